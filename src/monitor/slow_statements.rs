//! The slowest statements on a store's table, from `pg_stat_statements`.

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use postgres::types::Type;

use crate::ident::quote_identifier;
use crate::pool::{Connection, Sql};
use crate::store::to_u64;

/// Where pg_stat_statements is installed, and which column names the
/// server's version uses (`mean_exec_time` from PostgreSQL 13 on).
pub(super) static STATEMENTS_EXTENSION: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT n.nspname::TEXT, current_setting('server_version_num')::INT4 >= 130000 \
         FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname = 'pg_stat_statements'",
        &[],
    )
});

/// How many slow statements
/// [`StoreStats::slow_statements`](crate::StoreStats::slow_statements) lists
/// at most.
const SLOW_STATEMENTS: i64 = 10;

/// The slowest statements on the table, when the server can tell.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SlowStatements {
    /// Up to ten reads and writes (`SELECT`, `INSERT`, `UPDATE`, `DELETE`,
    /// `WITH`) that mention the table, slowest mean time first; schema
    /// changes are left out.
    Found(Vec<SlowStatement>),
    /// The `pg_stat_statements` extension is not installed in this database.
    NotInstalled,
    /// Installed, but its figures could not be read; the server's reason
    /// (for example, the library is not in `shared_preload_libraries`).
    Unavailable(String),
}

impl fmt::Display for SlowStatements {
    /// A one-line summary, with what to do when the figures are missing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlowStatements::Found(found) => write!(f, "{} statements", found.len()),
            SlowStatements::NotInstalled => f.write_str(
                "pg_stat_statements is not installed: add it to shared_preload_libraries \
                 in postgresql.conf, restart, and run CREATE EXTENSION pg_stat_statements",
            ),
            SlowStatements::Unavailable(reason) => write!(
                f,
                "pg_stat_statements is installed but unreadable: {reason}"
            ),
        }
    }
}

/// One statement's timings from `pg_stat_statements`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlowStatement {
    /// The normalised statement text.
    pub query: String,
    /// How often it ran.
    pub calls: u64,
    /// Its mean execution time.
    pub mean: Duration,
    /// Its longest execution time.
    pub max: Duration,
}

/// The slowest statements mentioning `table`, or why there are none.
pub(super) fn slow_statements(
    c: &mut Connection,
    table: &str,
) -> Result<SlowStatements, postgres::Error> {
    let Some(extension) = c
        .prepare(&STATEMENTS_EXTENSION)?
        .query_opt(&mut c.client, &[])?
    else {
        return Ok(SlowStatements::NotInstalled);
    };
    let schema: String = extension.get(0);
    let (mean, max) = if extension.get::<_, bool>(1) {
        ("mean_exec_time", "max_exec_time")
    } else {
        ("mean_time", "max_time")
    };
    // The schema name comes from the catalog, quoted; nothing from a caller.
    let sql = format!(
        "SELECT query, calls, {mean}, {max} FROM {}.pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND position($1::TEXT IN query) > 0 \
         AND query ~* '^\\s*(with|select|insert|update|delete)\\M' \
         ORDER BY {mean} DESC LIMIT $2::INT8",
        quote_identifier(&schema)
    );
    let sql = Sql::once(sql, &[Type::TEXT, Type::INT8]);
    let found = c
        .prepare(&sql)
        .and_then(|st| st.query(&mut c.client, &[&table, &SLOW_STATEMENTS]));
    match found {
        Ok(rows) => Ok(SlowStatements::Found(
            rows.iter()
                .map(|row| SlowStatement {
                    query: row.get::<_, Option<String>>(0).unwrap_or_default(),
                    calls: to_u64(row.get(1)),
                    mean: millis(row.get(2)),
                    max: millis(row.get(3)),
                })
                .collect(),
        )),
        Err(e) => match e.as_db_error() {
            Some(db) => Ok(SlowStatements::Unavailable(db.message().to_owned())),
            None => Err(e),
        },
    }
}

fn millis(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or_default()
}
