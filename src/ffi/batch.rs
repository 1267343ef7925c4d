//! Ordered batches: `trebuchet_batch`, saves, conditional saves and
//! deletes over several actors, committed in one transaction.

use std::sync::Mutex;

use super::write::expected_from;
use super::*;
use crate::{BatchResult, RawBatch};

/// Saves, conditional saves and deletes over several actors, applied in one
/// transaction, all or nothing, by `trebuchet_batch_commit`. Make one with
/// `trebuchet_batch_new`, add steps with `trebuchet_batch_save`,
/// `trebuchet_batch_save_if` and `trebuchet_batch_delete` (nothing is sent
/// until the commit), and release it with `trebuchet_batch_free`.
///
/// The batch keeps its store's connections alive: it may outlive the store
/// handle it was made from. Thread-safe (a lock inside), but steps added
/// from several threads at once land in no particular order.
pub struct trebuchet_batch {
    _private: [u8; 0],
}

/// One step of a batch, in the order added.
enum Step {
    Save {
        id: String,
        bytes: Vec<u8>,
        expected: Option<Expected>,
    },
    Delete {
        id: String,
    },
}

/// What a `trebuchet_batch` holds: its own handle on the store and the
/// steps added since the last successful commit.
struct BatchSteps {
    store: StateStore,
    steps: Mutex<Vec<Step>>,
}

/// The batch that applies `steps`: the one place this module speaks the
/// store's batch API.
fn to_batch<'s>(store: &'s StateStore, steps: &[Step]) -> RawBatch<'s> {
    steps
        .iter()
        .fold(store.raw().batch(), |batch, step| match step {
            Step::Save {
                id,
                bytes,
                expected: None,
            } => batch.save(id, bytes),
            Step::Save {
                id,
                bytes,
                expected: Some(expected),
            } => batch.save_if(id, bytes, *expected),
            Step::Delete { id } => batch.delete(id),
        })
}

/// What one step of a committed batch did, in the order the steps were
/// added. The caller owns the array; the library only writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct trebuchet_step_result {
    /// For a save step, the sequence number written; 0 for a delete step.
    pub sequence: u64,
    /// For a delete step, whether the actor existed; false for a save step.
    pub deleted: bool,
}

impl From<BatchResult> for trebuchet_step_result {
    fn from(result: BatchResult) -> Self {
        match result {
            BatchResult::Saved(sequence) => trebuchet_step_result {
                sequence,
                deleted: false,
            },
            BatchResult::Deleted(deleted) => trebuchet_step_result {
                sequence: 0,
                deleted,
            },
        }
    }
}

/// # Safety
///
/// `batch` must be NULL or a live handle.
unsafe fn batch_arg<'a>(batch: *const trebuchet_batch) -> Result<&'a BatchSteps, trebuchet_status> {
    // SAFETY: forwarded.
    unsafe { borrow::<BatchSteps, _>(batch, Kind::Batch, "batch") }
}

/// Adds a step after checking the actor id (`TREBUCHET_INVALID_ACTOR_ID`
/// for an empty or overlong one; the batch is then unchanged).
///
/// # Safety
///
/// `batch` NULL or live; `actor_id` NULL or NUL-terminated.
unsafe fn push(
    batch: *mut trebuchet_batch,
    actor_id: *const c_char,
    step: impl FnOnce(String) -> Result<Step, trebuchet_status>,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let batch = unsafe { batch_arg(batch) }?;
        let id = unsafe { str_arg(actor_id, "actor_id") }?;
        check(crate::validate_actor_id(id))?;
        let step = step(id.to_owned())?;
        batch
            .steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(step);
        Ok(TREBUCHET_OK)
    })
}

/// Makes an empty batch on `store`. Release it with `trebuchet_batch_free`.
///
/// # Safety
///
/// `store` NULL or live; `batch_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_batch_new(
    store: *const trebuchet_store,
    batch_out: *mut *mut trebuchet_batch,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let store = unsafe { store_arg(store) }?;
        out_arg(batch_out, "batch_out")?;
        let batch = BatchSteps {
            store: store.clone(),
            steps: Mutex::new(Vec::new()),
        };
        // SAFETY: checked non-NULL.
        unsafe { batch_out.write(into_handle(Kind::Batch, batch)) };
        Ok(TREBUCHET_OK)
    })
}

/// Frees a batch, sending nothing, and sets `*batch` to NULL. NULL and a
/// pointer to NULL are fine.
///
/// # Safety
///
/// `batch` NULL or the address of a batch pointer; no other thread may be
/// using it.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_batch_free(batch: *mut *mut trebuchet_batch) {
    boundary(|| {
        // SAFETY: forwarded.
        drop(unsafe { take::<BatchSteps, _>(batch, Kind::Batch) });
        TREBUCHET_OK
    });
}

/// Adds a step that saves the `len` bytes at `data` (copied; `data` may be
/// NULL when `len` is 0) as the actor's state.
///
/// # Safety
///
/// `batch` NULL or live; `actor_id` NUL-terminated; `data` readable for
/// `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_batch_save(
    batch: *mut trebuchet_batch,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        push(batch, actor_id, |id| {
            Ok(Step::Save {
                id,
                bytes: bytes_arg(data, len)?.to_vec(),
                expected: None,
            })
        })
    }
}

/// Adds a step that saves the bytes only when the actor is at
/// `expected_sequence` (`TREBUCHET_EXPECT_ABSENT`, 0: when it does not
/// exist). When it is not, the whole batch fails at the commit with
/// `TREBUCHET_CONFLICT`.
///
/// # Safety
///
/// As `trebuchet_batch_save`.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_batch_save_if(
    batch: *mut trebuchet_batch,
    actor_id: *const c_char,
    data: *const u8,
    len: usize,
    expected_sequence: u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        push(batch, actor_id, |id| {
            Ok(Step::Save {
                id,
                bytes: bytes_arg(data, len)?.to_vec(),
                expected: Some(expected_from(expected_sequence)),
            })
        })
    }
}

/// Adds a step that deletes the actor (one that does not exist is not an
/// error: its result says so).
///
/// # Safety
///
/// `batch` NULL or live; `actor_id` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_batch_delete(
    batch: *mut trebuchet_batch,
    actor_id: *const c_char,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe { push(batch, actor_id, |id| Ok(Step::Delete { id })) }
}

/// How many steps the batch holds: the length `trebuchet_batch_commit`
/// wants for its results.
///
/// # Safety
///
/// `batch` NULL or live; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_batch_count(
    batch: *const trebuchet_batch,
    count_out: *mut usize,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let batch = unsafe { batch_arg(batch) }?;
        out_arg(count_out, "count_out")?;
        let count = batch.steps.lock().unwrap_or_else(|p| p.into_inner()).len();
        // SAFETY: checked non-NULL.
        unsafe { count_out.write(count) };
        Ok(TREBUCHET_OK)
    })
}

/// Applies every step in one transaction, all or nothing. When
/// `results_out` is not NULL, `results_out[i]` receives what step `i` did
/// (the sequence number a save wrote, whether a delete found the actor),
/// and `count` must be the batch's step count (`trebuchet_batch_count`);
/// otherwise `TREBUCHET_INVALID_ARGUMENT` and nothing is sent. An empty
/// batch commits nothing and succeeds.
///
/// On success the batch is empty again, ready for new steps. On an error
/// nothing is applied, `results_out` is untouched and the batch keeps its
/// steps (commit again after `TREBUCHET_NOT_APPLIED`, or free it):
/// `TREBUCHET_CONFLICT` for the first failed `trebuchet_batch_save_if`,
/// with `trebuchet_last_conflict_actual` giving the number found and the
/// last error naming the actor; `TREBUCHET_INVALID_ARGUMENT` for an actor
/// given twice or an expected number above 2^63 - 1;
/// `TREBUCHET_STATE_TOO_LARGE`; connection and database statuses.
///
/// # Safety
///
/// `batch` NULL or live; `results_out` NULL or writable for `count`
/// elements.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_batch_commit(
    batch: *mut trebuchet_batch,
    count: usize,
    results_out: *mut trebuchet_step_result,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let batch = unsafe { batch_arg(batch) }?;
        let mut steps = batch.steps.lock().unwrap_or_else(|p| p.into_inner());
        if !results_out.is_null() && count != steps.len() {
            return Err(fail(
                TREBUCHET_INVALID_ARGUMENT,
                format!(
                    "count is {count} but the batch holds {} steps: results_out needs one \
                     element per step",
                    steps.len()
                ),
            ));
        }
        let results = check(to_batch(&batch.store, &steps).commit())?;
        steps.clear();
        let results: Vec<trebuchet_step_result> = results.into_iter().map(Into::into).collect();
        // SAFETY: NULL or writable for `count` elements, which is the
        // number of steps and of results.
        unsafe { write_all_opt(results_out, &results) };
        Ok(TREBUCHET_OK)
    })
}
