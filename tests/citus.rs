//! The store on Citus (distributed PostgreSQL), on a throwaway cluster of a
//! coordinator and two workers on loopback: `migrate` distributes the tables
//! by `actor_id`, every single-actor statement is a router query to one
//! shard, and the operations keep their results.
//!
//! Without the extension installed these tests say they were skipped and
//! why (with `CI=true` they fail instead: `.ci/run` installs it).

#[path = "citus/bulk.rs"]
mod bulk;
mod common;
#[path = "citus/feed.rs"]
mod feed;
#[path = "citus/outcome.rs"]
mod outcome;
#[path = "citus/schema.rs"]
mod schema;

use std::sync::OnceLock;

use trebuchet_postgres::testing::{point_statements, TestCluster, TestDatabase};
use trebuchet_postgres::{ChangeKind, Event, Expected, StateStore};

/// The process's Citus cluster, or `None` (after saying why) when the
/// extension is not installed.
fn citus() -> Option<&'static TestDatabase> {
    static CLUSTER: OnceLock<TestDatabase> = OnceLock::new();
    if !common::citus_found() {
        return None;
    }
    Some(CLUSTER.get_or_init(|| {
        TestDatabase::citus_cluster(2).unwrap_or_else(|e| panic!("no Citus cluster: {e}"))
    }))
}

#[test]
fn single_actor_operations_keep_their_results() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    assert_eq!(store.save("room-1", &1u32).unwrap(), 1);
    assert_eq!(store.save("room-1", &2u32).unwrap(), 2);
    assert_eq!(store.load::<u32>("room-1").unwrap(), Some(2));
    assert_eq!(
        store
            .save_if("room-1", &3u32, Expected::Sequence(2))
            .unwrap(),
        3
    );
    let conflict = store
        .save_if("room-1", &4u32, Expected::Sequence(2))
        .unwrap_err();
    assert!(conflict.is_conflict(), "{conflict}");
    assert_eq!(store.save_if("room-2", &1u32, Expected::Absent).unwrap(), 1);
    assert_eq!(
        store
            .transform("room-1", |n: Option<u32>| n.unwrap_or(0) + 1)
            .unwrap()
            .sequence,
        4
    );
    assert!(store.delete("room-1").unwrap());
    assert!(!store.exists("room-1").unwrap());
    // Numbers continue above the delete.
    assert_eq!(store.save("room-1", &9u32).unwrap(), 6);
    assert_eq!(store.sequence("room-1").unwrap(), Some(6));
}

#[test]
fn every_single_actor_statement_is_a_router_query_to_one_shard() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store: StateStore = schema.store();
    let mut client = schema.client().unwrap();
    for (name, sql) in point_statements(&store) {
        let prepared = client.prepare(&sql).unwrap();
        let text = "room-1".to_owned();
        let state: Vec<u8> = vec![1];
        let number: Option<i64> = Some(1);
        let params = common::point_arguments(name, prepared.params(), &text, &state, &number);
        let mut tx = client.transaction().unwrap();
        let plan: String = tx
            .query(&format!("EXPLAIN {sql}"), &params)
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0) + "\n")
            .collect();
        tx.rollback().unwrap();
        assert!(
            plan.contains("Task Count: 1\n"),
            "{name} is not a query to one shard:\n{plan}"
        );
        assert!(
            plan.contains("Custom Scan (Citus Adaptive)") && !plan.contains("Distributed Subplan"),
            "{name} is not a router query:\n{plan}"
        );
    }
}

/// The next `n` events, which must be changes, by actor, each actor's in
/// the order received.
fn changes_by_actor(
    sub: &trebuchet_postgres::Subscription,
    n: usize,
) -> std::collections::HashMap<String, Vec<(u64, ChangeKind)>> {
    let mut seen: std::collections::HashMap<String, Vec<(u64, ChangeKind)>> = Default::default();
    for _ in 0..n {
        match sub.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Event::Change(c)) => seen
                .entry(c.actor_id.clone())
                .or_default()
                .push((c.sequence, c.kind)),
            other => panic!("expected a change, got {other:?}"),
        }
    }
    seen
}

/// The shard of `table` that holds `actor`, and the worker it is on.
fn shard_of<'a>(
    db: &'a TestDatabase,
    client: &mut postgres::Client,
    table: &str,
    actor: &str,
) -> (i64, &'a TestCluster) {
    let row = client
        .query_one(
            "SELECT shardid, nodeport FROM citus_shards WHERE table_name = $1::TEXT::regclass \
             AND shardid = get_shard_id_for_distribution_column($1::TEXT::regclass, $2::TEXT)",
            &[&table, &actor],
        )
        .unwrap();
    let (shard, port): (i64, i32) = (row.get(0), row.get(1));
    let worker = db
        .citus()
        .unwrap()
        .workers()
        .iter()
        .find(|w| i32::from(w.port()) == port)
        .unwrap();
    (shard, worker)
}

/// Polls `done` every 20 ms for up to 60 s.
#[track_caller]
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    common::wait_until(what, std::time::Duration::from_secs(60), &mut done);
}

#[test]
fn concurrent_saves_from_many_threads_each_get_their_own_numbers() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    // The default store: group commit on.
    let store = schema.store();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                (1..=50u64)
                    .map(|n| {
                        let id = format!("actor-{t}-{}", n % 4);
                        (id.clone(), store.save(&id, &n).unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        for (id, sequence) in t.join().unwrap() {
            let last = seen.insert(id.clone(), sequence).unwrap_or(0);
            assert_eq!(sequence, last + 1, "{id}");
        }
    }
}
