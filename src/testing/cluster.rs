//! A PostgreSQL cluster of a test's own: [`TestCluster`].

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::other;
use super::system::{current_uid, find_bindir, postgres_ids};
use crate::{ConnectOptions, SslMode};

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
