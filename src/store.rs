//! The state store: every operation on actor state.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::config::ConnectOptions;
use crate::error::{Error, Expected, InvalidActorId, Result};
use crate::listener::{ChangeListener, ChangeListenerBuilder};
use crate::pool::{Connection, Pool, PoolOptions};
use crate::schema::{self, Names, Statements, VerifyReport, DEFAULT_CHANNEL, DEFAULT_TABLE};

/// The largest state accepted by default: 64 MiB, far below PostgreSQL's
/// 1 GB `bytea` limit.
pub const DEFAULT_MAX_STATE_SIZE: usize = 64 * 1024 * 1024;

/// A stored state with its version and timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The state.
    pub value: T,
    /// Its sequence number: 1 for the first save, then one more per write.
    pub sequence: u64,
    /// When it was last written (UTC, from the server's clock).
    pub updated_at: SystemTime,
    /// When the actor was created (UTC, from the server's clock).
    pub created_at: SystemTime,
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

/// Configures and builds a [`StateStore`]. Obtain one with
/// [`StateStore::builder`].
///
/// Defaults: connection from the environment ([`ConnectOptions::from_env`])
/// unless a URL, options or pool is given; table `actor_states`; channel
/// `actor_state_changes`; [`Codec::Cbor`]; states up to
/// [`DEFAULT_MAX_STATE_SIZE`]; [`RetryPolicy::default`]; no migration at
/// build time.
#[must_use = "a builder does nothing until build() is called"]
pub struct StateStoreBuilder {
    connect: Option<Result<ConnectOptions>>,
    pool_options: PoolOptions,
    pool: Option<Pool>,
    table: String,
    channel: String,
    codec: Codec,
    max_state_size: usize,
    retry: RetryPolicy,
    migrate: bool,
}

impl fmt::Debug for StateStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateStoreBuilder")
            .field("connect", &self.connect)
            .field("pool_options", &self.pool_options)
            .field("table", &self.table)
            .field("channel", &self.channel)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl StateStoreBuilder {
    /// Connects with a connection string (`postgresql://...` or
    /// `key=value ...`). A malformed string is reported by
    /// [`build`](Self::build), before any connection attempt.
    pub fn url(mut self, url: &str) -> Self {
        self.connect = Some(url.parse());
        self
    }

    /// Connects with explicit options.
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.connect = Some(Ok(options));
        self
    }

    /// Pool settings for the pool this builder opens (ignored with
    /// [`pool`](Self::pool)).
    pub fn pool_options(mut self, options: PoolOptions) -> Self {
        self.pool_options = options;
        self
    }

    /// Uses an existing pool, shared with other stores.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The table, optionally schema-qualified (`"game.rooms"`). Validated
    /// as a PostgreSQL identifier and always quoted.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The notification channel the table's trigger announces changes on.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// The codec for typed states.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The largest encoded state accepted, in bytes.
    pub fn max_state_size(mut self, bytes: usize) -> Self {
        self.max_state_size = bytes;
        self
    }

    /// How [`StateStore::transform`] retries on conflict.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Runs [`StateStore::migrate`] as part of `build` (default off).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Validates the configuration, opens the pool (unless one was given) and
    /// connects once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConnectionString`], [`Error::InvalidIdentifier`] and
    /// [`Error::InvalidConfig`] before anything is contacted; then the
    /// errors of [`Pool::new`] and, with [`migrate`](Self::migrate), of
    /// [`StateStore::migrate`].
    pub fn build(self) -> Result<StateStore> {
        let names = Names::new(&self.table, &self.channel)?;
        if self.retry.max_attempts == 0 {
            return Err(Error::invalid_config(
                "RetryPolicy::max_attempts must be at least 1",
            ));
        }
        if self.max_state_size > i32::MAX as usize {
            return Err(Error::invalid_config(
                "max_state_size must stay below PostgreSQL's 1 GB bytea limit",
            ));
        }
        let pool = match self.pool {
            Some(pool) => pool,
            None => {
                let connect = match self.connect {
                    Some(connect) => connect?,
                    None => ConnectOptions::from_env()?,
                };
                Pool::new(connect, self.pool_options)?
            }
        };
        let store = StateStore {
            inner: Arc::new(Inner {
                sql: Statements::new(&names),
                names,
                pool,
                codec: self.codec,
                max_state_size: self.max_state_size,
                retry: self.retry,
            }),
        };
        if self.migrate {
            store.migrate()?;
        }
        Ok(store)
    }
}

struct Inner {
    pool: Pool,
    names: Names,
    sql: Statements,
    codec: Codec,
    max_state_size: usize,
    retry: RetryPolicy,
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
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
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
enum Failure {
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
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::SequenceOutOfRange(n))
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
        StateStoreBuilder {
            connect: None,
            pool_options: PoolOptions::default(),
            pool: None,
            table: DEFAULT_TABLE.to_owned(),
            channel: DEFAULT_CHANNEL.to_owned(),
            codec: Codec::default(),
            max_state_size: DEFAULT_MAX_STATE_SIZE,
            retry: RetryPolicy::default(),
            migrate: false,
        }
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
    /// Connection errors, or [`Error::Database`] when the user may not
    /// create objects.
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
        schema::verify(&mut conn.client, &self.inner.names)
    }

    /// Runs `f` on a pooled connection and classifies its errors. Reads
    /// (`retry_lost`) run once more on another connection when the first
    /// one turns out to be dead; writes never do, since the first attempt
    /// may have been applied.
    fn call<R>(
        &self,
        retry_lost: bool,
        mut f: impl FnMut(&Inner, &mut Connection) -> Result<R, Failure>,
    ) -> Result<R> {
        let attempts = if retry_lost { 2 } else { 1 };
        let mut attempt = 0;
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
            return Err(self.schema_hint(error));
        }
    }

    fn schema_hint(&self, error: Error) -> Error {
        match error.sql_state() {
            Some(c) if *c == postgres::error::SqlState::UNDEFINED_TABLE => Error::SchemaMissing {
                table: self.inner.names.table_sql(),
            },
            _ => error,
        }
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        let bytes = self.inner.codec.encode(value).map_err(Error::Encode)?;
        self.check_size(&bytes)?;
        Ok(bytes)
    }

    fn decode<T: DeserializeOwned>(&self, id: &str, bytes: &[u8]) -> Result<T> {
        self.inner
            .codec
            .decode(bytes)
            .map_err(|source| Error::Decode {
                actor_id: id.to_owned(),
                source,
            })
    }

    fn check_size(&self, bytes: &[u8]) -> Result<()> {
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
    /// When `Ok` is returned the write is committed. When an error is
    /// returned after the statement was sent (the connection dropped), the
    /// write may or may not have been applied; use
    /// [`save_if`](Self::save_if) to make a retry safe.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`], [`Error::Encode`] and
    /// [`Error::StateTooLarge`] before anything is sent; connection and
    /// database errors; [`Error::SchemaMissing`] before migration.
    pub fn save<T: Serialize + ?Sized>(&self, id: &str, state: &T) -> Result<u64> {
        check_actor_id(id)?;
        let bytes = self.encode(state)?;
        self.save_bytes(id, &bytes)
    }

    /// Loads an actor's state, or `None` when it does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the stored bytes are not a `T` in this store's
    /// codec; otherwise as [`save`](Self::save).
    pub fn load<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>> {
        match self.load_bytes(id)? {
            Some(bytes) => self.decode(id, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Loads state, sequence number and timestamps in one query.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn load_versioned<T: DeserializeOwned>(&self, id: &str) -> Result<Option<Versioned<T>>> {
        match self.load_versioned_bytes(id)? {
            Some(v) => Ok(Some(Versioned {
                value: self.decode(id, &v.value)?,
                sequence: v.sequence,
                updated_at: v.updated_at,
                created_at: v.created_at,
            })),
            None => Ok(None),
        }
    }

    /// Saves `state` only when the stored version is what `expected` says
    /// (optimistic locking), and returns the new sequence number.
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
    /// differ (nothing is written); otherwise as [`save`](Self::save).
    pub fn save_if<T: Serialize + ?Sized>(
        &self,
        id: &str,
        state: &T,
        expected: Expected,
    ) -> Result<u64> {
        check_actor_id(id)?;
        let bytes = self.encode(state)?;
        self.save_bytes_if(id, &bytes, expected)
    }

    /// Saves `state` with an explicit sequence number (the seed's
    /// `saveWithSequence`), which must be greater than the stored one (and
    /// than a deleted actor's last one), so that sequence numbers only grow.
    ///
    /// # Errors
    ///
    /// [`Error::StaleSequence`] when `sequence` is not greater; otherwise as
    /// [`save`](Self::save).
    pub fn save_with_sequence<T: Serialize + ?Sized>(
        &self,
        id: &str,
        state: &T,
        sequence: u64,
    ) -> Result<()> {
        check_actor_id(id)?;
        let bytes = self.encode(state)?;
        self.save_bytes_with_sequence(id, &bytes, sequence)
    }

    /// Atomically replaces an actor's state with `f(current)`, where
    /// `current` is `None` for a new actor, and returns what was written.
    ///
    /// Unlike a load followed by a save, no concurrent update is ever lost:
    /// the write is conditional on the version `f` saw, and when another
    /// writer got there first the state is read again and **`f` runs
    /// again**, after a jittered back-off ([`RetryPolicy`]). So `f` may run
    /// more than once and should have no side effects beyond computing the
    /// new state. It runs while the attempt holds a pooled connection: keep
    /// it short.
    ///
    /// # Errors
    ///
    /// [`Error::TooManyConflicts`] after [`RetryPolicy::max_attempts`]
    /// lost races (nothing written by this call); [`Error::Decode`] when the
    /// stored state is not a `T`; otherwise as [`save`](Self::save).
    pub fn transform<T, F>(&self, id: &str, mut f: F) -> Result<Versioned<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> T,
    {
        check_actor_id(id)?;
        let mut value = None;
        let versioned = self.transform_loop(id, |current| {
            let current = current.map(|bytes| self.decode(id, bytes)).transpose()?;
            let next = f(current);
            let bytes = self.encode(&next)?;
            value = Some(next);
            Ok(bytes)
        })?;
        Ok(Versioned {
            value: value.expect("set by the successful attempt"),
            sequence: versioned.sequence,
            updated_at: versioned.updated_at,
            created_at: versioned.created_at,
        })
    }

    /// Deletes an actor and returns whether it existed. The delete is
    /// announced on the channel and the actor's last sequence number is
    /// kept, so a later save continues above it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn delete(&self, id: &str) -> Result<bool> {
        check_actor_id(id)?;
        self.call(false, |inner, c| {
            let st = c.prepare(&inner.sql.delete)?;
            Ok(c.client.execute(&st, &[&id])? > 0)
        })
    }

    /// Whether the actor exists.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn exists(&self, id: &str) -> Result<bool> {
        check_actor_id(id)?;
        self.call(true, |inner, c| {
            let st = c.prepare(&inner.sql.exists)?;
            Ok(c.client.query_one(&st, &[&id])?.get(0))
        })
    }

    /// The actor's current sequence number, or `None` when it does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn sequence(&self, id: &str) -> Result<Option<u64>> {
        check_actor_id(id)?;
        self.call(true, |inner, c| {
            let st = c.prepare(&inner.sql.sequence)?;
            Ok(c.client
                .query_opt(&st, &[&id])?
                .map(|row| to_u64(row.get(0))))
        })
    }

    // ----- bytes API -------------------------------------------------------

    /// [`save`](Self::save) with raw bytes, bypassing the codec.
    ///
    /// # Errors
    ///
    /// As [`save`](Self::save).
    pub fn save_bytes(&self, id: &str, state: &[u8]) -> Result<u64> {
        check_actor_id(id)?;
        self.check_size(state)?;
        self.call(false, |inner, c| {
            let st = c.prepare(&inner.sql.save)?;
            let row = c.client.query_one(&st, &[&id, &state])?;
            Ok(to_u64(row.get(0)))
        })
    }

    /// [`load`](Self::load) returning the stored bytes.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load), without decoding.
    pub fn load_bytes(&self, id: &str) -> Result<Option<Vec<u8>>> {
        check_actor_id(id)?;
        self.call(true, |inner, c| {
            let st = c.prepare(&inner.sql.load)?;
            Ok(c.client.query_opt(&st, &[&id])?.map(|row| row.get(0)))
        })
    }

    /// [`load_versioned`](Self::load_versioned) returning the stored bytes.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load), without decoding.
    pub fn load_versioned_bytes(&self, id: &str) -> Result<Option<Versioned<Vec<u8>>>> {
        check_actor_id(id)?;
        self.call(true, |inner, c| load_versioned_on(inner, c, id))
    }

    /// The stored bytes and versions of several actors in one query. Actors
    /// that do not exist are absent from the map.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`] for any bad id (nothing is sent);
    /// connection and database errors.
    pub fn load_many_versioned_bytes<S: AsRef<str>>(
        &self,
        ids: &[S],
    ) -> Result<HashMap<String, Versioned<Vec<u8>>>> {
        let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
        for id in &ids {
            check_actor_id(id)?;
        }
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.call(true, |inner, c| {
            let st = c.prepare(&inner.sql.load_many)?;
            Ok(c.client
                .query(&st, &[&ids])?
                .iter()
                .map(|row| {
                    (
                        row.get(0),
                        Versioned {
                            value: row.get(1),
                            sequence: to_u64(row.get(2)),
                            updated_at: row.get(3),
                            created_at: row.get(4),
                        },
                    )
                })
                .collect())
        })
    }

    /// [`save_if`](Self::save_if) with raw bytes.
    ///
    /// # Errors
    ///
    /// As [`save_if`](Self::save_if).
    pub fn save_bytes_if(&self, id: &str, state: &[u8], expected: Expected) -> Result<u64> {
        check_actor_id(id)?;
        self.check_size(state)?;
        let written = self.call(false, |inner, c| write_if_on(inner, c, id, state, expected))?;
        match written {
            Written::Yes { sequence, .. } => Ok(sequence),
            Written::Blocked { actual } => Err(Error::Conflict {
                actor_id: id.to_owned(),
                expected,
                actual,
            }),
        }
    }

    /// [`save_with_sequence`](Self::save_with_sequence) with raw bytes.
    ///
    /// # Errors
    ///
    /// As [`save_with_sequence`](Self::save_with_sequence).
    pub fn save_bytes_with_sequence(&self, id: &str, state: &[u8], sequence: u64) -> Result<()> {
        check_actor_id(id)?;
        self.check_size(state)?;
        let wanted = to_i64(sequence)?;
        let row = self.call(false, |inner, c| {
            let st = c.prepare(&inner.sql.save_with_sequence)?;
            Ok(c.client.query_one(&st, &[&id, &state, &wanted])?)
        })?;
        if row.get::<_, Option<i64>>(0).is_some() {
            return Ok(());
        }
        Err(Error::StaleSequence {
            actor_id: id.to_owned(),
            sequence,
            current: row.get::<_, Option<i64>>(3).map(to_u64),
        })
    }

    /// [`transform`](Self::transform) on raw bytes: `f` gets the stored
    /// bytes (`None` for a new actor) and returns the bytes to store. The
    /// same retry rules apply, so `f` may run more than once.
    ///
    /// # Errors
    ///
    /// As [`transform`](Self::transform), without decoding.
    pub fn transform_bytes<F>(&self, id: &str, mut f: F) -> Result<Versioned<Vec<u8>>>
    where
        F: FnMut(Option<&[u8]>) -> Vec<u8>,
    {
        check_actor_id(id)?;
        let mut value = Vec::new();
        let versioned = self.transform_loop(id, |current| {
            let next = f(current);
            self.check_size(&next)?;
            value.clone_from(&next);
            Ok(next)
        })?;
        Ok(Versioned {
            value,
            sequence: versioned.sequence,
            updated_at: versioned.updated_at,
            created_at: versioned.created_at,
        })
    }

    /// Read, compute, conditional write; again after a back-off when another
    /// writer won. Each attempt holds one connection for its two round trips.
    fn transform_loop(
        &self,
        id: &str,
        mut next: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>>,
    ) -> Result<Versioned<()>> {
        let policy = self.inner.retry;
        for attempt in 1..=policy.max_attempts {
            let written = self.call(false, |inner, c| {
                let current = load_versioned_on(inner, c, id)?;
                let bytes = next(current.as_ref().map(|v| v.value.as_slice()))?;
                let expected = current.map_or(Expected::Absent, |v| Expected::Sequence(v.sequence));
                write_if_on(inner, c, id, &bytes, expected)
            })?;
            match written {
                Written::Yes {
                    sequence,
                    updated_at,
                    created_at,
                } => {
                    return Ok(Versioned {
                        value: (),
                        sequence,
                        updated_at,
                        created_at,
                    })
                }
                Written::Blocked { .. } if attempt < policy.max_attempts => {
                    let pause = policy.backoff(attempt - 1);
                    log::trace!("transform of {id:?} lost a race (attempt {attempt}); retrying in {pause:?}");
                    std::thread::sleep(pause);
                }
                Written::Blocked { .. } => {}
            }
        }
        Err(Error::TooManyConflicts {
            actor_id: id.to_owned(),
            attempts: policy.max_attempts,
        })
    }
}

fn load_versioned_on(
    inner: &Inner,
    c: &mut Connection,
    id: &str,
) -> Result<Option<Versioned<Vec<u8>>>, Failure> {
    let st = c.prepare(&inner.sql.load_versioned)?;
    Ok(c.client.query_opt(&st, &[&id])?.map(|row| Versioned {
        value: row.get(0),
        sequence: to_u64(row.get(1)),
        updated_at: row.get(2),
        created_at: row.get(3),
    }))
}

/// The conditional write, in one round trip in the common case. When the
/// statement's snapshot could not see the row that blocked it (a writer
/// committed in between), the current sequence number is read once more so
/// that the conflict reports the truth.
fn write_if_on(
    inner: &Inner,
    c: &mut Connection,
    id: &str,
    state: &[u8],
    expected: Expected,
) -> Result<Written, Failure> {
    let row = match expected {
        Expected::Absent => {
            let st = c.prepare(&inner.sql.save_if_absent)?;
            c.client.query_one(&st, &[&id, &state])?
        }
        Expected::Sequence(n) => {
            let n = to_i64(n)?;
            let st = c.prepare(&inner.sql.save_if_sequence)?;
            c.client.query_one(&st, &[&id, &state, &n])?
        }
    };
    if let Some(sequence) = row.get::<_, Option<i64>>(0) {
        return Ok(Written::Yes {
            sequence: to_u64(sequence),
            updated_at: row
                .get::<_, Option<SystemTime>>(1)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            created_at: row
                .get::<_, Option<SystemTime>>(2)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    let mut actual = row.get::<_, Option<i64>>(3).map(to_u64);
    if Expected::from(actual) == expected {
        let st = c.prepare(&inner.sql.sequence)?;
        actual = c.client.query_opt(&st, &[&id])?.map(|r| to_u64(r.get(0)));
    }
    Ok(Written::Blocked { actual })
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
