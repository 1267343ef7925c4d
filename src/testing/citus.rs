//! A Citus cluster of a test's own: [`TestCitusCluster`].

use std::io;
use std::path::PathBuf;
use std::process::Command;

use super::cluster::TestCluster;
use super::other;
use super::system::find_bindir;
use crate::ConnectOptions;

/// The settings every node starts with: those of [`TestCluster::start`],
/// with the extension loaded.
const NODE_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("max_connections", "200"),
    ("shared_preload_libraries", "citus"),
];

/// A throwaway Citus cluster (distributed PostgreSQL) on loopback: a
/// coordinator and workers, each a [`TestCluster`] of its own (its own
/// `initdb`, run as the `postgres` user when this process is root) with the
/// extension created in database `postgres` and the workers added to the
/// coordinator. Dropping it stops every node and removes their directories.
///
/// Citus is not in every distribution's packages: [`citus_installed`]
/// tells whether the server [`TestCluster`] would start can load it, so
/// that a test can say it was skipped and why.
///
/// ```no_run
/// use trebuchet_postgres::testing::{citus_installed, TestCitusCluster};
/// use trebuchet_postgres::StateStore;
///
/// if let Err(why) = citus_installed() {
///     eprintln!("skipped: {why}");
///     return Ok(());
/// }
/// let cluster = TestCitusCluster::start(2)?;
/// let store = StateStore::builder()
///     .connect_options(cluster.coordinator().connect_options())
///     .migrate(true)
///     .build()?;
/// store.save("actor-1", &42u32)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TestCitusCluster {
    coordinator: TestCluster,
    workers: Vec<TestCluster>,
}

/// Whether the extension is installed into the server that
/// [`TestCluster`] starts (its `citus.so` beside the server binaries'
/// libraries); the reason, with how to install it, when not.
///
/// # Errors
///
/// The reason, when Citus is not installed or the server binaries cannot
/// be found.
pub fn citus_installed() -> Result<(), String> {
    let bindir = find_bindir().map_err(|e| e.to_string())?;
    let mut places: Vec<PathBuf> = Vec::new();
    if let Some(parent) = bindir.parent() {
        places.push(parent.join("lib"));
    }
    let pkglibdir = Command::new(bindir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    places.extend(pkglibdir);
    if places.iter().any(|dir| dir.join("citus.so").is_file()) {
        return Ok(());
    }
    Err(format!(
        "the Citus extension is not installed into the PostgreSQL in {} (no citus.so in {}): \
         build and install it from source (https://github.com/citusdata/citus), or set \
         PG_BINDIR to a PostgreSQL that has it",
        bindir.display(),
        places
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

impl TestCitusCluster {
    /// Starts a coordinator and `workers` workers, creates the extension on
    /// each and adds the workers to the coordinator. The coordinator holds
    /// no shards.
    ///
    /// # Errors
    ///
    /// When Citus is not installed ([`citus_installed`] says why), a node
    /// fails to start, or a node cannot be added; the message includes the
    /// server's words.
    pub fn start(workers: usize) -> io::Result<TestCitusCluster> {
        citus_installed().map_err(other)?;
        let coordinator = start_node()?;
        sql(
            &coordinator,
            &format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {})",
                coordinator.port()
            ),
        )?;
        let mut cluster = TestCitusCluster {
            coordinator,
            workers: Vec::with_capacity(workers),
        };
        for _ in 0..workers {
            cluster.add_worker()?;
        }
        Ok(cluster)
    }

    /// The coordinator: the node applications connect to.
    pub fn coordinator(&self) -> &TestCluster {
        &self.coordinator
    }

    /// The workers, in the order they were added.
    pub fn workers(&self) -> &[TestCluster] {
        &self.workers
    }

    /// Connection options for the coordinator (user and database
    /// `postgres`, TLS off).
    pub fn connect_options(&self) -> ConnectOptions {
        self.coordinator.connect_options()
    }

    /// Starts one more worker and adds it to the coordinator. Existing
    /// shards stay where they are until they are rebalanced
    /// (`citus_rebalance_start`); new distributed tables use it at once.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn add_worker(&mut self) -> io::Result<&TestCluster> {
        let worker = start_node()?;
        sql(
            &self.coordinator,
            &format!("SELECT citus_add_node('127.0.0.1', {})", worker.port()),
        )?;
        self.workers.push(worker);
        Ok(self.workers.last().expect("just pushed"))
    }
}

/// One node: a [`TestCluster`] that loads the extension, with it created
/// in database `postgres`.
fn start_node() -> io::Result<TestCluster> {
    let node = TestCluster::start_with(NODE_SETTINGS)?;
    sql(&node, "CREATE EXTENSION IF NOT EXISTS citus")?;
    Ok(node)
}

/// Runs `statements` on `node`, as `postgres` in database `postgres`.
fn sql(node: &TestCluster, statements: &str) -> io::Result<()> {
    node.connect_options()
        .connect()
        .and_then(|mut client| {
            client
                .batch_execute(statements)
                .map_err(crate::Error::Database)
        })
        .map_err(|e| other(format!("on the node at port {}: {e}", node.port())))
}
