//! The listener's thread: waits for notifications, parses them into
//! batches and fans them out; checks that a quiet connection still answers;
//! reconnects with back-off and catches subscribers up.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use fallible_iterator::FallibleIterator;
use postgres::Client;

use super::catch_up;
use super::connector::Connector;
use super::query::CatchUpQuery;
use super::sink::{fan_out, settle_all};
use super::Shared;
use crate::change::{is_probe, Change, Event, MalformedPayload};
use crate::error::Error;

/// How long the listener thread waits for a notification before it looks at
/// its other duties (shutdown, owed resyncs). Bounds shutdown latency.
const TICK: Duration = Duration::from_millis(100);

/// Connect timeout of reconnection attempts, so that shutdown never waits
/// on a slow connect for long.
const RECONNECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

/// The most notifications the listener takes in before it fans them out.
/// It takes only what the driver has already received, so a lone change goes
/// out at once, while a flood reaches each subscriber as one message per
/// batch rather than one per change: a channel operation (and possibly a
/// thread wake-up) per subscriber per change is what capped fan-out. A batch
/// is also at most a quarter of a queue's capacity, so that a subscriber
/// that keeps up is never handed more at once than its queue holds.
const MAX_BATCH: usize = 256;

/// The listener thread.
pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) conn: Connector,
    pub(super) catch_up: Option<CatchUpQuery>,
    /// Never sent on; its sender is dropped to stop this thread (at
    /// shutdown, or when its node leaves the cluster).
    pub(super) wake: Receiver<()>,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) malformed_log: MalformedLog,
    pub(super) heartbeat_interval: Duration,
    pub(super) heartbeat_timeout: Duration,
}

/// At most one log line per this interval about malformed payloads: any
/// client that can connect may send them, as fast as it likes.
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs malformed payloads without letting a flood of them flood the log:
/// the first at once, then one line per [`MALFORMED_LOG_INTERVAL`] with the
/// count of those not logged. (All of them are counted in the health.)
#[derive(Default)]
pub(super) struct MalformedLog {
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

/// Ends every subscription when dropped: held by a listener's thread, so
/// that however it ends, even by a panic, subscribers do not wait forever
/// (dropping the senders ends their iteration).
pub(super) struct EndSubscriptions(pub(super) Arc<Shared>);

impl Drop for EndSubscriptions {
    fn drop(&mut self) {
        self.0.connected.store(false, Ordering::Release);
        self.0.registry().sinks.clear();
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
    /// A worker like this one, on another connection (a Citus node's),
    /// stopped by dropping `wake`'s sender.
    pub(super) fn sibling(&self, conn: Connector, wake: Receiver<()>) -> Worker {
        Worker {
            shared: Arc::clone(&self.shared),
            conn,
            catch_up: self.catch_up.clone(),
            wake,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            malformed_log: MalformedLog::default(),
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
        }
    }

    /// Listens on `client`, or, without one, connects first (and catches
    /// subscribers up, as after any gap).
    pub(super) fn run(self, client: Option<Client>) {
        let mut client = match client.or_else(|| self.reconnect()) {
            Some(client) => client,
            None => return,
        };
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

    /// Whether this thread is to stop: the listener shuts down, or (a Citus
    /// node's thread) its node left the cluster.
    fn stopping(&self) -> bool {
        self.shutting_down() || matches!(self.wake.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Whether the listener shuts down: one atomic load, for the loop that
    /// takes in each notification (a node's leaving is seen between
    /// notifications, by [`stopping`](Self::stopping)).
    fn shutting_down(&self) -> bool {
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
                        while batch.len() < limit
                            && !notifications.is_empty()
                            && !self.shutting_down()
                        {
                            // Buffered: taken without reading the socket.
                            match notifications.iter().next() {
                                Ok(Some(n)) => self.receive(&n, &mut batch),
                                _ => break,
                            }
                        }
                        if self.shutting_down() {
                            return Listened::Ended;
                        }
                        if !batch.is_empty() {
                            owed = fan_out(&self.shared, batch.drain(..).collect());
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
                        owed = settle_all(&self.shared);
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
            // On Citus, older than a change already heard on another
            // connection.
            Ok(change)
                if self.shared.newest.as_ref().is_some_and(|newest| {
                    !newest
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .admits(&change)
                }) => {}
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
            let query = self.catch_up.clone();
            let shared = Arc::clone(&self.shared);
            let spawned = thread::Builder::new()
                .name("trebuchet-listener-connect".into())
                .spawn(move || {
                    let attempt = conn
                        .connect(Some(RECONNECT_CONNECT_TIMEOUT), |_| Ok(()))
                        .map(|mut client| {
                            // After LISTEN, so that nothing falls between the two.
                            let ids = catch_up::ids(&shared);
                            let current = catch_up::read(
                                &mut client,
                                query.as_ref(),
                                &ids,
                                conn.table.table(),
                            );
                            if query.is_some() && !ids.is_empty() {
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
                    catch_up::deliver(&self.shared, current);
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
}
