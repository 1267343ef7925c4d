//! Several actors in one call: bulk saves, loads and deletes.

use super::error::{conflict_actual_of, status_of};
use super::write::expected_from;
use super::*;

/// Reads the `count` items of a bulk save: `actor_ids[i]` with the
/// `lens[i]` bytes at `data[i]`.
///
/// # Safety
///
/// As `trebuchet_store_save_many`.
unsafe fn items_arg<'a>(
    count: usize,
    actor_ids: *const *const c_char,
    data: *const *const u8,
    lens: *const usize,
) -> Result<Vec<(&'a str, &'a [u8])>, trebuchet_status> {
    // SAFETY: forwarded from the caller's guarantees.
    let ids = unsafe { ids_arg(actor_ids, count) }?;
    let data = unsafe { array_arg(data, count, "data") }?;
    let lens = unsafe { array_arg(lens, count, "lens") }?;
    ids.into_iter()
        .zip(data.iter().zip(lens))
        // SAFETY: forwarded.
        .map(|(id, (&bytes, &len))| Ok((id, unsafe { bytes_arg(bytes, len) }?)))
        .collect()
}

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
        let items = unsafe { items_arg(count, actor_ids, data, lens) }?;
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

/// What one item of `trebuchet_store_save_many_if` came to. The caller
/// owns the array; the library only writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct trebuchet_item_result {
    /// `TREBUCHET_OK`: written. `TREBUCHET_CONFLICT`: not written, the
    /// actor was at another version. Any other status is this item's own
    /// error, for example `TREBUCHET_NOT_APPLIED` or
    /// `TREBUCHET_OUTCOME_UNKNOWN` after the connection broke.
    pub status: trebuchet_status,
    /// For `TREBUCHET_OK`, the sequence number written; otherwise 0.
    pub sequence: u64,
    /// For `TREBUCHET_CONFLICT`, the sequence number found, 0
    /// (`TREBUCHET_EXPECT_ABSENT`) when the actor does not exist: what a
    /// retry expects after reading the state again. Otherwise 0.
    pub conflict_actual: u64,
}

impl trebuchet_item_result {
    /// One item's outcome, without touching the thread's last error.
    fn of(outcome: &crate::Result<u64>) -> trebuchet_item_result {
        match outcome {
            Ok(sequence) => trebuchet_item_result {
                status: TREBUCHET_OK,
                sequence: *sequence,
                conflict_actual: 0,
            },
            Err(e) => trebuchet_item_result {
                status: status_of(e),
                sequence: 0,
                conflict_actual: conflict_actual_of(e).unwrap_or(0),
            },
        }
    }
}

/// Saves `count` actors in one statement, each only when it is at
/// `expected_sequences[i]` (`TREBUCHET_EXPECT_ABSENT`, 0: when it does not
/// exist); otherwise as `trebuchet_store_save_many`. A conflict on one item
/// does not stop the others: `results_out[i]` says what became of item `i`,
/// with the sequence number written, or, for a conflict, the number found
/// as data.
///
/// Returns `TREBUCHET_OK` when every item has its result, whether written
/// or not (`trebuchet_last_conflict_actual` then reports nothing: each
/// result carries its own). Fails, writing nothing and leaving
/// `results_out` untouched, for bad input (an id given twice or an
/// expected number above 2^63 - 1 is `TREBUCHET_INVALID_ARGUMENT`) and
/// for connection and database errors. `count` 0 does nothing.
///
/// # Safety
///
/// As `trebuchet_store_save_many`; `expected_sequences` holds `count`
/// elements and `results_out` is writable for `count` elements (both NULL
/// when `count` is 0).
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_save_many_if(
    store: *const trebuchet_store,
    count: usize,
    actor_ids: *const *const c_char,
    data: *const *const u8,
    lens: *const usize,
    expected_sequences: *const u64,
    results_out: *mut trebuchet_item_result,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let items = unsafe { items_arg(count, actor_ids, data, lens) }?;
        let expected = unsafe { array_arg(expected_sequences, count, "expected_sequences") }?;
        if count > 0 {
            out_arg(results_out, "results_out")?;
        }
        let items: Vec<(&str, &[u8], Expected)> = items
            .into_iter()
            .zip(expected)
            .map(|((id, bytes), &expected)| (id, bytes, expected_from(expected)))
            .collect();
        let outcomes = check(store.raw().save_many_if(&items))?;
        let results: Vec<trebuchet_item_result> =
            outcomes.iter().map(trebuchet_item_result::of).collect();
        // SAFETY: writable for `count` elements (checked non-NULL when
        // `count` is not 0); one result per item.
        unsafe { write_all_opt(results_out, &results) };
        Ok(TREBUCHET_OK)
    })
}

/// As `trebuchet_store_load_many`, also writing each actor's sequence
/// number and timestamps to `versions_out[i]`: all zero (sequence 0) for an
/// actor that does not exist, whose buffer is NULL. `buffers_out` may be
/// NULL when only the versions are wanted; otherwise release each buffer
/// with `trebuchet_buffer_free`. On an error nothing is written and no
/// buffer is made.
///
/// # Safety
///
/// `actor_ids` holds `count` NUL-terminated ids (NULL when `count` is 0);
/// `versions_out` is writable for `count` elements, and `buffers_out`
/// NULL or writable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_load_many_versioned(
    store: *const trebuchet_store,
    count: usize,
    actor_ids: *const *const c_char,
    buffers_out: *mut *mut trebuchet_buffer,
    versions_out: *mut trebuchet_version,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let ids = unsafe { ids_arg(actor_ids, count) }?;
        if count > 0 {
            out_arg(versions_out, "versions_out")?;
        }
        let found = check(store.raw().load_many_versioned(&ids))?;
        for (i, versioned) in found.into_iter().enumerate() {
            let version = versioned
                .as_ref()
                .map_or_else(trebuchet_version::default, trebuchet_version::of);
            // SAFETY: writable for `count` elements; `i` is below it.
            unsafe { versions_out.add(i).write(version) };
            if !buffers_out.is_null() {
                let buffer = versioned.map_or(std::ptr::null_mut(), |v| {
                    into_handle(Kind::Buffer, v.value.into_boxed_slice())
                });
                // SAFETY: non-NULL and writable for `count` elements.
                unsafe { buffers_out.add(i).write(buffer) };
            }
        }
        Ok(TREBUCHET_OK)
    })
}
