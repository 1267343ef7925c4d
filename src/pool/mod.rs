//! The connection pool: r2d2 over `postgres::Client`, one TLS connector per
//! pool, prepared statements cached per connection (or, through a
//! transaction-mode pooler, sent unnamed with their parameter types), and
//! fault detection that re-checks idle connections only after a connection
//! was seen to break.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use postgres::types::Type;
use postgres::Client;
use r2d2::ManageConnection;
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::config::{
    classify_connect, within_timeout, Abandoned, ConnectOptions, Dialer, PoolerMode,
};
use crate::error::{server, ConnectFailure, Error, Result};

mod affinity;
mod opener;
mod options;
mod statement;
#[cfg(all(test, feature = "testing"))]
mod tests;
mod watchdog;
use affinity::{Parking, PARK_LIMIT};
pub(crate) use opener::Manager;
use opener::{open_first, Opened, Opener};
pub use options::PoolOptions;
#[cfg(test)]
pub(crate) use statement::param_types;
use statement::StatementCache;
pub(crate) use statement::{Prepared, Sql};
use watchdog::{Watch, Watchdog};

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
    abandoned_connects: Abandoned,
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
            abandoned_connects: Abandoned::new(options.max_size as usize),
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
