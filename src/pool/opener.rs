//! How the pool opens connections: the connect path with its timeout, the
//! first connection a pool hands out, and the r2d2 manager.

use super::*;

/// A new connection, before the pool wraps it.
pub(super) struct Opened {
    pub(super) client: Client,
    pub(super) backend: Option<Backend>,
    pub(super) watch: Option<Watch>,
}

pub(crate) struct Manager {
    pub(super) opener: Arc<Opener>,
}

/// How connections are made: shared by the r2d2 manager and the pool
/// handle, which opens connections of its own outside the pool.
pub(super) struct Opener {
    pub(super) dialer: Dialer,
    pub(super) statement_timeout: Option<Duration>,
    pub(super) pooler: PoolerMode,
    /// The driver's connect timeout, which bounds all of [`Opener::open`].
    pub(super) connect_timeout: Option<Duration>,
    /// The server's ports, to find a new connection's socket.
    pub(super) ports: Arc<[u16]>,
    pub(super) shared: Arc<Shared>,
}

impl Opener {
    /// Opens a connection within the connect timeout. The driver's own
    /// timeout covers only the TCP handshake: a server or path that accepts
    /// the connection and then stops answering would hold the caller (the
    /// pool's thread, or `Pool::new`) for as long as it stays silent. So the
    /// connect runs on a helper thread, given up on at the timeout; it ends
    /// by itself when the peer answers or the socket dies, and drops its
    /// connection. At most the pool's size of such connects are left
    /// running (see `config::within_timeout`).
    pub(super) fn open(self: &Arc<Self>) -> Result<Opened> {
        let Some(limit) = self.connect_timeout else {
            return self.open_here();
        };
        let timed_out = || Error::Connect {
            failure: ConnectFailure::Timeout,
            target: self.shared.target.clone(),
            user: self.shared.user.clone(),
            source: None,
        };
        let opener = Arc::clone(self);
        within_timeout(
            limit,
            &self.shared.abandoned_connects,
            "trebuchet-connect",
            timed_out,
            move || opener.open_here(),
        )
    }

    /// Connects, applies the session settings and learns which server
    /// process serves the connection, in one round trip after the handshake.
    /// Through a transaction-mode pooler there is no session to set up, and
    /// behind any pooler the server process is not the connection's own.
    pub(super) fn open_here(&self) -> Result<Opened> {
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

    pub(super) fn wrap(&self, opened: Opened) -> Connection {
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
pub(super) fn open_first(opener: &Arc<Opener>, wait: Option<Duration>) -> Result<Opened> {
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

pub(super) fn connect_error(e: postgres::Error, shared: &Shared) -> Error {
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
