//! The server out of reach: a program started before its server waits for
//! it or fails clearly (refused, then 57P03 while the server starts up);
//! through a network that stalls (forwards nothing, closes nothing) a
//! listener notices and resyncs once it flows, and calls fail within their
//! timeouts.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::{returns_within, wait_until};
use trebuchet_postgres::testing::{StopMode, TcpProxy, TestCluster};
use trebuchet_postgres::{
    ChangeListener, ConnectFailure, ConnectOptions, Error, Event, PoolOptions, ResyncReason,
    StateStore,
};

use super::{store_on, RECOVERY};

// ----- the server starts after the program ------------------------------------

/// A store builder for `cluster` that may wait `wait` for its server.
fn late_store(cluster: &TestCluster, wait: Option<Duration>) -> Result<StateStore, Error> {
    let mut builder = StateStore::builder()
        .connect_options(cluster.connect_options())
        .migrate(true);
    if let Some(wait) = wait {
        builder = builder.wait_for_server(wait);
    }
    builder.build()
}

#[track_caller]
fn assert_connect_failure(result: Result<StateStore, Error>, expected: ConnectFailure) -> Error {
    match result {
        Err(e @ Error::Connect { failure, .. }) if failure == expected => e,
        Err(e) => panic!("expected {expected:?}, got {e} ({e:?})"),
        Ok(_) => panic!("expected {expected:?}, got a store"),
    }
}

#[test]
fn a_program_started_before_the_server_waits_or_fails_clearly() {
    let cluster = TestCluster::start().expect("cluster");
    cluster.stop(StopMode::Fast).expect("stop");

    // Without waiting: an error saying what is wrong.
    let (result, took) = {
        let cluster_options = cluster.connect_options();
        returns_within("a build without waiting", RECOVERY, move || {
            StateStore::builder()
                .connect_options(cluster_options)
                .migrate(true)
                .build()
        })
    };
    let e = assert_connect_failure(result, ConnectFailure::Refused);
    assert!(e.to_string().contains("is PostgreSQL running?"), "{e}");
    eprintln!("refused without waiting after {took:?}");

    // Waiting too briefly: the same error once the wait is over (and not
    // before: the wait is a lower bound).
    let wait = Duration::from_millis(700);
    let (result, took) = {
        let cluster_options = cluster.connect_options();
        returns_within("a build waiting 700 ms", RECOVERY, move || {
            StateStore::builder()
                .connect_options(cluster_options)
                .wait_for_server(wait)
                .migrate(true)
                .build()
        })
    };
    assert_connect_failure(result, ConnectFailure::Refused);
    assert!(
        took >= wait,
        "gave up after {took:?}, before the wait of {wait:?}"
    );
    eprintln!("refused after waiting {took:?} for {wait:?}");

    // Waiting long enough: the program starts first and gets its store
    // once the server is up.
    let program = {
        let options = cluster.connect_options();
        thread::spawn(move || {
            StateStore::builder()
                .connect_options(options)
                .wait_for_server(RECOVERY)
                .migrate(true)
                .build()
        })
    };
    thread::sleep(Duration::from_millis(800));
    assert!(!program.is_finished(), "the program did not wait");
    cluster.restart().expect("start the server late");
    let store = program.join().unwrap().expect("the program's store");
    assert_eq!(store.save("late", &1u32).unwrap(), 1);
}

#[test]
fn a_server_still_starting_up_is_waited_for() {
    let cluster = TestCluster::start().expect("cluster");
    cluster.stop(StopMode::Fast).expect("stop");
    cluster
        .restart_in_recovery()
        .expect("start the server, still in recovery");
    // The server answers, but refuses connections while it starts up.
    let refused = trebuchet_postgres::postgres::Client::connect(
        &cluster.url(),
        trebuchet_postgres::postgres::NoTls,
    )
    .map(drop)
    .expect_err("a server in recovery refuses connections");
    assert_eq!(
        refused.code(),
        Some(&trebuchet_postgres::postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{refused}"
    );

    // Without waiting: a clear error saying the server is not ready.
    let e = assert_connect_failure(late_store(&cluster, None), ConnectFailure::NotReady);
    assert!(e.to_string().contains("starting up"), "{e}");

    // Waiting: through 57P03 until the server is ready.
    let program = {
        let options = cluster.connect_options();
        thread::spawn(move || {
            StateStore::builder()
                .connect_options(options)
                .wait_for_server(RECOVERY)
                .migrate(true)
                .build()
        })
    };
    thread::sleep(Duration::from_millis(800));
    assert!(!program.is_finished(), "the program did not wait");
    cluster.promote().expect("end recovery");
    let store = program.join().unwrap().expect("the program's store");
    assert_eq!(store.save("late", &1u32).unwrap(), 1);
}

// ----- the network stalls -----------------------------------------------------

/// Connection options through `proxy` to `cluster`.
fn through(proxy: &TcpProxy, cluster: &TestCluster) -> ConnectOptions {
    let mut options = cluster.connect_options();
    options.port(proxy.port());
    options
}

#[test]
fn a_listener_notices_a_stalled_network_and_resyncs_once_it_flows() {
    let interval = Duration::from_millis(300);
    let timeout = Duration::from_millis(700);
    let cluster = TestCluster::start().expect("cluster");
    let direct = store_on(&cluster, true);
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let listener = ChangeListener::builder()
        .connect_options(through(&proxy, &cluster))
        .channel(direct.channel())
        .heartbeat(interval, timeout)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .expect("listener through the proxy");
    let changes = listener.subscribe();
    direct.save("a", &1u32).unwrap();
    match changes.recv_timeout(RECOVERY) {
        Ok(Event::Change(c)) => assert_eq!((c.actor_id.as_str(), c.sequence), ("a", 1)),
        other => panic!("expected the first change, got {other:?}"),
    }

    // The proxy keeps the connection open and forwards nothing: no error,
    // no close, no keepalive failure (the proxy's kernel acknowledges).
    // Nothing but the heartbeat can notice it: TCP keepalives are answered.
    proxy.stall();
    let stalled = Instant::now();
    wait_until("the listener notices the stall", RECOVERY, || {
        !listener.health().connected
    });
    eprintln!(
        "stall noticed after {:?} (heartbeat {interval:?} + {timeout:?})",
        stalled.elapsed()
    );
    let health = listener.health();
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("heartbeat")),
        "{health:?}"
    );
    direct.save("a", &2u32).unwrap(); // missed: the resync covers it

    // A listener built meanwhile fails by its connect timeout instead of
    // waiting for the network, which stays stalled until it has returned.
    let connect_timeout = Duration::from_millis(800);
    let mut options = through(&proxy, &cluster);
    options.connect_timeout(connect_timeout);
    let channel = direct.channel().to_owned();
    let (built, took) = returns_within("a listener's build", RECOVERY, move || {
        ChangeListener::builder()
            .connect_options(options)
            .channel(channel)
            .build()
    });
    match built {
        Err(Error::Connect {
            failure: ConnectFailure::Timeout,
            ..
        }) => {}
        other => panic!("expected a connect timeout, got {other:?}"),
    }
    eprintln!("listener build timed out after {took:?} (connect timeout {connect_timeout:?})");

    proxy.resume();
    match changes.recv_timeout(RECOVERY) {
        Ok(Event::Resync(ResyncReason::Reconnected)) => {}
        other => panic!("expected a resync once the network flows, got {other:?}"),
    }
    wait_until("the listener reconnects", RECOVERY, || {
        listener.health().connected
    });
    direct.save("a", &3u32).unwrap();
    match changes.recv_timeout(RECOVERY) {
        Ok(Event::Change(c)) => assert_eq!((c.actor_id.as_str(), c.sequence), ("a", 3)),
        other => panic!("expected the change after the resync, got {other:?}"),
    }
    // Shutdown still returns after all that.
    let ((), took) = returns_within("shutdown()", RECOVERY, move || listener.shutdown());
    eprintln!("shutdown returned after {took:?}");
}

#[test]
fn calls_through_a_stalled_network_fail_within_the_call_timeout() {
    let call_timeout = Duration::from_millis(800);
    let connect_timeout = Duration::from_millis(800);
    let connection_timeout = Duration::from_millis(1500);
    let outcome_timeout = Duration::from_millis(1500);
    // The most any one call should take while the network stalls (printed
    // beside what each took; the test waits longer before it fails): a call in
    // flight is cut after the call timeout; a later one may first check an
    // idle connection (up to the call timeout) and then wait for a new
    // connection (up to the connection timeout). A write whose connection
    // was cut then tries to find out whether it landed, on new connections
    // (each up to the connect timeout), for up to the outcome timeout.
    let read_bound = call_timeout * 2 + connection_timeout;
    let write_bound = read_bound + outcome_timeout + connect_timeout;
    let cluster = TestCluster::start().expect("cluster");
    let direct = store_on(&cluster, true);
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let mut options = through(&proxy, &cluster);
    options.connect_timeout(connect_timeout);
    let store = StateStore::builder()
        .connect_options(options)
        .pool_options(
            PoolOptions::default()
                .max_size(2)
                .call_timeout(Some(call_timeout))
                .connection_timeout(connection_timeout),
        )
        .outcome_timeout(outcome_timeout)
        .build()
        .expect("store through the proxy");
    store.save("a", &1u32).unwrap();
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));

    // The network stays stalled until every call below has returned: only
    // the timeouts end them.
    proxy.stall();
    let mut outcomes = Vec::new();
    for n in 2..8u32 {
        let caller = store.clone();
        let write = n % 2 == 0;
        let (result, took) = returns_within(&format!("call {n}"), RECOVERY, move || {
            if write {
                caller.save("a", &n).map(drop)
            } else {
                caller.load::<u32>("a").map(drop)
            }
        });
        let bound = if write { write_bound } else { read_bound };
        let e = result.expect_err("a call through a stalled network");
        assert!(e.is_connection(), "{e} ({e:?})");
        outcomes.push((took, bound, e.to_string()));
    }
    eprintln!("calls while stalled (took, bound, error): {outcomes:#?}");

    // A store built meanwhile fails by its connect timeout too.
    let mut options = through(&proxy, &cluster);
    options.connect_timeout(connect_timeout);
    let (built, took) = returns_within("a store's build", RECOVERY, move || {
        StateStore::builder().connect_options(options).build()
    });
    assert_connect_failure(built, ConnectFailure::Timeout);
    eprintln!("store build timed out after {took:?}");

    proxy.resume();
    // The same store recovers by itself.
    wait_until("calls succeed again", RECOVERY, || {
        store.save("a", &100u32).is_ok()
    });
    assert_eq!(store.load::<u32>("a").unwrap(), Some(100));
    // A save cut by the timeout may have been applied, but only whole.
    let stored: u32 = direct.load("a").unwrap().unwrap();
    assert_eq!(stored, 100);
}
