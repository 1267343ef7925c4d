//! The connection pool: r2d2 over `postgres::Client`, one TLS connector per
//! pool, prepared statements cached per connection (or, through a
//! transaction-mode pooler, sent unnamed with their parameter types), and
//! fault detection that re-checks idle connections only after a connection
//! was seen to break.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use postgres::types::Type;
use postgres::Client;
use r2d2::ManageConnection;
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::config::{classify_connect, ConnectOptions, Dialer, PoolerMode};
use crate::error::{server, ConnectFailure, Error, Result};

mod affinity;
mod statement;
mod watchdog;
use affinity::{Parking, PARK_LIMIT};
#[cfg(test)]
pub(crate) use statement::param_types;
use statement::StatementCache;
pub(crate) use statement::{Prepared, Sql};
use watchdog::{Watch, Watchdog};

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
    call_timeout: Option<Duration>,
}

impl Default for PoolOptions {
    /// `max_size` 10, `min_idle` 1, `connection_timeout` 10 s, no
    /// `statement_timeout`, `idle_timeout` 10 min, `max_lifetime` 30 min,
    /// no `wait_for_server`, no `call_timeout`.
    fn default() -> Self {
        PoolOptions {
            max_size: 10,
            min_idle: Some(1),
            connection_timeout: Duration::from_secs(10),
            statement_timeout: None,
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            wait_for_server: None,
            call_timeout: None,
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

    /// How long an idle connection is kept (default 10 min). A returned
    /// connection stays with the thread that used it for one to two
    /// seconds first (see [`Pool`]); the timeout counts from then.
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

    /// The longest a call may hold a pooled connection (default `None`: no
    /// limit). Past it the pool closes the connection, and the call fails
    /// at once with a connection error ([`Error::is_connection`]) instead of
    /// waiting for a server or network that stopped answering.
    ///
    /// It covers the whole call: its round trips and, for
    /// [`transform`](crate::StateStore::transform), the closure. Choose it
    /// above the slowest call you expect (a large bulk write, a
    /// [`migrate`](crate::StateStore::migrate) waiting for another process).
    /// A write cut this way is a write whose connection broke: it then
    /// finds out on a new connection whether it landed, within
    /// [`StateStoreBuilder::outcome_timeout`](crate::StateStoreBuilder::outcome_timeout).
    ///
    /// Why it is needed: TCP keepalives and `TCP_USER_TIMEOUT` notice a
    /// peer that is gone, but not one that still acknowledges while
    /// nothing answers (a frozen server, a hung proxy or pooler, a stalled
    /// path), and `statement_timeout` never fires for a request the server
    /// never received. A call then fails within the timeout plus a tenth of
    /// it; the calls after it fail within
    /// [`connection_timeout`](Self::connection_timeout), since new
    /// connections time out too (after the connect timeout of
    /// [`ConnectOptions::connect_timeout`]).
    ///
    /// Enforced on Linux, for connections over TCP: the pool closes the
    /// socket, which the driver does not expose, after finding it in
    /// `/proc` when the connection is opened (the pool's connections are
    /// then opened one at a time). A connection whose socket cannot be told
    /// apart, for example because another part of the program connected
    /// to the same port at the same moment, is used without the bound.
    pub fn call_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.call_timeout = timeout;
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
        if self.call_timeout.is_some_and(|t| t.as_millis() == 0) {
            return Err(Error::invalid_config(
                "call_timeout must be at least 1 ms (use None for no limit)",
            ));
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
    statements: StatementCache,
    /// Through a transaction-mode pooler: statements are sent unnamed, with
    /// their declared parameter types, on every call.
    unnamed: bool,
    verified_epoch: u64,
    broken: bool,
    /// Its entry at the call-timeout watchdog, when it has one.
    watch: Option<Watch>,
}

impl Connection {
    /// `sql`, ready to run: prepared on first use and cached for the life
    /// of the connection, or, through a transaction-mode pooler (and for a
    /// statement made for one call), its text and declared parameter types,
    /// sent unnamed on every call (parse, bind and execute in one round
    /// trip).
    pub fn prepare<'a>(&mut self, sql: &'a Sql) -> Result<Prepared<'a>, postgres::Error> {
        if self.unnamed || !sql.is_cached() {
            return Ok(Prepared::Unnamed {
                sql: sql.text(),
                types: sql.types(),
            });
        }
        if let Some(statement) = self.statements.get(sql) {
            return Ok(Prepared::Named(statement.clone()));
        }
        let statement = self.client.prepare_typed(sql.text(), sql.types())?;
        self.statements.insert(sql, statement.clone());
        Ok(Prepared::Named(statement))
    }
}

/// State shared by the pool handle and the r2d2 manager.
struct Shared {
    /// Bumped whenever a connection is seen broken: connections verified
    /// before that are checked once more before their next use.
    epoch: AtomicU64,
    last_error: Mutex<Option<(Instant, ConnectFailure, Option<postgres::Error>)>>,
    /// A connection made while constructing the pool, handed out first.
    spare: Mutex<Option<Opened>>,
    /// Connects given up on that have not ended yet.
    abandoned_connects: AtomicUsize,
    /// Bounds calls, with a `call_timeout`.
    watchdog: Option<Arc<Watchdog>>,
    /// Check-outs that found every connection in use and waited.
    waits: AtomicU64,
    /// Their total wait, in microseconds.
    wait_micros: AtomicU64,
    /// Check-outs that gave up after `connection_timeout`.
    timeouts: AtomicU64,
    target: String,
    user: String,
}

/// A new connection, before the pool wraps it.
struct Opened {
    client: Client,
    backend: Option<Backend>,
    watch: Option<Watch>,
}

pub(crate) struct Manager {
    opener: Arc<Opener>,
}

/// How connections are made: shared by the r2d2 manager and the pool
/// handle, which opens connections of its own outside the pool.
struct Opener {
    dialer: Dialer,
    statement_timeout: Option<Duration>,
    pooler: PoolerMode,
    /// The driver's connect timeout, which bounds all of [`Opener::open`].
    connect_timeout: Option<Duration>,
    /// The server's ports, to find a new connection's socket.
    ports: Arc<[u16]>,
    max_size: u32,
    shared: Arc<Shared>,
}

impl Opener {
    /// Opens a connection within the connect timeout. The driver's own
    /// timeout covers only the TCP handshake: a server or path that accepts
    /// the connection and then stops answering would hold the caller (the
    /// pool's thread, or `Pool::new`) for as long as it stays silent. So the
    /// connect runs on a helper thread, given up on at the timeout; it ends
    /// by itself when the peer answers or the socket dies, and drops its
    /// connection. At most `max_size` such connects are left running.
    fn open(self: &Arc<Self>) -> Result<Opened> {
        let Some(limit) = self.connect_timeout else {
            return self.open_here();
        };
        let timed_out = || Error::Connect {
            failure: ConnectFailure::Timeout,
            target: self.shared.target.clone(),
            user: self.shared.user.clone(),
            source: None,
        };
        let abandoned = &self.shared.abandoned_connects;
        if abandoned.load(Ordering::Acquire) >= self.max_size as usize {
            return Err(timed_out());
        }
        // Whoever moves it from WAITING first decides: the helper
        // delivers, or the caller gives up and the helper counts itself out
        // when it ends.
        const WAITING: u8 = 0;
        const DELIVERED: u8 = 1;
        const ABANDONED: u8 = 2;
        let outcome = Arc::new(AtomicU8::new(WAITING));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (opener, helper_outcome) = (Arc::clone(self), Arc::clone(&outcome));
        thread::Builder::new()
            .name("trebuchet-connect".into())
            .spawn(move || {
                let opened = opener.open_here();
                let decided = helper_outcome.compare_exchange(
                    WAITING,
                    DELIVERED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                match decided {
                    Ok(_) => drop(tx.send(opened)),
                    Err(_) => {
                        opener
                            .shared
                            .abandoned_connects
                            .fetch_sub(1, Ordering::AcqRel);
                    }
                }
            })
            .map_err(Error::thread_start("a connect thread"))?;
        match rx.recv_timeout(limit) {
            Ok(opened) => opened,
            Err(_) => {
                abandoned.fetch_add(1, Ordering::AcqRel);
                let gave_up = outcome.compare_exchange(
                    WAITING,
                    ABANDONED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if gave_up.is_ok() {
                    return Err(timed_out());
                }
                // Delivered just now: take it.
                abandoned.fetch_sub(1, Ordering::AcqRel);
                rx.recv().unwrap_or_else(|_| Err(timed_out()))
            }
        }
    }

    /// Connects, applies the session settings and learns which server
    /// process serves the connection, in one round trip after the handshake.
    /// Through a transaction-mode pooler there is no session to set up, and
    /// behind any pooler the server process is not the connection's own.
    fn open_here(&self) -> Result<Opened> {
        let connect = || self.dialer.connect();
        let (mut client, watch) = match &self.shared.watchdog {
            Some(watchdog) => watchdog.open(&self.ports, connect),
            None => connect().map(|client| (client, None)),
        }
        .map_err(|e| connect_error(e, &self.shared))?;
        if self.pooler == PoolerMode::Transaction {
            return Ok(Opened {
                client,
                backend: None,
                watch,
            });
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
        Ok(Opened {
            client,
            backend,
            watch,
        })
    }

    fn wrap(&self, opened: Opened) -> Connection {
        Connection {
            client: opened.client,
            backend: opened.backend,
            statements: StatementCache::default(),
            unnamed: self.pooler == PoolerMode::Transaction,
            verified_epoch: self.shared.epoch.load(Ordering::Acquire),
            broken: false,
            watch: opened.watch,
        }
    }
}

/// The pool's first connection, retried while the server is not up yet
/// and `wait` allows.
fn open_first(opener: &Arc<Opener>, wait: Option<Duration>) -> Result<Opened> {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    let deadline = wait.map(|wait| Instant::now() + wait);
    let mut pause = FIRST_PAUSE;
    loop {
        let error = match opener.open() {
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
            opener.shared.target
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
        } => e.code().is_none() && (e.is_closed() || server::is_io(e)),
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
    /// Boxed: r2d2 and the parking lot move connections on every
    /// check-out and return, and a pointer moves for less.
    type Connection = Box<Connection>;
    type Error = Error;

    fn connect(&self) -> Result<Box<Connection>> {
        let spare = self
            .opener
            .shared
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let opened = match spare {
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
        Ok(Box::new(self.opener.wrap(opened)))
    }

    fn is_valid(&self, conn: &mut Box<Connection>) -> Result<()> {
        conn.client
            .simple_query("")
            .map(|_| ())
            .map_err(Error::Database)
    }

    fn has_broken(&self, conn: &mut Box<Connection>) -> bool {
        conn.broken || conn.client.is_closed()
    }
}

/// A pool of connections to one server, cheap to clone and safe to share
/// between threads and between several [`StateStore`](crate::StateStore)s
/// (the seed's shared `EventLoopGroup`).
///
/// A thread gets back the connection it used last when no other caller
/// took it: a returned connection stays with its thread until another
/// caller needs it (one that would otherwise wait or open a connection) or
/// for one to two seconds, and then goes back to the pool's idle list.
/// Handing a socket from thread to thread on every call costs the client
/// and the server CPU (and, where they share cores, throughput). Such
/// connections count as idle in [`Pool::state`].
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
    /// Connections returned by calls, kept for the thread that used them.
    parking: Arc<Parking<r2d2::PooledConnection<Manager>>>,
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
            .field("parked", &self.parking.len())
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
        let pooler = connect.get_pooler();
        if pooler == PoolerMode::Transaction && options.statement_timeout.is_some() {
            return Err(Error::invalid_config(
                "statement_timeout is a session setting, which a transaction-mode pooler \
                 does not keep (and would pass to other clients): set it on the role instead \
                 (ALTER ROLE app SET statement_timeout = '5s') and leave \
                 PoolOptions::statement_timeout unset",
            ));
        }
        let dialer = connect.dialer()?;
        let config = &dialer.config;
        let connect = Arc::new(connect);
        let watchdog = options
            .call_timeout
            .map(|timeout| Watchdog::start(timeout, connect.target()))
            .transpose()
            .map_err(Error::thread_start("the call timeout's thread"))?;
        let ports: Arc<[u16]> = match config.get_ports() {
            [] => Arc::new([5432]),
            ports => ports.into(),
        };
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            last_error: Mutex::new(None),
            spare: Mutex::new(None),
            abandoned_connects: AtomicUsize::new(0),
            watchdog,
            waits: AtomicU64::new(0),
            wait_micros: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            target: connect.target(),
            user: config.get_user().unwrap_or("postgres").to_owned(),
        });
        let opener = Arc::new(Opener {
            connect_timeout: config.get_connect_timeout().copied(),
            dialer: dialer.clone(),
            statement_timeout: options.statement_timeout,
            pooler,
            ports,
            max_size: options.max_size,
            shared: Arc::clone(&shared),
        });
        let first = open_first(&opener, options.wait_for_server)?;
        let manager = Manager {
            opener: Arc::clone(&opener),
        };
        *shared.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(first);
        // r2d2's worker threads (three, as r2d2 would start), shared with
        // the job that hands long-parked connections back to r2d2. Its
        // periodic jobs (that one and r2d2's reaper) end with the pool.
        let workers = Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(3)
                .thread_name_pattern("r2d2-worker-{}")
                .on_drop_behavior(OnPoolDropBehavior::DiscardPendingScheduled)
                .build(),
        );
        let parking = Arc::new(Parking::new(options.max_size as usize));
        let weak = Arc::downgrade(&parking);
        workers.execute_at_fixed_rate(PARK_LIMIT, PARK_LIMIT, move || {
            if let Some(parking) = weak.upgrade() {
                // Dropped outside the parking lot's lock: back to r2d2.
                drop(parking.release_stale());
            }
        });
        let r2d2 = r2d2::Pool::builder()
            .thread_pool(workers)
            .max_size(options.max_size)
            .min_idle(options.min_idle)
            .test_on_check_out(false)
            .connection_timeout(options.connection_timeout)
            .idle_timeout(options.idle_timeout)
            .max_lifetime(options.max_lifetime)
            .build_unchecked(manager);
        Ok(Pool {
            r2d2,
            parking,
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
        // Parked connections are checked out from r2d2's point of view.
        let parked = u32::try_from(self.parking.len()).unwrap_or(u32::MAX);
        PoolState {
            connections: state.connections,
            idle: state.idle_connections.saturating_add(parked),
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
    pub(crate) fn get(&self) -> Result<Checkout<'_>> {
        let start = Instant::now();
        // A check of a connection waits at most this long for its answer.
        let check = self
            .options
            .call_timeout
            .map_or(CHECK_TIMEOUT, |t| t.min(CHECK_TIMEOUT));
        // Bounded: each pass either returns or discards one dead connection.
        for _ in 0..=self.options.max_size {
            // This thread's own connection, else an idle one, else one
            // parked by another thread, else a wait.
            let found = self
                .parking
                .take_own()
                .or_else(|| self.r2d2.try_get())
                .or_else(|| self.parking.take_any())
                .or_else(|| self.parking.begin_wait());
            let mut conn = match found {
                Some(conn) => conn,
                None => {
                    let conn = self.wait_for_connection(start);
                    self.parking.done_waiting();
                    conn?
                }
            };
            let epoch = self.shared.epoch.load(Ordering::Acquire);
            if conn.verified_epoch >= epoch {
                return Ok(self.checkout(conn, false));
            }
            if conn.client.is_valid(check).is_ok() {
                conn.verified_epoch = epoch;
                return Ok(self.checkout(conn, true));
            }
            log::debug!(
                "discarding a dead pooled connection to {}",
                self.shared.target
            );
            conn.broken = true;
        }
        Err(self.checkout_error(start))
    }

    /// Hands `conn` to a call, under the call timeout when there is one.
    fn checkout(&self, conn: r2d2::PooledConnection<Manager>, checked: bool) -> Checkout<'_> {
        if let (Some(watch), Some(watchdog)) = (&conn.watch, &self.shared.watchdog) {
            watch.arm(Instant::now() + watchdog.timeout());
        }
        Checkout {
            conn: Some(conn),
            parking: &self.parking,
            checked,
        }
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
        let opened = self.opener.open()?;
        Ok(self.opener.wrap(opened))
    }

    /// Classifies an error from a call on `conn`. A broken connection is
    /// marked for replacement and every other pooled connection for a check.
    /// Returns the error and whether the connection broke.
    pub(crate) fn call_error(&self, conn: &mut Connection, e: postgres::Error) -> (Error, bool) {
        let lost = e.is_closed()
            || conn.client.is_closed()
            || server::is_session_ended(&e)
            || e.as_db_error().is_none() && e.code().is_none() && server::is_io(&e);
        if lost {
            log::warn!(
                "connection to {} lost ({e}); idle connections will be checked before reuse",
                self.shared.target
            );
            conn.broken = true;
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
            return (Error::ConnectionLost(Arc::new(e)), true);
        }
        let error = match () {
            () if server::is_cancelled(&e) => Error::StatementTimeout,
            // A statement this connection prepared is gone, or one of its
            // names is taken: a transaction-mode pooler handed the call to
            // another server connection. Nothing was executed.
            () if !conn.unnamed && server::is_lost_statement(&e) => {
                conn.statements.clear();
                Error::invalid_config(format!(
                    "{}: the server lost a statement this connection prepared, as happens \
                     through a transaction-mode pooler (PgBouncer pool_mode = transaction); \
                     declare it with ConnectOptions::pooler(PoolerMode::Transaction)",
                    e.as_db_error()
                        .map_or("prepared statement missing", |db| db.message())
                ))
            }
            () if server::is_notify_queue_full(&e) => {
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
            () => Error::Database(e),
        };
        (error, false)
    }
}

/// How long a check of a connection that may have died waits for an answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection checked out for one call. Dereferences to the
/// [`Connection`]; returns it to the pool when dropped, and discards it
/// when the call timeout cut it.
pub(crate) struct Checkout<'p> {
    /// Always `Some` until dropped.
    conn: Option<r2d2::PooledConnection<Manager>>,
    parking: &'p Parking<r2d2::PooledConnection<Manager>>,
    /// The connection was checked with a round trip for this checkout,
    /// because another one broke since it was last used: the server may be
    /// going through a restart or a mass disconnect.
    pub(crate) checked: bool,
}

impl Deref for Checkout<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("a checkout holds its connection")
    }
}

impl DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("a checkout holds its connection")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.watch.as_ref().is_some_and(Watch::release) {
            conn.broken = true;
        }
        if !conn.broken && !conn.client.is_closed() {
            // Dropped here, outside the parking lot's lock, when a caller
            // waits for it in r2d2.
            drop(self.parking.park(conn));
        }
    }
}

/// The pool against a real server: which connection a caller gets.
#[cfg(all(test, feature = "testing"))]
mod affinity_tests {
    use std::sync::mpsc;

    use super::*;
    use crate::testing::TestDatabase;

    fn pool(max_size: u32) -> Pool {
        let options = PoolOptions::default()
            .max_size(max_size)
            .min_idle(None)
            .connection_timeout(Duration::from_secs(10));
        Pool::new(TestDatabase::shared().connect_options(), options).unwrap()
    }

    fn pid(pool: &Pool) -> i32 {
        let mut conn = pool.get().unwrap();
        let row = conn
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .unwrap();
        row.get(0)
    }

    #[test]
    fn each_thread_gets_back_the_connection_it_used_last() {
        let pool = pool(4);
        // Until r2d2 has opened its connections, a caller that finds none
        // idle takes one parked by another thread rather than wait.
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool.state().idle < 4 {
            assert!(
                Instant::now() < deadline,
                "r2d2 did not open its connections"
            );
            thread::sleep(Duration::from_millis(5));
        }
        // Two threads taking turns: without affinity the second would get
        // the connection the first just returned.
        let (to_other, from_main) = mpsc::channel::<()>();
        let (to_main, from_other) = mpsc::channel::<i32>();
        let other = {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut seen = Vec::new();
                while from_main.recv().is_ok() {
                    let pid = pid(&pool);
                    seen.push(pid);
                    to_main.send(pid).unwrap();
                }
                seen
            })
        };
        let mut seen = Vec::new();
        for _ in 0..20 {
            seen.push(pid(&pool));
            to_other.send(()).unwrap();
            from_other.recv().unwrap();
        }
        drop(to_other);
        let theirs = other.join().unwrap();
        assert!(
            seen.iter().all(|p| *p == seen[0]),
            "this thread hopped: {seen:?}"
        );
        assert!(
            theirs.iter().all(|p| *p == theirs[0]),
            "the other hopped: {theirs:?}"
        );
        assert_ne!(seen[0], theirs[0]);
        let state = pool.state();
        assert_eq!(
            state.idle, state.connections,
            "parked connections count as idle"
        );
    }

    #[test]
    fn each_statement_is_prepared_once_per_connection_and_found_by_its_identity() {
        let pool = pool(1);
        let mut conn = pool.get().unwrap();
        let run = |conn: &mut Checkout<'_>, sql: &Sql| -> i32 {
            let statement = conn.prepare(sql).unwrap();
            statement.query_one(&mut conn.client, &[]).unwrap().get(0)
        };
        let count = |conn: &mut Checkout<'_>| -> i64 {
            conn.client
                .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
                .unwrap()
                .get(0)
        };
        let before = count(&mut conn);
        let one = Sql::new("SELECT 1::INT4", &[]);
        let two = Sql::new("SELECT 2::INT4", &[]);
        assert_eq!(run(&mut conn, &one), 1);
        assert_eq!(run(&mut conn, &two), 2);
        assert_eq!(run(&mut conn, &one), 1);
        // A statement made again with the same text is another statement.
        drop(one);
        let again = Sql::new("SELECT 3::INT4", &[]);
        assert_eq!(run(&mut conn, &again), 3);
        assert_eq!(
            count(&mut conn) - before,
            3,
            "one server statement per statement used"
        );
        // A statement for one call is never kept.
        let once = Sql::once("SELECT 4::INT4", &[]);
        assert_eq!(run(&mut conn, &once), 4);
        assert_eq!(count(&mut conn) - before, 3);
    }

    #[test]
    fn a_connection_parked_by_another_thread_is_taken_rather_than_waited_for() {
        let pool = pool(1);
        let parked_by = {
            let pool = pool.clone();
            thread::spawn(move || pid(&pool)).join().unwrap()
        };
        // The first call may have waited for the pool's first connection.
        let waits = pool.state().waits;
        assert_eq!(pid(&pool), parked_by);
        assert_eq!(pool.state().waits, waits, "waited for a parked connection");
    }

    #[test]
    fn a_caller_waiting_for_a_connection_gets_the_one_returned() {
        let pool = pool(1);
        let held = pool.get().unwrap();
        // That call may have waited for the pool's first connection.
        let waits = pool.state().waits;
        let holder = held.backend.map(|b| b.pid);
        let waiter = {
            let pool = pool.clone();
            thread::spawn(move || pid(&pool))
        };
        // The waiter is waiting inside r2d2 once the pool counts its wait.
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool.parking.waiting() == 0 {
            assert!(Instant::now() < deadline, "the waiter never waited");
            thread::sleep(Duration::from_millis(5));
        }
        drop(held);
        let got = waiter.join().unwrap();
        assert_eq!(Some(got), holder);
        assert_eq!(pool.state().waits, waits + 1);
    }
}
