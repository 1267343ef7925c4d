//! Security against a real server: passwords kept out of every log line
//! (here), least privilege (a role with only SELECT, INSERT, UPDATE and
//! DELETE; `least_privilege`), hostile actor ids stored as data, and hostile
//! notification payloads sent by another client on the channel
//! (`hostile_input`).
//!
//! Covered elsewhere: TLS modes with a real certificate (`tls_modes_follow_libpq`)
//! and scram-sha-256 with a wrong password (`password_authentication_and_no_password_in_messages`)
//! in tests/connect.rs; hostile table, schema and channel names, and
//! undecodable stored bytes (`decode_fuzz`), in
//! tests/bad_input_gets_a_clear_error.rs.

#[path = "security/hostile_input.rs"]
mod hostile_input;
#[path = "security/least_privilege.rs"]
mod least_privilege;

use crate::common;

use common::{admin, rewrite_hba};

use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use trebuchet_postgres::postgres::Client;
use trebuchet_postgres::testing::TestCluster;
use trebuchet_postgres::{
    ChangeKind, ChangeListener, ConnectFailure, Error, Event, Pool, PoolOptions, StateCache,
    StateStore, Subscription,
};

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(60);

// ----- log capture -----------------------------------------------------------

/// Every log record of this test process (this crate's and the driver's),
/// formatted as a logger would print it.
struct Capture {
    lines: Mutex<Vec<String>>,
}

/// At most this many lines are kept; the rest are counted.
const MAX_LINES: usize = 500_000;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if UNLOGGED.with(|u| u.get()) {
            return;
        }
        let line = format!("{} {} {}", record.level(), record.target(), record.args());
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() < MAX_LINES {
            lines.push(line);
        }
    }

    fn flush(&self) {}
}

/// Installs the capturing logger at the most verbose level (once per
/// process) and returns it.
fn capture_logs() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture {
            lines: Mutex::new(Vec::new()),
        }));
        log::set_logger(capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
        capture
    })
}

thread_local! {
    /// Set while this thread runs the test's own statements that carry a
    /// password (the driver logs every statement it sends).
    static UNLOGGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs the test's own `sql`, which sets passwords, without capturing the
/// driver's log line of it: only what the library logs is scanned.
fn run_unlogged(client: &mut Client, sql: &str) {
    UNLOGGED.with(|u| u.set(true));
    let result = client.batch_execute(sql);
    UNLOGGED.with(|u| u.set(false));
    result.unwrap();
}

impl Capture {
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

// ----- helpers -----------------------------------------------------------------

/// Every message of an error and its sources, joined.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(" / ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Display, Debug and the source chain of an error.
fn all_texts(err: &Error) -> String {
    format!("{err}\n{err:?}\n{}", chain(err))
}

#[track_caller]
fn next_event(sub: &Subscription) -> Event {
    sub.recv_timeout(WAIT)
        .unwrap_or_else(|e| panic!("no event within {WAIT:?}: {e:?}"))
}

/// Ends every session of `role` from the server side.
fn terminate_sessions(admin: &mut Client, role: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .unwrap()
        .get(0)
}

// ----- passwords never in a log line ----------------------------------------------

/// The password must not appear in any log line (this crate's or the
/// driver's, at trace level) through a wrong password, a right one, a
/// connection lost under the pool, and a listener that loses its connection,
/// fails to reconnect with a password the server no longer accepts, and
/// reconnects once it does again; nor in any error, `Debug` or health text.
#[test]
fn passwords_never_appear_in_log_lines() {
    const RIGHT: &str = "log-secret-7319";
    const WRONG: &str = "wrong-log-secret-2206";
    const CHANGED: &str = "rotated-log-secret-5581";
    // Percent-encoded in the URL below; its decoded form must not leak either.
    const ENCODED: &str = "p%40ss%3Alog-9923";
    const DECODED: &str = "p@ss:log-9923";
    let capture = capture_logs();

    let cluster = TestCluster::start_with(&[("fsync", "off")]).expect("start a cluster");
    let mut admin = admin(&cluster);
    run_unlogged(
        &mut admin,
        &format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE app LOGIN PASSWORD '{RIGHT}'; \
             CREATE SCHEMA app AUTHORIZATION app; \
             CREATE ROLE odd LOGIN PASSWORD '{DECODED}'; \
             CREATE SCHEMA odd AUTHORIZATION odd"
        ),
    );
    rewrite_hba(
        &cluster,
        &mut admin,
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    );
    let with_password = |user: &str, password: &str| {
        let mut options = cluster.connect_options();
        options.user(user).password(password);
        options
    };
    let mut texts: Vec<(String, String)> = Vec::new();

    // A wrong password, through every door (after the reload took effect).
    let deadline = Instant::now() + WAIT;
    let err = loop {
        match Pool::new(with_password("app", WRONG), PoolOptions::default()) {
            Err(err) => break err,
            Ok(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(_) => panic!("the server still accepts a wrong password"),
        }
    };
    assert!(
        matches!(
            err,
            Error::Connect {
                failure: ConnectFailure::AuthenticationFailed,
                ..
            }
        ),
        "{err:?}"
    );
    texts.push(("pool error".into(), all_texts(&err)));
    let err = ChangeListener::builder()
        .connect_options(with_password("app", WRONG))
        .build()
        .unwrap_err();
    texts.push(("listener error".into(), all_texts(&err)));
    let wrong_url = format!(
        "postgresql://app:{WRONG}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    let err = StateStore::connect(&wrong_url).unwrap_err();
    texts.push(("URL store error".into(), all_texts(&err)));
    let err = ChangeListener::connect(&wrong_url).unwrap_err();
    texts.push(("URL listener error".into(), all_texts(&err)));

    // The right password: a store, a listener, a cache.
    let url = format!(
        "postgresql://app:{RIGHT}@127.0.0.1:{}/postgres?sslmode=disable&application_name=logscan",
        cluster.port()
    );
    let store = StateStore::builder()
        .url(&url)
        .table("app.actor_states")
        .pool_options(PoolOptions::default().max_size(2))
        .migrate(true)
        .build()
        .expect("the right password connects");
    let listener = store
        .listener_builder()
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .unwrap();
    let sub = listener.subscribe();
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();
    assert_eq!(store.save("a", &1u32).unwrap(), 1);
    common::expect_change(&sub, "a", 1, ChangeKind::Saved);
    assert_eq!(cache.get("a").unwrap().as_deref(), Some(&1));

    // The password changes and every session is cut: the pool's next call
    // sees its connection lost, and the listener retries with a password
    // the server now refuses, until the old one is back.
    run_unlogged(
        &mut admin,
        &format!("SET password_encryption = 'scram-sha-256'; ALTER ROLE app PASSWORD '{CHANGED}'"),
    );
    assert!(terminate_sessions(&mut admin, "app") >= 2);
    // A connection the pool was still opening in the background, signed in
    // with the old password, may have come after that: end those too, until
    // no session of the role is left.
    common::wait_until("no session of app is left", WAIT, || {
        terminate_sessions(&mut admin, "app") == 0
    });
    let lost = store.save("a", &2u32);
    texts.push(("lost call".into(), format!("{lost:?}")));
    common::wait_until("the listener fails to reconnect", WAIT, || {
        let health = listener.health();
        !health.connected
            && health
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("authentication failed"))
    });
    let health = listener.health();
    texts.push(("health while refused".into(), format!("{health:?}")));
    let err = store.load::<u32>("a").unwrap_err();
    texts.push(("store error while refused".into(), all_texts(&err)));
    run_unlogged(
        &mut admin,
        &format!("SET password_encryption = 'scram-sha-256'; ALTER ROLE app PASSWORD '{RIGHT}'"),
    );
    common::wait_until("the listener reconnects", WAIT, || {
        listener.health().connected
    });
    match next_event(&sub) {
        Event::Resync(_) => {}
        Event::Change(c) if c.actor_id == "a" => {}
        other => panic!("expected a resync after the gap, got {other:?}"),
    }
    let next = store.save("a", &3u32).unwrap();
    texts.push(("store Debug".into(), format!("{store:?}")));
    texts.push(("pool Debug".into(), format!("{:?}", store.pool())));
    texts.push(("listener Debug".into(), format!("{listener:?}")));
    texts.push((
        "connect options Debug".into(),
        format!("{:?}", store.pool().connect_options()),
    ));
    texts.push(("health".into(), format!("{:?}", listener.health())));
    common::wait_until("the cache sees the last save", WAIT, || {
        cache.sequence("a").is_some_and(|s| s >= next)
    });

    // A percent-encoded password with URL delimiters, right and wrong.
    let odd = format!(
        "postgresql://odd:{ENCODED}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    let odd_store = StateStore::builder()
        .url(&odd)
        .table("odd.actor_states")
        .migrate(true)
        .build()
        .expect("an encoded password connects");
    odd_store.save("b", &1u32).unwrap();
    texts.push(("odd store Debug".into(), format!("{odd_store:?}")));
    let odd_wrong = odd.replace("log-9923", "log-0000");
    let err = StateStore::connect(&odd_wrong).unwrap_err();
    texts.push(("odd wrong error".into(), all_texts(&err)));
    listener.shutdown();
    drop(cache);

    let lines = capture.lines();
    // The scan saw what it had to: the pool's loss, the listener's refused
    // reconnects and its recovery.
    for needle in [
        "connection to 127.0.0.1",
        "listener reconnect failed",
        "authentication failed",
        "listener reconnected",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no log line mentions {needle:?}; {} lines captured",
            lines.len()
        );
    }
    let secrets = [RIGHT, WRONG, CHANGED, ENCODED, DECODED, "log-0000"];
    for line in &lines {
        for secret in secrets {
            assert!(
                !line.contains(secret),
                "a log line shows a password: {line}"
            );
        }
    }
    for (what, text) in &texts {
        for secret in secrets {
            assert!(!text.contains(secret), "{what} shows a password: {text}");
        }
    }
}
