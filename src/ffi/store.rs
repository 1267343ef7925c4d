//! Opening and closing a store, its schema, and the single-actor calls
//! that read no state: delete, exists, sequence.

use super::*;
use crate::StateStoreBuilder;

/// A connected store: a pool of connections to one table. Thread-safe:
/// share one handle between all threads; free it once none uses it.
pub struct trebuchet_store {
    _private: [u8; 0],
}

/// Builds the store and writes it to `store_out`: the end of every open.
pub(super) fn open(
    builder: StateStoreBuilder,
    store_out: *mut *mut trebuchet_store,
) -> Result<trebuchet_status, trebuchet_status> {
    out_arg(store_out, "store_out")?;
    let store = check(builder.build())?;
    // SAFETY: checked non-NULL above; the caller passes a writable pointer.
    unsafe { store_out.write(into_handle(Kind::Store, store)) };
    Ok(TREBUCHET_OK)
}

/// A builder with a connection string, table and channel, each `None` for
/// the default.
fn builder(url: Option<&str>, table: Option<&str>, channel: Option<&str>) -> StateStoreBuilder {
    let mut builder = StateStore::builder();
    if let Some(url) = url {
        builder = builder.url(url);
    }
    if let Some(table) = table {
        builder = builder.table(table);
    }
    if let Some(channel) = channel {
        builder = builder.channel(channel);
    }
    builder
}

/// Connects to PostgreSQL with a connection string (a `postgresql://` URL or
/// libpq `key=value` text). `table` and `channel` may be NULL for the
/// defaults (`actor_states`, `actor_state_changes`). Does not create the
/// schema: call `trebuchet_store_migrate`.
///
/// On success `*store_out` is a new store; release it with `trebuchet_store_free`.
///
/// # Safety
///
/// Strings must be NUL-terminated; `store_out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_open(
    url: *const c_char,
    table: *const c_char,
    channel: *const c_char,
    store_out: *mut *mut trebuchet_store,
) -> trebuchet_status {
    run(|| {
        // SAFETY: the caller passes NUL-terminated strings or NULL.
        let url = unsafe { str_arg(url, "url") }?;
        let table = unsafe { opt_str_arg(table, "table") }?;
        let channel = unsafe { opt_str_arg(channel, "channel") }?;
        open(builder(Some(url), table, channel), store_out)
    })
}

/// As `trebuchet_store_open`, with the connection from the environment:
/// `DATABASE_URL`, else `POSTGRES_HOST`, `POSTGRES_PORT`, `POSTGRES_DATABASE`,
/// `POSTGRES_USER`, `POSTGRES_PASSWORD`.
///
/// # Safety
///
/// As `trebuchet_store_open`.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_open_env(
    table: *const c_char,
    channel: *const c_char,
    store_out: *mut *mut trebuchet_store,
) -> trebuchet_status {
    run(|| {
        // SAFETY: the caller passes NUL-terminated strings or NULL.
        let table = unsafe { opt_str_arg(table, "table") }?;
        let channel = unsafe { opt_str_arg(channel, "channel") }?;
        open(builder(None, table, channel), store_out)
    })
}

/// Closes the store's connections, frees it and sets `*store` to NULL.
/// NULL, a pointer to NULL, or a handle of another kind: nothing happens.
///
/// # Safety
///
/// No other thread may be using the store.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_free(store: *mut *mut trebuchet_store) {
    boundary(|| {
        // SAFETY: the caller passes NULL or the address of a handle pointer.
        drop(unsafe { take::<StateStore, _>(store, Kind::Store) });
        TREBUCHET_OK
    });
}

/// Creates or upgrades the table, tombstones, function and trigger. Idempotent.
///
/// # Safety
///
/// `store` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_migrate(
    store: *const trebuchet_store,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        check(store.migrate())?;
        Ok(TREBUCHET_OK)
    })
}

/// Checks that the schema is complete. `TREBUCHET_SCHEMA_MISSING` when
/// anything is missing or wrong; the last error lists every problem.
///
/// # Safety
///
/// `store` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_verify(store: *const trebuchet_store) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        let report = check(store.verify())?;
        if report.is_ok() {
            Ok(TREBUCHET_OK)
        } else {
            Err(fail(TREBUCHET_SCHEMA_MISSING, report.to_string()))
        }
    })
}

/// Deletes the actor. `deleted_out`, when not NULL, receives whether it
/// existed.
///
/// # Safety
///
/// `actor_id` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_delete(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    deleted_out: *mut bool,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        let deleted = check(store.delete(id))?;
        // SAFETY: NULL or writable.
        unsafe { write_opt(deleted_out, deleted) };
        Ok(TREBUCHET_OK)
    })
}

/// Whether the actor exists.
///
/// # Safety
///
/// `actor_id` NUL-terminated; `exists_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_exists(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    exists_out: *mut bool,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        out_arg(exists_out, "exists_out")?;
        let exists = check(store.exists(id))?;
        // SAFETY: checked non-NULL.
        unsafe { exists_out.write(exists) };
        Ok(TREBUCHET_OK)
    })
}

/// The actor's sequence number; `TREBUCHET_NOT_FOUND` when it does not exist.
///
/// # Safety
///
/// `actor_id` NUL-terminated; `sequence_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_sequence(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    sequence_out: *mut u64,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        out_arg(sequence_out, "sequence_out")?;
        let Some(sequence) = check(store.sequence(id))? else {
            return Ok(TREBUCHET_NOT_FOUND);
        };
        // SAFETY: checked non-NULL.
        unsafe { sequence_out.write(sequence) };
        Ok(TREBUCHET_OK)
    })
}

/// A snapshot of a store's connection pool, from
/// `trebuchet_store_pool_state`. The counters run from the pool's
/// creation. The caller owns the struct; the library only writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct trebuchet_pool_state {
    /// Connections open, in use or idle.
    pub connections: u32,
    /// Connections open and idle.
    pub idle: u32,
    /// The most connections the pool opens
    /// (`trebuchet_store_options_pool_size`).
    pub max_size: u32,
    /// Calls that found every connection in use and waited for one.
    pub waits: u64,
    /// The time those calls spent waiting, in microseconds, in total.
    pub wait_time_us: u64,
    /// Calls that waited for a connection in vain (`TREBUCHET_POOL_EXHAUSTED`
    /// or `TREBUCHET_CONNECT_FAILED`).
    pub timeouts: u64,
}

/// How many connections the store's pool holds, its maximum, and how often
/// calls waited for one. Reads counters only: nothing is sent.
///
/// # Safety
///
/// `store` NULL or live; `state_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_pool_state(
    store: *const trebuchet_store,
    state_out: *mut trebuchet_pool_state,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        out_arg(state_out, "state_out")?;
        let state = store.pool().state();
        let state = trebuchet_pool_state {
            connections: state.connections,
            idle: state.idle,
            max_size: state.max_size,
            waits: state.waits,
            wait_time_us: u64::try_from(state.wait_time.as_micros()).unwrap_or(u64::MAX),
            timeouts: state.timeouts,
        };
        // SAFETY: checked non-NULL.
        unsafe { state_out.write(state) };
        Ok(TREBUCHET_OK)
    })
}
