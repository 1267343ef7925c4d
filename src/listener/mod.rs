//! The change feed: one connection and one thread per listener, `LISTEN`
//! on the channel, fan-out to bounded per-subscriber queues, reconnection
//! with back-off, and an explicit `Resync` after every gap.
//!
//! This module holds the handle ([`ChangeListener`]) and what its parts
//! share; [`builder`] starts a listener, [`worker`] is its thread,
//! [`connector`] opens its connections, [`sink`] and [`subscription`] are
//! the two ends of a subscriber's queue, [`catch_up`] fills the gap after a
//! reconnect, and [`announce`] sends a change without a write.

mod announce;
mod builder;
mod catch_up;
mod connector;
mod nodes;
mod query;
mod sink;
mod subscription;
mod worker;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use crossbeam_channel::Sender;

pub use builder::ChangeListenerBuilder;
pub(crate) use query::CatchUpQuery;
pub use subscription::{CallbackHandle, EventBatch, Events, Subscription};

use crate::change::{check_actor_id, Event, ResyncReason};
use crate::error::{Error, Result};
use connector::Connector;
use sink::Registry;

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

/// What the listener's thread, its handles and its subscriptions share.
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
    /// On Citus, the newest number heard of each actor: its changes may
    /// come on two connections (its node's, and the coordinator's for
    /// writes of several actors), and one that comes after a newer one is
    /// dropped, so that per actor numbers only grow. `None` on one server.
    newest: Option<Mutex<nodes::Newest>>,
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

/// What every clone of a listener and every subscription from it hold: the
/// last one dropped stops and joins the thread.
struct Handle {
    shared: Arc<Shared>,
    /// Dropped to stop: every thread waiting on its receiver wakes.
    wake: Mutex<Option<Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    channel: String,
    target: String,
    /// Opens the short-lived connections of [`ChangeListener::announce`].
    conn: Connector,
    /// The store's catch-up query, which reads an announced actor's number.
    catch_up: Option<CatchUpQuery>,
}

impl Handle {
    fn stop(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        drop(self.wake.lock().unwrap_or_else(|p| p.into_inner()).take());
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
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use trebuchet_postgres::ChangeListener;
    /// let listener = ChangeListener::builder()
    ///     .url("postgresql://postgres@localhost/trebuchet")
    ///     .queue_capacity(4096)
    ///     .heartbeat(Duration::from_secs(10), Duration::from_secs(5))
    ///     .build()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn builder() -> ChangeListenerBuilder {
        ChangeListenerBuilder::new()
    }

    /// Listens on `actor_state_changes` through a connection string.
    ///
    /// ```no_run
    /// let listener = trebuchet_postgres::ChangeListener::connect("postgresql://postgres@localhost/trebuchet")?;
    /// assert_eq!(listener.channel(), "actor_state_changes");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`ChangeListenerBuilder::build`].
    pub fn connect(url: &str) -> Result<ChangeListener> {
        ChangeListener::builder().url(url).build()
    }

    /// The channel listened on.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// assert_eq!(listener.channel(), store.channel());
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn channel(&self) -> &str {
        &self.handle.channel
    }

    /// Every change on the channel.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// let everything = listener.subscribe();
    /// store.save("room-1", &1u32)?;
    /// println!("{:?}", everything.recv());
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn subscribe(&self) -> Subscription {
        self.add(None)
    }

    /// Changes of one actor.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// let room = listener.subscribe_actor("room-1");
    /// store.save("room-2", &1u32)?; // not this subscription's
    /// store.save("room-1", &1u32)?;
    /// println!("{:?}", room.recv()); // the change of room-1
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn subscribe_actor(&self, actor_id: impl Into<String>) -> Subscription {
        self.add(Some(std::iter::once(actor_id.into()).collect()))
    }

    /// Changes of a set of actors.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// let lobby = listener.subscribe_actors(["room-1", "room-2"]);
    /// store.save("room-2", &1u32)?;
    /// println!("{:?}", lobby.recv());
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn subscribe_actors<I, S>(&self, actor_ids: I) -> Subscription
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.add(Some(actor_ids.into_iter().map(Into::into).collect()))
    }

    fn add(&self, filter: Option<HashSet<String>>) -> Subscription {
        Subscription::new(&self.handle, filter)
    }

    /// Runs `callback` for every event on a thread of its own (never on the
    /// listener's thread), until the returned handle is dropped or the
    /// listener shuts down. Its subscription keeps the listener running
    /// until then.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// let handle = listener.on_change(|event| println!("{event:?}"))?;
    /// store.save("room-1", &1u32)?;
    /// drop(handle); // stops the callback
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// let health = listener.health();
    /// println!("connected: {}, {} reconnects, {} received", health.connected, health.reconnects, health.received);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
    /// listener's own too, as a change of kind
    /// [`ChangeKind::Announced`](crate::ChangeKind::Announced), delivered
    /// whatever numbers a subscriber has seen; a
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
    /// [`ChangeKind::Announced`](crate::ChangeKind::Announced)).
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
        let catch_up = handle.catch_up.clone();
        let actor_id = actor_id.to_owned();
        handle.conn.within_connect_timeout(move |conn| {
            announce::announce(conn, &channel, catch_up.as_ref(), &actor_id)
        })
    }

    /// Stops and joins the thread and closes the connection, even while
    /// subscriptions exist; every subscription then ends (after the events
    /// already queued). Idempotent; also done when the last clone and the
    /// last subscription are dropped.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// let changes = listener.subscribe();
    /// listener.shutdown(); // stops the thread now, for every clone
    /// assert!(changes.recv().is_err());
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn shutdown(&self) {
        self.handle.stop();
    }
}
