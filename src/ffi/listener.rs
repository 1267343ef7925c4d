//! The change feed: listeners, subscriptions and the events they deliver.

use super::*;

/// A change listener: one connection that `LISTEN`s, fanning changes out to
/// subscriptions. Thread-safe; `trebuchet_listener_shutdown` may be called
/// from any thread while others wait on its subscriptions.
pub struct trebuchet_listener {
    _private: [u8; 0],
}

/// A queue of events from a listener, for all actors or one. May be waited
/// on from any thread; threads waiting on the same subscription compete for
/// its events (each event goes to one of them). Must not be freed while
/// another thread waits on it.
pub struct trebuchet_subscription {
    _private: [u8; 0],
}

/// The size of `trebuchet_event.actor_id`: an actor id has at most 255
/// characters of at most 4 UTF-8 bytes, plus the terminating NUL.
pub const TREBUCHET_ACTOR_ID_CAPACITY: usize = 1024;

/// What a `trebuchet_event` reports. Numbers never change.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum trebuchet_event_kind {
    /// The actor was inserted or updated.
    TREBUCHET_EVENT_SAVED = 0,
    /// The actor was deleted.
    TREBUCHET_EVENT_DELETED = 1,
    /// Changes may have been missed (see `resync_reason`): reload what you keep.
    TREBUCHET_EVENT_RESYNC = 2,
    /// A peer asked everyone to reload the actor without writing it
    /// (`trebuchet_listener_announce`); `sequence` is the actor's number at
    /// that moment (0 when it does not exist).
    TREBUCHET_EVENT_ANNOUNCED = 3,
}

/// Why a resync event was sent. Numbers never change.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum trebuchet_resync_reason {
    /// Not a resync event.
    TREBUCHET_RESYNC_NONE = 0,
    /// The listener reconnected; changes in between were not announced.
    TREBUCHET_RESYNC_RECONNECTED = 1,
    /// This subscription's queue was full and changes were dropped.
    TREBUCHET_RESYNC_LAGGED = 2,
    /// A reason this version of the header does not know.
    TREBUCHET_RESYNC_OTHER = 3,
}

/// One event from `trebuchet_subscription_next`. The caller owns the struct;
/// nothing in it needs freeing. The library only writes it, never reads it,
/// so what it held before does not matter.
#[repr(C)]
pub struct trebuchet_event {
    /// Saved, deleted, announced, or resync.
    pub kind: trebuchet_event_kind,
    /// For a resync, why; otherwise `TREBUCHET_RESYNC_NONE`.
    pub resync_reason: trebuchet_resync_reason,
    /// The sequence number the change produced (0 for a resync).
    pub sequence: u64,
    /// When the change was written, in microseconds since the Unix epoch (UTC); 0 for a resync.
    pub timestamp_us: i64,
    /// The length of `actor_id` in bytes, without the NUL (0 for a resync).
    pub actor_id_len: usize,
    /// The actor, NUL-terminated UTF-8 (empty for a resync).
    pub actor_id: [c_char; TREBUCHET_ACTOR_ID_CAPACITY],
}

/// Starts a listener on the store's server and channel (one connection and
/// one thread). Release it with `trebuchet_listener_free`.
///
/// # Safety
///
/// `store` NULL or live; `listener_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_listener_open(
    store: *const trebuchet_store,
    listener_out: *mut *mut trebuchet_listener,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        out_arg(listener_out, "listener_out")?;
        let listener = check(store.listener())?;
        // SAFETY: checked non-NULL.
        unsafe { listener_out.write(into_handle(Kind::Listener, listener)) };
        Ok(TREBUCHET_OK)
    })
}

/// # Safety
///
/// `listener` must be NULL or a live handle.
unsafe fn listener_arg<'a>(
    listener: *const trebuchet_listener,
) -> Result<&'a ChangeListener, trebuchet_status> {
    // SAFETY: forwarded.
    unsafe { borrow::<ChangeListener, _>(listener, Kind::Listener, "listener") }
}

/// Subscribes to every actor's changes (`actor_id` NULL) or one actor's.
/// Release the subscription (which unsubscribes) with
/// `trebuchet_subscription_free`.
///
/// # Safety
///
/// `listener` NULL or live; `actor_id` NULL or NUL-terminated; `subscription_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_listener_subscribe(
    listener: *const trebuchet_listener,
    actor_id: *const c_char,
    subscription_out: *mut *mut trebuchet_subscription,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let listener = unsafe { listener_arg(listener) }?;
        let id = unsafe { opt_str_arg(actor_id, "actor_id") }?;
        out_arg(subscription_out, "subscription_out")?;
        let subscription = match id {
            None => listener.subscribe(),
            Some(id) => {
                check(crate::validate_actor_id(id))?;
                listener.subscribe_actor(id)
            }
        };
        // SAFETY: checked non-NULL.
        unsafe { subscription_out.write(into_handle(Kind::Subscription, subscription)) };
        Ok(TREBUCHET_OK)
    })
}

/// Asks every listener on the channel, in every process, to reload
/// `actor_id` without writing it: they receive `TREBUCHET_EVENT_ANNOUNCED`
/// with the actor's current sequence number (0 when it does not exist).
/// One statement on the listener's own connection; nothing is written.
///
/// # Safety
///
/// `listener` NULL or live; `actor_id` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_listener_announce(
    listener: *const trebuchet_listener,
    actor_id: *const c_char,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let listener = unsafe { listener_arg(listener) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        check(listener.announce(id))?;
        Ok(TREBUCHET_OK)
    })
}

/// Stops the listener's thread and closes its connection. Every
/// subscription, including one another thread is waiting on, then returns
/// `TREBUCHET_CLOSED`. Idempotent. The handle stays valid until freed.
///
/// # Safety
///
/// `listener` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_listener_shutdown(
    listener: *const trebuchet_listener,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let listener = unsafe { listener_arg(listener) }?;
        listener.shutdown();
        Ok(TREBUCHET_OK)
    })
}

/// Shuts the listener down (as `trebuchet_listener_shutdown`), frees it and
/// sets `*listener` to NULL. NULL and a pointer to NULL are fine.
/// Subscriptions stay valid handles (they report `TREBUCHET_CLOSED`) and
/// must still be freed.
///
/// # Safety
///
/// No other thread may be using the listener handle.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_listener_free(listener: *mut *mut trebuchet_listener) {
    boundary(|| {
        // SAFETY: forwarded.
        if let Some(listener) = unsafe { take::<ChangeListener, _>(listener, Kind::Listener) } {
            listener.shutdown();
        }
        TREBUCHET_OK
    });
}

/// Waits up to `timeout_ms` milliseconds (0: do not wait) for the next event
/// and writes it to `*event_out`. `TREBUCHET_TIMEOUT` when none came,
/// `TREBUCHET_CLOSED` once the listener has shut down.
///
/// # Safety
///
/// `subscription` NULL or live; `event_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_subscription_next(
    subscription: *const trebuchet_subscription,
    timeout_ms: u32,
    event_out: *mut trebuchet_event,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let subscription =
            unsafe { borrow::<Subscription, _>(subscription, Kind::Subscription, "subscription") }?;
        out_arg(event_out, "event_out")?;
        let event = match subscription.recv_timeout(Duration::from_millis(timeout_ms.into())) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => return Ok(TREBUCHET_TIMEOUT),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(fail(TREBUCHET_CLOSED, "the listener has shut down"))
            }
        };
        // SAFETY: checked non-NULL.
        unsafe { event_out.write(to_c_event(&event)) };
        Ok(TREBUCHET_OK)
    })
}

/// Unsubscribes, frees the subscription and sets `*subscription` to NULL.
/// NULL and a pointer to NULL are fine.
///
/// # Safety
///
/// No other thread may be waiting on the subscription.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_subscription_free(
    subscription: *mut *mut trebuchet_subscription,
) {
    boundary(|| {
        // SAFETY: forwarded.
        drop(unsafe { take::<Subscription, _>(subscription, Kind::Subscription) });
        TREBUCHET_OK
    });
}

fn to_c_event(event: &Event) -> trebuchet_event {
    let mut out = trebuchet_event {
        kind: trebuchet_event_kind::TREBUCHET_EVENT_RESYNC,
        resync_reason: trebuchet_resync_reason::TREBUCHET_RESYNC_NONE,
        sequence: 0,
        timestamp_us: 0,
        actor_id_len: 0,
        actor_id: [0; TREBUCHET_ACTOR_ID_CAPACITY],
    };
    match event {
        Event::Change(change) => {
            out.kind = match change.kind {
                ChangeKind::Announced => trebuchet_event_kind::TREBUCHET_EVENT_ANNOUNCED,
                ChangeKind::Deleted => trebuchet_event_kind::TREBUCHET_EVENT_DELETED,
                ChangeKind::Saved => trebuchet_event_kind::TREBUCHET_EVENT_SAVED,
            };
            out.sequence = change.sequence;
            out.timestamp_us = change
                .timestamp
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
            // Ids hold at most 255 characters (1020 bytes); cut at a
            // character boundary all the same, leaving room for the NUL.
            let id = &change.actor_id;
            let mut len = id.len().min(TREBUCHET_ACTOR_ID_CAPACITY - 1);
            while !id.is_char_boundary(len) {
                len -= 1;
            }
            for (dst, src) in out.actor_id.iter_mut().zip(&id.as_bytes()[..len]) {
                *dst = *src as c_char;
            }
            out.actor_id_len = len;
        }
        Event::Resync(reason) => {
            out.resync_reason = match reason {
                ResyncReason::Reconnected => trebuchet_resync_reason::TREBUCHET_RESYNC_RECONNECTED,
                ResyncReason::Lagged => trebuchet_resync_reason::TREBUCHET_RESYNC_LAGGED,
            };
        }
    }
    out
}
