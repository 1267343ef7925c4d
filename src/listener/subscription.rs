//! The subscriber's side: [`Subscription`] and the batches it receives,
//! handed out one event at a time, and callbacks on threads of their own.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError};

use super::sink::Sink;
use super::Handle;
use crate::change::Event;
use crate::error::{Error, Result};
#[cfg(doc)]
use crate::ChangeListener;

/// A stream of [`Event`]s from a [`ChangeListener`], with its own bounded
/// queue. Dropping it unsubscribes.
///
/// It keeps its listener running: the listener's thread and connection stay
/// up (reconnecting as needed) while a subscription exists, even when every
/// clone of the [`ChangeListener`] is gone, and dropping the last
/// subscription of a listener without clones stops and joins its thread.
/// Once the listener shuts down ([`ChangeListener::shutdown`]), the
/// receiving methods report disconnection (after the events still queued)
/// and iteration ends.
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
    /// Registers a subscriber of `handle`'s listener (none after shutdown:
    /// the subscription then ends at once).
    pub(super) fn new(handle: &Arc<Handle>, filter: Option<HashSet<String>>) -> Subscription {
        let shared = &handle.shared;
        let (tx, rx) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut registry = shared.registry();
        let id = registry.next_id;
        registry.next_id += 1;
        if !shared.shutdown.load(Ordering::Acquire) {
            let sink = Sink::new(tx, Arc::clone(&queued), shared.capacity, filter);
            registry.sinks.insert(id, sink);
        }
        Subscription {
            id,
            rx,
            pending: Mutex::new(VecDeque::new()),
            queued,
            handle: Arc::clone(handle),
        }
    }

    /// Waits for the next event.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// use trebuchet_postgres::Event;
    /// let changes = listener.subscribe();
    /// match changes.recv() {
    ///     Ok(Event::Change(change)) => println!("{} is at {}", change.actor_id, change.sequence),
    ///     Ok(Event::Resync(reason)) => println!("reload everything: {reason:?}"),
    ///     Ok(_) => {}
    ///     Err(_) => println!("the listener has shut down"),
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// # use std::time::Duration;
    /// let changes = listener.subscribe_actor("room-1");
    /// if let Ok(event) = changes.recv_timeout(Duration::from_secs(1)) {
    ///     println!("{event:?}");
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// let changes = listener.subscribe();
    /// while let Ok(event) = changes.try_recv() {
    ///     println!("{event:?}"); // whatever is queued, without waiting
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// use trebuchet_postgres::Event;
    /// for event in listener.subscribe().iter() {
    ///     if let Event::Change(change) = event {
    ///         println!("{} is at {}", change.actor_id, change.sequence);
    ///     }
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
    pub(super) fn on_event<F>(self, callback: F) -> Result<CallbackHandle>
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

    /// The first `len` of `events`, counted in `queued` (by the sender)
    /// until dropped.
    pub(super) fn new(events: Arc<[Event]>, len: usize, queued: Arc<AtomicUsize>) -> EventBatch {
        EventBatch {
            events,
            next: 0,
            end: len,
            queued,
        }
    }
}

impl fmt::Debug for EventBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(&self.events[self.next..self.end])
            .finish()
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

/// Keeps an [`ChangeListener::on_change`] callback running; dropping it
/// stops the callback's thread (after the event in progress) and joins it.
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
