//! Single-actor writes: plain, conditional, with a time to live, and
//! transforms through a C callback.

use std::sync::Mutex;

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

// Write options are an opaque handle with setters rather than a plain C
// struct. A struct C fills in would need a size or version field to grow,
// every binding would have to mirror its layout exactly (padding, `bool`
// size), and the library would read C-written memory where a `bool` holding
// 2 or a stale field is undefined behaviour in Rust. A handle grows by
// adding setters, keeps old binaries working unchanged, and costs bindings
// one pointer type, as the store options do (and as rustls-ffi's config
// builders do).

/// How `trebuchet_store_save_with` writes: a condition on the stored
/// version, a time to live, or a sequence number of the caller's choosing.
/// Make one with `trebuchet_write_options_new` (a plain save), add what the
/// write needs with the setters (a later call of the same setter replaces
/// the earlier one), use it for any number of writes, and release it with
/// `trebuchet_write_options_free`. Combinations are checked when a write
/// uses them. Thread-safe (a lock inside).
pub struct trebuchet_write_options {
    _private: [u8; 0],
}

/// The options behind a handle.
///
/// # Safety
///
/// `options` must be NULL or a live handle.
unsafe fn write_options_arg<'a>(
    options: *const trebuchet_write_options,
) -> Result<&'a Mutex<WriteOptions>, trebuchet_status> {
    // SAFETY: forwarded.
    unsafe { borrow::<Mutex<WriteOptions>, _>(options, Kind::WriteOptions, "options") }
}

/// Runs `change` on the options behind `options`.
///
/// # Safety
///
/// `options` must be NULL or a live handle.
unsafe fn update(
    options: *mut trebuchet_write_options,
    change: impl FnOnce(WriteOptions) -> WriteOptions,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let options = unsafe { write_options_arg(options) }?;
        let mut options = options.lock().unwrap_or_else(|p| p.into_inner());
        *options = change(*options);
        Ok(TREBUCHET_OK)
    })
}

/// `TREBUCHET_EXPECT_ABSENT` (0) or a sequence number, as `Expected`.
pub(super) fn expected_from(sequence: u64) -> Expected {
    match sequence {
        TREBUCHET_EXPECT_ABSENT => Expected::Absent,
        n => Expected::Sequence(n),
    }
}

/// Makes write options for a plain save: no condition, no time to live,
/// the next sequence number. Release them with
/// `trebuchet_write_options_free`.
///
/// # Safety
///
/// `options_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_write_options_new(
    options_out: *mut *mut trebuchet_write_options,
) -> trebuchet_status {
    run(|| {
        out_arg(options_out, "options_out")?;
        let options = Mutex::new(WriteOptions::new());
        // SAFETY: checked non-NULL.
        unsafe { options_out.write(into_handle(Kind::WriteOptions, options)) };
        Ok(TREBUCHET_OK)
    })
}

/// Frees write options and sets `*options` to NULL. NULL and a pointer to
/// NULL are fine.
///
/// # Safety
///
/// `options` NULL or the address of an options pointer; no other thread
/// may be using them.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_write_options_free(options: *mut *mut trebuchet_write_options) {
    boundary(|| {
        // Taking the value back frees the box; the options themselves own
        // nothing that needs dropping.
        // SAFETY: forwarded.
        let _ = unsafe { take::<Mutex<WriteOptions>, _>(options, Kind::WriteOptions) };
        TREBUCHET_OK
    });
}

/// Writes only when the actor does not exist (an expired actor counts as
/// absent); otherwise `TREBUCHET_CONFLICT`, as `trebuchet_store_save_if`
/// with `TREBUCHET_EXPECT_ABSENT`.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_write_options_expect_absent(
    options: *mut trebuchet_write_options,
) -> trebuchet_status {
    // SAFETY: forwarded.
    unsafe { update(options, |o| o.expect(Expected::Absent)) }
}

/// Writes only when the actor is at `expected_sequence`
/// (`TREBUCHET_EXPECT_ABSENT`, 0: when it does not exist); otherwise
/// `TREBUCHET_CONFLICT`, as `trebuchet_store_save_if`. A number above
/// 2^63 - 1 fails the write with `TREBUCHET_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_write_options_expect_sequence(
    options: *mut trebuchet_write_options,
    expected_sequence: u64,
) -> trebuchet_status {
    // SAFETY: forwarded.
    unsafe { update(options, |o| o.expect(expected_from(expected_sequence))) }
}

/// Gives the state a time to live of `ttl_ms` milliseconds, as
/// `trebuchet_store_save_with_ttl`: it reads as absent once that has
/// passed, and the sweeper deletes it later, announcing a delete. From
/// 1 ms to 1,000 years; the write fails with `TREBUCHET_INVALID_ARGUMENT`
/// otherwise. Writes with a time to live are not group-committed.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_write_options_ttl_ms(
    options: *mut trebuchet_write_options,
    ttl_ms: u64,
) -> trebuchet_status {
    // SAFETY: forwarded.
    unsafe { update(options, |o| o.ttl(Duration::from_millis(ttl_ms))) }
}

/// Writes at `sequence` instead of the next number, for moving actors
/// between stores. It must be above the stored number (and a deleted
/// actor's last one); otherwise `TREBUCHET_CONFLICT`, with
/// `trebuchet_last_conflict_actual` giving the stored number. Cannot be
/// combined with an expectation (the write fails with
/// `TREBUCHET_INVALID_ARGUMENT`): the number is the condition.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_write_options_sequence(
    options: *mut trebuchet_write_options,
    sequence: u64,
) -> trebuchet_status {
    // SAFETY: forwarded.
    unsafe { update(options, |o| o.sequence(sequence)) }
}

/// The body of every save: reads the arguments, writes as `options` say
/// and writes the new sequence number to `sequence_out` when it is not
/// NULL.
///
/// # Safety
///
/// As `trebuchet_store_save`.
unsafe fn save_as(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
    options: impl FnOnce() -> Result<WriteOptions, trebuchet_status>,
    sequence_out: *mut u64,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        let bytes = unsafe { bytes_arg(data, len) }?;
        let options = options()?;
        let sequence = check(store.raw().save_with(id, bytes, options))?;
        // SAFETY: NULL or writable.
        unsafe { write_opt(sequence_out, sequence) };
        Ok(TREBUCHET_OK)
    })
}

/// Stores the state as `options` say (NULL: a plain save, as
/// `trebuchet_store_save`): the one general write, of which
/// `trebuchet_store_save`, `trebuchet_store_save_if` and
/// `trebuchet_store_save_with_ttl` are short forms. `sequence_out`, when
/// not NULL, receives the sequence number written.
///
/// `TREBUCHET_CONFLICT` when the options' condition or sequence number does
/// not hold: nothing is written, and `trebuchet_last_conflict_actual` gives
/// the number found (0 when the actor does not exist).
/// `TREBUCHET_INVALID_ARGUMENT` for options that do not fit together or are
/// out of range; nothing is sent.
///
/// # Safety
///
/// As `trebuchet_store_save`; `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_save_with(
    store: *const trebuchet_store,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
    options: *const trebuchet_write_options,
    sequence_out: *mut u64,
) -> trebuchet_status {
    let options = || {
        if options.is_null() {
            return Ok(WriteOptions::new());
        }
        // SAFETY: non-NULL and live per the caller.
        let options = unsafe { write_options_arg(options) }?;
        Ok(*options.lock().unwrap_or_else(|p| p.into_inner()))
    };
    // SAFETY: forwarded from the caller's guarantees.
    unsafe { save_as(store, actor_id, data, len, options, sequence_out) }
}

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
        save_as(
            store,
            actor_id,
            data,
            len,
            || Ok(WriteOptions::new()),
            sequence_out,
        )
    }
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
    let options = || Ok(WriteOptions::new().ttl(Duration::from_millis(ttl_ms)));
    // SAFETY: forwarded from the caller's guarantees.
    unsafe { save_as(store, actor_id, data, len, options, sequence_out) }
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
    let options = || Ok(WriteOptions::new().expect(expected_from(expected_sequence)));
    // SAFETY: forwarded from the caller's guarantees.
    unsafe { save_as(store, actor_id, data, len, options, sequence_out) }
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
