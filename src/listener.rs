//! The change feed: one connection and one thread per listener, `LISTEN`
//! on the channel, fan-out to bounded per-subscriber queues, reconnection
//! with back-off, and an explicit `Resync` after every gap.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError};
use fallible_iterator::FallibleIterator;
use postgres::{Client, SimpleQueryMessage};

use crate::change::{
    check_actor_id, is_probe, Change, ChangeKind, Event, MalformedPayload, ResyncReason,
    TableFilter,
};
use crate::config::{
    classify_connect, listen_through_transaction_pooler, validate_identifier, ConnectOptions,
    Dialer, PoolerMode, DEFAULT_CHANNEL,
};
use crate::error::{ConnectFailure, Error, Result};
use crate::ident::quote_identifier;

/// How long the listener thread waits for a notification before it looks at
/// its other duties (shutdown, owed resyncs). Bounds shutdown latency.
const TICK: Duration = Duration::from_millis(100);

/// Connect timeout of reconnection attempts, so that shutdown never waits
/// on a slow connect for long.
const RECONNECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

/// Filtered subscriptions with at most this many actors in all get exact
/// catch-up after a reconnect; beyond it they get a `Resync`.
const MAX_CATCH_UP_IDS: usize = 10_000;

/// The most notifications the listener takes in before it fans them out.
/// It takes only what the driver has already received, so a lone change goes
/// out at once, while a flood reaches each subscriber as one message per
/// batch rather than one per change: a channel operation (and possibly a
/// thread wake-up) per subscriber per change is what capped fan-out. A batch
/// is also at most a quarter of a queue's capacity, so that a subscriber
/// that keeps up is never handed more at once than its queue holds.
const MAX_BATCH: usize = 256;

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
    catch_up_sql: Option<String>,
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
    /// Connects with a connection string. A listener needs a session-level
    /// connection: point it at the server itself, or at PgBouncer in session
    /// mode, never at PgBouncer in transaction mode (LISTEN breaks there):
    /// [`build`](Self::build) refuses options that declare one
    /// ([`PoolerMode::Transaction`](crate::PoolerMode::Transaction)) and one
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
    /// it; [`Change::table`] tells them apart. A store's listener
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

    pub(crate) fn catch_up_sql(mut self, sql: String) -> Self {
        self.catch_up_sql = Some(sql);
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
        };
        let client = conn.connect_within_timeout()?;
        let catch_up_sql: Option<Arc<str>> = self.catch_up_sql.map(Into::into);
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            stats: Stats::default(),
            connected: AtomicBool::new(true),
            last_error: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            capacity: self.capacity,
            lagged: Arc::new([Event::Resync(ResyncReason::Lagged)]),
            reconnected: Arc::new([Event::Resync(ResyncReason::Reconnected)]),
        });
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let worker = Worker {
            shared: Arc::clone(&shared),
            conn: conn.clone(),
            catch_up_sql: catch_up_sql.clone(),
            wake: wake_rx,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            malformed_log: MalformedLog::default(),
            heartbeat_interval: self.heartbeat.0,
            heartbeat_timeout: self.heartbeat.1,
        };
        let thread = thread::Builder::new()
            .name(format!("trebuchet-listener-{}", self.channel))
            .spawn(move || worker.run(client))
            .map_err(Error::thread_start("the listener thread"))?;
        Ok(ChangeListener {
            handle: Arc::new(Handle {
                shared,
                wake: wake_tx,
                thread: Mutex::new(Some(thread)),
                channel: self.channel,
                target,
                conn,
                catch_up_sql,
            }),
        })
    }
}

/// Counters of a listener, all since it started.
#[derive(Debug, Default)]
struct Stats {
    received: AtomicU64,
    malformed: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
}

/// A listener's health, from [`ChangeListener::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerHealth {
    /// Whether the listener's connection is up and listening.
    pub connected: bool,
    /// How many times it has reconnected.
    pub reconnects: u64,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// Notifications received on the channel.
    pub received: u64,
    /// Events dropped because a subscriber's queue was full (counted once per
    /// subscriber).
    pub dropped: u64,
    /// Payloads that could not be parsed (logged and skipped).
    pub malformed: u64,
    /// Live subscriptions.
    pub subscribers: usize,
}

/// One subscriber's end at the listener.
struct Sink {
    /// Unbounded underneath, so that an idle subscription costs no queue
    /// memory; `capacity` bounds the events in it (counted in `queued`),
    /// and only the listener thread sends.
    tx: Sender<EventBatch>,
    /// Events sent and not yet handed out, shared with the subscription.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    filter: Option<HashSet<String>>,
    /// A resync owed to this subscriber, delivered before anything else.
    owed: Option<ResyncReason>,
    /// The last sequence number delivered per actor (filtered subscribers
    /// only: bounded by the filter), so catch-up never repeats or reverses.
    last: HashMap<String, u64>,
}

impl Sink {
    fn wants(&self, actor_id: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f.contains(actor_id))
    }

    /// Whether a filtered subscriber takes `change`: one of its actors, newer
    /// than what it was given of that actor, or an announce (not a version).
    /// Records a version as given.
    fn takes(&mut self, change: &Change) -> bool {
        if !self.wants(&change.actor_id) {
            return false;
        }
        if change.kind == ChangeKind::Announced {
            return true;
        }
        if self
            .last
            .get(&change.actor_id)
            .is_some_and(|&seen| seen >= change.sequence)
        {
            return false;
        }
        self.last.insert(change.actor_id.clone(), change.sequence);
        true
    }

    /// The events of `batch` this subscriber takes: every one for an
    /// unfiltered subscriber (the batch itself, shared), or those
    /// [`takes`](Self::takes) picks, which may be none.
    fn pick(&mut self, batch: &Arc<[Event]>) -> Option<Arc<[Event]>> {
        if self.filter.is_none() {
            return Some(Arc::clone(batch));
        }
        let mine: Vec<Event> = batch
            .iter()
            .filter(|event| match event {
                Event::Change(change) => self.takes(change),
                Event::Resync(_) => true,
            })
            .cloned()
            .collect();
        (!mine.is_empty()).then(|| mine.into())
    }

    /// Delivers `events` in order, never blocking: after any resync it is
    /// owed, as many as its queue has room for; the rest are dropped and a
    /// resync is owed. Returns false when the subscriber is gone.
    fn offer(&mut self, events: Arc<[Event]>, shared: &Shared) -> bool {
        if !self.settle(shared) {
            return false;
        }
        let len = events.len();
        let fits = if self.owed.is_some() {
            0
        } else {
            len.min(self.room())
        };
        if fits > 0 && !self.send(events, fits) {
            return false;
        }
        if fits < len {
            shared
                .stats
                .dropped
                .fetch_add((len - fits) as u64, Ordering::Relaxed);
            self.owe(ResyncReason::Lagged);
        }
        true
    }

    /// Tries to deliver an owed resync. Returns false when the subscriber is
    /// gone.
    fn settle(&mut self, shared: &Shared) -> bool {
        let Some(reason) = self.owed else {
            return true;
        };
        if self.room() == 0 {
            return true;
        }
        if !self.send(shared.resync(reason), 1) {
            return false;
        }
        self.owed = None;
        true
    }

    /// How many more events the queue holds.
    fn room(&self) -> usize {
        self.capacity
            .saturating_sub(self.queued.load(Ordering::Acquire))
    }

    /// Sends the first `len` of `events`, counted as queued until the
    /// subscriber has taken them. Returns false when the subscriber is gone.
    fn send(&self, events: Arc<[Event]>, len: usize) -> bool {
        self.queued.fetch_add(len, Ordering::AcqRel);
        let batch = EventBatch {
            events,
            next: 0,
            end: len,
            queued: Arc::clone(&self.queued),
        };
        // Unbounded: fails only when the subscription is gone (the batch,
        // dropped, takes its count back).
        self.tx.try_send(batch).is_ok()
    }

    fn owe(&mut self, reason: ResyncReason) {
        // A reconnect subsumes a lag and the other way round: one resync.
        self.owed = Some(self.owed.unwrap_or(reason));
    }
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    sinks: HashMap<u64, Sink>,
}

struct Shared {
    registry: Mutex<Registry>,
    stats: Stats,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    shutdown: AtomicBool,
    capacity: usize,
    /// One resync event of each reason, shared by every subscriber owed it.
    lagged: Arc<[Event]>,
    reconnected: Arc<[Event]>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resync(&self, reason: ResyncReason) -> Arc<[Event]> {
        Arc::clone(match reason {
            ResyncReason::Lagged => &self.lagged,
            ResyncReason::Reconnected => &self.reconnected,
        })
    }

    fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }
}

/// Opens the listener's connection.
#[derive(Clone)]
struct Connector {
    dialer: Dialer,
    target: String,
    listen: String,
    table: Arc<TableFilter>,
}

impl Connector {
    /// A connection error as [`Error::Connect`].
    fn connect_error(&self, e: postgres::Error) -> Error {
        Error::Connect {
            failure: classify_connect(&e),
            target: self.target.clone(),
            user: self
                .dialer
                .config
                .get_user()
                .unwrap_or("postgres")
                .to_owned(),
            source: Some(e),
        }
    }

    /// Opens a connection, with `timeout` as its connect timeout when given.
    fn dial(&self, timeout: Option<Duration>) -> Result<Client> {
        let mut dialer = self.dialer.clone();
        if let Some(timeout) = timeout {
            dialer.config.connect_timeout(timeout);
        }
        dialer.connect().map_err(|e| self.connect_error(e))
    }

    /// Connects, runs `check` on the new connection, then `LISTEN`s.
    fn connect(
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
    fn connect_within_timeout(&self) -> Result<Client> {
        self.within_connect_timeout(Connector::connect_refusing_transaction_poolers)
    }

    /// Runs `work` (which connects) within the configured connect timeout,
    /// on a helper thread when there is one, as
    /// [`connect_within_timeout`](Self::connect_within_timeout) does.
    fn within_connect_timeout<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connector) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let Some(&limit) = self.dialer.config.get_connect_timeout() else {
            return work(self);
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let conn = self.clone();
        thread::Builder::new()
            .name("trebuchet-listener-connect".into())
            .spawn(move || {
                let _ = tx.send(work(&conn));
            })
            .map_err(Error::thread_start("the listener's connect thread"))?;
        rx.recv_timeout(limit).unwrap_or_else(|_| {
            Err(Error::Connect {
                failure: ConnectFailure::Timeout,
                target: self.target.clone(),
                user: self
                    .dialer
                    .config
                    .get_user()
                    .unwrap_or("postgres")
                    .to_owned(),
                source: None,
            })
        })
    }
}

/// The listener thread.
struct Worker {
    shared: Arc<Shared>,
    conn: Connector,
    catch_up_sql: Option<Arc<str>>,
    wake: Receiver<()>,
    initial_backoff: Duration,
    max_backoff: Duration,
    malformed_log: MalformedLog,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
}

/// At most one log line per this interval about malformed payloads: any
/// client that can connect may send them, as fast as it likes.
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs malformed payloads without letting a flood of them flood the log:
/// the first at once, then one line per [`MALFORMED_LOG_INTERVAL`] with the
/// count of those not logged. (All of them are counted in the health.)
#[derive(Default)]
struct MalformedLog {
    last: Cell<Option<Instant>>,
    unlogged: Cell<u64>,
}

impl MalformedLog {
    fn note(&self, channel: &str, error: &MalformedPayload) {
        let now = Instant::now();
        if self
            .last
            .get()
            .is_some_and(|at| now.duration_since(at) < MALFORMED_LOG_INTERVAL)
        {
            self.unlogged.set(self.unlogged.get() + 1);
            return;
        }
        match self.unlogged.replace(0) {
            0 => log::warn!("channel {channel:?}: {error}"),
            n => log::warn!(
                "channel {channel:?}: {error} ({n} more malformed payloads skipped since the last message)"
            ),
        }
        self.last.set(Some(now));
    }
}

/// Why [`Worker::listen`] returned.
enum Listened {
    /// The connection failed, or the listener is shutting down.
    Ended,
    /// Nothing arrived for a heartbeat interval.
    Quiet,
}

impl Worker {
    fn run(self, mut client: Client) {
        // However the thread ends, even by a panic, subscribers must not
        // wait forever: dropping the senders ends their iteration.
        struct EndSubscriptions(Arc<Shared>);
        impl Drop for EndSubscriptions {
            fn drop(&mut self) {
                self.0.connected.store(false, Ordering::Release);
                self.0.registry().sinks.clear();
            }
        }
        let _end = EndSubscriptions(Arc::clone(&self.shared));
        loop {
            match self.listen(&mut client) {
                Listened::Quiet => {
                    if let Some(alive) = self.heartbeat(client) {
                        client = alive;
                        continue;
                    }
                }
                Listened::Ended => drop(client),
            }
            if self.stopping() {
                break;
            }
            match self.reconnect() {
                Some(c) => client = c,
                None => break,
            }
        }
    }

    fn stopping(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire)
    }

    /// Receives and fans out until the connection fails, shutdown, or a
    /// heartbeat interval passes without a notification.
    fn listen(&self, client: &mut Client) -> Listened {
        // Whether some subscriber is owed a resync it had no room for.
        let mut owed = false;
        let mut heard = Instant::now();
        let limit = (self.shared.capacity / 4).clamp(1, MAX_BATCH);
        let mut batch = Vec::with_capacity(limit);
        while !self.stopping() {
            if heard.elapsed() >= self.heartbeat_interval {
                return Listened::Quiet;
            }
            // A fresh iterator per wait: a TimeoutIter yields None forever
            // after its first timeout.
            let first = client.notifications().timeout_iter(TICK).next();
            match first {
                Ok(Some(n)) => {
                    heard = Instant::now();
                    self.receive(&n, &mut batch);
                    // Then, in batches, whatever the driver holds already
                    // and whatever the socket has, without waiting, but
                    // never past a shutdown: under a flood the buffer never
                    // runs dry. A lone change goes out without a read.
                    let mut notifications = client.notifications();
                    loop {
                        while batch.len() < limit && !notifications.is_empty() && !self.stopping() {
                            // Buffered: taken without reading the socket.
                            match notifications.iter().next() {
                                Ok(Some(n)) => self.receive(&n, &mut batch),
                                _ => break,
                            }
                        }
                        if self.stopping() {
                            return Listened::Ended;
                        }
                        if !batch.is_empty() {
                            owed = self.fan_out(batch.drain(..).collect());
                        }
                        match notifications.iter().next() {
                            Ok(Some(n)) => self.receive(&n, &mut batch),
                            Ok(None) => break,
                            Err(e) => {
                                self.lost(e);
                                return Listened::Ended;
                            }
                        }
                    }
                }
                Ok(None) if client.is_closed() => {
                    self.lost_closed();
                    return Listened::Ended;
                }
                Ok(None) => {
                    if owed {
                        owed = self.settle_all();
                    }
                }
                Err(e) => {
                    self.lost(e);
                    return Listened::Ended;
                }
            }
        }
        Listened::Ended
    }

    /// Checks that the server still answers: `LISTEN` again (a no-op that
    /// keeps `LISTEN` as the session's last statement, which is how
    /// monitoring finds listeners), on a helper thread so that a connection
    /// that never answers cannot hold this thread (and `shutdown()`) beyond
    /// the heartbeat timeout. Returns the client when it answered in time;
    /// otherwise the connection counts as lost and, when it never answered,
    /// the helper drops it once it does or once the socket dies.
    fn heartbeat(&self, mut client: Client) -> Option<Client> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let listen = self.conn.listen.clone();
        let spawned = thread::Builder::new()
            .name("trebuchet-listener-heartbeat".into())
            .spawn(move || {
                let answer = client.batch_execute(&listen);
                let _ = tx.send((client, answer));
            });
        if let Err(e) = spawned {
            // The client went with the closure: reconnect.
            log::warn!("cannot start the listener's heartbeat thread: {e}");
            self.shared.connected.store(false, Ordering::Release);
            self.shared
                .set_error(format!("cannot start the heartbeat thread: {e}"));
            return None;
        }
        crossbeam_channel::select! {
            recv(rx) -> answer => match answer {
                Ok((client, Ok(()))) => Some(client),
                Ok((_, Err(e))) => {
                    self.lost(e);
                    None
                }
                Err(_) => {
                    self.lost_closed();
                    None
                }
            },
            recv(self.wake) -> _ => None,
            default(self.heartbeat_timeout) => {
                log::warn!(
                    "listener connection to {} did not answer a heartbeat within {:?}; reconnecting",
                    self.conn.target,
                    self.heartbeat_timeout
                );
                self.shared.connected.store(false, Ordering::Release);
                self.shared.set_error(format!(
                    "the server did not answer a heartbeat within {:?}",
                    self.heartbeat_timeout
                ));
                None
            },
        }
    }

    /// Parses one notification into `batch`. Skips a round-trip probe, a
    /// change of another table, and a malformed payload (counted and
    /// logged).
    fn receive(&self, n: &postgres::Notification, batch: &mut Vec<Event>) {
        self.shared.stats.received.fetch_add(1, Ordering::Relaxed);
        if is_probe(n.payload()) {
            // A round-trip check by `notify_round_trip`, not a change.
            return;
        }
        match Change::from_payload(n.payload()) {
            // Another table's change on a shared channel.
            Ok(change) if !self.conn.table.admits(&change) => {}
            Ok(change) => batch.push(Event::Change(Arc::new(change))),
            Err(e) => {
                self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                self.malformed_log.note(n.channel(), &e);
            }
        }
    }

    fn lost(&self, e: postgres::Error) {
        log::warn!("listener connection to {} lost: {e}", self.conn.target);
        self.shared.connected.store(false, Ordering::Release);
        let detail = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_owned());
        self.shared.set_error(detail);
    }

    fn lost_closed(&self) {
        log::warn!("listener connection to {} closed", self.conn.target);
        self.shared.connected.store(false, Ordering::Release);
        self.shared.set_error("connection closed".into());
    }

    /// Delivers a batch of changes, in order, to every interested
    /// subscriber: one message per subscriber, holding the batch itself
    /// (shared) or, for a filtered subscriber, the changes it takes. Removes
    /// the subscribers that are gone. Returns whether some subscriber is
    /// still owed a resync.
    fn fan_out(&self, batch: Arc<[Event]>) -> bool {
        let shared = &*self.shared;
        let mut registry = shared.registry();
        let mut owed = false;
        registry.sinks.retain(|_, sink| {
            let alive = match sink.pick(&batch) {
                Some(events) => sink.offer(events, shared),
                None => sink.settle(shared),
            };
            owed |= sink.owed.is_some();
            alive
        });
        owed
    }

    fn settle_all(&self) -> bool {
        let shared = &*self.shared;
        let mut registry = shared.registry();
        let mut owed = false;
        registry.sinks.retain(|_, sink| {
            let alive = sink.settle(shared);
            owed |= sink.owed.is_some();
            alive
        });
        owed
    }

    /// Reconnects with capped, jittered exponential back-off until it
    /// succeeds or the listener shuts down; then catches subscribers up.
    ///
    /// Each attempt (connect, `LISTEN`, catch-up query) runs on a helper
    /// thread while this one waits for it or for shutdown: the driver's
    /// connect timeout covers only the TCP handshake, so a server that
    /// accepts the connection and never answers would otherwise hold this
    /// thread, and `shutdown()` joining it, for as long as it stays silent.
    /// An attempt abandoned at shutdown ends on its own when the server
    /// answers or goes away; its connection is then dropped.
    fn reconnect(&self) -> Option<Client> {
        let mut pause = self.initial_backoff;
        loop {
            let jittered = pause.mul_f64(0.5 + fastrand::f64() / 2.0);
            match self.wake.recv_timeout(jittered) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.stopping() {
                return None;
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            let conn = self.conn.clone();
            let sql = self.catch_up_sql.clone();
            let shared = Arc::clone(&self.shared);
            let spawned = thread::Builder::new()
                .name("trebuchet-listener-connect".into())
                .spawn(move || {
                    let attempt = conn
                        .connect(Some(RECONNECT_CONNECT_TIMEOUT), |_| Ok(()))
                        .map(|mut client| {
                            // After LISTEN, so that nothing falls between the two.
                            let ids = catch_up_ids(&shared);
                            let current = catch_up_query(
                                &mut client,
                                sql.as_deref(),
                                &ids,
                                conn.table.table(),
                            );
                            if sql.is_some() && !ids.is_empty() {
                                // Leaves LISTEN as the session's last
                                // statement, which is how monitoring
                                // (`StateStore::stats`, the seed's
                                // pg_stat_activity query) finds listeners.
                                // Listening again is a no-op otherwise.
                                let _ = client.batch_execute(&conn.listen);
                            }
                            (client, current)
                        });
                    let _ = tx.send(attempt);
                });
            let attempt = match spawned {
                Ok(_) => crossbeam_channel::select! {
                    recv(rx) -> attempt => attempt.unwrap_or_else(|_| {
                        Err(Error::invalid_config("the listener's connect thread failed"))
                    }),
                    recv(self.wake) -> _ => return None,
                },
                Err(e) => Err(Error::thread_start("the listener's connect thread")(e)),
            };
            match attempt {
                Ok((client, current)) => {
                    self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.shared.connected.store(true, Ordering::Release);
                    log::info!("listener reconnected to {}", self.conn.target);
                    self.catch_up(current);
                    return Some(client);
                }
                Err(e) => {
                    log::debug!("listener reconnect failed: {e}");
                    self.shared.set_error(e.to_string());
                    pause = (pause * 2).min(self.max_backoff);
                }
            }
        }
    }

    /// After a gap: filtered subscribers get the current versions of their
    /// actors where that is cheap (`current`); everyone else gets a `Resync`.
    fn catch_up(&self, found: Option<CatchUp>) {
        let shared = &*self.shared;
        let mut registry = shared.registry();
        registry.sinks.retain(|_, sink| {
            let moved: Option<Vec<Event>> = match (&sink.filter, &found) {
                // A subscription made while the query ran was not asked
                // about: it gets a resync.
                (Some(filter), Some(found))
                    if filter.iter().all(|id| found.queried.contains(id)) =>
                {
                    let current: Vec<Arc<Change>> = filter
                        .iter()
                        .filter_map(|id| found.current.get(id))
                        .cloned()
                        .collect();
                    Some(
                        current
                            .into_iter()
                            .filter(|change| sink.takes(change))
                            .map(Event::Change)
                            .collect(),
                    )
                }
                _ => None,
            };
            match moved {
                Some(moved) if moved.is_empty() => sink.settle(shared),
                Some(moved) => sink.offer(moved.into(), shared),
                None => {
                    sink.owe(ResyncReason::Reconnected);
                    sink.settle(shared)
                }
            }
        });
    }
}

/// The actors of all filtered subscriptions, for the catch-up query.
fn catch_up_ids(shared: &Shared) -> Vec<String> {
    let registry = shared.registry();
    let mut ids = HashSet::new();
    for sink in registry.sinks.values() {
        if let Some(filter) = &sink.filter {
            ids.extend(filter.iter().cloned());
        }
    }
    ids.into_iter().collect()
}

/// What the catch-up query found: the ids asked about, and the current
/// version (or tombstone) of those that exist or existed.
struct CatchUp {
    queried: HashSet<String>,
    current: HashMap<String, Arc<Change>>,
}

/// Reads the current versions of `ids`, or `None` when catch-up is not
/// possible and subscribers must get a `Resync` instead.
fn catch_up_query(
    client: &mut Client,
    sql: Option<&str>,
    ids: &[String],
    table: Option<String>,
) -> Option<CatchUp> {
    let sql = sql.filter(|_| (1..=MAX_CATCH_UP_IDS).contains(&ids.len()))?;
    match current_versions(client, sql, ids, table) {
        Ok(current) => Some(CatchUp {
            queried: ids.iter().cloned().collect(),
            current,
        }),
        Err(e) => {
            log::warn!("catch-up query failed, sending resync instead: {e}");
            None
        }
    }
}

/// The current version (or tombstone) of those of `ids` that exist or
/// existed, through the store's catch-up query `sql`.
fn current_versions(
    client: &mut Client,
    sql: &str,
    ids: &[String],
    table: Option<String>,
) -> std::result::Result<HashMap<String, Arc<Change>>, postgres::Error> {
    let rows = client.query(sql, &[&ids])?;
    Ok(rows
        .iter()
        .map(|row| {
            let id: String = row.get(0);
            let sequence: i64 = row.get(1);
            let deleted: bool = row.get(2);
            let seconds: f64 = row.get(3);
            let change = Change {
                actor_id: id.clone(),
                sequence: u64::try_from(sequence).unwrap_or(0),
                timestamp: SystemTime::UNIX_EPOCH
                    // An 'infinity' timestamp must not end the thread.
                    + Duration::try_from_secs_f64(seconds).unwrap_or_default(),
                kind: if deleted {
                    ChangeKind::Deleted
                } else {
                    ChangeKind::Saved
                },
                table: table.clone(),
            };
            (id, Arc::new(change))
        })
        .collect())
}

/// Sends an announce of `actor_id` on a connection of its own: reads the
/// actor's number through the catch-up query when there is one, then
/// notifies, with the server's clock as the timestamp.
fn announce(
    conn: &Connector,
    channel: &str,
    catch_up_sql: Option<&str>,
    actor_id: &str,
) -> Result<()> {
    let mut client = conn.dial(None)?;
    let sequence = match catch_up_sql {
        Some(sql) => current_versions(&mut client, sql, &[actor_id.to_owned()], None)
            .map_err(Error::Database)?
            .get(actor_id)
            .map_or(0, |c| c.sequence),
        None => 0,
    };
    let sequence = i64::try_from(sequence).map_err(|_| Error::SequenceOutOfRange(sequence))?;
    client
        .execute(
            ANNOUNCE_SQL,
            &[&channel, &actor_id, &sequence, &conn.table.table()],
        )
        .map_err(Error::Database)?;
    Ok(())
}

/// Notifies `$1` of an announce of actor `$2` at number `$3` in table `$4`
/// (a `NULL` table leaves the key out), with the seed's keys.
const ANNOUNCE_SQL: &str = "SELECT pg_notify($1::TEXT, json_strip_nulls(json_build_object( \
     'actorID', $2::TEXT, 'sequenceNumber', $3::BIGINT, \
     'timestamp', EXTRACT(EPOCH FROM clock_timestamp()), \
     'op', 'announce', 'table', $4::TEXT))::TEXT)";

struct Handle {
    shared: Arc<Shared>,
    wake: Sender<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
    channel: String,
    target: String,
    /// Opens the short-lived connections of [`ChangeListener::announce`].
    conn: Connector,
    /// The store's catch-up query, which reads an announced actor's number.
    catch_up_sql: Option<Arc<str>>,
}

impl Handle {
    fn stop(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
        // Held through the join, so a concurrent caller returns only once
        // the thread has ended too.
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = thread.take() {
            if handle.thread().id() != thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Listens for state changes on one channel and fans them out to any number
/// of subscribers (the seed's `PostgreSQLStreamAdapter`).
///
/// It owns one dedicated connection (never a pooled one) and one background
/// thread. Each [`Subscription`] has its own bounded queue; the thread never
/// blocks on a subscriber, so a slow one only hurts itself: it loses events
/// and then receives [`Event::Resync`] before anything newer.
///
/// When the connection drops, the thread reconnects with capped exponential
/// back-off and `LISTEN`s again. Changes committed in the gap were not
/// announced, so each subscriber then receives `Event::Resync` — or, for a
/// subscription filtered to known actors of a listener made from a store,
/// the current version of each of its actors that it has not seen yet.
///
/// Cheap to clone. The thread runs as long as a clone of the listener or a
/// [`Subscription`] from it exists (including the subscriptions inside
/// [`on_change`](Self::on_change) callbacks and [`StateCache`](crate::StateCache)s):
/// a subscription may outlive every clone and still receive changes, through
/// reconnects too. Dropping the last of them stops and joins the thread
/// promptly (within about a second, also while it waits for notifications or
/// a server) and closes the connection. [`shutdown`](Self::shutdown) stops it
/// at once, whatever still holds it, and ends every subscription.
///
/// ```no_run
/// use trebuchet_postgres::{Event, StateStore};
///
/// let store = StateStore::connect("postgresql://localhost/trebuchet")?;
/// let listener = store.listener()?;
/// let changes = listener.subscribe();
/// for event in changes.iter() {
///     match event {
///         Event::Change(c) => println!("{} is now at {}", c.actor_id, c.sequence),
///         Event::Resync(_) => println!("missed changes: reload everything"),
///         _ => {}
///     }
/// }
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
#[derive(Clone)]
pub struct ChangeListener {
    handle: Arc<Handle>,
}

impl fmt::Debug for ChangeListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeListener")
            .field("target", &self.handle.target)
            .field("channel", &self.handle.channel)
            .field("health", &self.health())
            .finish()
    }
}

impl ChangeListener {
    /// A builder with every default.
    pub fn builder() -> ChangeListenerBuilder {
        ChangeListenerBuilder {
            connect: None,
            channel: DEFAULT_CHANNEL.to_owned(),
            table: None,
            catch_up_sql: None,
            capacity: 1024,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            keepalives: (Duration::from_secs(5), Duration::from_secs(2), 3),
            heartbeat: (Duration::from_secs(5), Duration::from_secs(5)),
        }
    }

    /// Listens on `actor_state_changes` through a connection string.
    ///
    /// # Errors
    ///
    /// As [`ChangeListenerBuilder::build`].
    pub fn connect(url: &str) -> Result<ChangeListener> {
        ChangeListener::builder().url(url).build()
    }

    /// The channel listened on.
    pub fn channel(&self) -> &str {
        &self.handle.channel
    }

    /// Every change on the channel.
    pub fn subscribe(&self) -> Subscription {
        self.add(None)
    }

    /// Changes of one actor.
    pub fn subscribe_actor(&self, actor_id: impl Into<String>) -> Subscription {
        self.add(Some(std::iter::once(actor_id.into()).collect()))
    }

    /// Changes of a set of actors.
    pub fn subscribe_actors<I, S>(&self, actor_ids: I) -> Subscription
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.add(Some(actor_ids.into_iter().map(Into::into).collect()))
    }

    fn add(&self, filter: Option<HashSet<String>>) -> Subscription {
        let shared = &self.handle.shared;
        let (tx, rx) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut registry = shared.registry();
        let id = registry.next_id;
        registry.next_id += 1;
        if !shared.shutdown.load(Ordering::Acquire) {
            registry.sinks.insert(
                id,
                Sink {
                    tx,
                    queued: Arc::clone(&queued),
                    capacity: shared.capacity,
                    filter,
                    owed: None,
                    last: HashMap::new(),
                },
            );
        }
        Subscription {
            id,
            rx,
            pending: Mutex::new(VecDeque::new()),
            queued,
            handle: Arc::clone(&self.handle),
        }
    }

    /// Runs `callback` for every event on a thread of its own (never on the
    /// listener's thread), until the returned handle is dropped or the
    /// listener shuts down. Its subscription keeps the listener running
    /// until then.
    ///
    /// # Errors
    ///
    /// When the thread cannot be started.
    pub fn on_change<F>(&self, callback: F) -> Result<CallbackHandle>
    where
        F: FnMut(Event) + Send + 'static,
    {
        self.subscribe().on_event(callback)
    }

    /// The connection state and counters.
    pub fn health(&self) -> ListenerHealth {
        let shared = &self.handle.shared;
        ListenerHealth {
            connected: shared.connected.load(Ordering::Acquire),
            reconnects: shared.stats.reconnects.load(Ordering::Relaxed),
            last_error: shared
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            received: shared.stats.received.load(Ordering::Relaxed),
            dropped: shared.stats.dropped.load(Ordering::Relaxed),
            malformed: shared.stats.malformed.load(Ordering::Relaxed),
            subscribers: shared.registry().sinks.len(),
        }
    }

    /// Announces a change of `actor_id` without a write, so that everyone
    /// listening on the channel reloads the actor, as the Swift adapter's
    /// `notify` does: a payload with the seed's keys (`actorID`,
    /// `sequenceNumber`, `timestamp`), `"op": "announce"`, and the
    /// listener's table when it knows it. It reaches the subscribers of
    /// every listener on the channel, in this process and others, this
    /// listener's own too, as a change of kind [`ChangeKind::Announced`],
    /// delivered whatever numbers a subscriber has seen; a
    /// [`StateCache`](crate::StateCache) holding the actor reads it again.
    ///
    /// Use it after changing a state by a path that does not fire the
    /// table's trigger (a bulk load, a restore, a hand-made fix), or to
    /// have peers reload for a reason of your own.
    ///
    /// The announced number is the actor's number at that moment (its
    /// tombstone's when it is deleted, 0 when it never existed), read
    /// through the store's catch-up query for a listener from
    /// [`StateStore::listener`](crate::StateStore::listener); 0 for a
    /// listener without a store. It is not a new version (see
    /// [`ChangeKind::Announced`]).
    ///
    /// Sends on a short-lived connection of its own (the listener's
    /// connection belongs to its thread, which may be waiting on the
    /// server or reconnecting), within the connect timeout when one is
    /// set; also after [`shutdown`](Self::shutdown).
    ///
    /// ```no_run
    /// use trebuchet_postgres::StateStore;
    ///
    /// let store = StateStore::connect("postgresql://localhost/trebuchet")?;
    /// let listener = store.listener()?;
    /// // ... the state of "room-1" was changed without its trigger ...
    /// listener.announce("room-1")?; // every peer reloads room-1
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`] for an id the table cannot hold, before
    /// anything is sent; [`Error::Connect`] when the connection cannot be
    /// opened (or not within the connect timeout); [`Error::Database`] when
    /// the server refuses the read or the notification.
    pub fn announce(&self, actor_id: &str) -> Result<()> {
        check_actor_id(actor_id).map_err(Error::InvalidActorId)?;
        let handle = &self.handle;
        let channel = handle.channel.clone();
        let catch_up_sql = handle.catch_up_sql.clone();
        let actor_id = actor_id.to_owned();
        handle.conn.within_connect_timeout(move |conn| {
            announce(conn, &channel, catch_up_sql.as_deref(), &actor_id)
        })
    }

    /// Stops and joins the thread and closes the connection, even while
    /// subscriptions exist; every subscription then ends (after the events
    /// already queued). Idempotent; also done when the last clone and the
    /// last subscription are dropped.
    pub fn shutdown(&self) {
        self.handle.stop();
    }
}

/// A stream of [`Event`]s from a [`ChangeListener`], with its own bounded
/// queue. Dropping it unsubscribes.
///
/// It keeps its listener running: the listener's thread and connection stay
/// up (reconnecting as needed) while a subscription exists, even when every
/// clone of the [`ChangeListener`] is gone, and dropping the last
/// subscription of a listener without clones stops and joins its thread.
/// Once the listener shuts down ([`ChangeListener::shutdown`]), the receiving
/// methods report disconnection (after the events still queued) and
/// iteration ends.
///
/// The listener hands changes over in batches, one channel message per batch
/// (whatever arrived together, shared by every subscriber), and the
/// receiving methods ([`recv`](Self::recv), [`recv_timeout`](Self::recv_timeout),
/// [`try_recv`](Self::try_recv), [`iter`](Self::iter)) give them out one by
/// one. Works with `crossbeam_channel::select!` through
/// [`receiver`](Self::receiver), whose messages are those batches.
///
/// Meant for one reader at a time: two threads receiving from one
/// subscription compete for its events.
pub struct Subscription {
    id: u64,
    rx: Receiver<EventBatch>,
    /// What is left of batches the receiving methods have started on.
    pending: Mutex<VecDeque<EventBatch>>,
    /// Events in the queue, as the listener counts them.
    queued: Arc<AtomicUsize>,
    /// Keeps the listener running.
    handle: Arc<Handle>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish()
    }
}

impl Subscription {
    /// Waits for the next event.
    ///
    /// # Errors
    ///
    /// [`RecvError`] once the listener has shut down and every queued event
    /// has been received.
    pub fn recv(&self) -> std::result::Result<Event, RecvError> {
        loop {
            if let Some(event) = self.next_pending() {
                return Ok(event);
            }
            if let Some(event) = self.start(self.rx.recv()?) {
                return Ok(event);
            }
        }
    }

    /// Waits for the next event at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`RecvTimeoutError::Timeout`], or `Disconnected` once the listener
    /// has shut down and every queued event has been received.
    pub fn recv_timeout(&self, timeout: Duration) -> std::result::Result<Event, RecvTimeoutError> {
        if let Some(event) = self.next_pending() {
            return Ok(event);
        }
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            return self.recv().map_err(|_| RecvTimeoutError::Disconnected);
        };
        loop {
            if let Some(event) = self.start(self.rx.recv_deadline(deadline)?) {
                return Ok(event);
            }
            if let Some(event) = self.next_pending() {
                return Ok(event);
            }
        }
    }

    /// The next event if one is queued.
    ///
    /// # Errors
    ///
    /// [`TryRecvError::Empty`], or `Disconnected` once the listener has
    /// shut down and every queued event has been received.
    pub fn try_recv(&self) -> std::result::Result<Event, TryRecvError> {
        loop {
            if let Some(event) = self.next_pending() {
                return Ok(event);
            }
            if let Some(event) = self.start(self.rx.try_recv()?) {
                return Ok(event);
            }
        }
    }

    /// A blocking iterator that ends when the listener shuts down.
    pub fn iter(&self) -> Events<'_> {
        Events { subscription: self }
    }

    /// The underlying receiver, for `select!` and for reading batches: each
    /// message is an [`EventBatch`], the events that arrived together, in
    /// order (iterate it, or read it in place with
    /// [`EventBatch::as_slice`], the cheapest way to follow a busy channel
    /// with many subscribers). Do not clone it to share: clones compete for
    /// batches, they do not each get every batch.
    ///
    /// Use either the receiver or the receiving methods of a subscription,
    /// not both: the receiving methods keep the rest of a batch they have
    /// started on, and the receiver's next batch comes after those events.
    ///
    /// ```no_run
    /// use trebuchet_postgres::crossbeam_channel::{self, select};
    /// use trebuchet_postgres::{Event, StateStore};
    ///
    /// let store = StateStore::connect("postgresql://localhost/trebuchet")?;
    /// let listener = store.listener()?;
    /// let changes = listener.subscribe();
    /// let (_stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
    /// loop {
    ///     select! {
    ///         recv(changes.receiver()) -> batch => match batch {
    ///             Ok(batch) => {
    ///                 for event in batch {
    ///                     if let Event::Change(c) = event {
    ///                         println!("{} is now at {}", c.actor_id, c.sequence);
    ///                     }
    ///                 }
    ///             }
    ///             Err(_) => break, // the listener shut down
    ///         },
    ///         recv(stop) -> _ => break,
    ///     }
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn receiver(&self) -> &Receiver<EventBatch> {
        &self.rx
    }

    /// The next event of a batch already started on.
    fn next_pending(&self) -> Option<Event> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(batch) = pending.front_mut() {
            let event = batch.next();
            if batch.len() == 0 {
                // Done with: its events leave the queue's count.
                pending.pop_front();
            }
            if event.is_some() {
                return event;
            }
        }
        None
    }

    /// The first event of a batch just received; keeps the rest.
    fn start(&self, mut batch: EventBatch) -> Option<Event> {
        let event = batch.next();
        if batch.len() > 0 {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(batch);
        }
        event
    }

    /// Runs `callback` for each event on a new thread.
    fn on_event<F>(self, callback: F) -> Result<CallbackHandle>
    where
        F: FnMut(Event) + Send + 'static,
    {
        self.spawn_handler("trebuchet-on-change", callback, || {})
    }

    /// Runs `callback` for each event on a new thread named `name`, and
    /// `on_end` once when the listener shuts down (not when the handle is
    /// dropped).
    pub(crate) fn spawn_handler<F, E>(
        self,
        name: &str,
        mut callback: F,
        on_end: E,
    ) -> Result<CallbackHandle>
    where
        F: FnMut(Event) + Send + 'static,
        E: FnOnce() + Send + 'static,
    {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        // Asked to stop, or the handle is gone.
        fn stopped(stop: &Receiver<()>) -> bool {
            !matches!(stop.try_recv(), Err(TryRecvError::Empty))
        }
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || loop {
                crossbeam_channel::select! {
                    recv(self.rx) -> batch => match batch {
                        Ok(batch) => {
                            for event in batch {
                                if stopped(&stop_rx) {
                                    return;
                                }
                                callback(event);
                            }
                        }
                        Err(_) => {
                            on_end();
                            break;
                        }
                    },
                    recv(stop_rx) -> _ => break,
                }
            })
            .map_err(Error::thread_start("a subscription's handler thread"))?;
        Ok(CallbackHandle {
            stop: stop_tx,
            thread: Some(thread),
        })
    }
}

impl<'a> IntoIterator for &'a Subscription {
    type Item = Event;
    type IntoIter = Events<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// A blocking iterator over a [`Subscription`]'s events, from
/// [`Subscription::iter`]; it ends when the listener shuts down.
#[derive(Debug)]
pub struct Events<'a> {
    subscription: &'a Subscription,
}

impl Iterator for Events<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.subscription.recv().ok()
    }
}

/// Events that reached one subscription together, in order: a message of
/// [`Subscription::receiver`]. Iterate it for the events, or read them in
/// place with [`as_slice`](Self::as_slice).
///
/// The changes of a batch are shared: every subscriber that receives the
/// batch holds the same allocation. Its events count towards the
/// subscription's queue capacity until the batch is dropped.
pub struct EventBatch {
    events: Arc<[Event]>,
    next: usize,
    end: usize,
    /// The subscription's count of queued events, which holds `end` of them
    /// for this batch until it is dropped.
    queued: Arc<AtomicUsize>,
}

impl fmt::Debug for EventBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(&self.events[self.next..self.end])
            .finish()
    }
}

impl EventBatch {
    /// The events not yet taken, borrowed. Iterating the batch gives owned
    /// events, each a clone of a shared `Arc`, which many subscribers on
    /// several cores make contend; reading the events in place does not.
    ///
    /// ```no_run
    /// use trebuchet_postgres::{Event, StateStore};
    ///
    /// let store = StateStore::connect("postgresql://localhost/trebuchet")?;
    /// let listener = store.listener()?;
    /// let changes = listener.subscribe();
    /// while let Ok(batch) = changes.receiver().recv() {
    ///     for event in batch.as_slice() {
    ///         match event {
    ///             Event::Change(c) => println!("{} is now at {}", c.actor_id, c.sequence),
    ///             Event::Resync(_) => println!("missed changes: reload everything"),
    ///             _ => {}
    ///         }
    ///     }
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn as_slice(&self) -> &[Event] {
        &self.events[self.next..self.end]
    }
}

impl Iterator for EventBatch {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        let event = self.events[self.next..self.end].first()?.clone();
        self.next += 1;
        Some(event)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.end - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for EventBatch {}

impl Drop for EventBatch {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.end, Ordering::AcqRel);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.handle.shared.registry().sinks.remove(&self.id);
        // Then the handle goes: when it was the last, the listener stops.
    }
}

/// Keeps an [`ChangeListener::on_change`] callback running; dropping it stops
/// the callback's thread (after the event in progress) and joins it.
#[derive(Debug)]
pub struct CallbackHandle {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for CallbackHandle {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}
