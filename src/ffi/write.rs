//! Single-actor writes: plain, conditional, with a time to live, and
//! transforms through a C callback.

use super::*;

/// `expected_sequence` for `trebuchet_store_save_if`: the actor must not exist.
/// Sequence numbers start at 1, so 0 never names a version.
pub const TREBUCHET_EXPECT_ABSENT: u64 = 0;

/// Where a transform callback puts the new state (`trebuchet_output_set`).
/// Valid only during the callback.
pub struct trebuchet_output {
    _private: [u8; 0],
}

/// A transform step: gets the current state (`exists` false and `current`
/// NULL for a new actor) and calls `trebuchet_output_set(next, ...)` with the
/// new one, then returns 0. Any other return value cancels the transform
/// (`TREBUCHET_CALLBACK_FAILED`, nothing written). The step may run more than
/// once when another writer wins a race; it must not unwind or `longjmp`.
pub type trebuchet_transform_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        current: *const u8,
        current_len: usize,
        exists: bool,
        next: *mut trebuchet_output,
    ) -> i32,
>;

/// Stores `len` bytes at `data` as the actor's state (`data` may be NULL
/// when `len` is 0). `sequence_out`, when not NULL, receives the new
/// sequence number.
///
/// # Safety
///
/// `actor_id` NUL-terminated; `data` readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_save(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
    sequence_out: *mut u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        save_with(
            store,
            actor_id,
            data,
            len,
            sequence_out,
            |store, id, bytes| store.raw().save(id, bytes),
        )
    }
}

/// The body of the saves: reads the arguments, runs `save` and writes the
/// new sequence number to `sequence_out` when it is not NULL.
///
/// # Safety
///
/// As `trebuchet_store_save`.
unsafe fn save_with(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
    sequence_out: *mut u64,
    save: impl FnOnce(&StateStore, &str, &[u8]) -> crate::Result<u64>,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        let bytes = unsafe { bytes_arg(data, len) }?;
        let sequence = check(save(store, id, bytes))?;
        // SAFETY: NULL or writable.
        unsafe { write_opt(sequence_out, sequence) };
        Ok(TREBUCHET_OK)
    })
}

/// Stores the state as `trebuchet_store_save` does, expiring `ttl_ms`
/// milliseconds from now: from then on it reads as absent, and the store's
/// sweeper (or the CLI's `sweep`) removes it, announcing a delete. A later
/// save without a time to live keeps the actor for good. `ttl_ms` runs from
/// 1 ms to 1,000 years (`TREBUCHET_INVALID_ARGUMENT` otherwise, and nothing
/// is written).
///
/// # Safety
///
/// As `trebuchet_store_save`.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_save_with_ttl(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
    ttl_ms: u64,
    sequence_out: *mut u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        save_with(
            store,
            actor_id,
            data,
            len,
            sequence_out,
            |store, id, bytes| {
                store.raw().save_with(
                    id,
                    bytes,
                    WriteOptions::new().ttl(Duration::from_millis(ttl_ms)),
                )
            },
        )
    }
}

/// Stores the state only when the actor is at `expected_sequence`, or does
/// not exist when it is `TREBUCHET_EXPECT_ABSENT` (0). Otherwise
/// `TREBUCHET_CONFLICT`, nothing is written, the last error names both
/// versions, and `trebuchet_last_conflict_actual` gives the sequence
/// number found (0 when the actor does not exist) as a number.
///
/// # Safety
///
/// As `trebuchet_store_save`.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_save_if(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
    expected_sequence: u64,
    sequence_out: *mut u64,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        let bytes = unsafe { bytes_arg(data, len) }?;
        let expected = match expected_sequence {
            TREBUCHET_EXPECT_ABSENT => Expected::Absent,
            n => Expected::Sequence(n),
        };
        let sequence = check(store.raw().save_if(id, bytes, expected))?;
        // SAFETY: NULL or writable.
        unsafe { write_opt(sequence_out, sequence) };
        Ok(TREBUCHET_OK)
    })
}

/// An atomic read-modify-write: `callback` gets the current bytes and sets
/// the new ones; when another writer wins the race it runs again on the
/// newer state. `user_data` is passed through untouched. `sequence_out`,
/// when not NULL, receives the sequence number written.
///
/// # Safety
///
/// `actor_id` NUL-terminated; `callback` must follow `trebuchet_transform_fn`.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_transform(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    callback: trebuchet_transform_fn,
    user_data: *mut c_void,
    sequence_out: *mut u64,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        let Some(callback) = callback else {
            return Err(fail(TREBUCHET_NULL_ARGUMENT, "callback is NULL"));
        };
        let mut failed = None;
        let result = store.raw().try_transform(id, |current| {
            let output = Tagged::new(Kind::Output, std::cell::RefCell::new(None::<Vec<u8>>));
            let (ptr, len) = current.map_or((std::ptr::null(), 0), |c| (c.as_ptr(), c.len()));
            let next = std::ptr::from_ref(&output)
                .cast_mut()
                .cast::<trebuchet_output>();
            // SAFETY: the callback follows trebuchet_transform_fn; `ptr`
            // and `next` outlive the call.
            let code = unsafe { callback(user_data, ptr, len, current.is_some(), next) };
            match (code, output.value.into_inner()) {
                (0, Some(bytes)) => Ok(bytes),
                (0, None) => {
                    failed = Some(
                        "the transform callback returned 0 without calling trebuchet_output_set"
                            .to_owned(),
                    );
                    Err(Error::invalid_config("transform cancelled"))
                }
                (code, _) => {
                    failed = Some(format!(
                        "the transform callback returned {code}; nothing was written"
                    ));
                    Err(Error::invalid_config("transform cancelled"))
                }
            }
        });
        if let Some(message) = failed {
            return Err(fail(TREBUCHET_CALLBACK_FAILED, message));
        }
        let sequence = check(result)?.sequence;
        // SAFETY: NULL or writable.
        unsafe { write_opt(sequence_out, sequence) };
        Ok(TREBUCHET_OK)
    })
}

/// Sets the new state from inside a transform callback (copies the bytes).
/// A second call replaces the first.
///
/// # Safety
///
/// `next` must be the handle the callback received; `data` readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_output_set(
    next: *mut trebuchet_output,
    data: *const u8,
    len: usize,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let output = unsafe {
            borrow::<std::cell::RefCell<Option<Vec<u8>>>, _>(next, Kind::Output, "next")
        }?;
        let bytes = unsafe { bytes_arg(data, len) }?;
        *output.borrow_mut() = Some(bytes.to_vec());
        Ok(TREBUCHET_OK)
    })
}
