//! Single-actor loads and the buffers that carry loaded bytes.

use super::*;

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
