//! Connecting, and every way it can fail: refused, missing database,
//! unknown role, wrong password, too many clients, pool exhaustion, TLS
//! modes with libpq's meanings, shared pools, the environment and
//! connection-string forms. Each test uses its own schema or cluster.

mod common;

use common::tls::{make_certificates, sessions, tls_cluster};
use common::{admin, returns_within, rewrite_hba, trust_cluster};

use std::fmt::Debug;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use trebuchet_postgres::postgres::Client;
use trebuchet_postgres::testing::{TestCluster, TestDatabase};
use trebuchet_postgres::{
    ConnectFailure, ConnectOptions, Error, Pool, PoolOptions, SslMode, StateStore,
};

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(60);

#[track_caller]
fn expect_connect_failure<T: Debug>(
    result: trebuchet_postgres::Result<T>,
    expected: ConnectFailure,
) -> Error {
    match result {
        Err(err @ Error::Connect { .. }) => {
            let Error::Connect { failure, .. } = &err else {
                unreachable!()
            };
            assert_eq!(*failure, expected, "{err}: {err:?}");
            assert!(err.is_connection());
            assert!(!err.is_invalid_input());
            err
        }
        other => panic!("expected Error::Connect {{ {expected:?} }}, got {other:?}"),
    }
}

#[track_caller]
fn assert_secret_hidden(secret: &str, texts: &[(&str, String)]) {
    for (what, text) in texts {
        assert!(!text.contains(secret), "{what} shows the password: {text}");
    }
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

#[test]
fn refused_connection_suggests_pg_isready() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut options = ConnectOptions::new();
    options
        .host("127.0.0.1")
        .port(port)
        .ssl_mode(SslMode::Disable);
    let (built, took) = returns_within("a build on a closed port", WAIT, move || {
        StateStore::builder().connect_options(options).build()
    });
    let err = expect_connect_failure(built, ConnectFailure::Refused);
    eprintln!("refused after {took:?}");
    let text = err.to_string();
    assert!(text.contains("pg_isready"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    let Error::Connect {
        target,
        user,
        source,
        ..
    } = &err
    else {
        unreachable!()
    };
    assert_eq!(target, &format!("127.0.0.1:{port}"));
    assert_eq!(user, "postgres");
    assert!(source.is_some());
    assert!(err.sql_state().is_none());

    // The same through a URL and through Pool::connect.
    let url = format!("postgresql://postgres@127.0.0.1:{port}/db?sslmode=disable");
    expect_connect_failure(StateStore::connect(&url), ConnectFailure::Refused);
    expect_connect_failure(Pool::connect(&url), ConnectFailure::Refused);
}

#[test]
fn unknown_database_is_database_missing() {
    let cluster = trust_cluster();
    let mut options = cluster.connect_options();
    options.dbname("no_such_database_here");
    let err = expect_connect_failure(
        StateStore::builder().connect_options(options).build(),
        ConnectFailure::DatabaseMissing,
    );
    assert!(err.to_string().contains("CREATE DATABASE"), "{err}");
    assert_eq!(err.sql_state().map(|c| c.code()), Some("3D000"));
}

#[test]
fn unknown_role_on_a_trust_server_is_authentication_failed() {
    let cluster = trust_cluster();
    let mut options = cluster.connect_options();
    options.user("no_such_role_here");
    let err = expect_connect_failure(
        StateStore::builder().connect_options(options).build(),
        ConnectFailure::AuthenticationFailed,
    );
    let Error::Connect { user, .. } = &err else {
        unreachable!()
    };
    assert_eq!(user, "no_such_role_here");
    assert!(err.to_string().contains("no_such_role_here"), "{err}");
    assert_eq!(err.sql_state().map(|c| c.code()), Some("28000"));
}

#[test]
fn password_authentication_and_no_password_in_messages() {
    const RIGHT: &str = "right-secret";
    const WRONG: &str = "wrong-secret-0451";
    let cluster = TestCluster::start_with(&[("fsync", "off")]).expect("start a cluster");
    let mut admin = admin(&cluster);
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE app LOGIN PASSWORD '{RIGHT}'; \
             CREATE SCHEMA app AUTHORIZATION app; \
             GRANT CREATE ON DATABASE postgres TO app; \
             CREATE ROLE odd LOGIN PASSWORD 'p@ss:w/rd?&'"
        ))
        .unwrap();
    rewrite_hba(
        &cluster,
        &mut admin,
        "local all all trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n\
         host all all ::1/128 scram-sha-256\n",
    );

    let with_password = |password: &str| {
        let mut options = cluster.connect_options();
        options.user("app").password(password);
        options
    };
    // The reload is asynchronous: wait until the server asks for passwords.
    let deadline = Instant::now() + WAIT;
    let err = loop {
        match Pool::new(with_password(WRONG), PoolOptions::default()) {
            Err(err) => break err,
            Ok(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(_) => panic!("the server still accepts a wrong password after reloading"),
        }
    };
    let err = expect_connect_failure(Err::<(), _>(err), ConnectFailure::AuthenticationFailed);
    assert_eq!(err.sql_state().map(|c| c.code()), Some("28P01"));

    // Through the builder, with options and with a URL.
    let options = with_password(WRONG);
    let builder = StateStore::builder()
        .connect_options(options.clone())
        .table("app.actor_states");
    let builder_debug = format!("{builder:?}");
    let err = expect_connect_failure(builder.build(), ConnectFailure::AuthenticationFailed);
    let text = err.to_string();
    assert!(
        text.contains("password authentication failed for user \"app\""),
        "{text}"
    );
    let url = format!(
        "postgresql://app:{WRONG}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    let url_builder = StateStore::builder().url(&url);
    let url_builder_debug = format!("{url_builder:?}");
    let url_err = expect_connect_failure(url_builder.build(), ConnectFailure::AuthenticationFailed);
    assert_secret_hidden(
        WRONG,
        &[
            ("Display", text.clone()),
            ("Debug", format!("{err:?}")),
            ("source chain", chain(&err)),
            ("URL error Display", url_err.to_string()),
            ("URL error Debug", format!("{url_err:?}")),
            ("URL error source chain", chain(&url_err)),
            ("ConnectOptions Debug", format!("{options:?}")),
            ("builder Debug", builder_debug),
            ("URL builder Debug", url_builder_debug),
        ],
    );
    assert!(format!("{options:?}").contains("<redacted>"));

    // No password at all.
    let mut options = cluster.connect_options();
    options.user("app");
    expect_connect_failure(
        Pool::new(options, PoolOptions::default()),
        ConnectFailure::AuthenticationFailed,
    );

    // The right password works, and is hidden everywhere too.
    let options = with_password(RIGHT);
    let builder = StateStore::builder()
        .connect_options(options.clone())
        .table("app.actor_states")
        .migrate(true);
    let builder_debug = format!("{builder:?}");
    let store = builder.build().expect("the right password connects");
    assert_eq!(store.save("a", &1u32).unwrap(), 1);
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));
    assert_secret_hidden(
        RIGHT,
        &[
            ("ConnectOptions Debug", format!("{options:?}")),
            ("builder Debug", builder_debug),
            ("store Debug", format!("{store:?}")),
            ("pool Debug", format!("{:?}", store.pool())),
        ],
    );
    let url = format!(
        "postgresql://app:{RIGHT}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    let parsed: ConnectOptions = url.parse().unwrap();
    assert_secret_hidden(RIGHT, &[("parsed URL Debug", format!("{parsed:?}"))]);
    StateStore::connect(&url).expect("the right password in a URL connects");

    // A percent-encoded password with URL delimiters in it.
    let url = format!(
        "postgresql://odd:p%40ss%3Aw%2Frd%3F%26@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    Pool::connect(&url).expect("a percent-encoded password connects");
    let url = format!(
        "postgresql://odd:p%40ss%3Aw%2Frd@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    );
    expect_connect_failure(Pool::connect(&url), ConnectFailure::AuthenticationFailed);
}

/// A least-privilege application role: it owns its schema but may not
/// create schemas in the database (PostgreSQL's default for a new role).
#[test]
fn app_role_owning_its_schema_can_migrate() {
    let cluster = trust_cluster();
    let mut admin = admin(cluster);
    let role = common::unique("owner");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; CREATE SCHEMA {role} AUTHORIZATION {role}"
        ))
        .unwrap();
    let may_create: bool = admin
        .query_one(
            "SELECT has_database_privilege($1, current_database(), 'CREATE')",
            &[&role],
        )
        .unwrap()
        .get(0);
    assert!(
        !may_create,
        "the role should not have CREATE on the database"
    );
    let mut options = cluster.connect_options();
    options.user(&role);
    let store = StateStore::builder()
        .connect_options(options)
        .table(format!("{role}.actor_states"))
        .build()
        .expect("connects as the role");
    let applied = store.migrate();
    assert!(
        matches!(&applied, Ok(v) if v.first() == Some(&1)),
        "migrate into a schema the role owns: {applied:?}"
    );
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(store.save("a", &1u32).unwrap(), 1);
    // Running it again is a no-op.
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
}

#[test]
fn too_many_clients_suggests_pooling() {
    let cluster = TestCluster::start_with(&[
        ("fsync", "off"),
        ("max_connections", "3"),
        ("superuser_reserved_connections", "0"),
    ])
    .expect("start a cluster with max_connections=3");
    let mut held: Vec<Client> = (0..3).map(|_| admin(&cluster)).collect();
    let err = expect_connect_failure(
        StateStore::builder()
            .connect_options(cluster.connect_options())
            .build(),
        ConnectFailure::TooManyClients,
    );
    assert_eq!(err.sql_state().map(|c| c.code()), Some("53300"));
    let text = err.to_string();
    assert!(text.contains("max_connections"), "{text}");
    assert!(text.contains("pool"), "{text}");
    assert!(text.contains("PgBouncer"), "{text}");

    // With a slot free again, the same options connect.
    held.pop();
    let deadline = Instant::now() + WAIT;
    let store = loop {
        match StateStore::builder()
            .connect_options(cluster.connect_options())
            .pool_options(
                PoolOptions::default()
                    .max_size(2)
                    .connection_timeout(Duration::from_millis(400)),
            )
            .migrate(true)
            .build()
        {
            Ok(store) => break store,
            Err(Error::Connect {
                failure: ConnectFailure::TooManyClients,
                ..
            }) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("after freeing a slot: {e:?}"),
        }
    };

    // That took the last slot. A pool that needs a second connection and
    // cannot get one reports the server's reason, not a generic exhaustion.
    let held = HeldConnection::hold(&store);
    let err = expect_connect_failure(store.load::<u32>("other"), ConnectFailure::TooManyClients);
    assert!(err.to_string().contains("max_connections"), "{err}");
    held.release().unwrap();
    assert_eq!(store.load::<u32>("held").unwrap(), Some(1));
}

/// A pooled connection kept busy by a `transform` of actor "held" whose
/// closure waits until [`release`](Self::release).
struct HeldConnection {
    release: mpsc::Sender<()>,
    holder: thread::JoinHandle<trebuchet_postgres::Result<trebuchet_postgres::Versioned<u32>>>,
}

impl HeldConnection {
    /// Returns once the closure runs, holding the connection.
    fn hold(store: &StateStore) -> HeldConnection {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            thread::spawn(move || {
                store.transform("held", move |n: Option<u32>| {
                    let _ = entered_tx.send(());
                    // Bounded: a test that fails before releasing it ends.
                    let _ = released.recv_timeout(WAIT);
                    n.unwrap_or(0) + 1
                })
            })
        };
        entered_rx
            .recv_timeout(WAIT)
            .expect("the transform closure started");
        HeldConnection { release, holder }
    }

    /// Lets the transform finish and returns what it returned.
    fn release(self) -> trebuchet_postgres::Result<trebuchet_postgres::Versioned<u32>> {
        let _ = self.release.send(());
        self.holder.join().unwrap()
    }
}

#[test]
fn pool_exhaustion_says_how_to_raise_the_limit() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .pool_options(
            PoolOptions::default()
                .max_size(1)
                .connection_timeout(Duration::from_millis(300)),
        )
        .migrate(true)
        .build()
        .unwrap();
    // The connection stays held until the load has failed: it gave up by
    // its connection timeout, not when the connection came back.
    let held = HeldConnection::hold(&store);
    let waiter = store.clone();
    let (result, waited_here) = returns_within("a load on an exhausted pool", WAIT, move || {
        waiter.load::<u32>("other")
    });
    let err = result.unwrap_err();
    match &err {
        Error::PoolExhausted { max_size, waited } => {
            assert_eq!(*max_size, 1);
            // The timeout is a lower bound: it never gives up sooner.
            assert!(*waited >= Duration::from_millis(300), "{waited:?}");
            assert!(*waited <= waited_here, "{waited:?} > {waited_here:?}");
        }
        other => panic!("expected PoolExhausted, got {other:?}"),
    }
    eprintln!("gave up after {waited_here:?} (connection timeout 300 ms)");
    assert!(err.is_connection());
    let text = err.to_string();
    assert!(text.contains("raise PoolOptions::max_size"), "{text}");
    assert!(text.contains("connection_timeout"), "{text}");
    assert!(text.contains("all 1 connections"), "{text}");

    // The holder finishes, and the pool serves again.
    let written = held.release().unwrap();
    assert_eq!((written.value, written.sequence), (1, 1));
    assert_eq!(store.load::<u32>("held").unwrap(), Some(1));
    assert_eq!(store.load::<u32>("other").unwrap(), None);
    assert!(store.pool().state().connections <= 1);
}

#[test]
fn one_pool_serves_two_stores_within_its_limit() {
    const MAX: u32 = 2;
    let schema = TestDatabase::shared().schema();
    let app = common::unique("shared_pool");
    let mut options = schema.connect_options();
    options.application_name(&app);
    let pool = Pool::new(options, PoolOptions::default().max_size(MAX)).unwrap();
    let rooms = StateStore::builder()
        .pool(pool.clone())
        .table(schema.table("rooms"))
        .channel(format!("{}_rooms", schema.name()))
        .build()
        .unwrap();
    let players = StateStore::builder()
        .pool(pool.clone())
        .table(schema.table("players"))
        .channel(format!("{}_players", schema.name()))
        .build()
        .unwrap();
    assert_eq!(rooms.migrate().unwrap().first(), Some(&1));
    assert_eq!(players.migrate().unwrap().first(), Some(&1));
    assert!(rooms.verify().unwrap().is_ok());
    assert!(players.verify().unwrap().is_ok());

    let mut admin = schema.client().unwrap();
    let peak = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let pool = pool.clone();
        let peak = Arc::clone(&peak);
        let done = Arc::clone(&done);
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(pool.state().connections, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let rooms = rooms.clone();
            let players = players.clone();
            thread::spawn(move || {
                for i in 0..15u32 {
                    let id = format!("actor-{t}-{}", i % 3);
                    rooms.save(&id, &format!("room {t} {i}")).unwrap();
                    players.save(&id, &(t * 1000 + i)).unwrap();
                    assert_eq!(
                        rooms.load::<String>(&id).unwrap(),
                        Some(format!("room {t} {i}"))
                    );
                    assert_eq!(players.load::<u32>(&id).unwrap(), Some(t * 1000 + i));
                }
            })
        })
        .collect();
    let mut server_peak = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        server_peak = server_peak.max(sessions(&mut admin, &app).0);
        thread::sleep(Duration::from_millis(5));
    }
    for worker in workers {
        worker.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let state = pool.state();
    assert_eq!(state.max_size, MAX);
    assert!(peak.load(Ordering::Relaxed) <= MAX, "peak {peak:?}");
    assert!(state.connections <= MAX, "{state:?}");
    assert!(server_peak <= i64::from(MAX), "server saw {server_peak}");
    assert!(server_peak >= 1);

    // Independent tables: same ids, own values, own sequence numbers.
    for t in 0..4u32 {
        for k in 0..3u32 {
            let id = format!("actor-{t}-{k}");
            let last = (0..15u32).filter(|i| i % 3 == k).max().unwrap();
            assert_eq!(
                rooms.load::<String>(&id).unwrap(),
                Some(format!("room {t} {last}"))
            );
            assert_eq!(players.load::<u32>(&id).unwrap(), Some(t * 1000 + last));
            assert_eq!(rooms.sequence(&id).unwrap(), Some(5));
            assert_eq!(players.sequence(&id).unwrap(), Some(5));
        }
    }
    rooms.save("only-in-rooms", &1u32).unwrap();
    assert!(!players.exists("only-in-rooms").unwrap());
    assert!(players.delete("actor-0-0").unwrap());
    assert!(rooms.exists("actor-0-0").unwrap());
}

#[test]
fn environment_variables_connect() {
    let cluster = trust_cluster();
    let port = cluster.port().to_string();
    let table = format!("{}.actor_states", common::unique("env"));
    let lookup = |vars: Vec<(&'static str, String)>| {
        move |key: &str| vars.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    };
    let vars = vec![
        ("POSTGRES_HOST", "127.0.0.1".to_owned()),
        ("POSTGRES_PORT", port.clone()),
        ("POSTGRES_DATABASE", "postgres".to_owned()),
        ("POSTGRES_USER", "postgres".to_owned()),
        ("POSTGRES_PASSWORD", "ignored-by-trust".to_owned()),
    ];
    let options = ConnectOptions::from_lookup(lookup(vars.clone())).unwrap();
    assert_eq!(options.target(), format!("127.0.0.1:{port}"));
    assert_eq!(options.get_dbname(), Some("postgres"));
    assert!(options.has_password());
    assert!(!format!("{options:?}").contains("ignored-by-trust"));
    let store = StateStore::builder()
        .connect_options(options)
        .table(&table)
        .migrate(true)
        .build()
        .expect("POSTGRES_* variables connect");
    assert_eq!(store.save("env", &"ok".to_owned()).unwrap(), 1);

    // An empty DATABASE_URL falls back to POSTGRES_*; a set one wins over them.
    let mut with_empty = vars.clone();
    with_empty.push(("DATABASE_URL", "  ".to_owned()));
    let options = ConnectOptions::from_lookup(lookup(with_empty)).unwrap();
    assert_eq!(options.target(), format!("127.0.0.1:{port}"));
    let url_wins = vec![
        ("DATABASE_URL", cluster.url()),
        ("POSTGRES_HOST", "nowhere.invalid".to_owned()),
        ("POSTGRES_PORT", "1".to_owned()),
    ];
    let options = ConnectOptions::from_lookup(lookup(url_wins)).unwrap();
    let store = StateStore::builder()
        .connect_options(options)
        .table(&table)
        .build()
        .expect("DATABASE_URL connects");
    assert_eq!(store.load::<String>("env").unwrap().as_deref(), Some("ok"));

    // A bad port is a configuration error, before anything is contacted.
    let err =
        ConnectOptions::from_lookup(lookup(vec![("POSTGRES_PORT", "54x".to_owned())])).unwrap_err();
    assert!(matches!(&err, Error::InvalidConfig { reason } if reason.contains("POSTGRES_PORT")));
}

#[test]
fn url_forms_from_the_issue_parse() {
    let o: ConnectOptions = "postgresql://user:pass@localhost:5432/mydb"
        .parse()
        .unwrap();
    assert_eq!(
        (o.get_user(), o.get_dbname(), o.get_port()),
        (Some("user"), Some("mydb"), 5432)
    );
    assert_eq!(o.target(), "localhost:5432");
    assert!(o.has_password());
    assert!(!format!("{o:?}").contains("\"pass\""));

    let o: ConnectOptions = "postgresql://user@localhost/mydb".parse().unwrap();
    assert_eq!(
        (o.get_user(), o.get_dbname(), o.get_port()),
        (Some("user"), Some("mydb"), 5432)
    );
    assert!(!o.has_password());

    let o: ConnectOptions = "postgresql://localhost/mydb".parse().unwrap();
    assert_eq!((o.get_user(), o.get_dbname()), (None, Some("mydb")));
    assert_eq!(o.target(), "localhost:5432");

    let o: ConnectOptions = "postgres://user:pass@host.example.com:5433/production"
        .parse()
        .unwrap();
    assert_eq!(
        (o.get_user(), o.get_dbname(), o.get_port()),
        (Some("user"), Some("production"), 5433)
    );
    assert_eq!(o.target(), "host.example.com:5433");
    assert_eq!(o.get_ssl_mode(), SslMode::Prefer);
}

#[test]
fn url_and_key_value_strings_connect() {
    let cluster = trust_cluster();
    let port = cluster.port();
    let mut admin = admin(cluster);
    let app = common::unique("kv");
    for (label, s) in [
        (
            "URL with user and password",
            format!("postgresql://postgres:pass@127.0.0.1:{port}/postgres?application_name={app}"),
        ),
        (
            "URL with user",
            format!("postgresql://postgres@127.0.0.1:{port}/postgres?application_name={app}"),
        ),
        (
            "URL without user",
            format!("postgres://127.0.0.1:{port}/postgres?application_name={app}&sslmode=disable"),
        ),
        (
            "key=value",
            format!(
                "host=127.0.0.1 port={port} user=postgres dbname=postgres application_name={app}"
            ),
        ),
        (
            "key=value, quoted, with TLS keys",
            format!(
                "host = '127.0.0.1' port={port} user='postgres' dbname='postgres' \
                 sslmode=disable application_name='{app}' connect_timeout=5"
            ),
        ),
    ] {
        let pool = Pool::connect(&s).unwrap_or_else(|e| panic!("{label}: {e:?}"));
        assert_eq!(pool.target(), format!("127.0.0.1:{port}"), "{label}");
        // The string's settings reached the server.
        let (all, encrypted) = sessions(&mut admin, &app);
        assert!(all >= 1, "{label}: no session named {app}");
        assert_eq!(encrypted, 0, "{label}");
        let store = StateStore::builder()
            .pool(pool)
            .table(format!("{}.actor_states", common::unique("kv")))
            .migrate(true)
            .build()
            .unwrap();
        assert_eq!(store.save("a", &1u8).unwrap(), 1);
        let via_connect = StateStore::connect(&s).unwrap_or_else(|e| panic!("{label}: {e:?}"));
        assert_eq!(
            via_connect.table(),
            "\"actor_states\"",
            "{label}: default table"
        );
    }
}

#[test]
fn require_against_a_server_without_tls_is_a_tls_failure() {
    let cluster = trust_cluster();
    let mut options = cluster.connect_options();
    options.ssl_mode(SslMode::Require);
    let err = expect_connect_failure(
        Pool::new(options, PoolOptions::default()),
        ConnectFailure::Tls,
    );
    assert!(err.to_string().contains("sslmode"), "{err}");
    // Prefer falls back to plain text.
    let mut options = cluster.connect_options();
    options.ssl_mode(SslMode::Prefer);
    Pool::new(options, PoolOptions::default()).expect("prefer falls back");
}

// ----- TLS ------------------------------------------------------------------

#[test]
fn tls_modes_follow_libpq() {
    if !common::program_found("openssl", &["version"], "openssl") {
        return;
    }
    let certs = make_certificates();
    let cluster = tls_cluster(&certs);
    let mut admin = admin(&cluster);
    let port = cluster.port();
    let ca = certs.ca.to_str().unwrap();
    let other_ca = certs.other_ca.to_str().unwrap();

    // (label, connection string, Some(encrypted?) when it must connect, None when it must fail with Tls)
    let cases: Vec<(&str, String, Option<bool>)> = vec![
        (
            "disable is plain",
            "host=localhost sslmode=disable".to_owned(),
            Some(false),
        ),
        (
            "prefer encrypts when offered",
            "host=localhost sslmode=prefer".to_owned(),
            Some(true),
        ),
        (
            "require without a root certificate encrypts, checking nothing",
            "host=127.0.0.1 sslmode=require".to_owned(),
            Some(true),
        ),
        (
            "require with the right root certificate checks the chain only",
            format!("host=wrong.invalid hostaddr=127.0.0.1 sslmode=require sslrootcert={ca}"),
            Some(true),
        ),
        (
            "require with an unrelated root certificate checks the chain",
            format!("host=localhost sslmode=require sslrootcert={other_ca}"),
            None,
        ),
        (
            "verify-full with the right CA and host localhost",
            format!("host=localhost sslmode=verify-full sslrootcert={ca}"),
            Some(true),
        ),
        (
            "verify-full with the right CA and the certificate's IP address",
            format!("host=127.0.0.1 sslmode=verify-full sslrootcert={ca}"),
            Some(true),
        ),
        (
            "verify-full with a host name the certificate does not name",
            format!("host=wrong.invalid hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={ca}"),
            None,
        ),
        (
            "verify-full with an unrelated CA",
            format!("host=localhost sslmode=verify-full sslrootcert={other_ca}"),
            None,
        ),
        (
            "verify-full without a root certificate uses the system roots",
            "host=localhost sslmode=verify-full".to_owned(),
            None,
        ),
        (
            "verify-ca with the right CA ignores the host name",
            format!("host=wrong.invalid hostaddr=127.0.0.1 sslmode=verify-ca sslrootcert={ca}"),
            Some(true),
        ),
        (
            "verify-ca with an unrelated CA",
            format!("host=127.0.0.1 sslmode=verify-ca sslrootcert={other_ca}"),
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (label, settings, outcome) in cases {
        let app = common::unique("tls");
        let s = format!(
            "{settings} port={port} user=postgres dbname=postgres \
             application_name={app} connect_timeout=5"
        );
        let options: ConnectOptions = match s.parse() {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{label}: does not parse: {e}"));
                continue;
            }
        };
        let result = Pool::new(options, PoolOptions::default().max_size(1));
        match (outcome, result) {
            (Some(encrypted), Ok(pool)) => {
                let (all, tls) = sessions(&mut admin, &app);
                let want = if encrypted { all } else { 0 };
                if all < 1 || tls != want {
                    failures.push(format!(
                        "{label}: {all} sessions, {tls} encrypted (expected encrypted: {encrypted})"
                    ));
                }
                drop(pool);
            }
            (Some(_), Err(e)) => failures.push(format!("{label}: should connect, got {e:?}")),
            (None, Ok(_)) => failures.push(format!("{label}: should fail with Tls, connected")),
            (None, Err(e)) => match &e {
                Error::Connect {
                    failure: ConnectFailure::Tls,
                    ..
                } => {
                    if !e.to_string().contains("sslrootcert") {
                        failures.push(format!("{label}: message without a hint: {e}"));
                    }
                }
                _ => failures.push(format!("{label}: expected ConnectFailure::Tls, got {e:?}")),
            },
        }
    }

    // A store works end to end over verify-full, and the session is encrypted.
    let app = common::unique("tls_store");
    let mut options = ConnectOptions::new();
    options
        .host("localhost")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .ssl_mode(SslMode::VerifyFull)
        .ssl_root_cert(&certs.ca)
        .application_name(&app);
    let store = StateStore::builder()
        .connect_options(options)
        .migrate(true)
        .build()
        .expect("verify-full through the builder");
    assert_eq!(store.save("tls", &"secret".to_owned()).unwrap(), 1);
    assert_eq!(
        store.load::<String>("tls").unwrap().as_deref(),
        Some("secret")
    );
    let (all, tls) = sessions(&mut admin, &app);
    if all < 1 || tls != all {
        failures.push(format!(
            "store over verify-full: {all} sessions, {tls} encrypted"
        ));
    }

    // An unreadable root certificate is a TLS setup error, not a connect error.
    let mut options = cluster.connect_options();
    options
        .ssl_mode(SslMode::VerifyFull)
        .ssl_root_cert("/nonexistent/ca.pem");
    match Pool::new(options, PoolOptions::default()) {
        Err(Error::Tls(e)) => assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}"),
        other => failures.push(format!("unreadable sslrootcert: {other:?}")),
    }

    assert!(
        failures.is_empty(),
        "TLS cases failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn statement_timeout_cancels_a_blocked_call() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .pool_options(
            PoolOptions::default()
                .max_size(2)
                .statement_timeout(Some(Duration::from_millis(200))),
        )
        .migrate(true)
        .build()
        .unwrap();
    store.save("locked", &1u32).unwrap();
    // Another session holds the row's lock, so the save waits on it.
    let mut holder = schema.client().unwrap();
    let mut tx = holder.transaction().unwrap();
    tx.execute(
        &format!(
            "SELECT 1 FROM {} WHERE actor_id = 'locked' FOR UPDATE",
            store.table()
        ),
        &[],
    )
    .unwrap();
    // The lock is held until the save has returned: only the statement
    // timeout ends it.
    let saver = store.clone();
    let (result, took) = returns_within("a save waiting on a lock", WAIT, move || {
        saver.save("locked", &2u32)
    });
    let err = result.unwrap_err();
    assert!(matches!(err, Error::StatementTimeout), "{err:?}");
    assert!(err.to_string().contains("statement_timeout"), "{err}");
    eprintln!("statement timeout after {took:?} (200 ms)");
    tx.rollback().unwrap();
    // Nothing was written, and the connection is still usable.
    assert_eq!(store.load::<u32>("locked").unwrap(), Some(1));
    assert_eq!(store.save("locked", &3u32).unwrap(), 2);
}
