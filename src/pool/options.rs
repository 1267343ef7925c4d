//! The pool's settings: [`PoolOptions`].

use std::time::Duration;

use crate::error::{Error, Result};

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
    pub(super) max_size: u32,
    pub(super) min_idle: Option<u32>,
    pub(super) connection_timeout: Duration,
    pub(super) statement_timeout: Option<Duration>,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_lifetime: Option<Duration>,
    pub(super) wait_for_server: Option<Duration>,
    pub(super) call_timeout: Option<Duration>,
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
    /// seconds first (see [`Pool`](crate::Pool)); the timeout counts from then.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a connection lives at most (default 30 min).
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// How long [`Pool::new`](crate::Pool::new) keeps trying to make its first connection
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
    /// [`ConnectOptions::connect_timeout`](crate::ConnectOptions::connect_timeout)).
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

    pub(super) fn validate(&self) -> Result<()> {
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
