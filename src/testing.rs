//! A real PostgreSQL for tests and examples, without Docker.
//!
//! [`TestDatabase::shared`] gives every test of a process the same server:
//! the one named by `TEST_DATABASE_URL` or `DATABASE_URL` when set, otherwise
//! a throwaway cluster ([`TestCluster`]) started with the system's `initdb` and
//! `pg_ctl` in a temporary directory on a free loopback port, and removed when
//! the process exits (even when it is killed). [`TestDatabase::schema`] gives
//! each test a schema of its own, dropped at the end, so tests run in parallel.
//!
//! ```no_run
//! use trebuchet_postgres::testing::TestDatabase;
//!
//! let schema = TestDatabase::shared().schema();
//! let store = schema.store_builder().migrate(true).build()?;
//! store.save("actor-1", &42u32)?;
//! # Ok::<(), trebuchet_postgres::Error>(())
//! ```
//!
//! Finding the server binaries: `PG_BINDIR` when set, else `pg_config
//! --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else `PATH`.
//! PostgreSQL refuses to run as root; as root the cluster runs as the
//! `postgres` user.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::config::{ConnectOptions, SslMode};
use crate::ident::quote_identifier;
use crate::store::{StateStore, StateStoreBuilder};
use crate::PoolOptions;

mod proxy;
pub use proxy::{Request as ProxyRequest, TcpProxy};

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

/// How to shut a [`TestCluster`] down, as `pg_ctl stop -m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for clients to disconnect.
    Smart,
    /// Disconnect clients, roll back their transactions, shut down cleanly.
    Fast,
    /// Abort at once, as a crash would (recovery runs at the next start).
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A PostgreSQL cluster of its own in a temporary directory, listening on
/// `127.0.0.1` and a Unix socket in that directory, with trust
/// authentication for the `postgres` user. Dropping it stops the server and
/// removes the directory; a watchdog process does the same if this process
/// dies first.
#[derive(Debug)]
pub struct TestCluster {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    settings: Vec<(String, String)>,
}

impl TestCluster {
    /// Initialises and starts a cluster with settings for fast tests
    /// (`fsync=off`, `max_connections=200`).
    ///
    /// # Errors
    ///
    /// When the server binaries cannot be found or `initdb`/`pg_ctl` fail;
    /// the message includes their output.
    pub fn start() -> io::Result<TestCluster> {
        Self::start_with(&[("fsync", "off"), ("max_connections", "200")])
    }

    /// Initialises and starts a cluster with these `postgresql.conf` settings.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with(settings: &[(&str, &str)]) -> io::Result<TestCluster> {
        let bindir = find_bindir()?;
        let owner = if current_uid()? == 0 {
            Some(postgres_ids()?)
        } else {
            None
        };
        let root = tempfile::Builder::new()
            .prefix("trebuchet-pg-")
            .tempdir()?
            .keep();
        let mut cluster = TestCluster {
            root,
            bindir,
            port: 0,
            owner,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&cluster.root, Some(uid), Some(gid))?;
        }
        cluster.spawn_watchdog()?;
        cluster.run(
            "initdb",
            &[
                "-D",
                cluster.data_dir().to_str().expect("utf-8 temp path"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `postgres` as user `postgres` over TCP, TLS off.
    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Connection options matching [`url`](Self::url).
    pub fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new();
        options
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .ssl_mode(SslMode::Disable);
        options
    }

    /// Stops the server, keeping its data.
    ///
    /// # Errors
    ///
    /// When `pg_ctl stop` fails.
    pub fn stop(&self, mode: StopMode) -> io::Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 temp path"),
                "-m",
                mode.as_arg(),
                "-w",
                "stop",
            ],
        )
    }

    /// Starts the server again on the same port after [`stop`](Self::stop).
    ///
    /// # Errors
    ///
    /// When `pg_ctl start` fails.
    pub fn restart(&self) -> io::Result<()> {
        self.start_server()
    }

    /// Starts the server again after [`stop`](Self::stop), but as a standby
    /// with no primary to follow and `hot_standby` off: it stays in recovery,
    /// refusing every connection with SQLSTATE 57P03 (`cannot_connect_now`,
    /// "the database system is not accepting connections"), until
    /// [`promote`](Self::promote). A server that is still starting up,
    /// for as long as a test needs.
    ///
    /// # Errors
    ///
    /// When the signal file cannot be written or `pg_ctl start` fails.
    pub fn restart_in_recovery(&self) -> io::Result<()> {
        let signal = self.data_dir().join("standby.signal");
        fs::write(&signal, b"")?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&signal, Some(uid), Some(gid))?;
        }
        self.start_server_with(&[("hot_standby", "off")])
    }

    /// Ends the recovery of [`restart_in_recovery`](Self::restart_in_recovery):
    /// the server accepts connections once this returns.
    ///
    /// # Errors
    ///
    /// When `pg_ctl promote` fails.
    pub fn promote(&self) -> io::Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 temp path"),
                "-w",
                "-t",
                "60",
                "promote",
            ],
        )
    }

    fn start_server(&self) -> io::Result<()> {
        self.start_server_with(&[])
    }

    fn start_server_with(&self, extra: &[(&str, &str)]) -> io::Result<()> {
        let data = self.data_dir();
        let log = self.root.join("server.log");
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.root.display()
        );
        let settings = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (key, value) in settings.chain(extra.iter().copied()) {
            options.push_str(&format!(" -c {key}={value}"));
        }
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 temp path"),
                "-l",
                log.to_str().expect("utf-8 temp path"),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map_err(|e| {
            let log = fs::read_to_string(&log).unwrap_or_default();
            other(format!("{e}\nserver log:\n{log}"))
        })
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<()> {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid).env("HOME", &self.root);
        }
        let out = cmd
            .output()
            .map_err(|e| other(format!("cannot run {program}: {e}")))?;
        if !out.status.success() {
            return Err(other(format!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// A detached shell that waits for this process to exit, then stops the
    /// server (SIGQUIT, an immediate shutdown) and removes the directory.
    fn spawn_watchdog(&self) -> io::Result<()> {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             pidfile='{root}/data/postmaster.pid'; \
             if [ -f \"$pidfile\" ]; then kill -QUIT \"$(head -n 1 \"$pidfile\")\" 2>/dev/null; fi; \
             n=0; while [ -f \"$pidfile\" ] && [ $n -lt 50 ]; do sleep 0.2; n=$((n+1)); done; \
             rm -rf '{root}'",
            pid = std::process::id(),
            root = self.root.display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map(drop)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.stop(StopMode::Immediate);
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn current_uid() -> io::Result<u32> {
    command_output("id", &["-u"])
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| other("cannot run `id -u`".into()))
}

fn postgres_ids() -> io::Result<(u32, u32)> {
    let uid = command_output("id", &["-u", "postgres"]).and_then(|s| s.parse().ok());
    let gid = command_output("id", &["-g", "postgres"]).and_then(|s| s.parse().ok());
    match (uid, gid) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(other(
            "running as root, but there is no `postgres` user to run PostgreSQL as \
             (PostgreSQL refuses to run as root): install PostgreSQL or create the user"
                .into(),
        )),
    }
}

fn find_bindir() -> io::Result<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    if let Some(dir) = command_output("pg_config", &["--bindir"]).map(PathBuf::from) {
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    Err(other(
        "cannot find PostgreSQL's initdb: install PostgreSQL (Debian: apt-get install postgresql), \
         set PG_BINDIR, or set TEST_DATABASE_URL to a running server"
            .into(),
    ))
}

/// The SQL of every statement a store runs for one actor, keyed by
/// `actor_id = $1`, by name: `load`, `load_versioned`, `exists`,
/// `sequence`, `save`, `save_if_absent`, `save_if_sequence`,
/// `save_with_sequence` (a save at a given number) and `delete`. For tests of how the server runs them
/// (such as partition pruning); `$1` is the actor id, `$2` the state.
pub fn point_statements(store: &StateStore) -> Vec<(&'static str, String)> {
    let sql = store.statements();
    vec![
        ("load", sql.load.text().to_owned()),
        ("load_versioned", sql.load_versioned.text().to_owned()),
        ("exists", sql.exists.text().to_owned()),
        ("sequence", sql.sequence.text().to_owned()),
        ("save", sql.save.text().to_owned()),
        ("save_if_absent", sql.save_if_absent.text().to_owned()),
        ("save_if_sequence", sql.save_if_sequence.text().to_owned()),
        (
            "save_with_sequence",
            sql.save_with_sequence.text().to_owned(),
        ),
        ("delete", sql.delete.text().to_owned()),
    ]
}

/// The server the tests of one process share.
#[derive(Debug)]
pub struct TestDatabase {
    options: ConnectOptions,
    url: String,
    cluster: Option<TestCluster>,
}

impl TestDatabase {
    /// The process-wide test server: `TEST_DATABASE_URL` or `DATABASE_URL`
    /// when set, otherwise a throwaway cluster started on first use.
    ///
    /// # Panics
    ///
    /// When no server can be reached or started; the message says why.
    pub fn shared() -> &'static TestDatabase {
        static SHARED: OnceLock<TestDatabase> = OnceLock::new();
        SHARED.get_or_init(|| {
            TestDatabase::from_env_or_start()
                .unwrap_or_else(|e| panic!("no PostgreSQL for tests: {e}"))
        })
    }

    /// A server of this value's own: `TEST_DATABASE_URL` or `DATABASE_URL`
    /// when set, otherwise a throwaway cluster that stops when the value is
    /// dropped. For programs (examples, tools) rather than tests, which
    /// share [`shared`](Self::shared).
    ///
    /// # Errors
    ///
    /// When the variable does not parse or no cluster can be started.
    pub fn from_env_or_start() -> io::Result<TestDatabase> {
        let url = ["TEST_DATABASE_URL", "DATABASE_URL"]
            .iter()
            .filter_map(|key| std::env::var(key).ok())
            .find(|url| !url.trim().is_empty());
        if let Some(url) = url {
            let options = url
                .parse()
                .map_err(|e| other(format!("TEST_DATABASE_URL/DATABASE_URL: {e}")))?;
            return Ok(TestDatabase {
                options,
                url,
                cluster: None,
            });
        }
        let cluster = TestCluster::start()?;
        Ok(TestDatabase {
            options: cluster.connect_options(),
            url: cluster.url(),
            cluster: Some(cluster),
        })
    }

    /// The URL of the server. May hold a password when it came from the
    /// environment: do not print it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connection options for the server.
    pub fn connect_options(&self) -> ConnectOptions {
        self.options.clone()
    }

    /// The throwaway cluster, when one was started.
    pub fn cluster(&self) -> Option<&TestCluster> {
        self.cluster.as_ref()
    }

    /// A fresh schema with a unique name, dropped with everything in it when
    /// the returned value is dropped.
    ///
    /// # Panics
    ///
    /// When the schema cannot be created.
    pub fn schema(&self) -> TestSchema {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let schema = TestSchema {
            name,
            options: self.options.clone(),
        };
        schema
            .execute(&format!("CREATE SCHEMA {}", quote_identifier(&schema.name)))
            .unwrap_or_else(|e| panic!("cannot create test schema: {e}"));
        schema
    }
}

/// A schema of one test's own; see [`TestDatabase::schema`].
#[derive(Debug)]
pub struct TestSchema {
    name: String,
    options: ConnectOptions,
}

impl TestSchema {
    /// The schema's name (also a valid, unique channel name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `schema.table`, for [`StateStoreBuilder::table`].
    pub fn table(&self, table: &str) -> String {
        format!("{}.{}", self.name, table)
    }

    /// A channel name unique to this schema.
    pub fn channel(&self) -> String {
        format!("{}_changes", self.name)
    }

    /// Connection options for the server.
    pub fn connect_options(&self) -> ConnectOptions {
        self.options.clone()
    }

    /// A builder for a store on `schema.actor_states` with this schema's
    /// channel and a small pool.
    pub fn store_builder(&self) -> StateStoreBuilder {
        StateStore::builder()
            .connect_options(self.options.clone())
            .pool_options(PoolOptions::default().max_size(8))
            .table(self.table(crate::DEFAULT_TABLE))
            .channel(self.channel())
    }

    /// A migrated store from [`store_builder`](Self::store_builder).
    ///
    /// # Panics
    ///
    /// When the store cannot be built.
    pub fn store(&self) -> StateStore {
        self.store_builder()
            .migrate(true)
            .build()
            .unwrap_or_else(|e| panic!("cannot build test store: {e}"))
    }

    /// A plain driver connection to the server, for statements a test runs
    /// itself.
    ///
    /// # Errors
    ///
    /// When the server cannot be reached.
    pub fn client(&self) -> Result<postgres::Client, crate::Error> {
        self.options
            .dialer()?
            .connect()
            .map_err(crate::Error::Database)
    }

    fn execute(&self, sql: &str) -> Result<(), crate::Error> {
        self.client()?
            .batch_execute(sql)
            .map_err(crate::Error::Database)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let _ = self.execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_identifier(&self.name)
        ));
    }
}
