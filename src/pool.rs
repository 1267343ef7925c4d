//! The connection pool: r2d2 over `postgres::Client`, one TLS connector per
//! pool, prepared statements cached per connection, and fault detection that
//! re-checks idle connections only after a connection was seen to break.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use postgres::error::SqlState;
use postgres::{Client, Statement};
use postgres_native_tls::MakeTlsConnector;
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;

use crate::config::{classify_connect, ConnectOptions};
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
    wait_for_server: Option<Duration>,
}

impl Default for PoolOptions {
    /// `max_size` 10, `min_idle` 1, `connection_timeout` 10 s, no
    /// `statement_timeout`, `idle_timeout` 10 min, `max_lifetime` 30 min,
    /// no `wait_for_server`.
    fn default() -> Self {
        PoolOptions {
            max_size: 10,
            min_idle: Some(1),
            connection_timeout: Duration::from_secs(10),
            statement_timeout: None,
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            wait_for_server: None,
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

    /// How long [`Pool::new`] keeps trying to make its first connection
    /// while the server is not up yet (default `None`: fail at once).
    ///
    /// For programs that may start before their database, as containers
    /// started together do. Retried, with back-off from 50 ms doubling to
    /// 1 s: a refused connection, a server that is starting up, in recovery
    /// or shutting down (SQLSTATE 57P03 and the like), and a connect that
    /// timed out. Anything else (a wrong password, a missing database, TLS)
    /// fails at once. When the server is still not up at the deadline,
    /// `Pool::new` returns the last [`Error::Connect`], which says why.
    pub fn wait_for_server(mut self, wait: Option<Duration>) -> Self {
        self.wait_for_server = wait;
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
    /// The server process serving it, when the server said.
    #[allow(dead_code)]
    pub backend: Option<Backend>,
    statements: HashMap<Box<str>, Statement>,
    verified_epoch: u64,
    broken: bool,
}

impl Connection {
    /// The prepared statement for `sql`, prepared on first use and cached
    /// for the life of the connection.
    pub fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.into(), statement.clone());
        Ok(statement)
    }
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
    inner: PostgresConnectionManager<MakeTlsConnector>,
    statement_timeout: Option<Duration>,
    shared: Arc<Shared>,
}

impl Manager {
    /// Connects, applies the session settings and learns which server
    /// process serves the connection, in one round trip after the handshake.
    fn open(&self) -> Result<(Client, Option<Backend>)> {
        let mut client = self
            .inner
            .connect()
            .map_err(|e| connect_error(e, &self.shared))?;
        let timeout = self.statement_timeout.map(|t| t.as_millis().to_string());
        let row = client
            .query_one(
                "SELECT pg_backend_pid(),                  (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),                  CASE WHEN $1::TEXT IS NULL THEN NULL                  ELSE set_config('statement_timeout', $1::TEXT, false) END",
                &[&timeout],
            )
            .map_err(|e| connect_error(e, &self.shared))?;
        let backend = row.get::<_, Option<SystemTime>>(1).map(|started| Backend {
            pid: row.get(0),
            started,
        });
        Ok((client, backend))
    }
}

/// The pool's first connection, retried while the server is not up yet
/// and `wait` allows.
fn open_first(manager: &Manager, wait: Option<Duration>) -> Result<(Client, Option<Backend>)> {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    let deadline = wait.map(|wait| Instant::now() + wait);
    let mut pause = FIRST_PAUSE;
    loop {
        let error = match manager.open() {
            Ok(opened) => return Ok(opened),
            Err(e) => e,
        };
        let left = deadline
            .filter(|_| server_not_up(&error))
            .and_then(|deadline| deadline.checked_duration_since(Instant::now()))
            .filter(|left| !left.is_zero());
        let Some(left) = left else {
            return Err(error);
        };
        log::info!(
            "waiting for the server at {}: {error}",
            manager.shared.target
        );
        std::thread::sleep(pause.mul_f64(0.5 + fastrand::f64() / 2.0).min(left));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Whether a connect failure means the server is not up (yet): worth
/// waiting for, unlike a wrong password or a missing database.
fn server_not_up(error: &Error) -> bool {
    match error {
        Error::Connect {
            failure: ConnectFailure::Refused | ConnectFailure::NotReady | ConnectFailure::Timeout,
            ..
        } => true,
        // A server that closes the connection while it starts or stops.
        Error::Connect {
            failure: ConnectFailure::Other,
            source: Some(e),
            ..
        } => e.code().is_none() && (e.is_closed() || is_io(e)),
        _ => false,
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
            .shared
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (client, backend) = match spare {
            Some(opened) => opened,
            None => match self.open() {
                Ok(opened) => opened,
                Err(e) => {
                    if let Error::Connect { failure, .. } = &e {
                        // Kept for callers that time out waiting: they get
                        // the reason instead of "pool exhausted".
                        *self
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
        Ok(Connection {
            client,
            backend,
            statements: HashMap::new(),
            verified_epoch: self.shared.epoch.load(Ordering::Acquire),
            broken: false,
        })
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
    /// database at once rather than on the first call. With
    /// [`PoolOptions::wait_for_server`], waits for a server that is not up
    /// yet.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] naming the cause (refused, authentication failed,
    /// too many clients, missing database, not ready, TLS),
    /// [`Error::InvalidConfig`] for impossible pool settings, [`Error::Tls`]
    /// for an unreadable root certificate.
    pub fn new(connect: ConnectOptions, options: PoolOptions) -> Result<Pool> {
        options.validate()?;
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
        let manager = Manager {
            inner: PostgresConnectionManager::new(config, tls),
            statement_timeout: options.statement_timeout,
            shared: Arc::clone(&shared),
        };
        let first = open_first(&manager, options.wait_for_server)?;
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
            Some(c) if is_notify_queue_full(c, &e) => {
                // The server moves the queue's tail only when a notifying
                // commit crosses a page, which a full queue never lets
                // happen: once the session that held the queue back is
                // gone, the queue would stay full. Asking for its usage
                // moves the tail, so that the next write can succeed.
                if let Err(e) = conn
                    .client
                    .simple_query("SELECT pg_notification_queue_usage()")
                {
                    log::debug!("could not advance the notification queue: {e}");
                }
                log::warn!(
                    "the NOTIFY queue of {} is full: writes fail until the session \
                     holding it back ends its transaction",
                    self.shared.target
                );
                Error::NotificationQueueFull(e)
            }
            _ => Error::Database(e),
        };
        (error, false)
    }
}

/// PostgreSQL's "too many notifications in the NOTIFY queue", raised at
/// commit. The code alone (program limit exceeded) also covers other
/// limits, such as an over-long row; the message tells them apart.
fn is_notify_queue_full(code: &SqlState, e: &postgres::Error) -> bool {
    *code == SqlState::PROGRAM_LIMIT_EXCEEDED
        && e.as_db_error()
            .is_some_and(|db| db.message().contains("NOTIFY queue"))
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
