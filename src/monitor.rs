//! Monitoring and diagnostics: the figures of the seed's Monitoring section
//! (table size, actor count, updates per second, listeners, slow queries)
//! and the checks of its Troubleshooting section, as data.
//!
//! The catalog queries live here; the statements on the store's own table
//! are built with the others in `schema.rs`.

use std::fmt;
use std::sync::LazyLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use fallible_iterator::FallibleIterator;
use postgres::types::Type;

use crate::change::PROBE_KEY;
use crate::config::{classify_connect, listen_through_transaction_pooler, PoolerMode};
use crate::error::{Error, Result};
use crate::ident::quote_identifier;
use crate::pool::{Connection, PoolState, Sql};
use crate::schema::{self, Layout};
use crate::store::{to_u64, Failure, StateStore};

/// The tables that hold the rows: the table itself, or the leaf partitions
/// of a partitioned one (which holds nothing itself).
const LEAVES: &str = "\
    WITH leaves AS (SELECT p.relid FROM pg_partition_tree(to_regclass($1::TEXT)) p WHERE p.isleaf \
    UNION ALL SELECT to_regclass($1) WHERE to_regclass($1) IS NOT NULL \
    AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(to_regclass($1))))";

/// Per-table figures, from the statistics views, in one round trip; summed
/// over the partitions of a partitioned table.
static TABLE_FIGURES: LazyLock<Sql> = LazyLock::new(|| {
    let text = format!(
        "{LEAVES}, s AS (SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::INT8 AS writes, \
         sum(n_dead_tup)::INT8 AS dead, max(GREATEST(last_vacuum, last_autovacuum)) AS vacuumed, \
         max(last_autovacuum) AS autovacuumed, sum(n_tup_upd)::INT8 AS updates, \
         sum(n_tup_hot_upd)::INT8 AS hot FROM pg_stat_user_tables \
         WHERE relid IN (SELECT relid FROM leaves)) \
         SELECT to_regclass($1) IS NOT NULL, \
         (SELECT sum(pg_total_relation_size(relid))::INT8 FROM leaves), \
         s.writes, s.dead, s.vacuumed, \
         (SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()), \
         pg_notification_queue_usage(), \
         (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
         current_setting('max_connections')::INT8, clock_timestamp(), \
         s.autovacuumed, s.updates, s.hot FROM s"
    );
    Sql::new(text, &[Type::TEXT])
});

/// The write counter alone, for the start of a window.
static WRITE_COUNTER: LazyLock<Sql> = LazyLock::new(|| {
    let text = format!(
        "{LEAVES} SELECT (SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::INT8 \
         FROM pg_stat_user_tables WHERE relid IN (SELECT relid FROM leaves)), clock_timestamp()"
    );
    Sql::new(text, &[Type::TEXT])
});

/// Every other client session, to find those listening on the channel.
static SESSIONS: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT pid, usename::TEXT, application_name, host(client_addr), state_change, query \
         FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        &[],
    )
});

/// Where pg_stat_statements is installed, and which column names the
/// server's version uses (`mean_exec_time` from PostgreSQL 13 on).
static STATEMENTS_EXTENSION: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT n.nspname::TEXT, current_setting('server_version_num')::INT4 >= 130000 \
         FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname = 'pg_stat_statements'",
        &[],
    )
});

/// A notification sent by hand, to time a round trip.
static NOTIFY: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT pg_notify($1::TEXT, $2::TEXT)",
        &[Type::TEXT, Type::TEXT],
    )
});

/// Who and where this session is, and what it may do with the table.
static SESSION_INFO: LazyLock<Sql> =
    LazyLock::new(|| Sql::new(SESSION_INFO_TEXT, &[Type::TEXT, Type::TEXT]));

const SESSION_INFO_TEXT: &str = "\
    SELECT current_setting('server_version'), current_user::TEXT, current_database()::TEXT, \
    (SELECT CASE WHEN ssl THEN version || ' ' || cipher END FROM pg_stat_ssl \
     WHERE pid = pg_backend_pid()), \
    to_regclass($1::TEXT) IS NOT NULL, \
    has_table_privilege(to_regclass($1), 'SELECT'), has_table_privilege(to_regclass($1), 'INSERT'), \
    has_table_privilege(to_regclass($1), 'UPDATE'), has_table_privilege(to_regclass($1), 'DELETE'), \
    has_table_privilege(to_regclass($2::TEXT), 'SELECT'), has_table_privilege(to_regclass($2), 'INSERT'), \
    has_table_privilege(to_regclass($2), 'UPDATE')";

/// How many slow statements [`StoreStats::slow_statements`] lists at most.
const SLOW_STATEMENTS: i64 = 10;

/// What [`StateStore::stats`] measured: the seed's Monitoring section, as a
/// struct. Figures the server does not keep (statistics turned off) are
/// `None`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoreStats {
    /// The quoted table name.
    pub table: String,
    /// The store's notification channel.
    pub channel: String,
    /// When the figures were taken (the server's clock).
    pub sampled_at: SystemTime,
    /// The table's size on disk with its indexes and TOAST data, in bytes
    /// (`pg_total_relation_size`).
    pub total_bytes: u64,
    /// Actors in the table (an exact count: it reads every row).
    pub actors: u64,
    /// Actor ids ever deleted, whose last sequence numbers the tombstone
    /// table keeps.
    pub tombstones: u64,
    /// Rows inserted, updated and deleted in the table, as the statistics
    /// collector counts them since [`writes_counted_since`](Self::writes_counted_since).
    /// Every save and delete is one. Backends report their counts about once
    /// a second, so the latest writes may be missing.
    pub writes: Option<u64>,
    /// When the database's statistics were last reset; `None` when they never
    /// were.
    pub writes_counted_since: Option<SystemTime>,
    /// Writes per second over [`window`](Self::window), from
    /// [`StateStore::stats_over`] or [`writes_per_second_since`](Self::writes_per_second_since).
    pub writes_per_second: Option<f64>,
    /// The window of [`writes_per_second`](Self::writes_per_second).
    pub window: Option<Duration>,
    /// Dead row versions awaiting vacuum (over every partition of a
    /// partitioned table).
    pub dead_rows: Option<u64>,
    /// The last vacuum of the table, manual or automatic (the latest of any
    /// partition).
    pub last_vacuum: Option<SystemTime>,
    /// The last vacuum autovacuum ran on the table (the latest of any
    /// partition); `None` when it never has. Long ago on a busy table means
    /// autovacuum falls behind: see the README's "Maintenance".
    pub last_autovacuum: Option<SystemTime>,
    /// The share of updates that were HOT (heap-only tuples: no index
    /// entry written), from 0 to 1, since the statistics began; `None`
    /// before the first update.
    pub hot_update_ratio: Option<f64>,
    /// Hash partitions of the table, `None` for a plain table.
    pub partitions: Option<u32>,
    /// Sessions listening on the channel, as far as `pg_stat_activity` tells:
    /// those whose last statement was `LISTEN` on it, which includes every
    /// [`ChangeListener`](crate::ChangeListener) and the seed's Swift adapter.
    pub listeners: Vec<ListenerSession>,
    /// Sessions of other roles whose statements this role may not see, so
    /// that they could be listeners too (grant `pg_read_all_stats` to see
    /// them).
    pub hidden_sessions: u64,
    /// How full the server's notification queue is, from 0 to 1
    /// (`pg_notification_queue_usage()`). It fills when a listening session
    /// stops reading; at 1, every `NOTIFY`, and so every write, fails.
    pub notification_queue_usage: f64,
    /// Client connections open on the server, from every application.
    pub server_connections: u64,
    /// The server's `max_connections`.
    pub max_connections: u64,
    /// The slowest statements on the table, from `pg_stat_statements`.
    pub slow_statements: SlowStatements,
    /// This store's own pool.
    pub pool: PoolState,
}

impl StoreStats {
    /// Writes per second between `earlier` and these figures: a rate over a
    /// window of your choosing, without the sleep of
    /// [`StateStore::stats_over`]. `None` when either lacks the write count,
    /// `earlier` is not earlier, or the statistics were reset in between.
    pub fn writes_per_second_since(&self, earlier: &StoreStats) -> Option<f64> {
        rate(
            earlier.writes?,
            earlier.sampled_at,
            self.writes?,
            self.sampled_at,
        )
    }
}

fn rate(before: u64, from: SystemTime, after: u64, to: SystemTime) -> Option<f64> {
    let seconds = to.duration_since(from).ok()?.as_secs_f64();
    if seconds <= 0.0 || after < before {
        return None;
    }
    Some((after - before) as f64 / seconds)
}

/// A session listening on the store's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerSession {
    /// The server process id (for `pg_terminate_backend`).
    pub pid: i32,
    /// The role it connected as.
    pub user: Option<String>,
    /// Its `application_name`.
    pub application_name: String,
    /// The client's address; `None` for a Unix socket.
    pub client_addr: Option<String>,
    /// Since when it has been waiting (the end of its last statement).
    pub since: Option<SystemTime>,
}

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

/// Who a store connects as and what it may do, from
/// [`StateStore::connection_info`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The server's version (`server_version`, such as `"16.4"`).
    pub server_version: String,
    /// The role connected as.
    pub user: String,
    /// The database connected to.
    pub database: String,
    /// The TLS version and cipher, or `None` when the connection is not
    /// encrypted.
    pub tls: Option<String>,
    /// Whether the table exists.
    pub table_exists: bool,
    /// Which of `SELECT`, `INSERT`, `UPDATE` and `DELETE` the role lacks on
    /// the table (empty when the table does not exist).
    pub missing_privileges: Vec<&'static str>,
    /// The quoted, qualified tombstone table.
    pub tombstone_table: String,
    /// Which of `SELECT`, `INSERT` and `UPDATE` the role lacks on the
    /// tombstone table, which saves read and the trigger writes on deletes
    /// (empty when that table does not exist).
    pub missing_tombstone_privileges: Vec<&'static str>,
}

/// Whether `query`, the last statement of a session, is `LISTEN` on
/// `channel`: quoted names match exactly, unquoted ones as PostgreSQL folds
/// them, to lower case.
pub(crate) fn is_listen_on(query: &str, channel: &str) -> bool {
    let query = query.trim().trim_end_matches(';').trim_end();
    let Some(keyword) = query.get(..6) else {
        return false;
    };
    if !keyword.eq_ignore_ascii_case("listen") {
        return false;
    }
    let rest = &query[6..];
    if !rest.starts_with(|c: char| c.is_whitespace()) {
        return false;
    }
    let name = rest.trim();
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\"") == channel,
        None => name.to_lowercase() == channel,
    }
}

impl StateStore {
    /// The table's figures, the channel's listeners, the notification
    /// queue, the server's connections, slow statements when
    /// `pg_stat_statements` is installed, and this store's pool: the seed's
    /// Monitoring section. Without a rate: see [`stats_over`](Self::stats_over)
    /// and [`StoreStats::writes_per_second_since`].
    ///
    /// A few round trips on one pooled connection; counting the actors reads
    /// every row.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let stats = store.stats()?;
    /// println!("{} actors in {} bytes, {} listeners", stats.actors, stats.total_bytes, stats.listeners.len());
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::SchemaMissing`] when the table does not exist; connection
    /// and database errors.
    pub fn stats(&self) -> Result<StoreStats> {
        let table = self.table();
        let channel = self.channel().to_owned();
        let bare_table = self.names().table.clone();
        let names = self.names().clone();
        let mut stats = self.call(true, |inner, c| {
            let row = c
                .prepare(&TABLE_FIGURES)?
                .query_one(&mut c.client, &[&table])?;
            if !row.get::<_, bool>(0) {
                return Err(Failure::Store(Error::SchemaMissing {
                    table: table.clone(),
                }));
            }
            let actors = c.prepare(&inner.sql.count_prefix)?;
            let actors = to_u64(actors.query_one(&mut c.client, &[&""])?.get(0));
            let tombstones = c.prepare(&inner.sql.count_tombstones)?;
            let tombstones = to_u64(tombstones.query_one(&mut c.client, &[])?.get(0));
            let mut listeners = Vec::new();
            let mut hidden_sessions = 0;
            for session in c.prepare(&SESSIONS)?.query(&mut c.client, &[])? {
                let query: Option<String> = session.get(5);
                match query.as_deref() {
                    Some(q) if is_listen_on(q, &channel) => listeners.push(ListenerSession {
                        pid: session.get(0),
                        user: session.get(1),
                        application_name: session.get::<_, Option<String>>(2).unwrap_or_default(),
                        client_addr: session.get(3),
                        since: session.get(4),
                    }),
                    Some("<insufficient privilege>") | None => hidden_sessions += 1,
                    Some(_) => {}
                }
            }
            let slow_statements = slow_statements(c, &bare_table)?;
            let partitions = match schema::layout(&mut c.client, &names)? {
                Layout::Hash(n) => Some(n),
                _ => None,
            };
            let updates: Option<i64> = row.get(11);
            let hot: Option<i64> = row.get(12);
            Ok(StoreStats {
                table: table.clone(),
                channel: channel.clone(),
                sampled_at: row.get(9),
                total_bytes: to_u64(row.get::<_, Option<i64>>(1).unwrap_or(0)),
                actors,
                tombstones,
                writes: row.get::<_, Option<i64>>(2).map(to_u64),
                writes_counted_since: row.get(5),
                writes_per_second: None,
                window: None,
                dead_rows: row.get::<_, Option<i64>>(3).map(to_u64),
                last_vacuum: row.get(4),
                last_autovacuum: row.get(10),
                hot_update_ratio: match (updates, hot) {
                    (Some(updates), Some(hot)) if updates > 0 => Some(hot as f64 / updates as f64),
                    _ => None,
                },
                partitions,
                listeners,
                hidden_sessions,
                notification_queue_usage: row.get(6),
                server_connections: to_u64(row.get(7)),
                max_connections: to_u64(row.get(8)),
                slow_statements,
                pool: self.pool().state(),
            })
        })?;
        stats.pool = self.pool().state();
        Ok(stats)
    }

    /// [`stats`](Self::stats) with writes per second measured over `window`:
    /// reads the write counter, sleeps `window`, then takes the figures.
    /// Backends report their counts about once a second (idle ones within
    /// ten), so use a window of several seconds for a steady figure.
    ///
    /// # Errors
    ///
    /// As [`stats`](Self::stats).
    pub fn stats_over(&self, window: Duration) -> Result<StoreStats> {
        if window.is_zero() {
            return self.stats();
        }
        let table = self.table();
        let (before, from): (Option<i64>, SystemTime) = self.call(true, |_, c| {
            let row = c
                .prepare(&WRITE_COUNTER)?
                .query_one(&mut c.client, &[&table])?;
            Ok((row.get(0), row.get(1)))
        })?;
        thread::sleep(window);
        let mut stats = self.stats()?;
        stats.window = Some(window);
        stats.writes_per_second = match (before, stats.writes) {
            (Some(before), Some(after)) => rate(to_u64(before), from, after, stats.sampled_at),
            _ => None,
        };
        Ok(stats)
    }

    /// The server's version, the role and database connected to, whether
    /// the connection is encrypted, and the role's privileges on the table
    /// and its tombstone table:
    /// the first things to check when something fails.
    ///
    /// # Errors
    ///
    /// Connection and database errors.
    pub fn connection_info(&self) -> Result<ConnectionInfo> {
        let table = self.table();
        self.call(true, |inner, c| {
            let tombstones = inner.names.qualify(&inner.names.tombstones);
            let row = c
                .prepare(&SESSION_INFO)?
                .query_one(&mut c.client, &[&table, &tombstones])?;
            let missing = |first: usize, privileges: &[&'static str]| -> Vec<&'static str> {
                privileges
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| row.get::<_, Option<bool>>(first + i) == Some(false))
                    .map(|(_, privilege)| *privilege)
                    .collect()
            };
            let missing_privileges = missing(5, &["SELECT", "INSERT", "UPDATE", "DELETE"]);
            let missing_tombstone_privileges = missing(9, &["SELECT", "INSERT", "UPDATE"]);
            Ok(ConnectionInfo {
                server_version: row.get(0),
                user: row.get(1),
                database: row.get(2),
                tls: row.get(3),
                table_exists: row.get(4),
                missing_privileges,
                tombstone_table: tombstones,
                missing_tombstone_privileges,
            })
        })
    }

    /// Sends a probe notification on the store's channel from a pooled
    /// connection and waits up to `timeout` for it to arrive on a fresh
    /// listening connection: the seed's "test manually" step of
    /// "Notifications Not Received". Returns the round-trip time, or `None`
    /// when the probe did not arrive in time.
    ///
    /// The probe reaches every session listening on the channel.
    /// [`ChangeListener`](crate::ChangeListener)s skip it; other listeners
    /// (the seed's Swift adapter) see a payload without an `actorID` and
    /// should ignore it.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] when the listening connection cannot be opened;
    /// [`Error::InvalidConfig`] through a transaction-mode pooler, where
    /// `LISTEN` does not work; connection and database errors.
    pub fn notify_round_trip(&self, timeout: Duration) -> Result<Option<Duration>> {
        let options = self.pool().connect_options();
        if options.get_pooler() == PoolerMode::Transaction {
            return Err(listen_through_transaction_pooler());
        }
        let dialer = options.dialer()?;
        let connect_error = |e: postgres::Error| Error::Connect {
            failure: classify_connect(&e),
            target: options.target(),
            user: dialer.config.get_user().unwrap_or("postgres").to_owned(),
            source: Some(e),
        };
        let mut listener = dialer.connect().map_err(connect_error)?;
        listener
            .batch_execute(&format!("LISTEN {}", quote_identifier(self.channel())))
            .map_err(Error::Database)?;
        let payload = format!("{{\"{PROBE_KEY}\":\"{:016x}\"}}", fastrand::u64(..));
        let channel = self.channel().to_owned();
        let start = Instant::now();
        self.call(false, |_, c| {
            c.prepare(&NOTIFY)?
                .execute(&mut c.client, &[&channel, &payload])?;
            Ok(())
        })?;
        loop {
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                return Ok(None);
            };
            match listener.notifications().timeout_iter(left).next() {
                Ok(Some(n)) if n.payload() == payload => return Ok(Some(start.elapsed())),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(None),
                Err(e) => return Err(Error::ConnectionLost(std::sync::Arc::new(e))),
            }
        }
    }
}

/// The slowest statements mentioning `table`, or why there are none.
fn slow_statements(c: &mut Connection, table: &str) -> Result<SlowStatements, postgres::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_declares_the_types_its_casts_name() {
        for sql in [
            &*TABLE_FIGURES,
            &*WRITE_COUNTER,
            &*SESSIONS,
            &*STATEMENTS_EXTENSION,
            &*SESSION_INFO,
            &*NOTIFY,
        ] {
            assert_eq!(
                crate::pool::param_types(sql.text()).as_deref(),
                Some(sql.types()),
                "{sql:?}"
            );
        }
    }

    #[test]
    fn listen_statements_are_recognised() {
        assert!(is_listen_on(
            "LISTEN \"actor_state_changes\"",
            "actor_state_changes"
        ));
        assert!(is_listen_on(
            "listen actor_state_changes;",
            "actor_state_changes"
        ));
        assert!(is_listen_on(
            "  LISTEN   Actor_State_Changes ",
            "actor_state_changes"
        ));
        assert!(is_listen_on("LISTEN \"Mixed\"", "Mixed"));
        assert!(!is_listen_on("LISTEN Mixed", "Mixed"));
        assert!(!is_listen_on("LISTEN \"other\"", "actor_state_changes"));
        assert!(!is_listen_on(
            "LISTENactor_state_changes",
            "actor_state_changes"
        ));
        assert!(!is_listen_on(
            "SELECT 'LISTEN actor_state_changes'",
            "actor_state_changes"
        ));
        assert!(!is_listen_on(
            "UNLISTEN actor_state_changes",
            "actor_state_changes"
        ));
        assert!(!is_listen_on("", "x"));
    }

    #[test]
    fn rates_need_a_forward_window_and_a_growing_counter() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(4);
        assert_eq!(rate(10, t0, 30, t1), Some(5.0));
        assert_eq!(rate(10, t1, 30, t0), None);
        assert_eq!(rate(30, t0, 10, t1), None);
        assert_eq!(rate(10, t0, 30, t0), None);
    }
}
