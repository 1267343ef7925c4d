//! The state store: every operation on actor state.
//!
//! [`StateStore`] is a handle on one `Inner`: the store's [`Core`] (pool,
//! names, statements, codec, retry policy) and what only the store needs
//! (size limit, lost-write counters, the group-commit combiner, the
//! sweeper). Every operation, here and in `monitor`, `transfer` and
//! `cache`, goes through `call` or `write` (in `call`), which check a
//! connection out, hand it over with the `Core`, classify errors and settle
//! lost replies. The operations are split by concern: `single`, `write`
//! and `conditional` for one actor, `bulk`, `batch`, `transform`,
//! `expiry`, `raw` (the same verbs on bytes), `versioned` (what reads
//! return) and `builder`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::config::ConnectOptions;
use crate::error::{Error, Result};
use crate::expected::Expected;
use crate::group::{rounds, Combiner, Item, MAX_GROUP};
use crate::listener::{CatchUpQuery, ChangeListener, ChangeListenerBuilder};
use crate::outcome::{self, write_id, Landed, LostWriteCounters, LostWrites, Settled, Traces};
use crate::pool::{Connection, Pool, PoolOptions};
use crate::schema::{
    self, Engine, Names, Statements, VerifyReport, DEFAULT_CHANNEL, DEFAULT_TABLE,
};

mod batch;
mod builder;
mod bulk;
mod call;
mod conditional;
mod core;
mod expiry;
mod raw;
mod read;
mod single;
mod transform;
mod versioned;
mod write;

pub(crate) use self::core::Core;
use conditional::{
    live_deletes, load_versioned_on, many_if_on, settle_if, settle_many_if, write_if_on,
    Conditional,
};
use expiry::{ttl_micros, Sweeper};
use read::{Answer, Kind, MAX_READ_GROUP, READ_STATEMENTS};

pub use batch::{Batch, BatchResult, RawBatch};
pub use builder::{StateStoreBuilder, DEFAULT_OUTCOME_TIMEOUT};
pub(crate) use bulk::bulk_query;
pub(crate) use call::Failure;
use call::{is_transient, Written};
pub use expiry::{Sweep, SweepOptions, MAX_SWEEP_BATCH};
pub use raw::Raw;
pub use transform::RetryPolicy;
pub use versioned::Versioned;
pub use write::WriteOptions;

/// The largest state accepted by default: 64 MiB, far below PostgreSQL's
/// 1 GB `bytea` limit.
pub const DEFAULT_MAX_STATE_SIZE: usize = 64 * 1024 * 1024;

pub(crate) struct Inner {
    core: Core,
    max_state_size: usize,
    outcome_timeout: Duration,
    lost_writes: LostWriteCounters,
    combiner: Option<Combiner<Item, u64>>,
    /// Coalesced point reads, when on.
    reads: Option<Combiner<read::Item, Option<read::Answer>>>,
    /// Set once, after the store exists: the thread holds only a weak
    /// reference to it.
    sweeper: std::sync::OnceLock<Sweeper>,
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
            .field("table", &self.inner.core.names().table_sql())
            .field("channel", &self.inner.core.names().channel)
            .field("codec", &self.inner.core.codec())
            .field("pool", self.inner.core.pool())
            .finish()
    }
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
    crate::change::check_actor_id(id).map_err(Error::InvalidActorId)
}

impl StateStore {
    /// A builder with every default.
    ///
    /// ```no_run
    /// use trebuchet_postgres::{Codec, StateStore};
    ///
    /// let store = StateStore::builder()
    ///     .url("postgresql://app@localhost/trebuchet")
    ///     .table("game.rooms")
    ///     .codec(Codec::Json)
    ///     .migrate(true)
    ///     .build()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn builder() -> StateStoreBuilder {
        StateStoreBuilder::new()
    }

    /// Connects with a connection string and every other default.
    ///
    /// ```no_run
    /// use trebuchet_postgres::StateStore;
    ///
    /// let store = StateStore::connect("postgresql://app@localhost:5432/trebuchet")?;
    /// store.migrate()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStoreBuilder::build`].
    pub fn connect(url: &str) -> Result<StateStore> {
        StateStore::builder().url(url).build()
    }

    /// Connects as the environment says ([`ConnectOptions::from_env`]).
    ///
    /// ```no_run
    /// // DATABASE_URL, or POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DATABASE, ...
    /// let store = trebuchet_postgres::StateStore::from_env()?;
    /// store.migrate()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStoreBuilder::build`].
    pub fn from_env() -> Result<StateStore> {
        StateStore::builder().build()
    }

    pub(crate) fn names(&self) -> &Names {
        self.inner.core.names()
    }

    #[cfg(feature = "testing")]
    pub(crate) fn statements(&self) -> &Statements {
        self.inner.core.sql()
    }

    /// The pool this store uses, to share with other stores.
    ///
    /// ```no_run
    /// use trebuchet_postgres::StateStore;
    ///
    /// let rooms = StateStore::from_env()?;
    /// // A second table on the same connections.
    /// let sessions = StateStore::builder()
    ///     .pool(rooms.pool().clone())
    ///     .table("sessions")
    ///     .build()?;
    /// println!("{} connections open", rooms.pool().state().connections);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn pool(&self) -> &Pool {
        self.inner.core.pool()
    }

    /// The quoted, qualified table name.
    ///
    /// ```no_run
    /// let store = trebuchet_postgres::StateStore::builder().table("game.rooms").build()?;
    /// assert_eq!(store.table(), r#""game"."rooms""#);
    /// // Safe to put into SQL text of your own as it is.
    /// let recent = format!(
    ///     "SELECT actor_id FROM {} ORDER BY updated_at DESC LIMIT 10",
    ///     store.table()
    /// );
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn table(&self) -> String {
        self.inner.core.names().table_sql()
    }

    /// The channel the table's trigger notifies.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// assert_eq!(store.channel(), "actor_state_changes"); // the default
    /// // Another program hears every change with `LISTEN actor_state_changes`.
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn channel(&self) -> &str {
        &self.inner.core.names().channel
    }

    /// The codec for typed states.
    ///
    /// ```no_run
    /// # use std::ops::ControlFlow;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Decode what a walk over stored bytes finds, as `load` would.
    /// let codec = store.codec();
    /// store.raw().for_each("room-", |id, v| {
    ///     match codec.decode::<Vec<String>>(&v.value) {
    ///         Ok(players) => println!("{id}: {players:?}"),
    ///         Err(e) => eprintln!("{id}: {e}"),
    ///     }
    ///     ControlFlow::Continue(())
    /// })?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn codec(&self) -> Codec {
        self.inner.core.codec()
    }

    /// A [`ChangeListener`] builder for this store's server and channel,
    /// which also lets subscriptions filtered to known actors catch up exactly
    /// after a reconnect. Set another URL on it to listen through a
    /// different route (LISTEN needs a session, not PgBouncer's transaction
    /// mode).
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Writes go through a pooler; LISTEN goes to the server itself.
    /// let listener = store
    ///     .listener_builder()
    ///     .url("postgresql://app@db-primary:5432/trebuchet")
    ///     .build()?;
    /// let room = listener.subscribe_actor("room-1");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn listener_builder(&self) -> ChangeListenerBuilder {
        ChangeListener::builder()
            .connect_options(self.inner.core.pool().connect_options().clone())
            .channel(self.inner.core.names().channel.clone())
            .table(match &self.inner.core.names().schema {
                Some(schema) => format!("{schema}.{}", self.inner.core.names().table),
                None => self.inner.core.names().table.clone(),
            })
            .catch_up_sql(CatchUpQuery::new(self.inner.core.sql().catch_up.text()))
    }

    /// Starts a [`ChangeListener`] on this store's server and channel.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::Event;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let listener = store.listener()?;
    /// let room = listener.subscribe_actor("room-1");
    /// store.save("room-1", &vec!["alice"])?;
    /// if let Ok(Event::Change(c)) = room.recv() {
    ///     println!("room-1 is now at sequence {}", c.sequence);
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let applied = store.migrate()?;
    /// println!("applied migrations {applied:?}");
    /// assert!(store.migrate()?.is_empty()); // up to date now
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Connection errors, or [`Error::InsufficientPrivilege`] when the role
    /// may not create or alter the objects (run it as their owner).
    pub fn migrate(&self) -> Result<Vec<i32>> {
        let mut conn = self.inner.core.pool().get()?;
        schema::migrate(&mut conn.client, self.inner.core.names())
    }

    /// The SQL that [`migrate`](Self::migrate) runs for this store's table
    /// and channel, to review or apply by hand.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let sql = store.migration_sql();
    /// assert!(sql.contains("CREATE TABLE IF NOT EXISTS"));
    /// println!("{sql}");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn migration_sql(&self) -> String {
        self.inner.core.names().migration_sql()
    }

    /// Checks the table, columns, tombstone table, notification function and
    /// trigger, and reports each problem with its fix: the seed's
    /// "Notifications Not Received" checklist.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let report = store.verify()?;
    /// if !report.is_ok() {
    ///     eprintln!("{report}"); // one line per problem, each with its fix
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Connection errors only; problems with the schema are in the report.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut conn = self.inner.core.pool().get()?;
        schema::verify(&mut conn, self.inner.core.names())
    }

    /// How the writes whose connection broke mid-write turned out, since
    /// the store was built. Reads counters only: no round trip.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let lost = store.lost_writes();
    /// if lost.unknown > 0 {
    ///     eprintln!("{} writes may or may not have been applied", lost.unknown);
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn lost_writes(&self) -> LostWrites {
        self.inner.lost_writes.snapshot()
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        let bytes = self
            .inner
            .core
            .codec()
            .encode(value)
            .map_err(Error::Encode)?;
        self.check_size(&bytes)?;
        Ok(bytes)
    }

    pub(crate) fn decode<T: DeserializeOwned>(&self, id: &str, bytes: &[u8]) -> Result<T> {
        self.inner
            .core
            .codec()
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::InvalidActorId;

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
