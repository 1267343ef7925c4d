//! Expiry: time-to-live checks, and the sweeper that deletes expired rows
//! in bounded batches so that each removal is announced as a delete; and
//! purging old tombstones, which deletes and sweeps leave behind.
//!
//! A row whose `expires_at` has passed already reads as absent from every
//! statement (see `schema.rs`); the sweeper only reclaims it and tells the
//! change feed. At most one sweeper works on a table at a time, across every
//! process: each batch runs in a transaction that first takes a
//! transaction-level advisory lock for the table, and a sweeper that finds
//! it taken skips its turn. A transaction-level lock is released by the
//! server at commit, rollback or disconnect, so a sweeper that dies never
//! leaves it held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use postgres::types::Type;

use super::StateStore;
use crate::error::{Error, Result};
use crate::pool::Sql;

/// The sweepers' advisory lock: a fixed class and a hash of the quoted table
/// name, so that each table has its own and none meets the migration lock
/// (a single `bigint` key, another key space).
static SWEEP_LOCK: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT pg_try_advisory_xact_lock(hashtext('trebuchet sweep'), hashtext($1::TEXT))",
        &[Type::TEXT],
    )
});

/// Tombstones deleted per transaction by [`StateStore::purge_tombstones`].
const PURGE_BATCH: i64 = 10_000;

/// The longest time to live a save accepts (about 1,000 years).
const MAX_TTL: Duration = Duration::from_secs(1000 * 366 * 24 * 3600);

/// The largest sweep batch.
pub const MAX_SWEEP_BATCH: u32 = 100_000;

/// A time to live as microseconds, for the statements.
pub(crate) fn ttl_micros(ttl: Duration) -> Result<i64> {
    if ttl < Duration::from_millis(1) {
        return Err(Error::invalid_argument(
            "ttl",
            format!("{ttl:?} is too short: a state must live at least 1 ms"),
        ));
    }
    if ttl > MAX_TTL {
        return Err(Error::invalid_argument(
            "ttl",
            format!(
                "{} s is too long: at most 1,000 years; save without a ttl to keep the state",
                ttl.as_secs()
            ),
        ));
    }
    Ok(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX))
}

fn check_batch_size(what: &'static str, batch_size: u32) -> Result<()> {
    if (1..=MAX_SWEEP_BATCH).contains(&batch_size) {
        return Ok(());
    }
    let reason = format!("{batch_size}: a sweep deletes 1 to {MAX_SWEEP_BATCH} rows per batch");
    Err(if what == "config" {
        Error::invalid_config(format!("SweepOptions::batch_size {reason}"))
    } else {
        Error::invalid_argument(what, reason)
    })
}

/// How a store's background sweeper runs, for
/// [`StateStoreBuilder::expiry_sweeper`](crate::StateStoreBuilder::expiry_sweeper).
///
/// ```
/// use std::time::Duration;
/// use trebuchet_postgres::SweepOptions;
///
/// let options = SweepOptions::default().interval(Duration::from_secs(10)).batch_size(500);
/// assert_eq!(options.get_batch_size(), 500);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepOptions {
    interval: Duration,
    batch_size: u32,
}

impl Default for SweepOptions {
    /// A sweep every 60 s, 1,000 rows per batch.
    fn default() -> Self {
        SweepOptions {
            interval: Duration::from_secs(60),
            batch_size: 1000,
        }
    }
}

impl SweepOptions {
    /// The pause between the end of one sweep and the start of the next
    /// (default 60 s). Expired states read as absent meanwhile: the interval
    /// only decides how long they take space and when the delete is
    /// announced.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Rows deleted per batch, each batch its own transaction (default
    /// 1,000; 1 to 100,000).
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// The configured interval.
    pub fn get_interval(&self) -> Duration {
        self.interval
    }

    /// The configured batch size.
    pub fn get_batch_size(&self) -> u32 {
        self.batch_size
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.interval.is_zero() {
            return Err(Error::invalid_config(
                "SweepOptions::interval must be positive",
            ));
        }
        check_batch_size("config", self.batch_size)
    }
}

/// What one sweep did, from [`StateStore::sweep_expired`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Sweep {
    /// Expired actors deleted (each announced as a delete).
    pub removed: u64,
    /// Batches run, each its own transaction.
    pub batches: u64,
    /// Another sweeper held the table's sweep lock, so this one stopped
    /// (before its first batch when `batches` is 0). Not an error: that
    /// sweeper is doing the work.
    pub busy: bool,
}

impl StateStore {
    /// Deletes every expired actor, `batch_size` rows per transaction,
    /// oldest first, and returns how many it removed. Each removal goes
    /// through the table's trigger: it is announced as a delete and leaves a
    /// tombstone, so the actor's sequence numbers never repeat.
    ///
    /// Expired states already read as absent; sweeping reclaims their space
    /// and tells listeners. At most one sweeper works on a table at a time
    /// across all processes: when another holds the table's sweep lock, this
    /// call stops and says so in [`Sweep::busy`]. Rows a writer holds locked
    /// are skipped until the next sweep.
    ///
    /// For a sweep in the background, see
    /// [`StateStoreBuilder::expiry_sweeper`](crate::StateStoreBuilder::expiry_sweeper);
    /// from cron, `trebuchet-postgres sweep`.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let sweep = store.sweep_expired(1000)?;
    /// println!("removed {} expired actors in {} batches", sweep.removed, sweep.batches);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a `batch_size` outside 1 to 100,000
    /// (nothing is sent); connection and database errors (batches committed
    /// before the error stay committed).
    pub fn sweep_expired(&self, batch_size: u32) -> Result<Sweep> {
        check_batch_size("batch size", batch_size)?;
        let mut sweep = Sweep::default();
        loop {
            match self.sweep_batch(batch_size)? {
                None => {
                    sweep.busy = true;
                    return Ok(sweep);
                }
                Some(removed) => {
                    sweep.batches += 1;
                    sweep.removed += removed;
                    if removed < u64::from(batch_size) {
                        return Ok(sweep);
                    }
                }
            }
        }
    }

    /// Deletes the tombstones of actors deleted more than `older_than` ago
    /// (by the server's clock), 10,000 per transaction, and returns how
    /// many it deleted.
    ///
    /// A tombstone keeps a deleted actor's last sequence number, so that an
    /// actor created again under the same id continues above it. The table
    /// of tombstones grows by one row per id ever deleted, which adds up
    /// when ids are not reused: sessions, expiring actors (every sweep
    /// leaves tombstones), generated ids. Purging forgets those numbers: an
    /// actor created again under a purged id starts again at 1, so a
    /// process that still remembers the id's old numbers takes the new
    /// actor's first changes for old ones and passes over them: a
    /// [`StateCache`](crate::StateCache) holding the id, a
    /// [`Subscription`](crate::Subscription) filtered to it (both keep the
    /// last number they saw), or a subscriber of your own that does the
    /// same. And [`Raw::restore_many`](crate::Raw::restore_many) no longer
    /// refuses versions at or below the forgotten number. So purge only ids
    /// that are not used
    /// again, or tombstones older than anything a running process
    /// remembers. A tombstone of an id that exists again is no longer
    /// needed and goes too.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let purged = store.purge_tombstones(Duration::from_secs(30 * 24 * 3600))?;
    /// println!("forgot {purged} actors deleted over 30 days ago");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an `older_than` over 292,000 years
    /// (nothing is sent); connection and database errors (batches
    /// committed before the error stay committed).
    pub fn purge_tombstones(&self, older_than: Duration) -> Result<u64> {
        let micros = i64::try_from(older_than.as_micros()).map_err(|_| {
            Error::invalid_argument(
                "older_than",
                format!("{older_than:?} is over 292,000 years"),
            )
        })?;
        let mut after = String::new();
        let mut purged = 0;
        loop {
            let (count, last) = self.call(true, |core, c| {
                let row = c
                    .prepare(&core.sql().purge_tombstones)?
                    .query_one(&mut c.client, &[&after, &micros, &PURGE_BATCH])?;
                Ok((row.get::<_, i64>(0), row.get::<_, Option<String>>(1)))
            })?;
            purged += u64::try_from(count).unwrap_or(0);
            match last {
                Some(last) if count == PURGE_BATCH => after = last,
                _ => return Ok(purged),
            }
        }
    }

    /// One batch in one transaction: the rows removed, or `None` when
    /// another sweeper holds the lock.
    pub(crate) fn sweep_batch(&self, batch_size: u32) -> Result<Option<u64>> {
        let limit = i64::from(batch_size);
        self.call(false, |core, c| {
            let table = core.names().table_sql();
            let lock = c.prepare(&SWEEP_LOCK)?;
            let sweep = c.prepare(&core.sql().sweep)?;
            let mut tx = c.client.transaction()?;
            if !lock.query_one(&mut tx, &[&table])?.get::<_, bool>(0) {
                return Ok(None);
            }
            // On Citus, deletes across shards: the trigger stays quiet and
            // the statement announces them.
            if let Some(settings) = core.sql().bulk_settings(None) {
                tx.batch_execute(&settings)?;
            }
            let removed: i64 = sweep.query_one(&mut tx, &[&limit])?.get(0);
            tx.commit()?;
            Ok(Some(u64::try_from(removed).unwrap_or(0)))
        })
    }
}

/// The stop flag of a background sweeper, and the condition its thread
/// waits on between sweeps.
type Stop = Arc<(Mutex<bool>, Condvar)>;

/// A store's background sweeper: one thread, stopped and joined when the
/// store's last handle is dropped.
pub(crate) struct Sweeper {
    stop: Stop,
    /// Set while the thread holds the store for a batch.
    holding: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Sweeper {
    /// Starts the thread. `open` gives the store for a batch, or `None` once
    /// it is gone; `batch` runs one batch on it. The thread holds the store
    /// only during a batch, so it never keeps the store alive, and takes it
    /// only under the stop lock, so that [`stop_if_last`](Self::stop_if_last)
    /// sees every hold.
    pub(crate) fn start<S: Send + 'static>(
        options: &SweepOptions,
        open: impl Fn() -> Option<S> + Send + 'static,
        batch: impl Fn(&S, u32) -> Result<Option<u64>> + Send + 'static,
    ) -> Result<Sweeper> {
        let stop: Stop = Arc::new((Mutex::new(false), Condvar::new()));
        let holding = Arc::new(AtomicBool::new(false));
        let (flag, held) = (Arc::clone(&stop), Arc::clone(&holding));
        let (interval, batch_size) = (options.interval, options.batch_size);
        let thread = thread::Builder::new()
            .name("trebuchet-sweep".into())
            .spawn(move || {
                let lock = || flag.0.lock().unwrap_or_else(|p| p.into_inner());
                'sweeps: loop {
                    {
                        let (guard, _) = flag
                            .1
                            .wait_timeout_while(lock(), interval, |stop| !*stop)
                            .unwrap_or_else(|p| p.into_inner());
                        if *guard {
                            break;
                        }
                    }
                    let mut removed = 0;
                    loop {
                        let store = {
                            let guard = lock();
                            if *guard {
                                break 'sweeps;
                            }
                            let Some(store) = open() else {
                                break 'sweeps;
                            };
                            held.store(true, Ordering::SeqCst);
                            store
                        };
                        let result = batch(&store, batch_size);
                        // Released before the flag is cleared: a last handle
                        // dropped in between counts this hold and leaves the
                        // join to the store's own drop.
                        drop(store);
                        held.store(false, Ordering::SeqCst);
                        match result {
                            Ok(Some(n)) if n == u64::from(batch_size) => removed += n,
                            Ok(Some(n)) => {
                                removed += n;
                                break;
                            }
                            Ok(None) => {
                                log::debug!("another sweeper holds the lock; skipping this sweep");
                                break;
                            }
                            Err(e) => {
                                log::warn!("sweeping expired actors failed: {e}");
                                break;
                            }
                        }
                    }
                    if removed > 0 {
                        log::debug!("swept {removed} expired actors");
                    }
                }
            })
            .map_err(Error::thread_start("the sweeper thread"))?;
        Ok(Sweeper {
            stop,
            holding,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Called as a handle of the store (`store`) is dropped: when it is the
    /// last one but for the thread's own hold during a batch, stops the
    /// thread and joins it here, so that the thread never ends up dropping
    /// the store itself after its last handle is gone.
    pub(crate) fn stop_if_last<T>(&self, store: &Arc<T>) {
        if self.is_own_thread() {
            return;
        }
        let mut stop = self.stop.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = usize::from(self.holding.load(Ordering::SeqCst));
        if Arc::strong_count(store).saturating_sub(held) != 1 {
            return;
        }
        *stop = true;
        self.stop.1.notify_all();
        drop(stop);
        self.join();
    }

    fn is_own_thread(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| t.thread().id() == thread::current().id())
    }

    /// Joins the thread, unless this is it (then it ends by itself).
    fn join(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_must_be_meaningful() {
        assert!(matches!(
            ttl_micros(Duration::ZERO),
            Err(Error::InvalidArgument { what: "ttl", .. })
        ));
        assert!(ttl_micros(Duration::from_micros(999)).is_err());
        assert_eq!(ttl_micros(Duration::from_millis(1)).unwrap(), 1000);
        assert_eq!(ttl_micros(Duration::from_secs(60)).unwrap(), 60_000_000);
        assert!(ttl_micros(MAX_TTL).is_ok());
        assert!(ttl_micros(MAX_TTL + Duration::from_secs(1)).is_err());
        assert!(ttl_micros(Duration::MAX).is_err());
    }

    #[test]
    fn sweep_options_are_checked() {
        assert!(SweepOptions::default().validate().is_ok());
        assert!(SweepOptions::default()
            .interval(Duration::ZERO)
            .validate()
            .is_err());
        assert!(SweepOptions::default().batch_size(0).validate().is_err());
        assert!(SweepOptions::default()
            .batch_size(MAX_SWEEP_BATCH + 1)
            .validate()
            .is_err());
    }
}
