//! Single-actor loads and the buffers that carry loaded bytes.

use std::time::SystemTime;

use super::*;
use crate::Versioned;

/// Bytes the library allocated (a loaded state). Read them with
/// `trebuchet_buffer_get`; release with `trebuchet_buffer_free`. Immutable,
/// so it may be read from several threads.
pub struct trebuchet_buffer {
    _private: [u8; 0],
}

/// Loads the actor's state into a new buffer: `TREBUCHET_NOT_FOUND` when
/// it does not exist. Release the buffer with `trebuchet_buffer_free`.
///
/// # Safety
///
/// `actor_id` NUL-terminated; `buffer_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_load(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    buffer_out: *mut *mut trebuchet_buffer,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        out_arg(buffer_out, "buffer_out")?;
        let Some(bytes) = check(store.raw().load(id))? else {
            return Ok(TREBUCHET_NOT_FOUND);
        };
        // SAFETY: checked non-NULL.
        unsafe { buffer_out.write(into_handle(Kind::Buffer, bytes.into_boxed_slice())) };
        Ok(TREBUCHET_OK)
    })
}

/// As `trebuchet_store_load`, also giving the state's sequence number.
///
/// # Safety
///
/// As `trebuchet_store_load`; `sequence_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_load_versioned(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    buffer_out: *mut *mut trebuchet_buffer,
    sequence_out: *mut u64,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        out_arg(buffer_out, "buffer_out")?;
        out_arg(sequence_out, "sequence_out")?;
        let Some(versioned) = check(store.raw().load_versioned(id))? else {
            return Ok(TREBUCHET_NOT_FOUND);
        };
        // SAFETY: checked non-NULL.
        unsafe {
            buffer_out.write(into_handle(
                Kind::Buffer,
                versioned.value.into_boxed_slice(),
            ));
            sequence_out.write(versioned.sequence);
        }
        Ok(TREBUCHET_OK)
    })
}

/// A stored state's version and timestamps, from
/// `trebuchet_store_load_with_version` and
/// `trebuchet_store_load_many_versioned`. Times are microseconds since the
/// Unix epoch (UTC, from the server's clock), as `trebuchet_event`'s
/// `timestamp_us`. The caller owns the struct; the library only writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct trebuchet_version {
    /// The sequence number: 1 for the first save, one more per write. 0
    /// only in `trebuchet_store_load_many_versioned`, for an actor that
    /// does not exist.
    pub sequence: u64,
    /// When the state was last written.
    pub updated_at_us: i64,
    /// When the actor was created (again, after a delete or an expiry).
    pub created_at_us: i64,
    /// When the state expires, for one saved with a time to live; 0 for one
    /// kept for good.
    pub expires_at_us: i64,
}

/// Microseconds since the Unix epoch, negative before it (saturating).
fn epoch_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

impl trebuchet_version {
    /// The version of a loaded state.
    pub(super) fn of<T>(versioned: &Versioned<T>) -> trebuchet_version {
        trebuchet_version {
            sequence: versioned.sequence,
            updated_at_us: epoch_micros(versioned.updated_at),
            created_at_us: epoch_micros(versioned.created_at),
            expires_at_us: versioned.expires_at.map_or(0, epoch_micros),
        }
    }
}

/// As `trebuchet_store_load`, also writing the state's sequence number and
/// timestamps to `*version_out` (which `trebuchet_store_load_versioned`
/// does not give): when it was last written, created, and when it expires
/// (0: never). `TREBUCHET_NOT_FOUND` when the actor does not exist or has
/// expired, and then neither output is written.
///
/// # Safety
///
/// As `trebuchet_store_load`; `version_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_load_with_version(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    buffer_out: *mut *mut trebuchet_buffer,
    version_out: *mut trebuchet_version,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        out_arg(buffer_out, "buffer_out")?;
        out_arg(version_out, "version_out")?;
        let Some(versioned) = check(store.raw().load_versioned(id))? else {
            return Ok(TREBUCHET_NOT_FOUND);
        };
        let version = trebuchet_version::of(&versioned);
        // SAFETY: checked non-NULL.
        unsafe {
            buffer_out.write(into_handle(
                Kind::Buffer,
                versioned.value.into_boxed_slice(),
            ));
            version_out.write(version);
        }
        Ok(TREBUCHET_OK)
    })
}

/// Points `*data_out` and `*len_out` at the buffer's bytes, valid until the
/// buffer is freed. `*data_out` is not NULL even for an empty state.
///
/// # Safety
///
/// `buffer` NULL or live; out-pointers writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_buffer_get(
    buffer: *const trebuchet_buffer,
    data_out: *mut *const u8,
    len_out: *mut usize,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let bytes = unsafe { borrow::<Box<[u8]>, _>(buffer, Kind::Buffer, "buffer") }?;
        out_arg(data_out, "data_out")?;
        out_arg(len_out, "len_out")?;
        // SAFETY: checked non-NULL.
        unsafe {
            data_out.write(bytes.as_ptr());
            len_out.write(bytes.len());
        }
        Ok(TREBUCHET_OK)
    })
}

/// Frees a buffer and sets `*buffer` to NULL, so a second call on the same
/// variable does nothing. NULL and a pointer to NULL are fine.
///
/// # Safety
///
/// `buffer` NULL or the address of a buffer pointer.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_buffer_free(buffer: *mut *mut trebuchet_buffer) {
    boundary(|| {
        // SAFETY: forwarded.
        drop(unsafe { take::<Box<[u8]>, _>(buffer, Kind::Buffer) });
        TREBUCHET_OK
    });
}
