//! Security against a real server: passwords kept out of every log line,
//! least privilege (a role with only SELECT, INSERT, UPDATE and DELETE),
//! hostile actor ids stored as data, and hostile notification payloads sent
//! by another client on the channel.
//!
//! Covered elsewhere: TLS modes with a real certificate (`tls_modes_follow_libpq`)
//! and scram-sha-256 with a wrong password (`password_authentication_and_no_password_in_messages`)
//! in tests/connect.rs; hostile table, schema and channel names in tests/bad_input.rs;
//! undecodable stored bytes in tests/decode_fuzz.rs.

use std::fmt::Debug;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use trebuchet_postgres::postgres::{self, Client, NoTls};
use trebuchet_postgres::testing::{TestCluster, TestDatabase};
use trebuchet_postgres::{
    ChangeKind, ChangeListener, ConnectFailure, ConnectOptions, Error, Event, Expected, Pool,
    PoolOptions, StateCache, StateStore, Subscription, Versioned,
};

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(15);

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

/// A name unique to this process and call.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// A trust-authentication cluster for roles without passwords: the shared
/// test cluster when there is one, otherwise one of this file's own.
fn trust_cluster() -> &'static TestCluster {
    static OWN: OnceLock<TestCluster> = OnceLock::new();
    if let Some(cluster) = TestDatabase::shared().cluster() {
        return cluster;
    }
    OWN.get_or_init(|| TestCluster::start().expect("start a test cluster"))
}

/// A superuser connection to a cluster.
fn admin(cluster: &TestCluster) -> Client {
    let config: postgres::Config = cluster.url().parse().expect("cluster URL");
    config.connect(NoTls).expect("connect as postgres")
}

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

#[track_caller]
fn expect_change(sub: &Subscription, actor: &str, sequence: u64, kind: ChangeKind) {
    match next_event(sub) {
        Event::Change(c) => {
            assert_eq!(
                (c.actor_id.as_str(), c.sequence, c.kind),
                (actor, sequence, kind),
                "{c:?}"
            );
        }
        other => panic!("expected a change of {actor:?}, got {other:?}"),
    }
}

/// Waits until `done` holds, failing after [`WAIT`] with `what`.
#[track_caller]
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Rewrites a cluster's `pg_hba.conf` (keeping the file the server's own)
/// and reloads it.
fn rewrite_hba(cluster: &TestCluster, admin: &mut Client, contents: &str) {
    let data = cluster.data_dir();
    let owner = fs::metadata(&data).unwrap();
    let path = data.join("pg_hba.conf");
    fs::write(&path, contents).unwrap();
    std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let reloaded: bool = admin
        .query_one("SELECT pg_reload_conf()", &[])
        .unwrap()
        .get(0);
    assert!(reloaded);
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
    expect_change(&sub, "a", 1, ChangeKind::Saved);
    assert_eq!(cache.get("a").unwrap().as_deref(), Some(&1));

    // The password changes and every session is cut: the pool's next call
    // sees its connection lost, and the listener retries with a password
    // the server now refuses, until the old one is back.
    run_unlogged(
        &mut admin,
        &format!("SET password_encryption = 'scram-sha-256'; ALTER ROLE app PASSWORD '{CHANGED}'"),
    );
    assert!(terminate_sessions(&mut admin, "app") >= 2);
    let lost = store.save("a", &2u32);
    texts.push(("lost call".into(), format!("{lost:?}")));
    wait_until("the listener fails to reconnect", || {
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
    wait_until("the listener reconnects", || listener.health().connected);
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
    wait_until("the cache sees the last save", || {
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

// ----- least privilege ------------------------------------------------------------

/// A schema migrated by its owner and a login role without DDL rights,
/// both removed at the end.
struct Restricted {
    admin: Client,
    schema: String,
    role: String,
    cluster: &'static TestCluster,
}

impl Restricted {
    fn new() -> Restricted {
        let cluster = trust_cluster();
        let mut admin = admin(cluster);
        let schema = unique("lp");
        let role = unique("dml");
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}; CREATE ROLE {role} LOGIN"))
            .unwrap();
        Restricted {
            admin,
            schema,
            role,
            cluster,
        }
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.schema)
    }

    /// A store on `name` in the schema, connecting as `user`.
    fn builder(&self, user: &str, name: &str) -> trebuchet_postgres::StateStoreBuilder {
        let mut options: ConnectOptions = self.cluster.connect_options();
        options.user(user).application_name(&self.role);
        StateStore::builder()
            .connect_options(options)
            .pool_options(PoolOptions::default().max_size(3))
            .table(self.table(name))
            .channel(format!("{}_changes", self.schema))
    }
}

impl Drop for Restricted {
    fn drop(&mut self) {
        let _ = terminate_sessions(&mut self.admin, &self.role);
        let _ = self.admin.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}",
            schema = self.schema,
            role = self.role
        ));
    }
}

#[track_caller]
fn expect_insufficient_privilege<T: Debug>(
    what: &str,
    result: trebuchet_postgres::Result<T>,
) -> Error {
    match result {
        Err(err @ Error::InsufficientPrivilege { .. }) => {
            assert_eq!(
                err.sql_state().map(|c| c.code()),
                Some("42501"),
                "{what}: {err:?}"
            );
            assert!(
                err.to_string().starts_with("insufficient privilege"),
                "{what}: {err}"
            );
            assert!(!err.is_connection() && !err.is_invalid_input(), "{what}");
            err
        }
        other => panic!("{what}: expected Error::InsufficientPrivilege, got {other:?}"),
    }
}

/// The README's grants: SELECT, INSERT, UPDATE and DELETE on the table,
/// SELECT, INSERT and UPDATE on its tombstone table, USAGE on the schema.
/// With them and nothing more, every operation and the listener work, and
/// `migrate` fails with a typed error that says what to do.
#[test]
fn least_privilege_role_works_but_cannot_migrate() {
    let mut r = Restricted::new();
    let owner = r
        .builder("postgres", "actor_states")
        .migrate(true)
        .build()
        .unwrap();
    owner.save("from-owner", &1u32).unwrap();
    let (schema, role) = (r.schema.clone(), r.role.clone());
    r.admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {schema} TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.actor_states TO {role}; \
             GRANT SELECT, INSERT, UPDATE ON {schema}.actor_states_tombstones TO {role}"
        ))
        .unwrap();
    let may_create: bool = r
        .admin
        .query_one(
            "SELECT has_schema_privilege($1, $2, 'CREATE') OR has_database_privilege($1, current_database(), 'CREATE')",
            &[&role, &schema],
        )
        .unwrap()
        .get(0);
    assert!(!may_create, "the role must not be able to create anything");

    let store = r
        .builder(&role, "actor_states")
        .build()
        .expect("the role connects");
    let listener = store.listener().expect("the role listens");
    let all = listener.subscribe();
    let one = listener.subscribe_actor("a");
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();

    // Single-actor operations.
    assert_eq!(store.save("a", &1u32).unwrap(), 1);
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));
    assert_eq!(
        store.load_versioned::<u32>("a").unwrap().unwrap().sequence,
        1
    );
    assert_eq!(store.save_if("a", &2u32, Expected::Sequence(1)).unwrap(), 2);
    assert_eq!(store.save_if("b", &1u32, Expected::Absent).unwrap(), 1);
    assert!(store
        .save_if("b", &1u32, Expected::Absent)
        .unwrap_err()
        .is_conflict());
    store.save_with_sequence("c", &1u32, 10).unwrap();
    let t = store
        .transform("a", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();
    assert_eq!((t.value, t.sequence), (3, 3));
    assert!(store.exists("a").unwrap());
    assert_eq!(store.sequence("c").unwrap(), Some(10));
    assert_eq!(cache.get("a").unwrap().as_deref(), Some(&3));
    // A delete records a tombstone through the trigger; a new save reads it.
    assert!(store.delete("a").unwrap());
    assert_eq!(store.save("a", &9u32).unwrap(), 5);
    for (sequence, kind) in [
        (1, ChangeKind::Saved),
        (2, ChangeKind::Saved),
        (3, ChangeKind::Saved),
        (4, ChangeKind::Deleted),
        (5, ChangeKind::Saved),
    ] {
        expect_change(&one, "a", sequence, kind);
    }
    assert_eq!(store.save_bytes("raw", b"raw").unwrap(), 1);
    assert_eq!(
        store.load_bytes("raw").unwrap().as_deref(),
        Some(&b"raw"[..])
    );
    store
        .transform_bytes("raw", |b| b.map(<[u8]>::to_vec).unwrap_or_default())
        .unwrap();

    // Bulk operations and batches.
    assert_eq!(
        store.save_many(&[("m1", 1u32), ("m2", 2u32)]).unwrap(),
        [1, 1]
    );
    assert_eq!(
        store.load_many::<u32, _>(&["m1", "m2", "none"]).unwrap(),
        [Some(1), Some(2), None]
    );
    let results = store
        .save_many_if(&[
            ("m1", 5u32, Expected::Sequence(1)),
            ("m3", 3u32, Expected::Absent),
        ])
        .unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(
        store.delete_many(&["m1", "m2", "none"]).unwrap(),
        [true, true, false]
    );
    let results = store
        .batch()
        .save("b1", &1u32)
        .save_if("b", &2u32, Expected::Sequence(1))
        .delete("c")
        .commit()
        .unwrap();
    assert_eq!(results.len(), 3);

    // Listing, export and import.
    let page = store.list_actors("", None, 100).unwrap();
    assert!(page.actors.iter().any(|a| a.actor_id == "from-owner"));
    assert_eq!(store.count_actors("m").unwrap(), 1);
    let mut exported = Vec::new();
    store
        .for_each_bytes("", |id, v| {
            exported.push((id, v));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert!(!exported.is_empty());
    let restored: Vec<(String, Versioned<Vec<u8>>)> = exported
        .into_iter()
        .map(|(id, v)| (format!("copy-{id}"), v))
        .collect();
    store.restore_many_bytes(&restored).unwrap();

    // Checks and monitoring.
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    let info = store.connection_info().unwrap();
    assert_eq!(info.user, role);
    assert!(info.missing_privileges.is_empty(), "{info:?}");
    store.stats().unwrap();
    assert!(store.notify_round_trip(WAIT).unwrap().is_some());

    // Every change reached the unfiltered subscriber too.
    let mut seen = 0;
    while let Ok(event) = all.recv_timeout(Duration::from_millis(500)) {
        if let Event::Change(_) = event {
            seen += 1;
        }
    }
    assert!(seen >= 15, "only {seen} changes arrived");
    assert_eq!(listener.health().malformed, 0);

    // migrate: a typed error naming the privilege and what to do, on the
    // migrated table, through the builder, and on a new table; nothing made.
    let err = expect_insufficient_privilege("migrate", store.migrate());
    let text = err.to_string();
    for needle in ["migrate", "owner", "42501"] {
        assert!(text.contains(needle), "say {needle:?}: {text}");
    }
    expect_insufficient_privilege(
        "builder migrate(true)",
        r.builder(&role, "actor_states").migrate(true).build(),
    );
    let fresh = r.builder(&role, "fresh").build().unwrap();
    expect_insufficient_privilege("migrate a new table", fresh.migrate());
    let made: bool = r
        .admin
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&r.table("fresh")])
        .unwrap()
        .get(0);
    assert!(!made);
    // The store still works after the refused migration.
    assert_eq!(store.load::<u32>("a").unwrap(), Some(9));
    listener.shutdown();
}

/// Without the grants on the tombstone table, `connection_info` (and so
/// `trebuchet-postgres doctor`) says what is missing, and a delete fails
/// with a typed error that names the grants, leaving the row in place.
#[test]
fn missing_tombstone_grants_are_reported() {
    let mut r = Restricted::new();
    let owner = r
        .builder("postgres", "actor_states")
        .migrate(true)
        .build()
        .unwrap();
    owner.save("kept", &1u32).unwrap();
    let (schema, role) = (r.schema.clone(), r.role.clone());
    r.admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {schema} TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.actor_states TO {role}"
        ))
        .unwrap();
    let store = r.builder(&role, "actor_states").build().unwrap();
    let info = store.connection_info().unwrap();
    assert!(info.missing_privileges.is_empty(), "{info:?}");
    assert_eq!(
        info.missing_tombstone_privileges,
        ["SELECT", "INSERT", "UPDATE"],
        "{info:?}"
    );
    let err = expect_insufficient_privilege("delete", store.delete("kept"));
    let text = err.to_string();
    assert!(text.contains("GRANT"), "say which grants: {text}");
    assert!(text.contains("tombstones"), "{text}");
    assert_eq!(owner.load::<u32>("kept").unwrap(), Some(1));
    expect_insufficient_privilege("save of a new actor", store.save("new", &1u32));
    assert!(!owner.exists("new").unwrap());
    // Reads do not touch the tombstones.
    assert_eq!(store.load::<u32>("kept").unwrap(), Some(1));
}
