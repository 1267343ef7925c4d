//! The change feed on Citus: a listener on the coordinator listens on every
//! worker, merges their changes, and treats a worker lost, added or
//! restarted, or a shard moved, as a gap.

use trebuchet_postgres::{ChangeKind, Event, StateStore};

use super::{changes_by_actor, citus, shard_of, wait_for};
use crate::common;

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

/// A `StateCache` on a listener built on the coordinator, unchanged:
/// another store's single saves, bulk saves and deletes on actors of both
/// workers reach it, and after a gap on one worker (its listening backend
/// terminated while the other store writes) it converges again.
#[test]
fn a_state_cache_follows_every_worker_and_converges_after_a_gap() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let cache: trebuchet_postgres::StateCache<u32> =
        trebuchet_postgres::StateCache::new(&store, &listener).unwrap();
    let other = schema.store_builder().build().unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("cached-{i}")).collect();
    let mut client = schema.client().unwrap();
    let table = schema.table("actor_states");
    let ports: std::collections::BTreeSet<u16> = ids
        .iter()
        .map(|id| shard_of(db, &mut client, &table, id).1.port())
        .collect();
    assert_eq!(ports.len(), 2, "the actors are on both workers");
    for id in &ids {
        store.save(id, &0u32).unwrap();
        assert_eq!(cache.get(id).unwrap().as_deref(), Some(&0));
    }
    let converged = |what: &str| {
        wait_for(what, || {
            ids.iter().all(|id| {
                cache.get(id).unwrap().as_deref().copied() == store.load::<u32>(id).unwrap()
            })
        })
    };

    other.save(&ids[0], &1u32).unwrap();
    other
        .save_many(&[(ids[1].as_str(), 1u32), (ids[2].as_str(), 1u32)])
        .unwrap();
    assert!(other.delete(&ids[3]).unwrap());
    assert_eq!(
        other.delete_many(&[&ids[4], &ids[5]]).unwrap(),
        [true, true]
    );
    converged("the cache sees the other store's writes");
    assert_eq!(cache.get(&ids[3]).unwrap(), None);

    // A gap on the worker of ids[6]: it writes while nobody listens there.
    let (_, worker) = shard_of(db, &mut client, &table, &ids[6]);
    let mut on_worker = worker.connect_options().connect().unwrap();
    let listen = format!("LISTEN \"{}\"", schema.channel());
    on_worker
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1",
            &[&listen],
        )
        .unwrap();
    other.save(&ids[6], &2u32).unwrap();
    other.save(&ids[7], &2u32).unwrap();
    converged("the cache converges after the gap");
    assert_eq!(cache.get(&ids[6]).unwrap().as_deref(), Some(&2));
}
