//! The server the tests of a process share ([`TestDatabase`]), and a schema
//! of each test's own in it ([`TestSchema`]).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::{other, TestCitusCluster, TestCluster};
use crate::{quote_identifier, ConnectOptions, PoolOptions, StateStore, StateStoreBuilder};

/// The server the tests of one process share.
#[derive(Debug)]
pub struct TestDatabase {
    options: ConnectOptions,
    url: String,
    cluster: Option<TestCluster>,
    citus: Option<TestCitusCluster>,
}

impl TestDatabase {
    /// The process-wide test server: `TEST_DATABASE_URL` or `DATABASE_URL`
    /// when set, otherwise a throwaway cluster started on first use; with
    /// `TEST_CITUS=1`, a throwaway Citus cluster ([`TestCitusCluster`], a
    /// coordinator and two workers), so that the same tests run against
    /// distributed tables.
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
    /// dropped (a Citus cluster with `TEST_CITUS=1`). For programs
    /// (examples, tools) rather than tests, which share
    /// [`shared`](Self::shared).
    ///
    /// # Errors
    ///
    /// When the variable does not parse or no cluster can be started
    /// (with `TEST_CITUS=1`: when Citus is not installed).
    pub fn from_env_or_start() -> io::Result<TestDatabase> {
        if std::env::var("TEST_CITUS").is_ok_and(|v| !v.is_empty() && v != "0") {
            return Self::citus_cluster(2);
        }
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
                citus: None,
            });
        }
        let cluster = TestCluster::start()?;
        Ok(TestDatabase {
            options: cluster.connect_options(),
            url: cluster.url(),
            cluster: Some(cluster),
            citus: None,
        })
    }

    /// A throwaway Citus cluster of this value's own, with `workers`
    /// workers, whose coordinator is the server.
    ///
    /// # Errors
    ///
    /// As [`TestCitusCluster::start`].
    pub fn citus_cluster(workers: usize) -> io::Result<TestDatabase> {
        let citus = TestCitusCluster::start(workers)?;
        Ok(TestDatabase {
            options: citus.connect_options(),
            url: citus.coordinator().url(),
            cluster: None,
            citus: Some(citus),
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

    /// The throwaway cluster, when one was started (a Citus cluster's
    /// coordinator).
    pub fn cluster(&self) -> Option<&TestCluster> {
        self.cluster
            .as_ref()
            .or(self.citus.as_ref().map(TestCitusCluster::coordinator))
    }

    /// The throwaway Citus cluster, when one was started.
    pub fn citus(&self) -> Option<&TestCitusCluster> {
        self.citus.as_ref()
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
        self.options.connect()
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
