//! Writes whose reply is lost, on Citus: the store stops the coordinator's
//! process, and must then also wait for what that process left on the
//! workers (a statement still on its way, a transaction still prepared)
//! before it reads what landed.
//!
//! These tests put a [`HoldProxy`] between the coordinator and the worker of
//! a cluster of their own, one test at a time, so that the worker receives
//! work from a coordinator's process after that process is gone.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use trebuchet_postgres::testing::{ProxyRequest, TcpProxy, TestDatabase, TestSchema};
use trebuchet_postgres::{PoolOptions, StateStore};

use super::{citus, shard_of, wait_for};
use crate::common::hold::{HoldProxy, Release};

/// A cluster of a coordinator and one worker for this module's tests, which
/// take turns: each sends the coordinator's traffic to the worker through a
/// proxy of its own.
fn held_cluster() -> Option<MutexGuard<'static, TestDatabase>> {
    static CLUSTER: OnceLock<Mutex<TestDatabase>> = OnceLock::new();
    citus()?;
    let cluster = CLUSTER.get_or_init(|| {
        let db = TestDatabase::citus_cluster(1).unwrap_or_else(|e| panic!("no Citus cluster: {e}"));
        // The proxy reads the statements: the nodes talk without TLS.
        let mut client = db.connect_options().connect().unwrap();
        for statement in [
            "ALTER SYSTEM SET citus.node_conninfo = 'sslmode=disable'",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(statement).unwrap();
        }
        Mutex::new(db)
    });
    Some(cluster.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Makes the coordinator reach its worker through `proxy` (or directly for
/// `None`); connections already open stay where they are.
fn route_worker(db: &TestDatabase, proxy: Option<&HoldProxy>) {
    let worker = db.citus().unwrap().workers()[0].port();
    let port = proxy.map_or(worker, HoldProxy::port);
    let mut client = db.connect_options().connect().unwrap();
    client
        .execute(
            "SELECT citus_update_node(nodeid, '127.0.0.1', $1::INT4) FROM pg_dist_node \
             WHERE groupid <> 0",
            &[&i32::from(port)],
        )
        .unwrap();
    // The worker holds the node list too: bring it up to date now, not in
    // the background, where a test's DDL would find it out of sync.
    client
        .batch_execute("SELECT start_metadata_sync_to_all_nodes()")
        .unwrap();
}

/// A store on `schema` whose one connection to the coordinator goes through
/// `proxy`, so that cutting it loses a reply.
fn store_through(schema: &TestSchema, proxy: &TcpProxy) -> StateStore {
    let mut options = schema.connect_options();
    options.port(proxy.port());
    schema
        .store_builder()
        .connect_options(options)
        .group_commit(false)
        .pool_options(PoolOptions::default().max_size(1).min_idle(Some(0)))
        .build()
        .unwrap()
}

/// A write whose reply is lost while the worker holds its COMMIT: what the
/// store reports is what the worker did. (Stopping the coordinator's process
/// makes Citus cancel the worker's work, so here the write is found not
/// applied.)
#[test]
fn a_lost_reply_while_the_worker_commits_is_settled_truthfully() {
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
    let store = store_through(&schema, &proxy);
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
    // The workers' processes end once the lock is released: the outcome is
    // found out, not left unknown.
    assert_truthful(saved, direct.load_versioned("x").unwrap());
}

/// A save of 2 over 1 reported as what the table holds: saved at the
/// number it answered, or not applied with the table still at 1.
#[track_caller]
fn assert_truthful(
    saved: trebuchet_postgres::Result<u64>,
    stored: Option<trebuchet_postgres::Versioned<u32>>,
) {
    let stored = stored.map(|v| (v.sequence, v.value));
    match saved {
        Ok(sequence) => assert_eq!(stored, Some((sequence, 2))),
        Err(e) if e.is_not_applied() => assert_eq!(
            stored,
            Some((1, 1)),
            "reported not applied ({e}), but the write landed"
        ),
        Err(e) => panic!("the outcome was not found out: {e}"),
    }
}

/// The coordinator's process sent a save's statement to the worker, and
/// the client's connection broke; the statement reaches the worker only
/// after the store has stopped that process. The store waits for the
/// worker's process serving it (found by its global process id) to end, so
/// what it reports is what landed: here the save.
#[test]
fn a_statement_that_reaches_the_worker_after_the_coordinators_process_is_waited_for() {
    let Some(db) = held_cluster() else { return };
    let schema = db.schema();
    let direct = schema.store();
    let actor = crate::common::unique("late");
    assert_eq!(direct.save(&actor, &1u32).unwrap(), 1);

    let hold = HoldProxy::start(
        db.citus().unwrap().workers()[0].port(),
        &actor,
        Release::Deliver(Duration::from_millis(300)),
    )
    .unwrap();
    route_worker(&db, Some(&hold));
    let proxy = TcpProxy::start(db.citus().unwrap().coordinator().port()).unwrap();
    let store = store_through(&schema, &proxy);
    let saving = {
        let actor = actor.clone();
        std::thread::spawn(move || store.save(&actor, &2u32))
    };
    wait_for("the statement is held on its way to the worker", || {
        hold.held()
    });
    proxy.sever_all();
    let saved = saving.join().unwrap();
    wait_for("the held statement has reached the worker", || {
        hold.released()
    });
    route_worker(&db, None);
    // The worker's process has run what it was sent and ended.
    let mut worker = db.citus().unwrap().workers()[0]
        .connect_options()
        .connect()
        .unwrap();
    wait_for("the worker's late process has ended", || {
        worker
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE client_port = $1)",
                &[&i32::from(hold.held_port())],
            )
            .unwrap()
            .get(0)
    });
    assert_truthful(saved, direct.load_versioned(&actor).unwrap());
}

/// A save of two actors on two shards commits in two phases. The
/// coordinator has committed it, but its `COMMIT PREPARED` never reaches
/// the worker, and the client's reply to `COMMIT` is lost: the worker
/// holds the write prepared until the coordinator settles it. The store
/// has it settled before it reads, so it reports the save; the rows are
/// there once every prepared transaction is settled.
#[test]
fn a_write_left_prepared_on_a_worker_is_settled_before_its_outcome_is_read() {
    let Some(db) = held_cluster() else { return };
    let schema = db.schema();
    let direct = schema.store();
    let table = schema.table("actor_states");
    let mut client = schema.client().unwrap();
    let a = crate::common::unique("prepared-a");
    let b = (0..)
        .map(|n| format!("{a}-{n}"))
        .find(|b| {
            shard_of(&db, &mut client, &table, b).0 != shard_of(&db, &mut client, &table, &a).0
        })
        .unwrap();
    direct.save_many(&[(&a, &1u32), (&b, &1u32)]).unwrap();

    let hold = HoldProxy::start(
        db.citus().unwrap().workers()[0].port(),
        "COMMIT PREPARED",
        Release::Sever,
    )
    .unwrap();
    hold.arm(false);
    route_worker(&db, Some(&hold));
    let proxy = TcpProxy::start(db.citus().unwrap().coordinator().port()).unwrap();
    let store = store_through(&schema, &proxy);
    // Once, so that the store's statements are prepared before the cut.
    store.save_many(&[(&a, &2u32), (&b, &2u32)]).unwrap();
    hold.arm(true);
    proxy.cut_after(ProxyRequest::Commit);
    let saved = store.save_many(&[(&a, &3u32), (&b, &3u32)]);
    assert!(hold.held(), "the write did not commit in two phases");
    route_worker(&db, None);
    client
        .batch_execute("SELECT recover_prepared_transactions()")
        .unwrap();
    let stored: Vec<u32> = direct
        .load_many::<u32, _>(&[&a, &b])
        .unwrap()
        .into_iter()
        .map(|v| v.unwrap())
        .collect();
    match saved {
        Ok(_) => assert_eq!(stored, [3, 3]),
        Err(e) if e.is_not_applied() => assert_eq!(
            stored,
            [2, 2],
            "reported not applied ({e}), but the prepared write committed"
        ),
        Err(e) => panic!("the outcome was not found out: {e}"),
    }
}
