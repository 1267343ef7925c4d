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
//!
//! [`TestCitusCluster`] starts a Citus cluster (distributed PostgreSQL) the
//! same way, a coordinator and workers on loopback, when the extension is
//! installed ([`citus_installed`]).

use std::io;

mod citus;
mod cluster;
mod database;
mod proxy;
mod statements;
mod system;

pub use citus::{citus_installed, TestCitusCluster};
pub use cluster::{StopMode, TestCluster};
pub use database::{TestDatabase, TestSchema};
pub use proxy::{Request as ProxyRequest, TcpProxy};
pub use statements::point_statements;

fn other(message: String) -> io::Error {
    io::Error::other(message)
}
