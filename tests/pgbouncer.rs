//! Through PgBouncer (Debian's package), started by the tests on loopback in
//! front of a cluster of their own: the store in transaction mode (unnamed
//! statements) and in session mode (cached statements), and the listener,
//! which refuses a transaction-mode pooler and works through session mode or
//! a direct URL.
//!
//! Ignored by default because they need the `pgbouncer` program; `.ci/run`
//! installs it and runs them:
//!
//! ```sh
//! cargo test --features testing --test pgbouncer -- --ignored
//! ```

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use trebuchet_postgres::testing::TestCluster;
use trebuchet_postgres::{
    ChangeKind, ChangeListener, ConnectOptions, Error, Expected, PoolOptions, PoolerMode,
    StateStore,
};

// ----- a PgBouncer of the test's own ---------------------------------------------

/// PgBouncer's pool modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Session,
    Transaction,
}

/// A PgBouncer process in a temporary directory, listening on a free
/// loopback port in front of `cluster`; killed and removed on drop.
struct PgBouncer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// The `pgbouncer` program, or `None` (after `common::tool_found` said
/// what to do) when it is not installed.
#[track_caller]
fn pgbouncer_binary() -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file());
    common::tool_found(found.is_some(), "pgbouncer", "pgbouncer");
    found
}

/// The uid and gid to run PgBouncer as: `postgres` when we are root
/// (PgBouncer refuses to run as root).
fn run_as() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    Some((
        id(&["-u", "postgres"]).expect("a postgres user"),
        id(&["-g", "postgres"]).expect("a postgres group"),
    ))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` with at most `pool_size` server
    /// connections, and waits (at most 60 s) until it accepts connections.
    /// `None` when PgBouncer is not installed and the test is to be skipped.
    #[track_caller]
    fn start(cluster: &TestCluster, mode: Mode, pool_size: u32) -> Option<PgBouncer> {
        let binary = pgbouncer_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("trebuchet-pgbouncer-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        let mode_name = match mode {
            Mode::Session => "session",
            Mode::Transaction => "transaction",
        };
        let ini = format!(
            "[databases]\n\
             postgres = host=127.0.0.1 port={server} dbname=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {userlist}\n\
             pool_mode = {mode_name}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 200\n\
             logfile = {log}\n\
             pidfile = {pid}\n\
             ignore_startup_parameters = extra_float_digits\n",
            server = cluster.port(),
            userlist = path("userlist.txt"),
            log = path("pgbouncer.log"),
            pid = path("pgbouncer.pid"),
        );
        fs::write(dir.path().join("pgbouncer.ini"), ini).unwrap();
        let mut command = Command::new(&binary);
        command
            .arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = run_as() {
            command.uid(uid).gid(gid);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let bouncer = PgBouncer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PgBouncer did not start listening: {}",
                bouncer.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Some(bouncer)
    }

    /// Connection options through PgBouncer (declaring nothing).
    fn options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new();
        options
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .ssl_mode(trebuchet_postgres::SslMode::Disable);
        options
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster behind every PgBouncer of this file.
fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        TestCluster::start_with(&[("fsync", "off"), ("max_connections", "100")])
            .expect("start a cluster")
    })
}

fn builder(options: ConnectOptions, table: &str) -> trebuchet_postgres::StateStoreBuilder {
    StateStore::builder()
        .connect_options(options)
        .pool_options(PoolOptions::default().max_size(4))
        .table(table)
        .channel(format!("{table}_changes"))
}

/// Every kind of operation, from `threads` threads at once so that
/// PgBouncer hands each client's transactions to different server
/// connections. Returns the errors.
fn exercise(store: &StateStore, threads: usize, rounds: u32) -> Vec<String> {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut errors = Vec::new();
                let mut check = |what: &str, r: Result<(), Error>| {
                    if let Err(e) = r {
                        errors.push(format!("{what}: {e}"));
                    }
                };
                barrier.wait();
                let id = format!("t{t}");
                for round in 1..=rounds {
                    check("save", store.save(&id, &round).map(drop));
                    check(
                        "load",
                        store.load::<u32>(&id).and_then(|v| {
                            (v == Some(round)).then_some(()).ok_or_else(|| {
                                Error::Encode(format!("load gave {v:?}, not {round}").into())
                            })
                        }),
                    );
                    check(
                        "transform",
                        store
                            .transform("shared", |n: Option<u64>| n.unwrap_or(0) + 1)
                            .map(drop),
                    );
                    check("exists", store.exists(&id).map(drop));
                    check("sequence", store.sequence(&id).map(drop));
                    check(
                        "save_many",
                        store
                            .save_many(&[(format!("{id}-a"), 1u32), (format!("{id}-b"), 2)])
                            .map(drop),
                    );
                    check(
                        "load_many",
                        store
                            .load_many::<u32, _>(&[format!("{id}-a"), format!("{id}-b")])
                            .map(drop),
                    );
                    check(
                        "batch",
                        store
                            .batch()
                            .save(&format!("{id}-c"), &round)
                            .delete(&format!("{id}-b"))
                            .commit()
                            .map(drop),
                    );
                    check(
                        "delete_many",
                        store.delete_many(&[format!("{id}-a")]).map(drop),
                    );
                    check("list", store.list_actors(&id, None, 10).map(drop));
                    check("partitions", store.partitions().map(drop));
                    check(
                        "save_if",
                        store
                            .save_if(&format!("{id}-if-{round}"), &1u32, Expected::Absent)
                            .map(drop),
                    );
                }
                errors
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("a worker panicked"))
        .collect()
}

// ----- transaction mode ------------------------------------------------------------

/// Declared, transaction mode works: every operation from several threads,
/// counters exact, through two server connections shared by eight clients.
#[test]
#[ignore = "needs pgbouncer; .ci/run runs it"]
fn store_works_through_transaction_mode_with_unnamed_statements() {
    let Some(bouncer) = PgBouncer::start(cluster(), Mode::Transaction, 2) else {
        return;
    };
    let table = common::unique("tx");
    // The owner migrates directly; the application goes through PgBouncer.
    let mut direct = cluster().connect_options();
    direct.application_name("migrate");
    builder(direct, &table).migrate(true).build().unwrap();

    let mut options = bouncer.options();
    options.pooler(PoolerMode::Transaction);
    let store = builder(options, &table)
        .pool_options(PoolOptions::default().max_size(8))
        .build()
        .unwrap();
    let errors = exercise(&store, 8, 25);
    assert!(
        errors.is_empty(),
        "{} errors: {:#?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    let shared = store.load_versioned::<u64>("shared").unwrap().unwrap();
    assert_eq!((shared.value, shared.sequence), (200, 200));
    assert!(store.verify().unwrap().is_ok());
    store.stats().unwrap();
    store.connection_info().unwrap();
    // Migration through the pooler too (a no-op now).
    assert!(store.migrate().unwrap().is_empty());
}

/// Undeclared, the cached named statements break in transaction mode, as
/// MEASUREMENTS.md records: the control that shows the test above is real,
/// and the error says what to do.
#[test]
#[ignore = "needs pgbouncer; .ci/run runs it"]
fn undeclared_transaction_mode_fails_with_advice() {
    let Some(bouncer) = PgBouncer::start(cluster(), Mode::Transaction, 2) else {
        return;
    };
    let table = common::unique("undeclared");
    builder(cluster().connect_options(), &table)
        .migrate(true)
        .build()
        .unwrap();
    let store = builder(bouncer.options(), &table)
        .pool_options(PoolOptions::default().max_size(8))
        .build()
        .unwrap();
    let errors = exercise(&store, 8, 10);
    assert!(
        errors.iter().any(|e| e.contains("PoolerMode::Transaction")),
        "{} errors: {:#?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
}

/// A statement_timeout cannot be a session setting through a transaction
/// pooler: refused before connecting, with where to set it instead.
#[test]
#[ignore = "needs pgbouncer; .ci/run runs it"]
fn statement_timeout_through_transaction_mode_is_refused() {
    let Some(bouncer) = PgBouncer::start(cluster(), Mode::Transaction, 2) else {
        return;
    };
    let mut options = bouncer.options();
    options.pooler(PoolerMode::Transaction);
    let err = StateStore::builder()
        .connect_options(options)
        .pool_options(PoolOptions::default().statement_timeout(Some(Duration::from_secs(1))))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("ALTER ROLE"), "{err}");
}

// ----- session mode ----------------------------------------------------------------

/// Session mode keeps a server connection per client: cached statements
/// work, declared or not, and so does the listener.
#[test]
#[ignore = "needs pgbouncer; .ci/run runs it"]
fn store_and_listener_work_through_session_mode() {
    let Some(bouncer) = PgBouncer::start(cluster(), Mode::Session, 20) else {
        return;
    };
    for declared in [false, true] {
        let table = common::unique("session");
        builder(cluster().connect_options(), &table)
            .migrate(true)
            .build()
            .unwrap();
        let mut options = bouncer.options();
        if declared {
            options.pooler(PoolerMode::Session);
        }
        let store = builder(options, &table).build().unwrap();
        let listener = store.listener().expect("LISTEN works in session mode");
        let sub = listener.subscribe_actor("watched");
        let errors = exercise(&store, 4, 10);
        assert!(errors.is_empty(), "declared {declared}: {errors:#?}");
        let first = store.save("watched", &1u32).unwrap();
        common::expect_change(&sub, "watched", first, ChangeKind::Saved);
        assert!(store.delete("watched").unwrap());
        common::expect_change(&sub, "watched", first + 1, ChangeKind::Deleted);
        listener.shutdown();
    }
}

// ----- the listener ---------------------------------------------------------------

#[track_caller]
fn expect_refused(what: &str, result: Result<ChangeListener, Error>) {
    match result {
        Err(err @ Error::InvalidConfig { .. }) => {
            let text = err.to_string();
            assert!(text.contains("transaction"), "{what}: {text}");
            assert!(text.contains("direct"), "{what}: say what to do: {text}");
        }
        other => panic!("{what}: expected InvalidConfig, got {other:?}"),
    }
}

/// A listener refuses a transaction-mode pooler, declared or found out,
/// and works through a direct URL beside a store that writes through
/// PgBouncer.
#[test]
#[ignore = "needs pgbouncer; .ci/run runs it"]
fn listener_refuses_transaction_mode_and_takes_a_direct_url() {
    let Some(bouncer) = PgBouncer::start(cluster(), Mode::Transaction, 3) else {
        return;
    };
    let table = common::unique("listen");
    builder(cluster().connect_options(), &table)
        .migrate(true)
        .build()
        .unwrap();
    let mut options = bouncer.options();
    options.pooler(PoolerMode::Transaction);
    let store = builder(options.clone(), &table).build().unwrap();

    // Declared: refused before connecting.
    expect_refused("store.listener()", store.listener());
    expect_refused(
        "declared options",
        ChangeListener::builder()
            .connect_options(options)
            .channel(store.channel())
            .build(),
    );
    // Not declared: found out by the listener's check at start.
    for _ in 0..3 {
        expect_refused(
            "undeclared PgBouncer URL",
            ChangeListener::builder()
                .connect_options(bouncer.options())
                .channel(store.channel())
                .build(),
        );
    }

    // A direct URL for the listener; writes through PgBouncer reach it.
    let listener = store
        .listener_builder()
        .connect_options(cluster().connect_options())
        .build()
        .expect("a direct listener");
    let sub = listener.subscribe();
    for n in 1..=20u64 {
        assert_eq!(store.save("direct", &n).unwrap(), n);
        common::expect_change(&sub, "direct", n, ChangeKind::Saved);
    }
    assert!(store.delete("direct").unwrap());
    common::expect_change(&sub, "direct", 21, ChangeKind::Deleted);
    // A direct listener is not mistaken for a pooled one.
    ChangeListener::builder()
        .connect_options(cluster().connect_options())
        .build()
        .expect("direct");
    drop(bouncer);
}
