//! One subscriber's end at the listener: its bounded queue, its filter,
//! the resync it is owed, and the fan-out of a batch to every subscriber.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;

use super::subscription::EventBatch;
use super::Shared;
use crate::change::{Change, ChangeKind, Event, ResyncReason};

/// One subscriber's end at the listener.
pub(super) struct Sink {
    /// Unbounded underneath, so that an idle subscription costs no queue
    /// memory; `capacity` bounds the events in it (counted in `queued`),
    /// and only the listener thread sends.
    tx: Sender<EventBatch>,
    /// Events sent and not yet handed out, shared with the subscription.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    pub(super) filter: Option<HashSet<String>>,
    /// A resync owed to this subscriber, delivered before anything else.
    pub(super) owed: Option<ResyncReason>,
    /// The last sequence number delivered per actor (filtered subscribers
    /// only: bounded by the filter), so catch-up never repeats or reverses.
    last: HashMap<String, u64>,
}

impl Sink {
    /// A subscriber's end, sending on `tx`, counting in `queued`.
    pub(super) fn new(
        tx: Sender<EventBatch>,
        queued: Arc<AtomicUsize>,
        capacity: usize,
        filter: Option<HashSet<String>>,
    ) -> Sink {
        Sink {
            tx,
            queued,
            capacity,
            filter,
            owed: None,
            last: HashMap::new(),
        }
    }

    fn wants(&self, actor_id: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f.contains(actor_id))
    }

    /// Whether a filtered subscriber takes `change`: one of its actors, newer
    /// than what it was given of that actor, or an announce (not a version).
    /// Records a version as given.
    pub(super) fn takes(&mut self, change: &Change) -> bool {
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
    pub(super) fn offer(&mut self, events: Arc<[Event]>, shared: &Shared) -> bool {
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
    pub(super) fn settle(&mut self, shared: &Shared) -> bool {
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
        let batch = EventBatch::new(events, len, Arc::clone(&self.queued));
        // Unbounded: fails only when the subscription is gone (the batch,
        // dropped, takes its count back).
        self.tx.try_send(batch).is_ok()
    }

    pub(super) fn owe(&mut self, reason: ResyncReason) {
        // A reconnect subsumes a lag and the other way round: one resync.
        self.owed = Some(self.owed.unwrap_or(reason));
    }
}

/// The subscribers of a listener, by subscription id.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) next_id: u64,
    pub(super) sinks: HashMap<u64, Sink>,
}

/// Delivers a batch of changes, in order, to every interested subscriber:
/// one message per subscriber, holding the batch itself (shared) or, for a
/// filtered subscriber, the changes it takes. Removes the subscribers that
/// are gone. Returns whether some subscriber is still owed a resync.
pub(super) fn fan_out(shared: &Shared, batch: Arc<[Event]>) -> bool {
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

/// Delivers the resyncs owed, where there is room. Returns whether some
/// subscriber is still owed one.
pub(super) fn settle_all(shared: &Shared) -> bool {
    let mut registry = shared.registry();
    let mut owed = false;
    registry.sinks.retain(|_, sink| {
        let alive = sink.settle(shared);
        owed |= sink.owed.is_some();
        alive
    });
    owed
}
