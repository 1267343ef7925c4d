//! Opening the listener's connections: the listening one (refusing a
//! transaction-mode pooler, within the connect timeout) and short-lived
//! ones.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use postgres::{Client, SimpleQueryMessage};

use crate::change::TableFilter;
use crate::config::{
    classify_connect, listen_through_transaction_pooler, within_timeout, Abandoned, ConnectOptions,
    Dialer,
};
use crate::error::{ConnectFailure, Error, Result};

/// Opens the listener's connection.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) dialer: Dialer,
    /// Where it connects (`host:port`), for messages.
    pub(super) target: String,
    /// The `LISTEN` statement.
    pub(super) listen: String,
    pub(super) table: Arc<TableFilter>,
    /// Connects given up on at the timeout that have not ended yet.
    pub(super) abandoned: Arc<Abandoned>,
}

impl Connector {
    /// A connector like this one, for the server `options` name (a Citus
    /// node): the same channel, table and timeouts.
    pub(super) fn for_node(&self, options: &ConnectOptions) -> Result<Connector> {
        let mut dialer = options.dialer()?;
        if let Some(&timeout) = self.dialer.config.get_connect_timeout() {
            dialer.config.connect_timeout(timeout);
        }
        Ok(Connector {
            dialer,
            target: options.target(),
            listen: self.listen.clone(),
            table: Arc::clone(&self.table),
            abandoned: Arc::clone(&self.abandoned),
        })
    }

    /// A connection error as [`Error::Connect`].
    fn connect_error(&self, e: postgres::Error) -> Error {
        self.failed(classify_connect(&e), Some(e))
    }

    /// [`Error::Connect`] for this connector's target and user.
    fn failed(&self, failure: ConnectFailure, source: Option<postgres::Error>) -> Error {
        Error::Connect {
            failure,
            target: self.target.clone(),
            user: self
                .dialer
                .config
                .get_user()
                .unwrap_or("postgres")
                .to_owned(),
            source,
        }
    }

    /// Opens a connection, with `timeout` as its connect timeout when given.
    pub(super) fn dial(&self, timeout: Option<Duration>) -> Result<Client> {
        let mut dialer = self.dialer.clone();
        if let Some(timeout) = timeout {
            dialer.config.connect_timeout(timeout);
        }
        dialer.connect().map_err(|e| self.connect_error(e))
    }

    /// Connects, runs `check` on the new connection, then `LISTEN`s.
    pub(super) fn connect(
        &self,
        timeout: Option<Duration>,
        check: impl FnOnce(&mut Client) -> Result<()>,
    ) -> Result<Client> {
        let mut client = self.dial(timeout)?;
        check(&mut client)?;
        self.table
            .resolve(&mut client)
            .map_err(|e| self.connect_error(e))?;
        client
            .batch_execute(&self.listen)
            .map_err(|e| self.connect_error(e))?;
        Ok(client)
    }

    /// Whether `client`'s transactions run on different server processes,
    /// as through a transaction-mode pooler that was not declared: its
    /// server process then serves a second connection opened now, or its own
    /// next transaction runs on another process. Never true for a direct or
    /// session-pooled connection, whose server process is its own for life,
    /// so a `true` is proof. A pooler that happens to keep `client` on one
    /// server process for these three statements goes unnoticed, and when the
    /// check cannot be made (no second connection within two seconds) the
    /// answer is `false`.
    fn transaction_pooled(&self, client: &mut Client) -> bool {
        fn pid(client: &mut Client) -> Option<String> {
            let messages = client.simple_query("SELECT pg_backend_pid()").ok()?;
            messages.into_iter().find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
        }
        let Some(first) = pid(client) else {
            return false;
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let connector = self.clone();
        let spawned = thread::Builder::new()
            .name("trebuchet-listener-check".into())
            .spawn(move || {
                let other = connector
                    .dialer
                    .connect()
                    .ok()
                    .and_then(|mut other| pid(&mut other));
                let _ = tx.send(other);
            });
        let other = match spawned {
            Ok(_) => rx.recv_timeout(Duration::from_secs(2)).ok().flatten(),
            Err(_) => None,
        };
        let again = pid(client);
        other.as_ref() == Some(&first) || again.is_some_and(|again| again != first)
    }

    /// Connects and listens, refusing a transaction-mode pooler. The check
    /// comes before LISTEN, which stays the session's last statement
    /// (monitoring finds listeners by it).
    fn connect_refusing_transaction_poolers(&self) -> Result<Client> {
        self.connect(None, |client| {
            if self.transaction_pooled(client) {
                Err(listen_through_transaction_pooler())
            } else {
                Ok(())
            }
        })
    }

    /// Connects and listens within the configured connect timeout, which
    /// the driver applies to the TCP handshake alone: a server or path that
    /// accepts the connection and then never answers would otherwise hold
    /// `build()` for as long as it stays silent. The attempt runs on a
    /// helper thread, which ends by itself (dropping its connection) when
    /// the peer answers or the socket dies.
    pub(super) fn connect_within_timeout(&self) -> Result<Client> {
        self.within_connect_timeout(Connector::connect_refusing_transaction_poolers)
    }

    /// Runs `work` (which connects) within the configured connect timeout,
    /// on a helper thread when there is one, as
    /// [`connect_within_timeout`](Self::connect_within_timeout) does.
    pub(super) fn within_connect_timeout<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connector) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let Some(&limit) = self.dialer.config.get_connect_timeout() else {
            return work(self);
        };
        let timed_out = || self.failed(ConnectFailure::Timeout, None);
        let conn = self.clone();
        within_timeout(
            limit,
            &self.abandoned,
            "trebuchet-listener-connect",
            timed_out,
            move || work(&conn),
        )
    }
}
