//! The connection pool: r2d2 over `postgres::Client`, one TLS connector per
//! pool, prepared statements cached per connection (or, through a
//! transaction-mode pooler, sent unnamed with their parameter types), and
//! fault detection that re-checks idle connections only after a connection
//! was seen to break.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{Client, GenericClient, Row, Statement, Transaction};
use postgres_native_tls::MakeTlsConnector;
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;

use crate::config::{classify_connect, ConnectOptions, PoolerMode};
use crate::error::{ConnectFailure, Error, Result};

/// Pool settings. Every field has a documented default ([`PoolOptions::default`]).
///
/// ```
/// use std::time::Duration;
/// use trebuchet_postgres::PoolOptions;
///
/// let options = PoolOptions::default()
///     .max_size(32)
///     .statement_timeout(Some(Duration::from_secs(5)));
/// assert_eq!(options.get_max_size(), 32);
/// ```
#[derive(Debug, Clone)]
pub struct PoolOptions {
    max_size: u32,
    min_idle: Option<u32>,
    connection_timeout: Duration,
    statement_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
}

impl Default for PoolOptions {
    /// `max_size` 10, `min_idle` 1, `connection_timeout` 10 s, no
    /// `statement_timeout`, `idle_timeout` 10 min, `max_lifetime` 30 min.
    fn default() -> Self {
        PoolOptions {
            max_size: 10,
            min_idle: Some(1),
            connection_timeout: Duration::from_secs(10),
            statement_timeout: None,
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
        }
    }
}

impl PoolOptions {
    /// The most connections the pool opens (default 10). Each one is a
    /// server backend: keep the sum over all processes below the server's
    /// `max_connections`.
    pub fn max_size(mut self, max_size: u32) -> Self {
        self.max_size = max_size;
        self
    }

    /// Idle connections kept open (default 1; `None` keeps `max_size`).
    pub fn min_idle(mut self, min_idle: Option<u32>) -> Self {
        self.min_idle = min_idle;
        self
    }

    /// How long a call waits for a free connection before it fails with
    /// [`Error::PoolExhausted`] (default 10 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The server-side `statement_timeout` of every pooled connection
    /// (default none). A statement over it fails with
    /// [`Error::StatementTimeout`].
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How long an idle connection is kept (default 10 min).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a connection lives at most (default 30 min).
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// The configured `max_size`.
    pub fn get_max_size(&self) -> u32 {
        self.max_size
    }

    fn validate(&self) -> Result<()> {
        if self.max_size == 0 {
            return Err(Error::invalid_config("max_size must be at least 1"));
        }
        if self.min_idle.is_some_and(|m| m > self.max_size) {
            return Err(Error::invalid_config("min_idle must not exceed max_size"));
        }
        if self.connection_timeout.is_zero() {
            return Err(Error::invalid_config("connection_timeout must be positive"));
        }
        if self.statement_timeout.is_some_and(|t| t.as_millis() == 0) {
            return Err(Error::invalid_config(
                "statement_timeout must be at least 1 ms (use None for no limit)",
            ));
        }
        Ok(())
    }
}

/// The server process behind a connection: enough to find it again from
/// another connection (pids are reused, start times tell them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backend {
    pub pid: i32,
    pub started: SystemTime,
}

/// A pooled connection with its prepared statements.
pub(crate) struct Connection {
    pub client: Client,
    /// The server process serving it, when the server said (never through
    /// a pooler, whose server connections serve other clients too).
    pub backend: Option<Backend>,
    statements: HashMap<Box<str>, Statement>,
    /// Through a transaction-mode pooler: statements are sent unnamed, with
    /// the parameter types their casts name, read once per text.
    unnamed: Option<HashMap<Box<str>, Arc<[Type]>>>,
    verified_epoch: u64,
    broken: bool,
}

impl Connection {
    /// The statement for `sql`: prepared on first use and cached for the
    /// life of the connection, or, through a transaction-mode pooler, the
    /// text and its parameter types, to be sent unnamed on every call
    /// (parse, bind and execute in one round trip).
    pub fn prepare<'a>(&mut self, sql: &'a str) -> Result<Prepared<'a>, postgres::Error> {
        if let Some(known) = &mut self.unnamed {
            if let Some(types) = known.get(sql) {
                return Ok(Prepared::Unnamed {
                    sql,
                    types: Arc::clone(types),
                });
            }
            if let Some(types) = param_types(sql) {
                let types: Arc<[Type]> = types.into();
                known.insert(sql.into(), Arc::clone(&types));
                return Ok(Prepared::Unnamed { sql, types });
            }
            // Every statement of this crate casts its parameters (a unit
            // test checks): this is a bug, but a named statement still
            // works wherever no transaction pooler is in the way.
            log::warn!("a statement without parameter casts is sent as a named statement: {sql}");
        }
        if let Some(statement) = self.statements.get(sql) {
            return Ok(Prepared::Named(statement.clone()));
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.into(), statement.clone());
        Ok(Prepared::Named(statement))
    }
}

/// A statement ready to run on a connection or on one of its transactions:
/// the choke point through which every statement of the store goes.
pub(crate) enum Prepared<'a> {
    /// Prepared once and cached: each call is bind and execute.
    Named(Statement),
    /// Sent as an unnamed statement with its parameter types on every call.
    Unnamed { sql: &'a str, types: Arc<[Type]> },
}

impl Prepared<'_> {
    /// Runs the statement and returns its rows.
    pub fn query(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.query(statement, params),
            Prepared::Unnamed { sql, types } => client.query_typed(sql, &typed(params, types)),
        }
    }

    /// Runs the statement, which must return exactly one row.
    pub fn query_one(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.query_one(statement, params),
            Prepared::Unnamed { sql, types } => client.query_typed_one(sql, &typed(params, types)),
        }
    }

    /// Runs the statement, which must return at most one row.
    pub fn query_opt(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.query_opt(statement, params),
            Prepared::Unnamed { sql, types } => client.query_typed_opt(sql, &typed(params, types)),
        }
    }

    /// Runs the statement and returns how many rows it changed.
    pub fn execute(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.execute(statement, params),
            Prepared::Unnamed { sql, types } => client.execute_typed(sql, &typed(params, types)),
        }
    }

    /// Binds the statement to a portal of `transaction`, to read its rows a
    /// batch at a time. (Unnamed, the text is prepared inside the
    /// transaction, where even a transaction-mode pooler keeps one server
    /// connection.)
    pub fn bind(
        &self,
        transaction: &mut Transaction<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<postgres::Portal, postgres::Error> {
        match self {
            Prepared::Named(statement) => transaction.bind(statement, params),
            Prepared::Unnamed { sql, .. } => transaction.bind(*sql, params),
        }
    }
}

/// Pairs parameters with their types for an unnamed statement.
fn typed<'p>(
    params: &[&'p (dyn ToSql + Sync)],
    types: &[Type],
) -> Vec<(&'p (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .zip(types.iter().cloned())
        .map(|(param, ty)| (*param, ty))
        .collect()
}

/// The parameter types of `sql`, read from the cast of each parameter's
/// first appearance (`$1::VARCHAR`, `$2::BYTEA[]`): `None` when a parameter
/// has no cast or names a type this crate does not send.
pub(crate) fn param_types(sql: &str) -> Option<Vec<Type>> {
    let mut types: Vec<Option<Type>> = Vec::new();
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let digits = bytes[i + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            i += 1;
            continue;
        }
        let n: usize = sql[i + 1..i + 1 + digits].parse().ok()?;
        i += 1 + digits;
        if n == 0 {
            return None;
        }
        if types.len() < n {
            types.resize(n, None);
        }
        let Some(rest) = sql[i..].strip_prefix("::") else {
            continue;
        };
        let name_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let array = rest[name_len..].starts_with("[]");
        if types[n - 1].is_none() {
            types[n - 1] = Some(type_named(&rest[..name_len], array)?);
        }
    }
    types.into_iter().collect()
}

/// The types this crate's statements cast their parameters to.
fn type_named(name: &str, array: bool) -> Option<Type> {
    let ty = match (name.to_ascii_uppercase().as_str(), array) {
        ("VARCHAR", false) => Type::VARCHAR,
        ("VARCHAR", true) => Type::VARCHAR_ARRAY,
        ("TEXT", false) => Type::TEXT,
        ("TEXT", true) => Type::TEXT_ARRAY,
        ("BYTEA", false) => Type::BYTEA,
        ("BYTEA", true) => Type::BYTEA_ARRAY,
        ("BIGINT" | "INT8", false) => Type::INT8,
        ("BIGINT" | "INT8", true) => Type::INT8_ARRAY,
        ("INT" | "INTEGER" | "INT4", false) => Type::INT4,
        ("INT" | "INTEGER" | "INT4", true) => Type::INT4_ARRAY,
        ("OID", false) => Type::OID,
        ("NAME", false) => Type::NAME,
        ("BOOL" | "BOOLEAN", false) => Type::BOOL,
        ("FLOAT8", false) => Type::FLOAT8,
        ("TIMESTAMP", false) => Type::TIMESTAMP,
        ("TIMESTAMP", true) => Type::TIMESTAMP_ARRAY,
        ("TIMESTAMPTZ", false) => Type::TIMESTAMPTZ,
        _ => return None,
    };
    Some(ty)
}

/// State shared by the pool handle and the r2d2 manager.
struct Shared {
    /// Bumped whenever a connection is seen broken: connections verified
    /// before that are checked once more before their next use.
    epoch: AtomicU64,
    last_error: Mutex<Option<(Instant, ConnectFailure, Option<postgres::Error>)>>,
    /// A connection made while constructing the pool, handed out first.
    spare: Mutex<Option<(Client, Option<Backend>)>>,
    /// Check-outs that found every connection in use and waited.
    waits: AtomicU64,
    /// Their total wait, in microseconds.
    wait_micros: AtomicU64,
    /// Check-outs that gave up after `connection_timeout`.
    timeouts: AtomicU64,
    target: String,
    user: String,
}

pub(crate) struct Manager {
    opener: Arc<Opener>,
}

/// How connections are made: shared by the r2d2 manager and the pool
/// handle, which opens connections of its own outside the pool.
struct Opener {
    inner: PostgresConnectionManager<MakeTlsConnector>,
    statement_timeout: Option<Duration>,
    pooler: PoolerMode,
    shared: Arc<Shared>,
}

impl Opener {
    /// Connects, applies the session settings and learns which server
    /// process serves the connection, in one round trip after the handshake.
    /// Through a transaction-mode pooler there is no session to set up, and
    /// behind any pooler the server process is not the connection's own.
    fn open(&self) -> Result<(Client, Option<Backend>)> {
        let mut client = self
            .inner
            .connect()
            .map_err(|e| connect_error(e, &self.shared))?;
        if self.pooler == PoolerMode::Transaction {
            return Ok((client, None));
        }
        let timeout = self.statement_timeout.map(|t| t.as_millis().to_string());
        // Unnamed, with the type given: one round trip, and no statement
        // name for a pooler to lose.
        let row = client
            .query_typed_one(
                "SELECT pg_backend_pid(), \
                 (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()), \
                 CASE WHEN $1::TEXT IS NULL THEN NULL \
                 ELSE set_config('statement_timeout', $1::TEXT, false) END",
                &[(&timeout, Type::TEXT)],
            )
            .map_err(|e| connect_error(e, &self.shared))?;
        let backend = row
            .get::<_, Option<SystemTime>>(1)
            .map(|started| Backend {
                pid: row.get(0),
                started,
            })
            .filter(|_| self.pooler == PoolerMode::None);
        Ok((client, backend))
    }

    fn wrap(&self, client: Client, backend: Option<Backend>) -> Connection {
        Connection {
            client,
            backend,
            statements: HashMap::new(),
            unnamed: (self.pooler == PoolerMode::Transaction).then(HashMap::new),
            verified_epoch: self.shared.epoch.load(Ordering::Acquire),
            broken: false,
        }
    }
}

fn connect_error(e: postgres::Error, shared: &Shared) -> Error {
    Error::Connect {
        failure: classify_connect(&e),
        target: shared.target.clone(),
        user: shared.user.clone(),
        source: Some(e),
    }
}

impl ManageConnection for Manager {
    type Connection = Connection;
    type Error = Error;

    fn connect(&self) -> Result<Connection> {
        let spare = self
            .opener
            .shared
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (client, backend) = match spare {
            Some(opened) => opened,
            None => match self.opener.open() {
                Ok(opened) => opened,
                Err(e) => {
                    if let Error::Connect { failure, .. } = &e {
                        // Kept for callers that time out waiting: they get
                        // the reason instead of "pool exhausted".
                        *self
                            .opener
                            .shared
                            .last_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) =
                            Some((Instant::now(), *failure, None));
                    }
                    return Err(e);
                }
            },
        };
        Ok(self.opener.wrap(client, backend))
    }

    fn is_valid(&self, conn: &mut Connection) -> Result<()> {
        conn.client
            .simple_query("")
            .map(|_| ())
            .map_err(Error::Database)
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.broken || conn.client.is_closed()
    }
}

/// A pool of connections to one server, cheap to clone and safe to share
/// between threads and between several [`StateStore`](crate::StateStore)s
/// (the seed's shared `EventLoopGroup`).
///
/// ```no_run
/// use trebuchet_postgres::{Pool, PoolOptions, StateStore};
///
/// let pool = Pool::new("postgresql://localhost/trebuchet".parse()?, PoolOptions::default())?;
/// let rooms = StateStore::builder().pool(pool.clone()).table("rooms").build()?;
/// let players = StateStore::builder().pool(pool).table("players").build()?;
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
#[derive(Clone)]
pub struct Pool {
    r2d2: r2d2::Pool<Manager>,
    opener: Arc<Opener>,
    shared: Arc<Shared>,
    options: Arc<PoolOptions>,
    connect: Arc<ConnectOptions>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.r2d2.state();
        f.debug_struct("Pool")
            .field("target", &self.shared.target)
            .field("user", &self.shared.user)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .field("options", &self.options)
            .finish()
    }
}

/// A snapshot of a pool's connections and of how often callers had to wait
/// for one, from [`Pool::state`]. The counters run from the pool's creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolState {
    /// Connections open, in use or idle.
    pub connections: u32,
    /// Connections open and idle.
    pub idle: u32,
    /// The configured maximum.
    pub max_size: u32,
    /// Check-outs that found all `max_size` connections in use and waited
    /// for one to be returned (opening a new connection is not a wait).
    /// Many waits mean the pool is too small for its callers.
    pub waits: u64,
    /// The time those check-outs spent waiting, in total.
    pub wait_time: Duration,
    /// Check-outs that waited `connection_timeout` in vain
    /// ([`Error::PoolExhausted`] or [`Error::Connect`]).
    pub timeouts: u64,
}

impl Pool {
    /// Opens a pool and one connection, to report a bad address, password or
    /// database at once rather than on the first call.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] naming the cause (refused, authentication failed,
    /// too many clients, missing database, TLS), [`Error::InvalidConfig`]
    /// for impossible pool settings, [`Error::Tls`] for an unreadable root
    /// certificate.
    pub fn new(connect: ConnectOptions, options: PoolOptions) -> Result<Pool> {
        options.validate()?;
        let pooler = connect.get_pooler();
        if pooler == PoolerMode::Transaction && options.statement_timeout.is_some() {
            return Err(Error::invalid_config(
                "statement_timeout is a session setting, which a transaction-mode pooler \
                 does not keep (and would pass to other clients): set it on the role instead \
                 (ALTER ROLE app SET statement_timeout = '5s') and leave \
                 PoolOptions::statement_timeout unset",
            ));
        }
        let config = connect.driver_config();
        let connect = Arc::new(connect);
        let tls = connect.tls_connector()?;
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            last_error: Mutex::new(None),
            spare: Mutex::new(None),
            waits: AtomicU64::new(0),
            wait_micros: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            target: connect.target(),
            user: config.get_user().unwrap_or("postgres").to_owned(),
        });
        let opener = Arc::new(Opener {
            inner: PostgresConnectionManager::new(config, tls),
            statement_timeout: options.statement_timeout,
            pooler,
            shared: Arc::clone(&shared),
        });
        let first = opener.open()?;
        let manager = Manager {
            opener: Arc::clone(&opener),
        };
        *shared.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(first);
        let r2d2 = r2d2::Pool::builder()
            .max_size(options.max_size)
            .min_idle(options.min_idle)
            .test_on_check_out(false)
            .connection_timeout(options.connection_timeout)
            .idle_timeout(options.idle_timeout)
            .max_lifetime(options.max_lifetime)
            .build_unchecked(manager);
        Ok(Pool {
            r2d2,
            opener,
            shared,
            options: Arc::new(options),
            connect,
        })
    }

    /// Connects with a connection string and default pool options.
    ///
    /// # Errors
    ///
    /// As [`Pool::new`], and [`Error::InvalidConnectionString`].
    pub fn connect(url: &str) -> Result<Pool> {
        Pool::new(url.parse()?, PoolOptions::default())
    }

    /// How many connections are open and idle, and how often callers
    /// waited for one. Reads counters only: no round trip.
    pub fn state(&self) -> PoolState {
        let state = self.r2d2.state();
        PoolState {
            connections: state.connections,
            idle: state.idle_connections,
            max_size: self.options.max_size,
            waits: self.shared.waits.load(Ordering::Relaxed),
            wait_time: Duration::from_micros(self.shared.wait_micros.load(Ordering::Relaxed)),
            timeouts: self.shared.timeouts.load(Ordering::Relaxed),
        }
    }

    /// The options the pool connects with (for example to point a
    /// [`ChangeListener`](crate::ChangeListener) at the same server).
    pub fn connect_options(&self) -> &ConnectOptions {
        &self.connect
    }

    /// `host:port` of the server, for messages.
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// Checks out a connection. A connection that was idle while another
    /// one broke is checked with a round trip first and replaced if dead, so
    /// a server restart costs each caller at most one error.
    pub(crate) fn get(&self) -> Result<r2d2::PooledConnection<Manager>> {
        let start = Instant::now();
        // Bounded: each pass either returns or discards one dead connection.
        for _ in 0..=self.options.max_size {
            let mut conn = match self.r2d2.try_get() {
                Some(conn) => conn,
                None => self.wait_for_connection(start)?,
            };
            let epoch = self.shared.epoch.load(Ordering::Acquire);
            if conn.verified_epoch >= epoch {
                return Ok(conn);
            }
            if conn.client.is_valid(Duration::from_secs(5)).is_ok() {
                conn.verified_epoch = epoch;
                return Ok(conn);
            }
            log::debug!(
                "discarding a dead pooled connection to {}",
                self.shared.target
            );
            conn.broken = true;
        }
        Err(self.checkout_error(start))
    }

    /// `r2d2::Pool::get` when no connection is idle: a wait when every
    /// connection is in use at `max_size`, otherwise a new connection.
    fn wait_for_connection(&self, start: Instant) -> Result<r2d2::PooledConnection<Manager>> {
        let full = self.r2d2.state().connections >= self.options.max_size;
        let waiting = Instant::now();
        let conn = self.r2d2.get();
        if full {
            let waited = u64::try_from(waiting.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.shared.waits.fetch_add(1, Ordering::Relaxed);
            self.shared.wait_micros.fetch_add(waited, Ordering::Relaxed);
        }
        conn.map_err(|_| {
            self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
            self.checkout_error(start)
        })
    }

    fn checkout_error(&self, start: Instant) -> Error {
        let last = self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match last {
            Some((at, failure, source))
                if start
                    .checked_sub(self.options.connection_timeout)
                    .is_none_or(|window| at >= window) =>
            {
                Error::Connect {
                    failure,
                    target: self.shared.target.clone(),
                    user: self.shared.user.clone(),
                    source,
                }
            }
            _ => Error::PoolExhausted {
                max_size: self.options.max_size,
                waited: start.elapsed(),
            },
        }
    }

    /// A new connection outside the pool, for finding out what became of a
    /// write whose connection broke: unlike a check-out, it does not wait
    /// for the pool's background reconnection.
    pub(crate) fn open_unpooled(&self) -> Result<Connection> {
        let (client, backend) = self.opener.open()?;
        Ok(self.opener.wrap(client, backend))
    }

    /// Classifies an error from a call on `conn`. A broken connection is
    /// marked for replacement and every other pooled connection for a check.
    /// Returns the error and whether the connection broke.
    pub(crate) fn call_error(&self, conn: &mut Connection, e: postgres::Error) -> (Error, bool) {
        let lost = e.is_closed()
            || conn.client.is_closed()
            || e.code().is_some_and(|c| {
                *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || c.code().starts_with("08")
            })
            || e.as_db_error().is_none() && e.code().is_none() && is_io(&e);
        if lost {
            log::warn!(
                "connection to {} lost ({e}); idle connections will be checked before reuse",
                self.shared.target
            );
            conn.broken = true;
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
            return (Error::ConnectionLost(Arc::new(e)), true);
        }
        let error = match e.code() {
            Some(c) if *c == SqlState::QUERY_CANCELED => Error::StatementTimeout,
            // A statement this connection prepared is gone, or one of its
            // names is taken: a transaction-mode pooler handed the call to
            // another server connection. Nothing was executed.
            Some(c)
                if conn.unnamed.is_none()
                    && (*c == SqlState::INVALID_SQL_STATEMENT_NAME
                        || *c == SqlState::DUPLICATE_PSTATEMENT) =>
            {
                conn.statements.clear();
                Error::invalid_config(format!(
                    "{}: the server lost a statement this connection prepared, as happens \
                     through a transaction-mode pooler (PgBouncer pool_mode = transaction); \
                     declare it with ConnectOptions::pooler(PoolerMode::Transaction)",
                    e.as_db_error()
                        .map_or("prepared statement missing", |db| db.message())
                ))
            }
            _ => Error::Database(e),
        };
        (error, false)
    }
}

fn is_io(e: &postgres::Error) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = source {
        if err.is::<std::io::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_types_come_from_the_first_cast() {
        assert_eq!(
            param_types("SELECT $1::VARCHAR, $2::BYTEA[], $3::BIGINT, $2, $1").unwrap(),
            [Type::VARCHAR, Type::BYTEA_ARRAY, Type::INT8]
        );
        assert_eq!(
            param_types("SELECT set_config('x', $2::BIGINT::TEXT, true), $1::timestamp[]").unwrap(),
            [Type::TIMESTAMP_ARRAY, Type::INT8]
        );
        assert_eq!(param_types("SELECT 1").unwrap(), []);
        assert_eq!(
            param_types("SELECT $1::NAME, $2::OID").unwrap(),
            [Type::NAME, Type::OID]
        );
    }

    #[test]
    fn a_parameter_without_a_cast_has_no_type() {
        assert_eq!(param_types("SELECT $1"), None);
        assert_eq!(param_types("SELECT $2::TEXT"), None);
        assert_eq!(param_types("SELECT $1::POINT"), None);
        assert_eq!(param_types("SELECT $0::TEXT"), None);
    }
}
