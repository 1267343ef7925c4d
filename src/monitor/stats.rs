//! The figures of the seed's Monitoring section: [`StateStore::stats`] and
//! [`StateStore::stats_over`].

use std::sync::LazyLock;
use std::thread;
use std::time::{Duration, SystemTime};

use postgres::types::Type;

use super::sessions::{
    listener_sessions, worker_listener_sessions, ListenerSession, WorkerListeners,
};
use super::slow_statements::{slow_statements, SlowStatements};
use crate::error::{Error, Result};
use crate::pool::{PoolState, Sql};
use crate::schema::{self, Engine, Layout};
use crate::store::{to_u64, Failure, StateStore};

/// The tables that hold the rows: the table itself, or the leaf partitions
/// of a partitioned one (which holds nothing itself).
const LEAVES: &str = "\
    WITH leaves AS (SELECT p.relid FROM pg_partition_tree(to_regclass($1::TEXT)) p WHERE p.isleaf \
    UNION ALL SELECT to_regclass($1) WHERE to_regclass($1) IS NOT NULL \
    AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(to_regclass($1))))";

/// Per-table figures, from the statistics views, in one round trip; summed
/// over the partitions of a partitioned table.
pub(super) static TABLE_FIGURES: LazyLock<Sql> = LazyLock::new(|| {
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
pub(super) static WRITE_COUNTER: LazyLock<Sql> = LazyLock::new(|| {
    let text = format!(
        "{LEAVES} SELECT (SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::INT8 \
         FROM pg_stat_user_tables WHERE relid IN (SELECT relid FROM leaves)), clock_timestamp()"
    );
    Sql::new(text, &[Type::TEXT])
});

/// On Citus, the table's figures summed over its shards on the workers
/// (the coordinator's own table is an empty shell): its size with the
/// shards', and per shard the writes, dead rows, updates and HOT updates,
/// as `writes,dead,updates,hot`; and the time of the reading.
pub(super) static SHARD_FIGURES: LazyLock<Sql> = LazyLock::new(|| {
    let text = "SELECT citus_total_relation_size($1::TEXT::regclass)::INT8, \
         sum(split_part(result, ',', 1)::INT8)::INT8, sum(split_part(result, ',', 2)::INT8)::INT8, \
         sum(split_part(result, ',', 3)::INT8)::INT8, sum(split_part(result, ',', 4)::INT8)::INT8, \
         clock_timestamp() \
         FROM run_command_on_shards($1::TEXT::regclass, \
         'SELECT concat_ws('','', n_tup_ins + n_tup_upd + n_tup_del, n_dead_tup, n_tup_upd, \
         n_tup_hot_upd) FROM pg_stat_user_tables WHERE relid = ''%s''::regclass') \
         WHERE success AND result <> ''";
    Sql::new(text, &[Type::TEXT])
});

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
    /// On Citus, the sessions listening on the channel on each active
    /// worker (each worker sends the changes of its own shards, so a
    /// listener that hears only the coordinator misses them); empty on one
    /// server.
    pub worker_listeners: Vec<WorkerListeners>,
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

pub(super) fn rate(before: u64, from: SystemTime, after: u64, to: SystemTime) -> Option<f64> {
    let seconds = to.duration_since(from).ok()?.as_secs_f64();
    if seconds <= 0.0 || after < before {
        return None;
    }
    Some((after - before) as f64 / seconds)
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
        let mut stats = self.call(true, |core, c| {
            let row = c
                .prepare(&TABLE_FIGURES)?
                .query_one(&mut c.client, &[&table])?;
            if !row.get::<_, bool>(0) {
                return Err(Failure::Store(Error::SchemaMissing {
                    table: table.clone(),
                }));
            }
            let actors = c.prepare(&core.sql().count_prefix)?;
            let actors = to_u64(actors.query_one(&mut c.client, &[&""])?.get(0));
            let tombstones = c.prepare(&core.sql().count_tombstones)?;
            let tombstones = to_u64(tombstones.query_one(&mut c.client, &[])?.get(0));
            let (listeners, hidden_sessions) = listener_sessions(c, &channel)?;
            let slow_statements = slow_statements(c, &bare_table)?;
            let partitions = match schema::layout(&mut c.client, &names)? {
                Layout::Hash(n) => Some(n),
                _ => None,
            };
            let (mut total_bytes, mut writes, mut dead_rows): (
                Option<i64>,
                Option<i64>,
                Option<i64>,
            ) = (row.get(1), row.get(2), row.get(3));
            let (mut updates, mut hot): (Option<i64>, Option<i64>) = (row.get(11), row.get(12));
            let mut worker_listeners = Vec::new();
            if core.sql().engine == Engine::Citus {
                worker_listeners = worker_listener_sessions(c, &channel)?;
                let shards = c
                    .prepare(&SHARD_FIGURES)?
                    .query_one(&mut c.client, &[&table])?;
                (total_bytes, writes, dead_rows, updates, hot) = (
                    shards.get(0),
                    shards.get(1),
                    shards.get(2),
                    shards.get(3),
                    shards.get(4),
                );
            }
            Ok(StoreStats {
                table: table.clone(),
                channel: channel.clone(),
                sampled_at: row.get(9),
                total_bytes: to_u64(total_bytes.unwrap_or(0)),
                actors,
                tombstones,
                writes: writes.map(to_u64),
                writes_counted_since: row.get(5),
                writes_per_second: None,
                window: None,
                dead_rows: dead_rows.map(to_u64),
                last_vacuum: row.get(4),
                last_autovacuum: row.get(10),
                hot_update_ratio: match (updates, hot) {
                    (Some(updates), Some(hot)) if updates > 0 => Some(hot as f64 / updates as f64),
                    _ => None,
                },
                partitions,
                listeners,
                hidden_sessions,
                worker_listeners,
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
    /// ```no_run
    /// # use std::time::Duration;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let stats = store.stats_over(Duration::from_secs(5))?;
    /// if let Some(rate) = stats.writes_per_second {
    ///     println!("{rate:.0} writes/s over the last 5 s, {} actors", stats.actors);
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`stats`](Self::stats).
    pub fn stats_over(&self, window: Duration) -> Result<StoreStats> {
        if window.is_zero() {
            return self.stats();
        }
        let table = self.table();
        let (before, from): (Option<i64>, SystemTime) = self.call(true, |core, c| {
            if core.sql().engine == Engine::Citus {
                let row = c
                    .prepare(&SHARD_FIGURES)?
                    .query_one(&mut c.client, &[&table])?;
                return Ok((row.get(1), row.get(5)));
            }
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
}
