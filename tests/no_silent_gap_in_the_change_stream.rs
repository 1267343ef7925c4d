//! Guarantee 4 of the design, **No silent gap in the change stream**:
//!
//! > After the listener loses its connection, lags behind, or drops events
//! > for a slow subscriber, the affected subscribers get an explicit `Resync`
//! > (or equivalent) before anything else, so a cache knows to reload.
//! > Deletes are announced too. Per actor, sequence numbers only grow.
//!
//! The tests of this file, against a real PostgreSQL: saves and deletes are
//! announced in order (`delivers_inserts_updates_and_deletes_in_order`); a
//! terminated backend and a fast or an immediate server restart end in a
//! `Resync` for unfiltered subscribers and an exact catch-up for filtered
//! ones (`terminated_backend_reconnects_with_resync_and_exact_catch_up`,
//! `reconnects_after_a_fast_server_restart`,
//! `reconnects_after_an_immediate_server_restart`); a `StateCache` converges
//! after the writes and deletes its listener missed
//! (`cache_converges_after_writes_deletes_and_a_lost_connection`,
//! `cache_serves_held_actors_while_the_server_is_down_and_converges_after_a_restart`).
//! Every test that receives changes checks that no subscriber ever sees an
//! actor's sequence number go backwards (or repeat).
//!
//! A subscriber that lags gets its `Resync` in
//! tests/a_slow_subscriber_hurts_only_itself.rs, a listener behind a stalled
//! network in tests/nothing_is_lost_on_a_fault.rs
//! (`faults::unreachable_server`), and listeners under a write load cut by
//! restarts in the same file (`faults`).
//!
//! The randomised history suite (`tests/history/`, the `history` test
//! target) checks this guarantee too.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use trebuchet_postgres::crossbeam_channel::TryRecvError;
use trebuchet_postgres::testing::{StopMode, TestCluster, TestDatabase};
use trebuchet_postgres::{
    ChangeKind, Error, Event, PoolOptions, ResyncReason, StateCache, StateStore,
};

use common::assert_recent;
use common::feed::{
    backends, exclusive, expect_change, expect_quiet, listener_backend, named_listener, next,
    next_within, terminate, unique_app_name, Order, WAIT,
};

/// How long a test waits for a listener to come back after a server restart.
const RESTART_WAIT: Duration = Duration::from_secs(60);

/// A store on a cluster of the test's own (default table and channel),
/// whose calls give up after 2 s while the server is down.
fn cluster_store(cluster: &TestCluster, migrate: bool) -> StateStore {
    StateStore::builder()
        .connect_options(cluster.connect_options())
        .pool_options(PoolOptions::default().connection_timeout(Duration::from_secs(2)))
        .migrate(migrate)
        .build()
        .expect("connect to the test's own cluster")
}

// ----- delivery --------------------------------------------------------------

#[test]
fn delivers_inserts_updates_and_deletes_in_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    assert_eq!(listener.channel(), schema.channel());
    let sub = listener.subscribe();
    let mut order = Order::new("subscriber");

    assert_eq!(store.save("room-1", &1u32).unwrap(), 1); // insert
    assert_eq!(store.save("room-1", &2u32).unwrap(), 2); // update
    assert!(store.delete("room-1").unwrap());
    assert_eq!(store.save("room-1", &3u32).unwrap(), 4); // created again

    for (sequence, kind) in [
        (1, ChangeKind::Saved),
        (2, ChangeKind::Saved),
        (3, ChangeKind::Deleted),
        (4, ChangeKind::Saved),
    ] {
        let c = expect_change(&sub, &mut order, "room-1", sequence, kind);
        assert_recent("change timestamp", c.timestamp);
    }
    expect_quiet(&sub, "subscriber");

    let health = listener.health();
    assert!(health.connected, "{health:?}");
    assert_eq!(health.received, 4, "{health:?}");
    assert_eq!(
        (health.malformed, health.dropped, health.reconnects),
        (0, 0, 0),
        "{health:?}"
    );
    assert_eq!(health.subscribers, 1, "{health:?}");
}

// ----- a terminated backend --------------------------------------------------

#[test]
fn terminated_backend_reconnects_with_resync_and_exact_catch_up() {
    let _alone = exclusive();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let app = unique_app_name("terminate");
    let listener = named_listener(
        &schema,
        &store,
        &app,
        (Duration::from_millis(500), Duration::from_secs(1)),
    );
    let all = listener.subscribe();
    let some = listener.subscribe_actors(["a", "b", "c", "e"]);
    let (mut oall, mut osome) = (Order::new("everything"), Order::new("a, b, c, e"));

    for id in ["a", "b", "c"] {
        assert_eq!(store.save(id, &1u32).unwrap(), 1);
    }
    for id in ["a", "b", "c"] {
        expect_change(&all, &mut oall, id, 1, ChangeKind::Saved);
        expect_change(&some, &mut osome, id, 1, ChangeKind::Saved);
    }

    let mut admin = schema.client().unwrap();
    let pid = listener_backend(&mut admin, &app);
    terminate(&mut admin, pid);

    // While the listener is away: a moves, b is deleted, e is created,
    // d (not in the filter) is created, c stays.
    assert_eq!(store.save("a", &2u32).unwrap(), 2);
    assert!(store.delete("b").unwrap());
    assert_eq!(store.save("e", &1u32).unwrap(), 1);
    assert_eq!(store.save("d", &1u32).unwrap(), 1);
    assert!(
        backends(&mut admin, &app).is_empty(),
        "the listener came back before the writes of the gap were done: \
         the test did not test a gap"
    );

    // The unfiltered subscriber: a resync first.
    match next(&all, &mut oall) {
        Event::Resync(ResyncReason::Reconnected) => {}
        other => panic!("expected a resync after the reconnect, got {other:?}"),
    }
    // New changes flow again, after the resync and nothing else.
    assert_eq!(store.save("c", &2u32).unwrap(), 2);
    expect_change(&all, &mut oall, "c", 2, ChangeKind::Saved);

    // The filtered subscriber: exactly the current versions of the actors
    // that moved, no resync, then the new change.
    let mut caught_up = HashMap::new();
    loop {
        match next(&some, &mut osome) {
            Event::Change(c) if c.actor_id == "c" => {
                assert_eq!((c.sequence, c.kind), (2, ChangeKind::Saved), "{c:?}");
                break;
            }
            Event::Change(c) => {
                assert_recent("catch-up timestamp", c.timestamp);
                let previous = caught_up.insert(c.actor_id.clone(), (c.sequence, c.kind));
                assert!(previous.is_none(), "caught up twice on {c:?}");
            }
            other => panic!("a filtered subscriber got {other:?} instead of catch-up"),
        }
    }
    let expected: HashMap<String, (u64, ChangeKind)> = [
        ("a".to_owned(), (2, ChangeKind::Saved)),
        ("b".to_owned(), (2, ChangeKind::Deleted)),
        ("e".to_owned(), (1, ChangeKind::Saved)),
    ]
    .into_iter()
    .collect();
    assert_eq!(caught_up, expected);

    expect_quiet(&all, "everything");
    assert_eq!(some.try_recv(), Err(TryRecvError::Empty));

    let health = listener.health();
    assert!(health.connected, "{health:?}");
    assert!(health.reconnects >= 1, "{health:?}");
    assert!(health.last_error.is_some(), "{health:?}");
    assert_eq!(health.subscribers, 2, "{health:?}");
}

// ----- server restarts -------------------------------------------------------

/// A listener on a cluster of the test's own survives `pg_ctl stop -m
/// <mode>` and a restart on the same port.
fn survives_a_restart(mode: StopMode) {
    let cluster = TestCluster::start().expect("start a cluster of the test's own");
    let store = cluster_store(&cluster, true);
    let listener = store
        .listener_builder()
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(250))
        .build()
        .unwrap();
    let all = listener.subscribe();
    let one = listener.subscribe_actor("r");
    let (mut oall, mut oone) = (Order::new("everything"), Order::new("r"));

    assert_eq!(store.save("r", &1u32).unwrap(), 1);
    expect_change(&all, &mut oall, "r", 1, ChangeKind::Saved);
    expect_change(&one, &mut oone, "r", 1, ChangeKind::Saved);

    cluster.stop(mode).expect("stop the cluster");
    common::wait_until("the listener notices the server is gone", WAIT, || {
        !listener.health().connected
    });
    // At least one reconnect fails on the stopped server.
    common::wait_until("a reconnect to the stopped server fails", WAIT, || {
        listener
            .health()
            .last_error
            .is_some_and(|e| e.contains("connection refused"))
    });
    assert!(!listener.health().connected);
    cluster.restart().expect("restart the cluster");

    match next_within(&all, &mut oall, RESTART_WAIT) {
        Event::Resync(ResyncReason::Reconnected) => {}
        other => panic!("expected a resync after the restart, got {other:?}"),
    }
    // The store's pooled connections died with the server; a fresh store
    // writes without first spending an error on each of them.
    let writer = cluster_store(&cluster, false);
    assert_eq!(writer.save("r", &2u32).unwrap(), 2);
    assert_eq!(writer.save("s", &1u32).unwrap(), 1);
    expect_change(&all, &mut oall, "r", 2, ChangeKind::Saved);
    expect_change(&all, &mut oall, "s", 1, ChangeKind::Saved);
    // Nothing of r moved in the gap: no catch-up, just the new change.
    expect_change(&one, &mut oone, "r", 2, ChangeKind::Saved);
    assert_eq!(one.try_recv(), Err(TryRecvError::Empty));

    let health = listener.health();
    assert!(health.connected, "{health:?}");
    assert!(health.reconnects >= 1, "{health:?}");
}

#[test]
fn reconnects_after_a_fast_server_restart() {
    survives_a_restart(StopMode::Fast);
}

#[test]
fn reconnects_after_an_immediate_server_restart() {
    survives_a_restart(StopMode::Immediate);
}

// ----- the state cache -------------------------------------------------------

#[test]
fn cache_converges_after_writes_deletes_and_a_lost_connection() {
    let _alone = exclusive();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let app = unique_app_name("cache");
    let listener = named_listener(
        &schema,
        &store,
        &app,
        (Duration::from_millis(500), Duration::from_secs(1)),
    );
    let cache: StateCache<u64> = StateCache::new(&store, &listener).unwrap();
    // Another store (its own pool) on the same table.
    let other = schema.store_builder().build().unwrap();

    store.save("p1", &10u64).unwrap();
    store.save("p2", &20u64).unwrap();
    assert_eq!(cache.get("p1").unwrap().as_deref(), Some(&10));
    assert_eq!(cache.get("p2").unwrap().as_deref(), Some(&20));
    assert_eq!(cache.get("p3").unwrap(), None);
    assert_eq!(cache.len(), 3);
    assert!(cache.contains("p3"));

    // A write from another store.
    other.save("p1", &11u64).unwrap();
    common::wait_until("the cache sees p1 = 11", WAIT, || {
        cache.get("p1").unwrap().as_deref() == Some(&11)
    });
    assert_eq!(cache.sequence("p1"), Some(2));

    // A delete, and a creation of an actor held as absent.
    other.delete("p2").unwrap();
    other.save("p3", &30u64).unwrap();
    common::wait_until("the cache sees p2 deleted and p3 created", WAIT, || {
        cache.get("p2").unwrap().is_none() && cache.get("p3").unwrap().as_deref() == Some(&30)
    });
    assert_eq!(cache.sequence("p2"), None);

    // The listener's connection is killed; writes in the gap are not
    // announced, and the resync after the reconnect reloads everything.
    let mut admin = schema.client().unwrap();
    let pid = listener_backend(&mut admin, &app);
    terminate(&mut admin, pid);
    other.save("p1", &12u64).unwrap();
    other.save("p2", &21u64).unwrap();
    other.delete("p3").unwrap();
    assert!(
        backends(&mut admin, &app).is_empty(),
        "the listener came back before the writes of the gap were done"
    );
    common::wait_until("the cache reloads after the reconnect", WAIT, || {
        cache.get("p1").unwrap().as_deref() == Some(&12)
            && cache.get("p2").unwrap().as_deref() == Some(&21)
            && cache.get("p3").unwrap().is_none()
    });
    assert!(listener.health().reconnects >= 1);

    // And it keeps following.
    other.save("p1", &13u64).unwrap();
    common::wait_until("the cache sees p1 = 13", WAIT, || {
        cache.get("p1").unwrap().as_deref() == Some(&13)
    });
}

#[test]
fn cache_serves_held_actors_while_the_server_is_down_and_converges_after_a_restart() {
    let cluster = TestCluster::start().expect("start a cluster of the test's own");
    let store = cluster_store(&cluster, true);
    let listener = store
        .listener_builder()
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(250))
        .build()
        .unwrap();
    let cache: StateCache<u64> = StateCache::new(&store, &listener).unwrap();

    store.save("held", &1u64).unwrap();
    store.save("absent-later", &5u64).unwrap();
    assert_eq!(cache.get("held").unwrap().as_deref(), Some(&1));
    assert_eq!(cache.get("absent-later").unwrap().as_deref(), Some(&5));
    assert_eq!(cache.get("missing").unwrap(), None);

    cluster.stop(StopMode::Fast).expect("stop the cluster");
    common::wait_until("the listener notices the server is gone", WAIT, || {
        !listener.health().connected
    });
    // Held entries, present or absent, come from memory: no server needed.
    assert_eq!(cache.get("held").unwrap().as_deref(), Some(&1));
    assert_eq!(cache.get("missing").unwrap(), None);
    // An actor not held needs the server, which is down.
    let err = cache.get("not-held").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect { .. } | Error::ConnectionLost(_) | Error::PoolExhausted { .. }
        ),
        "{err:?}"
    );
    assert!(!cache.contains("not-held"));

    cluster.restart().expect("restart the cluster");
    // Written as soon as the server is back, likely before the listener is:
    // either announced or reloaded after the resync.
    let writer = cluster_store(&cluster, false);
    writer.save("held", &2u64).unwrap();
    writer.delete("absent-later").unwrap();
    writer.save("missing", &7u64).unwrap();
    common::wait_until(
        "the cache converges after the restart",
        RESTART_WAIT,
        || {
            cache.get("held").ok().flatten().as_deref() == Some(&2)
                && cache.get("absent-later").ok().flatten().is_none()
                && cache.get("missing").ok().flatten().as_deref() == Some(&7)
        },
    );
    assert!(listener.health().connected);

    writer.save("held", &3u64).unwrap();
    common::wait_until("the cache follows after the restart", WAIT, || {
        cache.get("held").ok().flatten().as_deref() == Some(&3)
    });
}
