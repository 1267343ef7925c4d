//! Configuring and building a [`StateStore`].

use super::*;

/// Configures and builds a [`StateStore`]. Obtain one with
/// [`StateStore::builder`].
///
/// Defaults: connection from the environment ([`ConnectOptions::from_env`])
/// unless a URL, options or pool is given; table `actor_states`; channel
/// `actor_state_changes`; [`Codec::Cbor`]; states up to
/// [`DEFAULT_MAX_STATE_SIZE`]; [`RetryPolicy::default`]; group commit on;
/// no migration at build time.
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
    group_commit: bool,
    coalesce_reads: bool,
    wait_for_server: Option<Duration>,
    outcome_timeout: Duration,
    partitions: Option<u32>,
    sweeper: Option<SweepOptions>,
}

/// How long a write whose connection broke tries to find out whether it
/// landed, by default.
pub const DEFAULT_OUTCOME_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Every default; [`StateStore::builder`].
    pub(super) fn new() -> StateStoreBuilder {
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
            group_commit: true,
            coalesce_reads: false,
            wait_for_server: None,
            outcome_timeout: DEFAULT_OUTCOME_TIMEOUT,
            partitions: None,
            sweeper: None,
        }
    }

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

    /// Group commit (default on): concurrent [`save`](StateStore::save)
    /// and [`save_if`](StateStore::save_if) calls on this store are
    /// combined into one statement and one commit.
    ///
    /// Each caller still returns only after its own row is committed, gets
    /// its own result (a conflict fails only its caller), and every row is
    /// announced, in order per actor. A lone writer goes through the same
    /// one-row statement as without grouping. When the connection is lost
    /// during a grouped commit, each caller finds out for its own row, as a
    /// lone write would (see [`outcome_timeout`](Self::outcome_timeout)).
    ///
    /// Why it is on: the change trigger's `NOTIFY` serialises commits
    /// server-wide, so one commit per row caps writes near the disk's flush
    /// rate however many threads write; one commit per group lifts that cap
    /// (measured: 4.5x the one-row rate at 16 threads). Turn it off to give
    /// every call a statement and a commit of its own. On Citus it is off
    /// whatever this says: a group's rows span shards (see the guide's
    /// chapter "Past one server").
    pub fn group_commit(mut self, enabled: bool) -> Self {
        self.group_commit = enabled;
        self
    }

    /// Coalesced reads (default off): concurrent [`load`](StateStore::load),
    /// [`load_versioned`](StateStore::load_versioned),
    /// [`exists`](StateStore::exists) and [`sequence`](StateStore::sequence)
    /// calls on this store are answered by one statement over their ids
    /// on one connection, at most two such statements at a time.
    ///
    /// A lone reader goes straight to its one-row statement, as without
    /// coalescing, so its latency does not change. Each caller gets exactly
    /// its own row, and a read sees every write that returned before it
    /// began. When the shared statement fails, each of its readers reads
    /// again on its own and gets its own result.
    ///
    /// What it trades: the server runs one statement for many rows instead
    /// of one per row, but at most two statements of reads run at a time,
    /// and every reader but a statement's leader is woken by another
    /// thread. Where the server's work per statement is the limit, that
    /// reads more rows per second; where the client's threads and the
    /// server share a few cores, the hand-offs cost more than the
    /// statements they save. On a 2-core machine running both, 8 threads
    /// loaded 15,500 to 22,000 rows/s with it, against 36,000 to 44,000
    /// without it. A single-threaded reader sees no change. On Citus it is
    /// off whatever this says (a statement of many ids spans shards).
    pub fn coalesce_reads(mut self, enabled: bool) -> Self {
        self.coalesce_reads = enabled;
        self
    }

    /// How long [`build`](Self::build) waits for a server that is not up
    /// yet (default: not at all): it retries a refused connection and a
    /// server that is starting up (SQLSTATE 57P03) with back-off until the
    /// server answers or `wait` has passed, then fails with the last
    /// [`Error::Connect`]. For programs that may start before their
    /// database. Sets [`PoolOptions::wait_for_server`]; ignored with
    /// [`pool`](Self::pool).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use trebuchet_postgres::StateStore;
    ///
    /// let store = StateStore::builder()
    ///     .url("postgresql://postgres@db/trebuchet")
    ///     .wait_for_server(Duration::from_secs(60))
    ///     .migrate(true)
    ///     .build()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn wait_for_server(mut self, wait: Duration) -> Self {
        self.wait_for_server = Some(wait);
        self
    }

    /// How long a write whose connection breaks before its reply arrives
    /// keeps trying, on new connections, to find out whether it was applied
    /// (default [`DEFAULT_OUTCOME_TIMEOUT`], 10 s). Within it the write
    /// returns what it would have returned, or [`Error::NotApplied`]; past
    /// it, [`Error::OutcomeUnknown`]. See [`StateStore`]'s section on lost
    /// connections.
    pub fn outcome_timeout(mut self, timeout: Duration) -> Self {
        self.outcome_timeout = timeout;
        self
    }

    /// Creates the table hash-partitioned by `actor_id` into `partitions`
    /// tables (`{table}_p0`, `{table}_p1`, ...) when [`StateStore::migrate`]
    /// creates it (default: one plain table). Everything else is the same:
    /// the trigger, delete announcements, tombstones, every operation and
    /// the listener.
    ///
    /// A table that already exists is not converted: `migrate` refuses one
    /// laid out otherwise, with [`Error::InvalidConfig`] saying how to
    /// convert it ([`StateStore::partition_table`]).
    ///
    /// ```
    /// let sql = trebuchet_postgres::StateStore::builder().partitions(4).migration_sql()?;
    /// assert!(sql.contains("PARTITION BY HASH (actor_id)"));
    /// assert!(sql.contains("\"actor_states_p3\" PARTITION OF"));
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Runs a sweeper thread that deletes expired actors in batches
    /// ([`StateStore::sweep_expired`]) every [`SweepOptions::interval`]
    /// (default: no sweeper). At most one sweeper works on a table at a
    /// time across all processes, so every instance may run one. The thread
    /// stops and is joined when the store's last handle is dropped.
    pub fn expiry_sweeper(mut self, options: SweepOptions) -> Self {
        self.sweeper = Some(options);
        self
    }

    /// Runs [`StateStore::migrate`] as part of `build` (default off).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// The SQL that [`StateStore::migrate`] runs for this builder's table
    /// and channel, without connecting: to review, or to apply by hand.
    ///
    /// ```
    /// let sql = trebuchet_postgres::StateStore::builder().table("rooms").migration_sql()?;
    /// assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"rooms\""));
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIdentifier`] for a bad table or channel name.
    pub fn migration_sql(&self) -> Result<String> {
        Ok(self.names()?.migration_sql())
    }

    fn names(&self) -> Result<Names> {
        let mut names = Names::new(&self.table, &self.channel)?;
        if let Some(partitions) = self.partitions {
            schema::check_partitions(partitions).map_err(Error::invalid_config)?;
            names.partitions = Some(partitions);
        }
        Ok(names)
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
        let names = self.names()?;
        if let Some(sweeper) = &self.sweeper {
            sweeper.validate()?;
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::invalid_config(
                "RetryPolicy::max_attempts must be at least 1",
            ));
        }
        if self.outcome_timeout.is_zero() {
            return Err(Error::invalid_config("outcome_timeout must be positive"));
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
                let mut pool_options = self.pool_options;
                if let Some(wait) = self.wait_for_server {
                    pool_options = pool_options.wait_for_server(Some(wait));
                }
                Pool::new(connect, pool_options)?
            }
        };
        let sql = Statements::new(&names, Engine::Postgres);
        let mut store = StateStore {
            inner: Arc::new(Inner {
                core: Core::new(pool, names, sql, self.codec, self.retry),
                max_state_size: self.max_state_size,
                outcome_timeout: self.outcome_timeout,
                lost_writes: LostWriteCounters::default(),
                combiner: self.group_commit.then(|| Combiner::new(1, MAX_GROUP)),
                reads: self
                    .coalesce_reads
                    .then(|| Combiner::new(READ_STATEMENTS, MAX_READ_GROUP)),
                sweeper: std::sync::OnceLock::new(),
            }),
        };
        if self.migrate {
            store.migrate()?;
        }
        // On Citus, with the table distributed, some statements take
        // another form: find out where the table lives (after migrating,
        // which distributes it).
        let engine = store.call(true, |core, c| {
            Ok(schema::engine(&mut c.client, core.names())?)
        })?;
        if engine != Engine::Postgres {
            let inner = Arc::get_mut(&mut store.inner).expect("no other handle yet");
            let sql = Statements::new(inner.core.names(), engine);
            inner.core.set_statements(sql);
            // A group's rows span shards, which Citus commits in two
            // phases, and a transaction that ran the trigger's NOTIFY
            // cannot be prepared: every group would fail and its writes
            // be made one by one.
            inner.combiner = None;
            inner.reads = None;
        }
        if let Some(options) = &self.sweeper {
            let weak = Arc::downgrade(&store.inner);
            let sweeper = Sweeper::start(
                options,
                move || weak.upgrade().map(|inner| StateStore { inner }),
                |store, batch| store.sweep_batch(batch),
            )?;
            let _ = store.inner.sweeper.set(sweeper);
        }
        Ok(store)
    }
}
