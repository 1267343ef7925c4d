//! Several actors in one call: bulk saves, loads and deletes.

use super::*;

/// Saves `count` actors in one statement and one round trip: `actor_ids[i]`
/// gets the `lens[i]` bytes at `data[i]` (`data[i]` may be NULL when
/// `lens[i]` is 0). All or nothing: on any error nothing is written. When
/// `sequences_out` is not NULL it receives the `count` new sequence
/// numbers, in order. An id given twice is `TREBUCHET_INVALID_ARGUMENT`;
/// `count` 0 does nothing.
///
/// # Safety
///
/// `actor_ids`, `data` and `lens` hold `count` elements (NULL when `count`
/// is 0); each id NUL-terminated; `data[i]` readable for `lens[i]` bytes;
/// `sequences_out` NULL or writable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_save_many(
    store: *const trebuchet_store,
    count: usize,
    actor_ids: *const *const c_char,
    data: *const *const u8,
    lens: *const usize,
    sequences_out: *mut u64,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let ids = unsafe { ids_arg(actor_ids, count) }?;
        let data = unsafe { array_arg(data, count, "data") }?;
        let lens = unsafe { array_arg(lens, count, "lens") }?;
        let items = ids
            .into_iter()
            .zip(data.iter().zip(lens))
            // SAFETY: forwarded.
            .map(|(id, (&bytes, &len))| Ok((id, unsafe { bytes_arg(bytes, len) }?)))
            .collect::<Result<Vec<_>, trebuchet_status>>()?;
        let sequences = check(store.raw().save_many(&items))?;
        // SAFETY: NULL or writable for `count` elements; one per item.
        unsafe { write_all_opt(sequences_out, &sequences) };
        Ok(TREBUCHET_OK)
    })
}

/// Loads `count` actors in one query: `buffers_out[i]` receives a new
/// buffer with `actor_ids[i]`'s state, or NULL when it does not exist.
/// Release each buffer with `trebuchet_buffer_free` (it accepts the NULL
/// ones). On an error no buffer is made.
///
/// # Safety
///
/// `actor_ids` holds `count` NUL-terminated ids (NULL when `count` is 0);
/// `buffers_out` is writable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_load_many(
    store: *const trebuchet_store,
    count: usize,
    actor_ids: *const *const c_char,
    buffers_out: *mut *mut trebuchet_buffer,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let ids = unsafe { ids_arg(actor_ids, count) }?;
        if count > 0 {
            out_arg(buffers_out, "buffers_out")?;
        }
        let found = check(store.raw().load_many(&ids))?;
        for (i, bytes) in found.into_iter().enumerate() {
            let buffer = bytes.map_or(std::ptr::null_mut(), |bytes| {
                into_handle(Kind::Buffer, bytes.into_boxed_slice())
            });
            // SAFETY: writable for `count` elements; `i` is below it.
            unsafe { buffers_out.add(i).write(buffer) };
        }
        Ok(TREBUCHET_OK)
    })
}

/// Deletes `count` actors in one statement. When `deleted_out` is not NULL,
/// `deleted_out[i]` receives whether `actor_ids[i]` existed. Each delete
/// is announced and leaves a tombstone, as `trebuchet_store_delete` does.
///
/// # Safety
///
/// `actor_ids` holds `count` NUL-terminated ids (NULL when `count` is 0);
/// `deleted_out` NULL or writable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_delete_many(
    store: *const trebuchet_store,
    count: usize,
    actor_ids: *const *const c_char,
    deleted_out: *mut bool,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let ids = unsafe { ids_arg(actor_ids, count) }?;
        let deleted = check(store.delete_many(&ids))?;
        // SAFETY: NULL or writable for `count` elements; one per id.
        unsafe { write_all_opt(deleted_out, &deleted) };
        Ok(TREBUCHET_OK)
    })
}
