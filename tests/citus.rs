//! The store on Citus (distributed PostgreSQL), on a throwaway cluster of a
//! coordinator and two workers on loopback: `migrate` distributes the tables
//! by `actor_id`, every single-actor statement is a router query to one
//! shard, and the operations keep their results.
//!
//! Without the extension installed these tests say they were skipped and
//! why (with `CI=true` they fail instead: `.ci/run` installs it).

mod common;

use std::sync::OnceLock;

use trebuchet_postgres::testing::{citus_installed, point_statements, TestCluster, TestDatabase};
use trebuchet_postgres::{ChangeKind, Event, Expected, StateStore};

/// The process's Citus cluster, or `None` (after saying why) when the
/// extension is not installed.
fn citus() -> Option<&'static TestDatabase> {
    static CLUSTER: OnceLock<TestDatabase> = OnceLock::new();
    let installed = citus_installed();
    if !common::tool_found(
        installed.is_ok(),
        "the Citus extension",
        "../shared/citus/build.sh",
    ) {
        eprintln!("{}", installed.unwrap_err());
        return None;
    }
    Some(CLUSTER.get_or_init(|| {
        TestDatabase::citus_cluster(2).unwrap_or_else(|e| panic!("no Citus cluster: {e}"))
    }))
}

#[test]
fn migrate_distributes_both_tables_by_actor_id_in_one_colocation_group() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    // Migrating again changes nothing.
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    assert!(store.verify().unwrap().is_ok());
    let mut client = schema.client().unwrap();
    let rows = client
        .query(
            "SELECT logicalrelid::TEXT, column_to_column_name(logicalrelid, partkey), \
             colocationid FROM pg_dist_partition \
             WHERE logicalrelid::TEXT LIKE $1 || '.%' ORDER BY 1",
            &[&schema.name()],
        )
        .unwrap();
    let tables: Vec<(String, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(tables.len(), 2, "{tables:?}");
    for (table, column, _) in &tables {
        assert_eq!(column, "actor_id", "{table} is distributed by {column}");
    }
    assert_eq!(tables[0].2, tables[1].2, "not co-located: {tables:?}");
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

/// The nodes holding the shards of `table`, as `host:port`.
fn shard_nodes(client: &mut postgres::Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT DISTINCT nodename::TEXT || ':' || nodeport::TEXT FROM citus_shards \
             WHERE table_name = $1::TEXT::regclass ORDER BY 1",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn a_listener_on_the_coordinator_hears_changes_on_every_worker_in_order() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    let nodes = shard_nodes(&mut client, &schema.table("actor_states"));
    assert_eq!(
        nodes.len(),
        2,
        "the shards should be on both workers: {nodes:?}"
    );
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    // Enough actors that both workers hold some.
    let ids: Vec<String> = (0..40).map(|i| format!("actor-{i}")).collect();
    for id in &ids {
        store.save(id, &1u32).unwrap();
        store.save(id, &2u32).unwrap();
    }
    for id in &ids[..5] {
        assert!(store.delete(id).unwrap());
    }
    let seen = changes_by_actor(&changes, ids.len() * 2 + 5);
    for (i, id) in ids.iter().enumerate() {
        let mut expected = vec![(1, ChangeKind::Saved), (2, ChangeKind::Saved)];
        if i < 5 {
            expected.push((3, ChangeKind::Deleted));
        }
        assert_eq!(seen.get(id), Some(&expected), "{id}");
    }
}

#[test]
fn an_announce_on_the_coordinator_reaches_every_listener() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    store.save("room-1", &1u32).unwrap();
    let first = store.listener().unwrap();
    let second = store.listener().unwrap();
    let (a, b) = (first.subscribe(), second.subscribe());
    first.announce("room-1").unwrap();
    for sub in [&a, &b] {
        common::expect_change(sub, "room-1", 1, ChangeKind::Announced);
    }
}

#[test]
fn verify_checks_the_distribution_and_the_triggers_on_every_shard() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");

    // Disable the change trigger on one shard, on the worker that holds it.
    let mut client = schema.client().unwrap();
    let (shard, worker) = shard_of(db, &mut client, &schema.table("actor_states"), "x");
    let port = worker.port();
    let mut on_worker = worker.connect_options().connect().unwrap();
    on_worker
        .batch_execute(&format!(
            "SET citus.enable_manual_changes_to_shards = on; \
             ALTER TABLE \"{}\".actor_states_{shard} \
             DISABLE TRIGGER actor_state_change_trigger_{shard}",
            schema.name()
        ))
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{report}");
    let text = report.to_string();
    assert!(
        text.contains(&format!("shard {shard} on 127.0.0.1:{port}"))
            && text.contains("actor_state_change_trigger"),
        "{text}"
    );
}

/// Polls `done` every 20 ms for up to 60 s.
#[track_caller]
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    common::wait_until(what, std::time::Duration::from_secs(60), &mut done);
}

/// A write whose reply is lost while the worker holds its COMMIT: what the
/// store reports is what the worker did. (Stopping the coordinator's process
/// makes Citus cancel the worker's work, so here the write is found not
/// applied; the store also waits for the worker's processes to end, which
/// this test cannot show apart.)
#[test]
fn a_lost_reply_while_the_worker_commits_is_settled_truthfully() {
    use trebuchet_postgres::testing::TcpProxy;
    use trebuchet_postgres::PoolOptions;

    let Some(db) = citus() else { return };
    let schema = db.schema();
    let direct = schema.store();
    assert_eq!(direct.save("x", &1u32).unwrap(), 1);
    let table = schema.table("actor_states");

    // On the worker that holds "x", its shard's commits wait for an
    // advisory lock the test holds: a COMMIT the coordinator has sent is
    // then still to come on the worker.
    let mut client = schema.client().unwrap();
    let (shard, worker) = shard_of(db, &mut client, &table, "x");
    let lock: i64 = 0x7465_7374_6c6f_636b;
    // Made on the coordinator, which gives it to every node.
    client
        .batch_execute(&format!(
            "CREATE FUNCTION \"{s}\".slow_commit() RETURNS TRIGGER AS $$ \
             BEGIN PERFORM pg_advisory_xact_lock({lock}); RETURN NULL; END $$ LANGUAGE plpgsql",
            s = schema.name()
        ))
        .unwrap();
    let mut on_worker = worker.connect_options().connect().unwrap();
    on_worker
        .batch_execute(&format!(
            "SET citus.enable_manual_changes_to_shards = on; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE \
             ON \"{s}\".actor_states_{shard} DEFERRABLE INITIALLY DEFERRED \
             FOR EACH ROW EXECUTE FUNCTION \"{s}\".slow_commit(); \
             SELECT pg_advisory_lock({lock})",
            s = schema.name()
        ))
        .unwrap();

    let proxy = TcpProxy::start(db.citus().unwrap().coordinator().port()).unwrap();
    let mut options = schema.connect_options();
    options.port(proxy.port());
    let store = StateStore::builder()
        .connect_options(options)
        .table(table.clone())
        .channel(schema.channel())
        .group_commit(false)
        .pool_options(PoolOptions::default().max_size(1).min_idle(Some(0)))
        .build()
        .unwrap();
    let saving = std::thread::spawn(move || store.save("x", &2u32));

    // The worker holds the COMMIT: cut the client's connection.
    let mut watch_worker = worker.connect_options().connect().unwrap();
    wait_for("the worker's commit waits for the lock", || {
        watch_worker
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND NOT granted)",
                &[],
            )
            .unwrap()
            .get(0)
    });
    proxy.sever_all();
    // Once the store has stopped the coordinator's process, the worker may
    // commit.
    wait_for("the coordinator's process is gone", || {
        client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE state = 'active' \
                 AND query LIKE 'INSERT INTO %' AND query LIKE '%' || $1 || '%')",
                &[&schema.name()],
            )
            .unwrap()
            .get(0)
    });
    on_worker
        .batch_execute(&format!("SELECT pg_advisory_unlock({lock})"))
        .unwrap();
    let saved = saving.join().unwrap();
    wait_for("the worker's process is done", || {
        watch_worker
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND NOT granted)",
                &[],
            )
            .unwrap()
            .get(0)
    });
    let stored = direct.load_versioned::<u32>("x").unwrap().unwrap();
    match saved {
        Ok(sequence) => assert_eq!((stored.sequence, stored.value), (sequence, 2)),
        Err(e) if e.is_not_applied() => assert_eq!(
            (stored.sequence, stored.value),
            (1, 1),
            "reported not applied ({e}), but the worker committed it"
        ),
        // The workers' processes end once the lock is released: the
        // outcome is found out, not left unknown.
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn migrating_a_table_made_before_distribution_distributes_it_and_loses_nothing() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    // A table as one server had it (say, restored from a dump onto the
    // coordinator): the migrations applied by hand, not distributed.
    let mut client = schema.client().unwrap();
    let sql = StateStore::builder()
        .table(schema.table("actor_states"))
        .channel(schema.channel())
        .migration_sql()
        .unwrap();
    client.batch_execute(&sql).unwrap();
    let table = schema.table("actor_states");
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (actor_id, state, sequence_number) \
             SELECT 'actor-' || i, '\\x01'::BYTEA, i FROM generate_series(1, 500) i; \
             DELETE FROM {table} WHERE actor_id IN ('actor-1', 'actor-2')"
        ))
        .unwrap();
    let before: Vec<(String, i64)> = client
        .query(
            &format!("SELECT actor_id::TEXT, sequence_number FROM {table} ORDER BY 1"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(before.len(), 498);

    let store = schema.store();
    assert!(store.verify().unwrap().is_ok());
    let after: Vec<(String, i64)> = client
        .query(
            &format!("SELECT actor_id::TEXT, sequence_number FROM {table} ORDER BY 1"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(after, before);
    let shards: i64 = client
        .query_one(
            "SELECT count(*) FROM citus_shards WHERE table_name = $1::TEXT::regclass",
            &[&table],
        )
        .unwrap()
        .get(0);
    assert!(shards > 1, "{shards} shards");
    // Numbers go on, above the tombstones the deletes left.
    assert_eq!(store.save("actor-2", &1u32).unwrap(), 4);
    assert_eq!(store.save("actor-7", &1u32).unwrap(), 8);
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

/// The next event within 60 s, which must be a resync.
#[track_caller]
fn expect_resync(sub: &trebuchet_postgres::Subscription) {
    match sub.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Event::Resync(_)) => {}
        other => panic!("expected a resync, got {other:?}"),
    }
}

#[test]
fn a_workers_listening_backend_terminated_is_a_gap_then_its_changes_flow_again() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    let (_, worker) = shard_of(db, &mut client, &schema.table("actor_states"), "x");
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    store.save("x", &1u32).unwrap();
    common::expect_change(&changes, "x", 1, ChangeKind::Saved);

    let mut on_worker = worker.connect_options().connect().unwrap();
    let listen = format!("LISTEN \"{}\"", schema.channel());
    let ended: i64 = on_worker
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM \
             (SELECT pid FROM pg_stat_activity WHERE query = $1 OFFSET 0) listening",
            &[&listen],
        )
        .unwrap()
        .get(0);
    assert_eq!(ended, 1, "one listening backend on the worker");
    expect_resync(&changes);
    // Listening again on the worker: its changes arrive.
    wait_for("the listener listens on the worker again", || {
        on_worker
            .query_one(
                "SELECT count(*) = 1 FROM pg_stat_activity WHERE query = $1",
                &[&listen],
            )
            .unwrap()
            .get(0)
    });
    store.save("x", &2u32).unwrap();
    common::expect_change(&changes, "x", 2, ChangeKind::Saved);
}

#[test]
fn a_node_added_while_listening_is_listened_on_and_a_shard_moved_there_is_a_gap() {
    if citus().is_none() {
        return;
    }
    // A cluster of its own: nodes come and go.
    let mut cluster = trebuchet_postgres::testing::TestCitusCluster::start(1).unwrap();
    let store = StateStore::builder()
        .connect_options(cluster.connect_options())
        .migrate(true)
        .build()
        .unwrap();
    let listener = store
        .listener_builder()
        .heartbeat(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(10),
        )
        .build()
        .unwrap();
    let changes = listener.subscribe();
    store.save("x", &1u32).unwrap();
    common::expect_change(&changes, "x", 1, ChangeKind::Saved);

    let old = cluster.workers()[0].port();
    let new = cluster.add_worker().unwrap().port();
    let mut on_new = cluster.workers()[1].connect_options().connect().unwrap();
    let listen = format!("LISTEN \"{}\"", store.channel());
    wait_for("the listener listens on the new node", || {
        on_new
            .query_one(
                "SELECT count(*) = 1 FROM pg_stat_activity WHERE query = $1",
                &[&listen],
            )
            .unwrap()
            .get(0)
    });
    // Move the shard of "x" (and its tombstones' shard) to the new node.
    let mut admin = cluster.connect_options().connect().unwrap();
    admin
        .execute(
            "SELECT citus_move_shard_placement(\
             get_shard_id_for_distribution_column('actor_states', 'x'), \
             '127.0.0.1', $1::INT4, '127.0.0.1', $2::INT4, shard_transfer_mode => 'block_writes')",
            &[&i32::from(old), &i32::from(new)],
        )
        .unwrap();
    expect_resync(&changes);
    store.save("x", &2u32).unwrap();
    common::expect_change(&changes, "x", 2, ChangeKind::Saved);
    let node: i32 = admin
        .query_one(
            "SELECT nodeport FROM citus_shards WHERE shardid = \
             get_shard_id_for_distribution_column('actor_states', 'x')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(node, i32::from(new), "the change came from the new node");
}

#[test]
fn a_worker_restarted_under_load_loses_nothing_acknowledged_and_subscribers_resync() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use trebuchet_postgres::testing::StopMode;

    if citus().is_none() {
        return;
    }
    // A cluster of its own: a worker restarts.
    let cluster = trebuchet_postgres::testing::TestCitusCluster::start(2).unwrap();
    let store = StateStore::builder()
        .connect_options(cluster.connect_options())
        .migrate(true)
        .build()
        .unwrap();
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (store, stop, acknowledged) =
                (store.clone(), Arc::clone(&stop), Arc::clone(&acknowledged));
            std::thread::spawn(move || {
                // Per actor: the last value and number a save returned.
                let mut last = std::collections::HashMap::new();
                let mut value = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    value += 1;
                    let id = format!("actor-{t}-{}", value % 8);
                    if let Ok(sequence) = store.save(&id, &value) {
                        last.insert(id, (value, sequence));
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                }
                last
            })
        })
        .collect();
    let progress = |what: &str, at_least: u64| {
        common::wait_until(what, std::time::Duration::from_secs(120), || {
            acknowledged.load(Ordering::Relaxed) >= at_least
        })
    };
    progress("the writers start", 50);
    let worker = &cluster.workers()[0];
    worker.stop(StopMode::Fast).unwrap();
    worker.restart().unwrap();
    let after = acknowledged.load(Ordering::Relaxed);
    progress("the writers go on after the restart", after + 200);
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        for (id, (value, sequence)) in writer.join().unwrap() {
            let stored = store.load_versioned::<u64>(&id).unwrap().unwrap();
            assert!(
                stored.sequence > sequence || (stored.sequence, stored.value) == (sequence, value),
                "{id}: save of {value} acknowledged at {sequence}, but the table has \
                 {} at {}",
                stored.value,
                stored.sequence
            );
        }
    }
    // The subscriber was told of the gap.
    loop {
        match changes.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Event::Resync(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("no resync after the worker's restart: {e}"),
        }
    }
}

#[test]
fn stats_sum_the_figures_of_every_shard() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    for i in 0..100u32 {
        let id = format!("s{i:03}");
        store.save(&id, &i).unwrap();
        store.save(&id, &(i + 1)).unwrap();
    }
    let mut stats = store.stats().unwrap();
    // Backends report their counts about once a second.
    wait_for("the shards' writes are counted", || {
        stats = store.stats().unwrap();
        stats.writes.unwrap_or(0) >= 200
    });
    assert_eq!(stats.actors, 100);
    // The rows live on the workers: far more than the coordinator's empty
    // shell table (8 kB pages, 32 shards with their indexes).
    assert!(stats.total_bytes > 32 * 8192, "{}", stats.total_bytes);
    assert!(stats.dead_rows.unwrap() > 0, "{stats:?}");
    assert!(stats.hot_update_ratio.is_some(), "{stats:?}");
}

#[test]
fn bulk_saves_and_deletes_span_the_workers_and_are_announced_from_the_coordinator() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    // Enough actors that both workers hold some.
    let ids: Vec<String> = (0..20).map(|i| format!("bulk-{i}")).collect();
    let items: Vec<(&str, u32)> = ids.iter().map(|id| (id.as_str(), 1)).collect();
    assert_eq!(store.save_many(&items).unwrap(), vec![1; 20]);
    assert_eq!(store.save_many(&items).unwrap(), vec![2; 20]);
    let shards: std::collections::BTreeSet<i64> = ids
        .iter()
        .map(|id| shard_of(db, &mut client, &schema.table("actor_states"), id).0)
        .collect();
    assert!(shards.len() > 1, "the actors live on one shard: {shards:?}");
    let mut gone: Vec<&str> = ids[..10].iter().map(String::as_str).collect();
    gone.push("never-saved");
    let deleted = store.delete_many(&gone).unwrap();
    assert_eq!(deleted, [vec![true; 10], vec![false]].concat());
    // Numbers go on above the deletes, through a bulk save too.
    assert_eq!(store.save_many(&items[..1]).unwrap(), vec![4]);
    assert_eq!(store.save(&ids[10], &9u32).unwrap(), 3);

    // Every change was announced, each actor's in order.
    let seen = changes_by_actor(&changes, 20 + 20 + 10 + 1 + 1);
    assert_eq!(
        seen[&ids[0]],
        [
            (1, ChangeKind::Saved),
            (2, ChangeKind::Saved),
            (3, ChangeKind::Deleted),
            (4, ChangeKind::Saved)
        ]
    );
    assert_eq!(
        seen[&ids[10]],
        [
            (1, ChangeKind::Saved),
            (2, ChangeKind::Saved),
            (3, ChangeKind::Saved)
        ]
    );
    assert_eq!(seen[&ids[19]].len(), 2);
    // A change raised on the coordinator names the table as the trigger does.
    let raw = store.listener().unwrap();
    let one = raw.subscribe();
    store.save_many(&items[..1]).unwrap();
    match one.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Event::Change(c)) => {
            assert_eq!(
                c.table.as_deref(),
                Some(schema.table("actor_states").as_str())
            )
        }
        other => panic!("expected a change, got {other:?}"),
    }
}

#[test]
fn the_sweeper_and_the_tombstone_purge_work_across_the_shards() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    let table = schema.table("actor_states");
    let ids: Vec<String> = (0..12).map(|i| format!("e{i:02}")).collect();
    for id in &ids {
        store
            .save_with(
                id,
                &1u32,
                trebuchet_postgres::WriteOptions::new().ttl(std::time::Duration::from_millis(200)),
            )
            .unwrap();
    }
    store.save("kept", &1u32).unwrap();
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    let expiring: Vec<&str> = ids.iter().map(String::as_str).collect();
    common::wait_expired(&mut client, &table, &expiring);

    let sweep = store.sweep_expired(5).unwrap();
    assert_eq!((sweep.removed, sweep.busy), (12, false), "{sweep:?}");
    assert_eq!(store.count_actors("").unwrap(), 1);
    let seen = changes_by_actor(&changes, 12);
    for id in &ids {
        assert_eq!(seen[id], [(2, ChangeKind::Deleted)], "{id}");
    }
    // The tombstones keep the numbers; purging forgets them.
    assert_eq!(store.save(&ids[0], &1u32).unwrap(), 3);
    assert_eq!(
        store.purge_tombstones(std::time::Duration::ZERO).unwrap(),
        12
    );
}

#[test]
fn restores_reproduce_versions_and_never_go_backwards_across_the_shards() {
    use std::ops::ControlFlow;
    use trebuchet_postgres::{RestoreOutcome, Versioned};

    let Some(db) = citus() else { return };
    let source = db.schema();
    let source = source.store();
    let ids: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        for round in 0..=(i as u32 % 3) {
            source.save(id, &round).unwrap();
        }
    }
    let mut exported: Vec<(String, Versioned<Vec<u8>>)> = Vec::new();
    source
        .raw()
        .for_each("", |id, v| {
            exported.push((id, v));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(exported.len(), 10);

    let target_schema = db.schema();
    let target = target_schema.store();
    let listener = target.listener().unwrap();
    let changes = listener.subscribe();
    let outcomes = target.raw().restore_many(&exported).unwrap();
    assert_eq!(outcomes, vec![RestoreOutcome::Written; 10]);
    for (id, v) in &exported {
        assert_eq!(
            &target.raw().load_versioned(id).unwrap().unwrap(),
            v,
            "{id}"
        );
    }
    // Each restored row is announced at its number.
    let seen = changes_by_actor(&changes, 10);
    for (id, v) in &exported {
        assert_eq!(seen[id], [(v.sequence, ChangeKind::Saved)], "{id}");
    }
    // Idempotent; never below a newer version or a tombstone.
    assert_eq!(
        target.raw().restore_many(&exported).unwrap(),
        vec![RestoreOutcome::Unchanged; 10]
    );
    let (newer, deleted) = (&exported[0].0, &exported[1].0);
    let newer_at = target.save(newer, &99u32).unwrap();
    assert!(target.delete(deleted).unwrap());
    let outcomes = target.raw().restore_many(&exported[..2]).unwrap();
    assert_eq!(
        outcomes,
        [
            RestoreOutcome::Superseded { current: newer_at },
            RestoreOutcome::Deleted {
                current: exported[1].1.sequence + 1
            },
        ]
    );
}

#[test]
fn conditional_bulk_saves_give_each_item_its_outcome_across_the_shards() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    let ids: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    for id in &ids[..4] {
        store.save(id, &1u32).unwrap();
    }
    store.delete(&ids[3]).unwrap();
    let items: Vec<(&str, u32, Expected)> = vec![
        (&ids[0], 2, Expected::Sequence(1)), // right
        (&ids[1], 2, Expected::Sequence(5)), // wrong number
        (&ids[2], 2, Expected::Absent),      // exists
        (&ids[3], 2, Expected::Absent),      // deleted: created above its tombstone
        (&ids[4], 2, Expected::Absent),      // new
        (&ids[5], 2, Expected::Sequence(1)), // absent
        (&ids[6], 2, Expected::Absent),      // new
        (&ids[7], 2, Expected::Absent),      // new
    ];
    let results = store.save_many_if(&items).unwrap();
    let summary: Vec<Result<u64, Option<u64>>> = results
        .iter()
        .map(|r| match r {
            Ok(sequence) => Ok(*sequence),
            Err(e) => {
                assert!(e.is_conflict(), "{e}");
                Err(match e {
                    trebuchet_postgres::Error::Conflict { actual, .. } => *actual,
                    other => panic!("{other}"),
                })
            }
        })
        .collect();
    assert_eq!(
        summary,
        [
            Ok(2),
            Err(Some(1)),
            Err(Some(1)),
            Ok(3),
            Ok(1),
            Err(None),
            Ok(1),
            Ok(1)
        ]
    );
    // The writes were announced, from the coordinator.
    let seen = changes_by_actor(&changes, 4 + 1 + 5);
    assert_eq!(seen[&ids[0]].last(), Some(&(2, ChangeKind::Saved)));
    assert_eq!(seen[&ids[3]].last(), Some(&(3, ChangeKind::Saved)));
    assert_eq!(seen[&ids[7]], [(1, ChangeKind::Saved)]);
}

#[test]
fn listing_counting_and_walking_see_every_shard_in_key_order() {
    use std::ops::ControlFlow;

    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let ids: Vec<String> = (0..30).map(|i| format!("p{i:02}")).collect();
    let items: Vec<(&str, u32)> = ids.iter().map(|id| (id.as_str(), 1)).collect();
    store.save_many(&items).unwrap();
    store.save("other", &1u32).unwrap();

    assert_eq!(store.count_actors("p").unwrap(), 30);
    // Pages of 7, resumed after each page's last id: every id once, in
    // key order, though the rows are spread over the shards.
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_actors("p", after.as_deref(), 7).unwrap();
        listed.extend(page.actors.iter().map(|a| a.actor_id.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(listed, ids);
    // The walk (what export runs) too.
    let mut walked = Vec::new();
    let visited = store
        .raw()
        .for_each("p", |id, v| {
            assert_eq!(v.sequence, 1);
            walked.push(id);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!((visited, walked), (30, ids));
}
