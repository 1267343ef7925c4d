//! Monitoring against a real PostgreSQL: `stats` (the seed's Monitoring
//! section), `connection_info`, `notify_round_trip`, and the pool's waits.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use trebuchet_postgres::testing::{TestCluster, TestDatabase};
use trebuchet_postgres::{Event, PoolOptions, SlowStatements, StateStore};

/// Polls `check` for up to 60 s.
#[track_caller]
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stats_count_the_table_and_find_its_listeners() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    for id in ["a", "b", "c"] {
        store.save(id, &vec![1u8; 100]).unwrap();
    }
    store.delete("c").unwrap();

    let stats = store.stats().unwrap();
    assert_eq!(stats.actors, 2);
    assert_eq!(stats.tombstones, 1);
    assert!(stats.total_bytes > 0);
    assert_eq!(stats.channel, schema.channel());
    assert!(stats.listeners.is_empty(), "{:?}", stats.listeners);
    assert!((0.0..1.0).contains(&stats.notification_queue_usage));
    assert!(stats.server_connections >= 1);
    assert_eq!(stats.max_connections, 200);
    assert_eq!(stats.pool.max_size, 8);
    assert_eq!(stats.writes_per_second, None);
    // The shared test cluster has no pg_stat_statements.
    assert_eq!(stats.slow_statements, SlowStatements::NotInstalled);
    assert!(stats
        .slow_statements
        .to_string()
        .contains("CREATE EXTENSION pg_stat_statements"));

    let listener = store.listener().unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.listeners.len(), 1, "{:?}", stats.listeners);
    assert_eq!(stats.listeners[0].application_name, "trebuchet-postgres");
    assert_eq!(stats.listeners[0].user.as_deref(), Some("postgres"));
    listener.shutdown();
    eventually("the listener's session to end", || {
        store.stats().unwrap().listeners.is_empty()
    });
}

/// After a reconnect with catch-up, the listener's session is still found.
#[test]
fn a_listener_is_found_again_after_it_reconnects() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    let listener = store
        .listener_builder()
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .unwrap();
    let _filtered = listener.subscribe_actor("a");
    let pid = store.stats().unwrap().listeners[0].pid;
    let mut admin = schema.client().unwrap();
    admin
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&pid])
        .unwrap();
    eventually("the listener to reconnect", || {
        listener.health().reconnects == 1 && listener.health().connected
    });
    eventually("the new session to be listed", || {
        let listeners = store.stats().unwrap().listeners;
        listeners.len() == 1 && listeners[0].pid != pid
    });
}

#[test]
fn writes_per_second_over_a_window() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let store = store.clone();
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                store.save("hot", &n).unwrap();
                n += 1;
            }
        })
    };
    let before = store.stats().unwrap();
    // Backends report their counts about once a second, so a window on a
    // busy machine may see no report: measure again until one does.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut windows = 0;
    let stats = loop {
        let stats = store.stats_over(Duration::from_secs(2)).unwrap();
        windows += 1;
        if stats.writes_per_second.is_some_and(|rate| rate > 0.0) || Instant::now() > deadline {
            break stats;
        }
    };
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(stats.window, Some(Duration::from_secs(2)));
    let rate = stats.writes_per_second.expect("a rate over the window");
    assert!(rate > 0.0, "{rate} after {windows} windows");
    eprintln!("{rate:.0} writes per second (window {windows})");
    let since = stats.writes_per_second_since(&before).unwrap();
    assert!(since > 0.0, "{since}");
    assert_eq!(before.writes_per_second_since(&stats), None);
}

#[test]
fn slow_statements_come_from_pg_stat_statements() {
    // Installed but not preloaded: said so, with the server's reason. In a
    // database of its own, so that the other tests still see NotInstalled.
    let shared = TestDatabase::shared();
    let schema = shared.schema();
    let database = schema.name().to_owned();
    let mut admin = schema.client().unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .unwrap();
    {
        let mut options = shared.connect_options();
        options.dbname(&database);
        let store = StateStore::builder()
            .connect_options(options)
            .pool_options(PoolOptions::default().max_size(2))
            .migrate(true)
            .build()
            .unwrap();
        let mut config: postgres::Config = shared.url().parse().unwrap();
        config.dbname(&database);
        let mut client = config.connect(postgres::NoTls).unwrap();
        client
            .batch_execute("CREATE EXTENSION pg_stat_statements")
            .unwrap();
        match store.stats().unwrap().slow_statements {
            SlowStatements::Unavailable(reason) => {
                assert!(reason.contains("shared_preload_libraries"), "{reason}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    admin
        .batch_execute(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
        .unwrap();

    // Preloaded and installed: the statements on the table, slowest first.
    let cluster = TestCluster::start_with(&[
        ("fsync", "off"),
        ("shared_preload_libraries", "pg_stat_statements"),
    ])
    .unwrap();
    let store = StateStore::builder()
        .connect_options(cluster.connect_options())
        .migrate(true)
        .build()
        .unwrap();
    let mut client = postgres::Client::connect(&cluster.url(), postgres::NoTls).unwrap();
    client
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .unwrap();
    for n in 0..20u32 {
        store.save("a", &n).unwrap();
        store.load::<u32>("a").unwrap();
    }
    let SlowStatements::Found(found) = store.stats().unwrap().slow_statements else {
        panic!("expected statements");
    };
    assert!(!found.is_empty());
    assert!(found.len() <= 10);
    assert!(found.iter().all(|s| s.query.contains("actor_states")));
    assert!(found.iter().any(|s| s.calls >= 20), "{found:?}");
    assert!(found.windows(2).all(|w| w[0].mean >= w[1].mean));
}

#[test]
fn connection_info_reports_the_session_and_missing_privileges() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let info = store.connection_info().unwrap();
    assert_eq!(info.user, "postgres");
    assert_eq!(info.database, "postgres");
    assert_eq!(info.tls, None);
    assert!(info.table_exists);
    assert!(info.missing_privileges.is_empty());
    assert!(info.missing_tombstone_privileges.is_empty());
    assert!(!info.server_version.is_empty());

    let role = format!("{}_reader", schema.name());
    let mut admin = schema.client().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; \
             GRANT USAGE ON SCHEMA \"{s}\" TO \"{role}\"; \
             GRANT SELECT ON \"{s}\".actor_states TO \"{role}\"",
            s = schema.name()
        ))
        .unwrap();
    {
        let mut options = schema.connect_options();
        options.user(&role);
        let reader = schema
            .store_builder()
            .connect_options(options)
            .build()
            .unwrap();
        let info = reader.connection_info().unwrap();
        assert_eq!(info.user, role);
        assert_eq!(info.missing_privileges, ["INSERT", "UPDATE", "DELETE"]);
        assert_eq!(
            info.missing_tombstone_privileges,
            ["SELECT", "INSERT", "UPDATE"]
        );
        assert_eq!(
            info.tombstone_table,
            format!("\"{}\".\"actor_states_tombstones\"", schema.name())
        );
    }
    admin
        .batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""))
        .unwrap();

    let missing = schema
        .store_builder()
        .table(schema.table("nothing_here"))
        .build()
        .unwrap();
    let info = missing.connection_info().unwrap();
    assert!(!info.table_exists);
    assert!(info.missing_privileges.is_empty());
    let err = missing.stats().unwrap_err();
    assert!(
        matches!(err, trebuchet_postgres::Error::SchemaMissing { .. }),
        "{err:?}"
    );
}

#[test]
fn a_probe_comes_back_and_listeners_skip_it() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let events = listener.subscribe();
    let timeout = Duration::from_secs(60);
    let rtt = store
        .notify_round_trip(timeout)
        .unwrap()
        .expect("the probe comes back");
    // The time it reports is within the time it was given.
    assert!(rtt < timeout, "{rtt:?}");
    eprintln!("probe round trip {rtt:?}");
    eventually("the listener to receive the probe", || {
        listener.health().received >= 1
    });
    assert!(events.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(listener.health().malformed, 0);
    store.save("a", &1u8).unwrap();
    assert!(matches!(
        events.recv_timeout(Duration::from_secs(30)),
        Ok(Event::Change(_))
    ));
}

/// A load waits for the only connection, which a walk holds until the load
/// has given up: the pool counts one wait, one timeout, and at least the
/// connection timeout of waiting (no more than the load took).
#[test]
fn the_pool_counts_waits() {
    let connection_timeout = Duration::from_millis(500);
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .pool_options(
            PoolOptions::default()
                .max_size(1)
                .connection_timeout(connection_timeout),
        )
        .migrate(true)
        .build()
        .unwrap();
    store.save("a", &1u8).unwrap();
    let before = store.pool().state();
    assert_eq!(before.timeouts, 0);
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let walker = {
        let store = store.clone();
        thread::spawn(move || {
            store
                .raw()
                .for_each("", |_, _| {
                    let _ = entered_tx.send(());
                    // Bounded: a test that fails before releasing it ends.
                    let _ = released.recv_timeout(Duration::from_secs(60));
                    ControlFlow::Continue(())
                })
                .unwrap()
        })
    };
    entered
        .recv_timeout(Duration::from_secs(60))
        .expect("the walk holds the connection");
    let started = Instant::now();
    let err = store.load::<u8>("a").unwrap_err();
    let load_took = started.elapsed();
    assert!(
        matches!(err, trebuchet_postgres::Error::PoolExhausted { .. }),
        "{err:?}"
    );
    release.send(()).unwrap();
    walker.join().unwrap();
    let after = store.pool().state();
    let waited = after.wait_time - before.wait_time;
    eprintln!("the load took {load_took:?}, of which the pool counted {waited:?} waiting");
    assert_eq!(after.waits, before.waits + 1, "{before:?} -> {after:?}");
    assert_eq!(after.timeouts, 1, "{after:?}");
    assert!(waited >= connection_timeout, "{before:?} -> {after:?}");
    assert!(
        waited <= load_took,
        "{before:?} -> {after:?}: more than {load_took:?}"
    );
    assert_eq!(after.connections, 1);
    // The connection is back: the next load needs no wait.
    assert_eq!(store.load::<u8>("a").unwrap(), Some(1));
}
