//! Security against a real server: passwords kept out of every log line,
//! least privilege (a role with only SELECT, INSERT, UPDATE and DELETE),
//! hostile actor ids stored as data, and hostile notification payloads sent
//! by another client on the channel.
//!
//! Covered elsewhere: TLS modes with a real certificate (`tls_modes_follow_libpq`)
//! and scram-sha-256 with a wrong password (`password_authentication_and_no_password_in_messages`)
//! in tests/connect.rs; hostile table, schema and channel names in tests/bad_input.rs;
//! undecodable stored bytes in tests/decode_fuzz.rs.

mod common;

use common::{admin, rewrite_hba, trust_cluster};

use std::fmt::Debug;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use trebuchet_postgres::postgres::Client;
use trebuchet_postgres::testing::{TestCluster, TestDatabase};
use trebuchet_postgres::{
    ChangeKind, ChangeListener, ConnectFailure, ConnectOptions, Error, Event, Expected, Pool,
    PoolOptions, StateCache, StateStore, Subscription, Versioned, WriteOptions,
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
        let schema = common::unique("lp");
        let role = common::unique("dml");
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

/// The grants of the guide's "Least privilege" (`guide::schema`): SELECT, INSERT, UPDATE and DELETE on the table,
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
    store
        .save_with("c", &1u32, WriteOptions::new().sequence(10))
        .unwrap();
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
        common::expect_change(&one, "a", sequence, kind);
    }
    assert_eq!(store.raw().save("raw", b"raw").unwrap(), 1);
    assert_eq!(
        store.raw().load("raw").unwrap().as_deref(),
        Some(&b"raw"[..])
    );
    store
        .raw()
        .transform("raw", |b| b.map(<[u8]>::to_vec).unwrap_or_default())
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
        .raw()
        .for_each("", |id, v| {
            exported.push((id, v));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert!(!exported.is_empty());
    let restored: Vec<(String, Versioned<Vec<u8>>)> = exported
        .into_iter()
        .map(|(id, v)| (format!("copy-{id}"), v))
        .collect();
    store.raw().restore_many(&restored).unwrap();

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
    while seen < 15 {
        match all.recv_timeout(WAIT) {
            Ok(Event::Change(_)) => seen += 1,
            Ok(_) => {}
            Err(e) => panic!("only {seen} changes arrived: {e:?}"),
        }
    }
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

// ----- hostile actor ids are data -------------------------------------------------

/// Ids that would break a statement assembled from strings, a JSON payload
/// built by concatenation, a LIKE pattern, a terminal or a byte-length limit.
fn hostile_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "it's",
        "\"quoted\"",
        "'; DROP TABLE actor_states; --",
        "\"; DROP TABLE actor_states; --",
        "x' OR '1'='1",
        "$1",
        "%s%n%x",
        "%",
        "_",
        "\\",
        "\\'\\\"",
        "back`tick`",
        "line\nbreak\r\ttab",
        "\u{7}\u{1b}[31mred",
        "{\"actorID\":\"evil\",\"sequenceNumber\":99}",
        "null",
        " ",
        "  padded  ",
        "🦀",
        "日本語のアクター",
        "\u{202E}txt.exe",
        "zero\u{200B}width",
        "e\u{301}",
        "\u{FEFF}bom",
        "\u{10FFFF}",
        "Ω≈ç√",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // 255 characters of four, two and three bytes: the column's limit is
    // in characters (1,020 bytes here), not bytes.
    ids.push("🦀".repeat(255));
    ids.push("é".repeat(255));
    ids.push("€".repeat(254) + "'");
    ids
}

/// Hostile actor ids are accepted and stored, loaded, listed, announced and
/// deleted exactly as given: no statement or payload is ever built from them.
#[test]
fn hostile_actor_ids_round_trip_as_data() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();
    let ids = hostile_ids();
    assert_eq!(ids[ids.len() - 3].len(), 1020);
    let mut client = schema.client().unwrap();

    for id in &ids {
        trebuchet_postgres::validate_actor_id(id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
        let only = listener.subscribe_actor(id.clone());
        assert_eq!(store.save(id, &1u32).unwrap(), 1, "{id:?}");
        assert_eq!(store.load::<u32>(id).unwrap(), Some(1), "{id:?}");
        assert_eq!(store.save_if(id, &2u32, Expected::Sequence(1)).unwrap(), 2);
        let t = store
            .transform(id, |n: Option<u32>| n.unwrap_or(0) + 1)
            .unwrap();
        assert_eq!((t.value, t.sequence), (3, 3), "{id:?}");
        assert!(store.exists(id).unwrap());
        assert_eq!(store.sequence(id).unwrap(), Some(3));
        assert_eq!(store.raw().load_versioned(id).unwrap().unwrap().sequence, 3);
        for sequence in 1..=3 {
            common::expect_change(&only, id, sequence, ChangeKind::Saved);
        }
        // Stored as given, byte for byte, and found by the server's own
        // comparison with the parameter.
        let stored: String = client
            .query_one(
                &format!(
                    "SELECT actor_id::TEXT FROM \"{}\".actor_states WHERE actor_id = $1",
                    schema.name()
                ),
                &[id],
            )
            .unwrap()
            .get(0);
        assert_eq!(&stored, id);
        // A prefix is a prefix, never a pattern.
        let expected = ids
            .iter()
            .filter(|other| other.starts_with(id.as_str()))
            .count();
        let before = ids
            .iter()
            .take_while(|other| *other != id)
            .collect::<Vec<_>>();
        let saved_so_far = before
            .iter()
            .filter(|other| other.starts_with(id.as_str()))
            .count()
            + 1;
        assert!(saved_so_far <= expected);
        assert_eq!(
            store.count_actors(id).unwrap(),
            saved_so_far as u64,
            "prefix {id:?}"
        );
        let page = store.list_actors(id, None, 1000).unwrap();
        assert!(page.actors.iter().any(|a| &a.actor_id == id), "{id:?}");
        assert!(page
            .actors
            .iter()
            .all(|a| a.actor_id.starts_with(id.as_str())));
    }
    // Bulk paths and the unfiltered subscriber see the same ids.
    let loaded = store.load_many::<u32, _>(&ids).unwrap();
    assert!(loaded.iter().all(|v| *v == Some(3)));
    let saved = store
        .save_many(&ids.iter().map(|id| (id.as_str(), 4u32)).collect::<Vec<_>>())
        .unwrap();
    assert!(saved.iter().all(|s| *s == 4));
    let mut announced = std::collections::HashMap::new();
    while announced.len() < ids.len() || announced.values().any(|s| *s < 4) {
        match next_event(&all) {
            Event::Change(c) => {
                assert!(ids.contains(&c.actor_id), "unknown actor {:?}", c.actor_id);
                announced.insert(c.actor_id.clone(), c.sequence);
            }
            other => panic!("{other:?}"),
        }
    }
    // Deletes are announced with the exact id too, and leave tombstones.
    for id in &ids {
        assert!(store.delete(id).unwrap(), "{id:?}");
        common::expect_change(&all, id, 5, ChangeKind::Deleted);
        assert_eq!(store.load::<u32>(id).unwrap(), None);
    }
    let (rows, tombstones): (i64, i64) = {
        let row = client
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM \"{s}\".actor_states), \
                     (SELECT count(*) FROM \"{s}\".actor_states_tombstones)",
                    s = schema.name()
                ),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((rows, tombstones), (0, ids.len() as i64));
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(listener.health().malformed, 0);
}

// ----- hostile notification payloads ------------------------------------------------

/// Payloads another client can send on the channel, none of which the
/// trigger would write. Each is under PostgreSQL's 8,000-byte limit.
fn hostile_payloads() -> Vec<(&'static str, String)> {
    let deep = |open: &str, close: &str, n: usize| open.repeat(n) + &close.repeat(n);
    vec![
        ("empty", String::new()),
        ("blank", "   ".into()),
        ("not JSON", "not json".into()),
        ("null", "null".into()),
        ("a number", "42".into()),
        ("a string", "\"room-1\"".into()),
        ("an array", "[\"room-1\",1]".into()),
        ("truncated", "{\"actorID\":\"a\",\"sequenceNumber\":".into()),
        (
            "trailing garbage",
            "{\"actorID\":\"a\",\"sequenceNumber\":1}}".into(),
        ),
        ("empty object", "{}".into()),
        ("no actorID", "{\"sequenceNumber\":1}".into()),
        ("no sequenceNumber", "{\"actorID\":\"a\"}".into()),
        (
            "actorID a number",
            "{\"actorID\":1,\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID null",
            "{\"actorID\":null,\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID an array",
            "{\"actorID\":[\"a\"],\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID an object",
            "{\"actorID\":{\"a\":1},\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID empty",
            "{\"actorID\":\"\",\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID with NUL",
            "{\"actorID\":\"a\\u0000b\",\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID of 256 characters",
            format!(
                "{{\"actorID\":\"{}\",\"sequenceNumber\":1}}",
                "é".repeat(256)
            ),
        ),
        (
            "actorID of 7,900 characters",
            format!(
                "{{\"actorID\":\"{}\",\"sequenceNumber\":1}}",
                "x".repeat(7900)
            ),
        ),
        (
            "duplicate actorID",
            "{\"actorID\":\"a\",\"actorID\":\"b\",\"sequenceNumber\":1}".into(),
        ),
        (
            "sequenceNumber a string",
            "{\"actorID\":\"a\",\"sequenceNumber\":\"1\"}".into(),
        ),
        (
            "sequenceNumber a fraction",
            "{\"actorID\":\"a\",\"sequenceNumber\":1.5}".into(),
        ),
        (
            "sequenceNumber a bool",
            "{\"actorID\":\"a\",\"sequenceNumber\":true}".into(),
        ),
        (
            "sequenceNumber 1e30",
            "{\"actorID\":\"a\",\"sequenceNumber\":1e30}".into(),
        ),
        (
            "sequenceNumber 2^64",
            "{\"actorID\":\"a\",\"sequenceNumber\":18446744073709551616}".into(),
        ),
        (
            "sequenceNumber negative",
            "{\"actorID\":\"a\",\"sequenceNumber\":-1}".into(),
        ),
        (
            "timestamp a string",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"timestamp\":\"now\"}".into(),
        ),
        (
            "timestamp 1e300",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"timestamp\":1e300}".into(),
        ),
        (
            "op a number",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"op\":5}".into(),
        ),
        (
            "op unknown",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"op\":\"drop\"}".into(),
        ),
        (
            "op of 7,900 characters",
            format!(
                "{{\"actorID\":\"a\",\"sequenceNumber\":1,\"op\":\"{}\"}}",
                "d".repeat(7900)
            ),
        ),
        (
            "huge wrong-typed value",
            format!(
                "{{\"actorID\":\"a\",\"sequenceNumber\":\"{}\"}}",
                "9".repeat(7900)
            ),
        ),
        ("huge non-JSON", "x".repeat(7999)),
        ("7,999 open brackets", "[".repeat(7999)),
        ("nested arrays", deep("[", "]", 3999)),
        ("nested objects", deep("{\"a\":", "}", 1300)),
        (
            "nested actorID",
            format!(
                "{{\"actorID\":{},\"sequenceNumber\":1}}",
                deep("[", "]", 3900)
            ),
        ),
        (
            "nested timestamp",
            format!(
                "{{\"actorID\":\"a\",\"sequenceNumber\":1,\"timestamp\":{}}}",
                deep("{\"t\":", "}", 1000)
            ),
        ),
    ]
}

/// Another client sends malformed, huge and deeply nested payloads on the
/// channel, once each and then as a flood: each is counted and skipped,
/// nothing reaches a subscriber or a cache, the listener stays connected,
/// and the log gets a few short lines rather than one long line per payload.
#[test]
fn hostile_notify_payloads_are_counted_and_skipped() {
    let capture = capture_logs();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();
    let channel = schema.channel();
    store.save("victim", &1u32).unwrap();
    common::expect_change(&all, "victim", 1, ChangeKind::Saved);
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&1));

    let payloads = hostile_payloads();
    let mut attacker = schema.client().unwrap();
    for (label, payload) in &payloads {
        assert!(payload.len() < 8000, "{label}: {} bytes", payload.len());
        attacker
            .execute("SELECT pg_notify($1, $2)", &[&channel, payload])
            .unwrap_or_else(|e| panic!("{label}: {e}"));
    }
    // A flood in one transaction: 2,000 distinct 7,900-byte payloads with a
    // wrong type (identical payloads in a transaction would be folded).
    const FLOOD: i64 = 2000;
    attacker
        .execute(
            "SELECT count(pg_notify($1, '{\"actorID\":\"victim\",\"sequenceNumber\":\"' \
             || i || repeat('9', 7900) || '\"}')) FROM generate_series(1, $2::INT8) i",
            &[&channel, &FLOOD],
        )
        .unwrap();
    // Unknown keys are ignored, however deeply nested: a valid change.
    let nested_extra = format!(
        "{{\"actorID\":\"victim\",\"sequenceNumber\":2,\"extra\":{}}}",
        "[".repeat(3900) + &"]".repeat(3900)
    );
    attacker
        .execute("SELECT pg_notify($1, $2)", &[&channel, &nested_extra])
        .unwrap();
    store.save("victim", &3u32).unwrap();

    // Nothing was made of the hostile ones: the next events are the valid
    // payload and the real save.
    common::expect_change(&all, "victim", 2, ChangeKind::Saved);
    common::expect_change(&all, "victim", 2, ChangeKind::Saved);
    let health = listener.health();
    let hostile = payloads.len() as u64 + FLOOD as u64;
    assert_eq!(health.malformed, hostile, "{health:?}");
    assert_eq!(health.received, hostile + 3, "{health:?}");
    assert!(health.connected && health.reconnects == 0, "{health:?}");
    assert_eq!(health.dropped, 0);
    common::wait_until("the cache reloads the real save", WAIT, || {
        cache.sequence("victim") == Some(2)
    });
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&3));

    // The log: a few short lines about this channel, not one per payload.
    let lines: Vec<String> = capture
        .lines()
        .into_iter()
        .filter(|l| l.contains(&channel) && l.contains("malformed"))
        .collect();
    assert!(!lines.is_empty(), "malformed payloads are logged");
    assert!(lines.len() <= 5, "{} log lines: {lines:#?}", lines.len());
    for line in &lines {
        assert!(line.len() < 600, "a {}-byte log line: {line}", line.len());
    }
    assert!(
        lines.iter().any(|l| l.contains("more")) || lines.len() == 1,
        "the count of suppressed messages is logged: {lines:#?}"
    );
}

/// A well-formed forged payload (any role that may connect may NOTIFY any
/// channel) cannot make a cache believe an actor deleted, or hide the
/// actor's later changes behind a huge sequence number: the cache takes
/// announcements as hints and reads the table.
#[test]
fn forged_payloads_cannot_poison_a_cache() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();
    store.save("victim", &1u32).unwrap();
    common::expect_change(&all, "victim", 1, ChangeKind::Saved);
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&1));

    let mut attacker = schema.client().unwrap();
    let max = i64::MAX;
    for payload in [
        format!("{{\"actorID\":\"victim\",\"sequenceNumber\":{max},\"op\":\"delete\"}}"),
        format!(
            "{{\"actorID\":\"victim\",\"sequenceNumber\":{},\"op\":\"save\"}}",
            max - 1
        ),
        "{\"actorID\":\"victim\",\"sequenceNumber\":2,\"op\":\"delete\"}".to_owned(),
    ] {
        attacker
            .execute("SELECT pg_notify($1, $2)", &[&schema.channel(), &payload])
            .unwrap();
    }
    for _ in 0..3 {
        next_event(&all);
    }
    // The cache still holds the stored state, and follows real changes.
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&1));
    store.save("victim", &2u32).unwrap();
    common::wait_until("the cache follows the real save", WAIT, || {
        cache.sequence("victim") == Some(2)
    });
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&2));
    // A real delete still empties it.
    assert!(store.delete("victim").unwrap());
    common::wait_until("the cache sees the real delete", WAIT, || {
        cache.get("victim").unwrap().is_none()
    });
    store.save("victim", &4u32).unwrap();
    common::wait_until("the cache sees the actor again", WAIT, || {
        cache.get("victim").unwrap().as_deref() == Some(&4)
    });
}
