//! [`ChangeListenerBuilder`]: the options of a listener, checked, and the
//! start of its connection and thread.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::connector::Connector;
use super::nodes::{self, Supervisor};
use super::query::CatchUpQuery;
use super::sink::Registry;
use super::worker::{EndSubscriptions, MalformedLog, Worker};
use super::{ChangeListener, Handle, Shared, Stats};
use crate::change::{Event, ResyncReason, TableFilter};
use crate::config::{
    listen_through_transaction_pooler, validate_identifier, Abandoned, ConnectOptions, PoolerMode,
    DEFAULT_CHANNEL,
};
use crate::error::{Error, Result};
use crate::ident::quote_identifier;

/// Configures a [`ChangeListener`]. Obtain one with
/// [`ChangeListener::builder`] or
/// [`StateStore::listener_builder`](crate::StateStore::listener_builder).
///
/// Defaults: connection from the environment unless given; channel
/// `actor_state_changes`; queues of 1,024 events per subscriber;
/// reconnection back-off from 100 ms doubling to 5 s; TCP keepalives idle
/// 5 s, interval 2 s, 3 probes (a dead peer is noticed in about 11 s); a
/// heartbeat after 5 s without notifications, answered within 5 s (a
/// connection that stops answering is noticed within 10 s).
#[must_use = "a builder does nothing until build() is called"]
pub struct ChangeListenerBuilder {
    connect: Option<Result<ConnectOptions>>,
    channel: String,
    table: Option<String>,
    catch_up: Option<CatchUpQuery>,
    capacity: usize,
    initial_backoff: Duration,
    max_backoff: Duration,
    keepalives: (Duration, Duration, u32),
    heartbeat: (Duration, Duration),
}

impl fmt::Debug for ChangeListenerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeListenerBuilder")
            .field("connect", &self.connect)
            .field("channel", &self.channel)
            .field("table", &self.table)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl ChangeListenerBuilder {
    /// Every default, as documented on the type.
    pub(super) fn new() -> ChangeListenerBuilder {
        ChangeListenerBuilder {
            connect: None,
            channel: DEFAULT_CHANNEL.to_owned(),
            table: None,
            catch_up: None,
            capacity: 1024,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            keepalives: (Duration::from_secs(5), Duration::from_secs(2), 3),
            heartbeat: (Duration::from_secs(5), Duration::from_secs(5)),
        }
    }

    /// Connects with a connection string. A listener needs a session-level
    /// connection: point it at the server itself, or at PgBouncer in session
    /// mode, never at PgBouncer in transaction mode (LISTEN breaks there):
    /// [`build`](Self::build) refuses options that declare one
    /// ([`PoolerMode::Transaction`]) and one
    /// it finds out about.
    pub fn url(mut self, url: &str) -> Self {
        self.connect = Some(url.parse());
        self
    }

    /// Connects with explicit options.
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.connect = Some(Ok(options));
        self
    }

    /// The channel to listen on (default `actor_state_changes`).
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// Delivers only the changes of this table (`name` or `schema.name`),
    /// for a channel that several tables share. By default a listener
    /// delivers every change announced on its channel, whichever table made
    /// it; [`Change::table`](crate::Change::table) tells them apart. A store's listener
    /// ([`StateStore::listener`](crate::StateStore::listener)) is set to the
    /// store's table.
    ///
    /// Payloads name their table from the library's schema version 4 on
    /// (`StateStore::migrate`). A payload without a `table` key (the
    /// seed's trigger, a table not migrated yet, a hand-written `NOTIFY`)
    /// cannot be told apart and is delivered. A name without its schema is
    /// looked up on every new connection, through its search path, where
    /// the table is (or the first schema of the path, before it exists).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// The queue capacity of each subscription, in events (default 1,024).
    /// A subscriber whose queue is full loses events and receives
    /// `Event::Resync(ResyncReason::Lagged)` once it has room again.
    ///
    /// Changes that arrive together reach a subscriber in batches of at
    /// most a quarter of the capacity (and at most 256); a batch that finds
    /// less room delivers its first events and drops the rest.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// The reconnection back-off: the first pause and the cap.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// TCP keepalives of the listener's connection: idle time, probe
    /// interval, probe count.
    pub fn keepalives(mut self, idle: Duration, interval: Duration, retries: u32) -> Self {
        self.keepalives = (idle, interval, retries);
        self
    }

    /// The heartbeat: after `interval` without a notification the listener
    /// sends a round trip (`LISTEN` again, which changes nothing), and when
    /// no answer comes within `timeout` it treats the connection as lost,
    /// reconnects and sends `Event::Resync`.
    ///
    /// TCP keepalives notice a peer that is gone, but not one whose kernel
    /// still acknowledges while nothing answers: a frozen server, a hung
    /// proxy or pooler, a network path that stalls. The heartbeat notices
    /// those within `interval + timeout` (default 5 s + 5 s).
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.heartbeat = (interval, timeout);
        self
    }

    /// The store's catch-up query, which lets subscriptions filtered to
    /// known actors catch up exactly after a reconnect and gives announces
    /// the actor's number. (Named for its caller,
    /// [`StateStore::listener_builder`](crate::StateStore::listener_builder).)
    pub(crate) fn catch_up_sql(mut self, query: CatchUpQuery) -> Self {
        self.catch_up = Some(query);
        self
    }

    /// Validates the channel, connects, runs `LISTEN` and starts the thread.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIdentifier`], [`Error::InvalidConnectionString`] and
    /// [`Error::InvalidConfig`] before connecting; [`Error::Connect`] when
    /// the first connection fails; [`Error::InvalidConfig`] when the
    /// options declare a transaction-mode pooler, or when the connection
    /// turns out to go through one (its transactions run on different server
    /// processes), where notifications would be lost.
    pub fn build(self) -> Result<ChangeListener> {
        validate_identifier("channel", &self.channel)?;
        let table = match self.table.as_deref() {
            None => None,
            Some(table) => Some(match table.split_once('.') {
                Some((schema, name)) => {
                    validate_identifier("schema", schema)?;
                    validate_identifier("table", name)?;
                    (Some(schema.to_owned()), name.to_owned())
                }
                None => {
                    validate_identifier("table", table)?;
                    (None, table.to_owned())
                }
            }),
        };
        if self.capacity == 0 {
            return Err(Error::invalid_config("queue_capacity must be at least 1"));
        }
        if self.initial_backoff.is_zero() || self.max_backoff < self.initial_backoff {
            return Err(Error::invalid_config(
                "reconnect back-off must be positive, and its cap at least the first pause",
            ));
        }
        if self.heartbeat.0.is_zero() || self.heartbeat.1.is_zero() {
            return Err(Error::invalid_config(
                "the heartbeat's interval and timeout must be positive",
            ));
        }
        let mut options = match self.connect {
            Some(connect) => connect?,
            None => ConnectOptions::from_env()?,
        };
        if options.get_pooler() == PoolerMode::Transaction {
            return Err(listen_through_transaction_pooler());
        }
        let (idle, interval, retries) = self.keepalives;
        options.keepalives(idle, interval, retries);
        let target = options.target();
        let conn = Connector {
            dialer: options.dialer()?,
            target: target.clone(),
            listen: format!("LISTEN {}", quote_identifier(&self.channel)),
            table: Arc::new(TableFilter::new(table)),
            // The listener connects once at a time: a few connects left
            // hanging on a silent server are enough.
            abandoned: Arc::new(Abandoned::new(4)),
        };
        let mut client = conn.connect_within_timeout()?;
        // On a Citus coordinator, changes are raised on the nodes that hold
        // the shards: listen there too. LISTEN again after asking, so that
        // it stays the session's last statement (monitoring finds
        // listeners by it).
        let topology = nodes::read(&mut client)
            .and_then(|topology| client.batch_execute(&conn.listen).map(|()| topology))
            .map_err(Error::Database)?
            .filter(nodes::Topology::has_nodes);
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            stats: Stats::default(),
            connected: AtomicBool::new(true),
            last_error: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            capacity: self.capacity,
            lagged: Arc::new([Event::Resync(ResyncReason::Lagged)]),
            reconnected: Arc::new([Event::Resync(ResyncReason::Reconnected)]),
            newest: topology.as_ref().map(|_| Mutex::default()),
        });
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(0);
        let worker = Worker {
            shared: Arc::clone(&shared),
            conn: conn.clone(),
            catch_up: self.catch_up.clone(),
            wake: wake_rx.clone(),
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            malformed_log: MalformedLog::default(),
            heartbeat_interval: self.heartbeat.0,
            heartbeat_timeout: self.heartbeat.1,
        };
        let end = EndSubscriptions(Arc::clone(&shared));
        let thread = match topology {
            None => thread::Builder::new()
                .name(format!("trebuchet-listener-{}", self.channel))
                .spawn(move || {
                    let _end = end;
                    worker.run(Some(client));
                }),
            Some(topology) => {
                let interval = self.heartbeat.0;
                let supervisor = Supervisor::start(worker, options, topology)?;
                thread::Builder::new()
                    .name(format!("trebuchet-listener-{}", self.channel))
                    .spawn(move || {
                        let _end = end;
                        supervisor.run(client, wake_rx, interval);
                    })
            }
        }
        .map_err(Error::thread_start("the listener thread"))?;
        Ok(ChangeListener {
            handle: Arc::new(Handle {
                shared,
                wake: Mutex::new(Some(wake_tx)),
                thread: Mutex::new(Some(thread)),
                channel: self.channel,
                target,
                conn,
                catch_up: self.catch_up,
            }),
        })
    }
}
