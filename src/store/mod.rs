//! The state store: every operation on actor state.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::config::ConnectOptions;
use crate::error::{Error, InvalidActorId, Result};
use crate::expected::Expected;
use crate::group::{rounds, Combiner, Item};
use crate::listener::{ChangeListener, ChangeListenerBuilder};
use crate::outcome::{self, write_id, Landed, LostWriteCounters, LostWrites, Settled, Traces};
use crate::pool::{Connection, Pool, PoolOptions};
use crate::schema::{self, Names, Statements, VerifyReport, DEFAULT_CHANNEL, DEFAULT_TABLE};

mod batch;
mod builder;
mod bulk;
mod conditional;
mod expiry;
mod raw;
mod transform;
mod write;

use conditional::{
    live_deletes, load_versioned_on, many_if_on, settle_if, settle_many_if, write_if_on,
    Conditional,
};
use expiry::{ttl_micros, Sweeper};

pub use batch::{Batch, BatchResult};
pub use builder::{StateStoreBuilder, DEFAULT_OUTCOME_TIMEOUT};
pub use expiry::{Sweep, SweepOptions, MAX_SWEEP_BATCH};
pub use raw::Raw;
pub use write::WriteOptions;

/// The largest state accepted by default: 64 MiB, far below PostgreSQL's
/// 1 GB `bytea` limit.
pub const DEFAULT_MAX_STATE_SIZE: usize = 64 * 1024 * 1024;

/// A stored state with its version and timestamps.
///
/// Every read that returns versions returns this, typed or as bytes
/// ([`Raw`]); [`Raw::restore_many`] takes it back. More fields may come
/// (hence `#[non_exhaustive]`): build one with [`new`](Self::new).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Versioned<T> {
    /// The state.
    pub value: T,
    /// Its sequence number: 1 for the first save, then one more per write.
    pub sequence: u64,
    /// When it was last written (UTC, from the server's clock).
    pub updated_at: SystemTime,
    /// When the actor was created (UTC, from the server's clock).
    pub created_at: SystemTime,
    /// When it expires (UTC, from the server's clock), for a state saved
    /// with a time to live ([`WriteOptions::ttl`]); `None` for one kept for good.
    pub expires_at: Option<SystemTime>,
}

impl<T> Versioned<T> {
    /// A version of `value` without expiry, for [`Raw::restore_many`] and
    /// for tests.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use trebuchet_postgres::Versioned;
    ///
    /// let now = SystemTime::now();
    /// let v = Versioned::new(b"state".to_vec(), 7, now, now)
    ///     .with_expires_at(Some(now + Duration::from_secs(60)));
    /// assert_eq!(v.sequence, 7);
    /// ```
    pub fn new(value: T, sequence: u64, updated_at: SystemTime, created_at: SystemTime) -> Self {
        Versioned {
            value,
            sequence,
            updated_at,
            created_at,
            expires_at: None,
        }
    }

    /// The same version expiring at `expires_at` (`None`: kept for good).
    #[must_use]
    pub fn with_expires_at(mut self, expires_at: Option<SystemTime>) -> Self {
        self.expires_at = expires_at;
        self
    }

    /// The same version holding `f(value)`.
    ///
    /// ```
    /// # use std::time::SystemTime;
    /// # use trebuchet_postgres::Versioned;
    /// # let now = SystemTime::now();
    /// let v = Versioned::new(2u32, 1, now, now).map(|n| n * 10);
    /// assert_eq!(v.value, 20);
    /// ```
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Versioned<U> {
        Versioned {
            value: f(self.value),
            sequence: self.sequence,
            updated_at: self.updated_at,
            created_at: self.created_at,
            expires_at: self.expires_at,
        }
    }

    /// [`map`](Self::map) with a step that may fail.
    pub(crate) fn try_map<U, E>(
        self,
        f: impl FnOnce(T) -> std::result::Result<U, E>,
    ) -> std::result::Result<Versioned<U>, E> {
        Ok(Versioned {
            value: f(self.value)?,
            sequence: self.sequence,
            updated_at: self.updated_at,
            created_at: self.created_at,
            expires_at: self.expires_at,
        })
    }
}

/// How [`StateStore::transform`] retries after losing a race: up to
/// `max_attempts` tries, sleeping a random time up to an exponentially
/// growing bound (from `initial_backoff`, doubling, capped at `max_backoff`)
/// between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before [`Error::TooManyConflicts`] (default 100).
    pub max_attempts: u32,
    /// The first back-off bound (default 1 ms).
    pub initial_backoff: Duration,
    /// The largest back-off bound (default 100 ms).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// The pause before attempt `attempt + 1`: full jitter, so that
    /// contenders spread out instead of colliding again in step.
    fn backoff(&self, attempt: u32) -> Duration {
        let bound = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max_backoff);
        bound.mul_f64(fastrand::f64())
    }
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) names: Names,
    pub(crate) sql: Statements,
    codec: Codec,
    max_state_size: usize,
    retry: RetryPolicy,
    outcome_timeout: Duration,
    lost_writes: LostWriteCounters,
    combiner: Option<Combiner>,
    /// Set once, after the store exists: the thread holds only a weak
    /// reference to it.
    sweeper: std::sync::OnceLock<Sweeper>,
    /// Whether the table's ids sort in code point order, read from the
    /// catalog on the first listing by prefix.
    pub(crate) key_order: std::sync::OnceLock<bool>,
}

/// Actor state in one PostgreSQL table.
///
/// Cheap to clone (an [`Arc`] inside) and `Send + Sync`: share one store
/// between all threads. Every call checks a connection out of the pool for
/// one round trip ([`transform`](Self::transform) takes two per attempt) and
/// returns it.
///
/// # Example
///
/// ```no_run
/// use serde::{Deserialize, Serialize};
/// use trebuchet_postgres::{Expected, StateStore};
///
/// #[derive(Serialize, Deserialize, Default)]
/// struct GameState { scores: std::collections::BTreeMap<String, i64> }
///
/// let store = StateStore::connect("postgresql://postgres@localhost/trebuchet")?;
/// store.migrate()?;
/// let seq = store.save("room-1", &GameState::default())?;
/// let state: Option<GameState> = store.load("room-1")?;
/// store.transform("room-1", |s: Option<GameState>| {
///     let mut s = s.unwrap_or_default();
///     *s.scores.entry("alice".into()).or_default() += 10;
///     s
/// })?;
/// store.save_if("room-1", &GameState::default(), Expected::Sequence(seq + 1))?;
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
///
/// # Sequence numbers
///
/// Each actor's sequence number is 1 after its first save and grows by one
/// with every write. A delete takes the next number too and leaves a
/// tombstone row holding it, so an actor created again under the same id
/// continues above it: a number never repeats for an id, and a listener that
/// ignores numbers it has already seen never ignores a new actor.
///
/// # Lost connections
///
/// When a connection breaks after a write was sent and before its reply
/// arrived (a server restart or crash, a network cut), the write may or may
/// not have been committed. The store does not leave the caller guessing: it
/// opens a new connection (retrying until
/// [`outcome_timeout`](StateStoreBuilder::outcome_timeout)), makes sure the
/// server process of the broken one has exited so the write cannot land
/// later, and reads the actors' *write tags* back. Every write carries a
/// random id, and each row it writes keeps `id XOR sequence number` among
/// the actor's 64 most recent tags (the `recent_writes` column; deletes tag
/// the tombstone). That costs no round trip and a few bytes per row.
///
/// The caller then gets what it would have got, or:
///
/// - [`Error::NotApplied`]: the write was not applied; the database is as if
///   the call had never been made, and making it again is safe.
///   [`transform`](Self::transform) does so itself, as after a lost race.
///   So does a write whose connection had just been checked with a round
///   trip because another one broke (the check can pass just before a
///   restart or a mass disconnect reaches that connection): it is made once
///   more on another connection, so that one fault fails a caller at most
///   once. Saves combined by group commit are made again together.
/// - [`Error::OutcomeUnknown`]: the server did not come back within
///   `outcome_timeout`, or the answer was pushed out of the tags. A
///   conditional write ([`save_if`](Self::save_if) with a sequence number,
///   [`transform`](Self::transform) on an existing actor,
///   a save at a given sequence number ([`WriteOptions::sequence`])) knows the sequence
///   number it would have produced, so it is always answered unless 64 other
///   writes to the same actor followed it before the store could look. A
///   plain [`save`](Self::save), a [`delete`](Self::delete) or
///   `save_if(.., Expected::Absent)` is answered when the actor has fewer
///   than 64 tagged writes in all, or when its write is among the last 64;
///   otherwise it is unknown.
///
/// Bulk writes and batches are all or nothing, so one tag found means all of
/// it committed. Writes made by other programs (the Swift adapter, manual
/// SQL) leave no tags; they never make an answer wrong, except that an actor
/// deleted *and* re-created by them while the store looks may read as
/// "not applied" for a delete that was.
///
/// Behind a connection pooler ([`ConnectOptions::pooler`]) the server
/// process of the broken connection is not the store's to stop, and a write
/// still running there could land after the store looked: a write that is
/// not found is then reported as [`Error::OutcomeUnknown`], never as
/// [`Error::NotApplied`].
///
/// Reads are simply run once more on a new connection. Failing to get a
/// connection at all ([`Error::Connect`], [`Error::PoolExhausted`]) means
/// nothing was sent.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

impl Drop for StateStore {
    fn drop(&mut self) {
        if let Some(sweeper) = self.inner.sweeper.get() {
            sweeper.stop_if_last(&self.inner);
        }
    }
}

impl fmt::Debug for StateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateStore")
            .field("table", &self.inner.names.table_sql())
            .field("channel", &self.inner.names.channel)
            .field("codec", &self.inner.codec)
            .field("pool", &self.inner.pool)
            .finish()
    }
}

/// Why a call on a connection failed: a driver error, to be classified with
/// the connection at hand, or one of ours.
pub(crate) enum Failure {
    Pg(postgres::Error),
    Store(Error),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Store(e)
    }
}

// Writes whose result is one outcome for the whole statement: the counters
// read it from the `Result` around them.
impl Settled for u64 {}
impl Settled for bool {}
impl Settled for Option<Option<u64>> {}
impl Settled for HashMap<String, u64> {}
impl Settled for std::collections::HashSet<String> {}
impl Settled for Written {}
impl Settled for Vec<Written> {}
impl Settled for Result<Vec<BatchResult>> {}

/// The outcome of a conditional write.
enum Written {
    Yes {
        sequence: u64,
        updated_at: SystemTime,
        created_at: SystemTime,
    },
    Blocked {
        actual: Option<u64>,
    },
    /// The connection broke and this error says what became of the item
    /// (from a bulk write's outcomes, found out afterwards).
    Lost(Error),
}

pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

pub(crate) fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::SequenceOutOfRange(n))
}

/// Checks an actor id as every operation does before it sends anything: not
/// empty, at most 255 characters (the column is `VARCHAR(255)`), no NUL
/// character. For rejecting bad input early, before connecting.
///
/// ```
/// assert!(trebuchet_postgres::validate_actor_id("room-1").is_ok());
/// assert!(trebuchet_postgres::validate_actor_id("").is_err());
/// ```
///
/// # Errors
///
/// [`Error::InvalidActorId`] saying what is wrong.
pub fn validate_actor_id(id: &str) -> Result<()> {
    check_actor_id(id)
}

/// Rejects ids the table cannot hold, before any round trip.
pub(crate) fn check_actor_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidActorId(InvalidActorId::Empty));
    }
    if id.len() > 255 {
        let chars = id.chars().count();
        if chars > 255 {
            return Err(Error::InvalidActorId(InvalidActorId::TooLong { chars }));
        }
    }
    if id.contains('\0') {
        return Err(Error::InvalidActorId(InvalidActorId::ContainsNul));
    }
    Ok(())
}

impl StateStore {
    /// A builder with every default.
    pub fn builder() -> StateStoreBuilder {
        StateStoreBuilder::new()
    }

    /// Connects with a connection string and every other default.
    ///
    /// # Errors
    ///
    /// As [`StateStoreBuilder::build`].
    pub fn connect(url: &str) -> Result<StateStore> {
        StateStore::builder().url(url).build()
    }

    /// Connects as the environment says ([`ConnectOptions::from_env`]).
    ///
    /// # Errors
    ///
    /// As [`StateStoreBuilder::build`].
    pub fn from_env() -> Result<StateStore> {
        StateStore::builder().build()
    }

    pub(crate) fn names(&self) -> &Names {
        &self.inner.names
    }

    #[cfg(feature = "testing")]
    pub(crate) fn statements(&self) -> &Statements {
        &self.inner.sql
    }

    /// The pool this store uses, to share with other stores.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The quoted, qualified table name.
    pub fn table(&self) -> String {
        self.inner.names.table_sql()
    }

    /// The channel the table's trigger notifies.
    pub fn channel(&self) -> &str {
        &self.inner.names.channel
    }

    /// The codec for typed states.
    pub fn codec(&self) -> Codec {
        self.inner.codec
    }

    /// A [`ChangeListener`] builder for this store's server and channel,
    /// which also lets subscriptions filtered to known actors catch up exactly
    /// after a reconnect. Set another URL on it to listen through a
    /// different route (LISTEN needs a session, not PgBouncer's transaction
    /// mode).
    pub fn listener_builder(&self) -> ChangeListenerBuilder {
        ChangeListener::builder()
            .connect_options(self.inner.pool.connect_options().clone())
            .channel(self.inner.names.channel.clone())
            .table(match &self.inner.names.schema {
                Some(schema) => format!("{schema}.{}", self.inner.names.table),
                None => self.inner.names.table.clone(),
            })
            .catch_up_sql(self.inner.sql.catch_up.clone())
    }

    /// Starts a [`ChangeListener`] on this store's server and channel.
    ///
    /// # Errors
    ///
    /// As [`ChangeListenerBuilder::build`].
    pub fn listener(&self) -> Result<ChangeListener> {
        self.listener_builder().build()
    }

    /// Creates or upgrades the table, its tombstone table, notification
    /// function and trigger. Idempotent, and safe when several processes
    /// run it at once (they take turns on an advisory lock). Returns the
    /// migration versions this call applied (empty when up to date).
    ///
    /// # Errors
    ///
    /// Connection errors, or [`Error::InsufficientPrivilege`] when the role
    /// may not create or alter the objects (run it as their owner).
    pub fn migrate(&self) -> Result<Vec<i32>> {
        let mut conn = self.inner.pool.get()?;
        schema::migrate(&mut conn.client, &self.inner.names)
    }

    /// The SQL that [`migrate`](Self::migrate) runs for this store's table
    /// and channel, to review or apply by hand.
    pub fn migration_sql(&self) -> String {
        self.inner.names.migration_sql()
    }

    /// Checks the table, columns, tombstone table, notification function and
    /// trigger, and reports each problem with its fix: the seed's
    /// "Notifications Not Received" checklist.
    ///
    /// # Errors
    ///
    /// Connection errors only; problems with the schema are in the report.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut conn = self.inner.pool.get()?;
        schema::verify(&mut conn, &self.inner.names)
    }

    /// Runs `f` on a pooled connection and classifies its errors. Reads
    /// (`retry_lost`) run once more on another connection when the first
    /// one turns out to be dead; writes never do, since the first attempt
    /// may have been applied. Work the server rolled back for a reason that
    /// running it again cures (see [`is_transient`]) runs again.
    pub(crate) fn call<R>(
        &self,
        retry_lost: bool,
        mut f: impl FnMut(&Inner, &mut Connection) -> Result<R, Failure>,
    ) -> Result<R> {
        let attempts = if retry_lost { 2 } else { 1 };
        let mut attempt = 0;
        let mut rolled_back = 0;
        loop {
            attempt += 1;
            let mut conn = self.inner.pool.get()?;
            let e = match f(&self.inner, &mut conn) {
                Ok(r) => return Ok(r),
                Err(Failure::Store(e)) => return Err(e),
                Err(Failure::Pg(e)) => e,
            };
            let (error, lost) = self.inner.pool.call_error(&mut conn, e);
            if lost && attempt < attempts {
                continue;
            }
            if self.again_after_rollback(&error, &mut rolled_back) {
                attempt -= 1;
                continue;
            }
            return Err(self.schema_hint(error));
        }
    }

    /// Whether to run work again that the server rolled back as a whole
    /// for a reason that running it again cures: a deadlock, a
    /// serialization failure, or a create that a concurrent delete
    /// overtook (the trigger refuses a row that would start at or below
    /// the tombstone that delete left, so that numbers never repeat). Pauses
    /// as the retry policy says before saying yes; `count` is the caller's
    /// tally of such rollbacks.
    fn again_after_rollback(&self, error: &Error, count: &mut u32) -> bool {
        if !is_transient(error) {
            return false;
        }
        *count += 1;
        let policy = self.inner.retry;
        if *count >= policy.max_attempts {
            return false;
        }
        log::debug!("the server rolled a write back ({error}); running it again");
        std::thread::sleep(policy.backoff(*count - 1));
        true
    }

    /// Runs a write on a pooled connection. When the connection breaks
    /// before the reply arrives, the write may or may not have landed:
    /// `settle` gives the result from what the rows of `ids` say, read on a
    /// new connection once the old one's server process is gone (see the
    /// section on lost connections).
    ///
    /// A write found not applied on a connection that had just been checked
    /// because another one broke is made once more: the check can pass just
    /// before a restart or a mass disconnect reaches that connection's
    /// server process, and the caller has not failed for this fault yet.
    pub(crate) fn write<R: Settled>(
        &self,
        ids: &[&str],
        mut f: impl FnMut(&Inner, &mut Connection) -> Result<R, Failure>,
        settle: impl Fn(&Traces) -> Result<R>,
    ) -> Result<R> {
        let mut again = true;
        let mut rolled_back = 0;
        loop {
            let mut conn = self.inner.pool.get()?;
            let e = match f(&self.inner, &mut conn) {
                Ok(r) => return Ok(r),
                Err(Failure::Store(e)) => return Err(e),
                Err(Failure::Pg(e)) => e,
            };
            let (backend, checked) = (conn.backend, conn.checked);
            let (error, _) = self.inner.pool.call_error(&mut conn, e);
            drop(conn);
            if self.again_after_rollback(&error, &mut rolled_back) {
                continue;
            }
            let Error::ConnectionLost(source) = error else {
                return Err(self.schema_hint(error));
            };
            log::info!(
                "connection lost during a write to {:?}; finding out whether it was applied",
                ids.first().copied().unwrap_or_default()
            );
            let result = outcome::find_out(
                &self.inner.pool,
                &self.inner.sql,
                ids,
                backend,
                source,
                self.inner.outcome_timeout,
            )
            .and_then(|traces| settle(&traces));
            self.inner.lost_writes.count(&result);
            let not_applied = matches!(outcome::lost(&result), Some(Error::NotApplied { .. }));
            if checked && again && not_applied {
                again = false;
                continue;
            }
            return result;
        }
    }

    /// How the writes whose connection broke mid-write turned out, since
    /// the store was built. Reads counters only: no round trip.
    pub fn lost_writes(&self) -> LostWrites {
        self.inner.lost_writes.snapshot()
    }

    fn schema_hint(&self, error: Error) -> Error {
        match error.sql_state() {
            Some(c) if *c == postgres::error::SqlState::UNDEFINED_TABLE => Error::SchemaMissing {
                table: self.inner.names.table_sql(),
            },
            _ => schema::privilege_error(error, &self.inner.names, false),
        }
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        let bytes = self.inner.codec.encode(value).map_err(Error::Encode)?;
        self.check_size(&bytes)?;
        Ok(bytes)
    }

    pub(crate) fn decode<T: DeserializeOwned>(&self, id: &str, bytes: &[u8]) -> Result<T> {
        self.inner
            .codec
            .decode(bytes)
            .map_err(|source| Error::Decode {
                actor_id: id.to_owned(),
                source,
            })
    }

    pub(crate) fn check_size(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.inner.max_state_size {
            return Err(Error::StateTooLarge {
                size: bytes.len(),
                max: self.inner.max_state_size,
            });
        }
        Ok(())
    }

    // ----- typed API -------------------------------------------------------

    /// Saves `state` unconditionally (an upsert) and returns its new sequence
    /// number: 1 for a new actor, one more than before otherwise.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = store.save("room-1", &vec!["alice", "bob"])?;
    /// assert!(seq >= 1);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// When `Ok` is returned the write is committed. When the connection
    /// breaks after the statement was sent, the store finds out what became
    /// of it (see [Lost connections](Self#lost-connections)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`], [`Error::Encode`] and
    /// [`Error::StateTooLarge`] before anything is sent; connection and
    /// database errors; [`Error::SchemaMissing`] before migration.
    pub fn save<T: Serialize + ?Sized>(&self, id: &str, state: &T) -> Result<u64> {
        self.save_with(id, state, WriteOptions::new())
    }

    /// Loads an actor's state, or `None` when it does not exist.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let players: Option<Vec<String>> = store.load("room-1")?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the stored bytes are not a `T` in this store's
    /// codec; otherwise as [`save`](Self::save).
    pub fn load<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>> {
        match self.raw().load(id)? {
            Some(bytes) => self.decode(id, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Loads state, sequence number, timestamps and expiry in one query.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// if let Some(v) = store.load_versioned::<Vec<String>>("room-1")? {
    ///     println!("{:?} at {}, written {:?}", v.value, v.sequence, v.updated_at);
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn load_versioned<T: DeserializeOwned>(&self, id: &str) -> Result<Option<Versioned<T>>> {
        self.raw()
            .load_versioned(id)?
            .map(|v| v.try_map(|bytes| self.decode(id, &bytes)))
            .transpose()
    }

    /// Saves `state` only when the stored version is what `expected` says
    /// (optimistic locking), and returns the new sequence number. The short
    /// form of `save_with(id, state, WriteOptions::new().expect(expected))`.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::{Expected, StateStore};
    /// # let store = StateStore::from_env()?;
    /// store.save_if("actor-1", &1u32, Expected::Absent)?; // creates, sequence 1
    /// let err = store.save_if("actor-1", &2u32, Expected::Absent).unwrap_err();
    /// assert!(err.is_conflict()); // "expected absent, found sequence 1"
    /// store.save_if("actor-1", &2u32, Expected::Sequence(1))?; // sequence 2
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] with the expected and actual versions when they
    /// differ (nothing is written). The actual version is one the actor was
    /// in while the call ran, never the expected one: when a writer the
    /// call waited for committed after the call's snapshot, the version is
    /// read again, and a create that finds the actor deleted again by then
    /// is made again ([`Error::TooManyConflicts`] after
    /// [`RetryPolicy::max_attempts`] such rounds). Otherwise as
    /// [`save`](Self::save).
    pub fn save_if<T: Serialize + ?Sized>(
        &self,
        id: &str,
        state: &T,
        expected: Expected,
    ) -> Result<u64> {
        self.save_with(id, state, WriteOptions::new().expect(expected))
    }

    /// Deletes an actor and returns whether it existed. The delete is
    /// announced on the channel and the actor's last sequence number is
    /// kept, so a later save continues above it.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = store.save("room-9", &1u8)?;
    /// assert!(store.delete("room-9")?);
    /// assert!(!store.delete("room-9")?); // already gone
    /// assert!(store.save("room-9", &1u8)? > seq + 1); // numbers never repeat
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn delete(&self, id: &str) -> Result<bool> {
        check_actor_id(id)?;
        let w = write_id();
        // An expired row is deleted (and announced) too, but it no longer
        // existed: the statement says whether the row was live.
        self.write(
            &[id],
            |inner, c| {
                let st = c.prepare(&inner.sql.delete)?;
                Ok(st
                    .query_opt(&mut c.client, &[&id, &w])?
                    .is_some_and(|row| row.get(0)))
            },
            |t| t.one(id, w, None).map(|_| true),
        )
    }

    /// Whether the actor exists.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// if !store.exists("room-1")? {
    ///     store.save("room-1", &Vec::<String>::new())?;
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn exists(&self, id: &str) -> Result<bool> {
        check_actor_id(id)?;
        self.call(true, |inner, c| {
            let st = c.prepare(&inner.sql.exists)?;
            Ok(st.query_one(&mut c.client, &[&id])?.get(0))
        })
    }

    /// The actor's current sequence number, or `None` when it does not exist.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = store.save("room-1", &0u8)?;
    /// assert_eq!(store.sequence("room-1")?, Some(seq)); // unless another writer came in between
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn sequence(&self, id: &str) -> Result<Option<u64>> {
        check_actor_id(id)?;
        self.call(true, |inner, c| {
            let st = c.prepare(&inner.sql.sequence)?;
            Ok(st
                .query_opt(&mut c.client, &[&id])?
                .map(|row| to_u64(row.get(0))))
        })
    }

    /// Starts an atomic batch of saves and deletes over several actors: all
    /// of them are applied in one transaction, or none is.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::{Expected, StateStore};
    /// # let store = StateStore::from_env()?;
    /// // Move an item from one inventory to another, atomically.
    /// let from: Vec<String> = vec![];
    /// let to: Vec<String> = vec!["sword".into()];
    /// store
    ///     .batch()
    ///     .save_if("player-1", &from, Expected::Sequence(7))
    ///     .save_if("player-2", &to, Expected::Sequence(3))
    ///     .delete("trade-offer-9")
    ///     .commit()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn batch(&self) -> Batch<'_> {
        Batch::new(self)
    }
}

/// Whether the server rolled a transaction back for a reason that running it
/// again can cure (deadlock, serialization failure).
fn is_transient(e: &Error) -> bool {
    e.sql_state().is_some_and(|c| {
        *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            || *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_ids_are_checked() {
        assert!(matches!(
            check_actor_id(""),
            Err(Error::InvalidActorId(InvalidActorId::Empty))
        ));
        assert!(matches!(
            check_actor_id(&"x".repeat(256)),
            Err(Error::InvalidActorId(InvalidActorId::TooLong {
                chars: 256
            }))
        ));
        assert!(check_actor_id(&"x".repeat(255)).is_ok());
        // 255 characters of two bytes each are fine: the limit is characters.
        assert!(check_actor_id(&"é".repeat(255)).is_ok());
        assert!(matches!(
            check_actor_id("a\0b"),
            Err(Error::InvalidActorId(InvalidActorId::ContainsNul))
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for attempt in 0..40 {
            assert!(p.backoff(attempt) <= p.max_backoff);
        }
        let p = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        };
        assert!(p.backoff(0) <= Duration::from_millis(10));
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<StateStore>();
        check::<Pool>();
    }
}
