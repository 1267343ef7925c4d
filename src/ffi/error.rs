//! Status codes, the calling thread's last error message, and the panic
//! boundary every exported function runs inside.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Error;

/// What a call did. Every exported function returns one.
///
/// The numbers are part of the ABI: a number is never reused or renumbered,
/// new statuses only get new numbers. Codes below 100 are outcomes a caller
/// expects (not found, a timeout); from 100 on they are errors, and
/// `trebuchet_last_error()` gives the message.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum trebuchet_status {
    /// Success.
    TREBUCHET_OK = 0,
    /// The actor does not exist (load, load_versioned, sequence).
    TREBUCHET_NOT_FOUND = 1,
    /// No event arrived within the timeout.
    TREBUCHET_TIMEOUT = 2,
    /// The listener has shut down; the subscription will get no more events.
    TREBUCHET_CLOSED = 3,
    /// A required pointer argument was NULL.
    TREBUCHET_NULL_ARGUMENT = 100,
    /// A string argument is not valid UTF-8.
    TREBUCHET_INVALID_UTF8 = 101,
    /// The actor id was rejected (empty, over 255 characters).
    TREBUCHET_INVALID_ACTOR_ID = 102,
    /// A connection string, table or channel name or other setting is invalid.
    TREBUCHET_INVALID_CONFIG = 103,
    /// A handle of another kind was passed (a listener where a store was expected).
    TREBUCHET_WRONG_HANDLE = 104,
    /// The state is larger than the store's maximum.
    TREBUCHET_STATE_TOO_LARGE = 105,
    /// An argument is out of range: an expected sequence number above
    /// 2^63 - 1, a time to live under 1 ms or over 1,000 years, a page
    /// limit of 0 or an index past a page's end, a pool size or timeout
    /// of 0, a results count that is not the batch's step count; write
    /// options that do not fit together; an actor given twice in one bulk
    /// call or batch; or a page token that is damaged or was made for
    /// another prefix.
    TREBUCHET_INVALID_ARGUMENT = 106,
    /// A conditional write found another version than the expected one.
    TREBUCHET_CONFLICT = 200,
    /// A transform kept losing races and gave up.
    TREBUCHET_TOO_MANY_CONFLICTS = 201,
    /// The transform callback returned non-zero; nothing was written.
    TREBUCHET_CALLBACK_FAILED = 202,
    /// Connecting to the server failed.
    TREBUCHET_CONNECT_FAILED = 300,
    /// The connection broke during the call (a write may or may not have happened).
    TREBUCHET_CONNECTION_LOST = 301,
    /// Every pooled connection stayed busy.
    TREBUCHET_POOL_EXHAUSTED = 302,
    /// The TLS configuration could not be built.
    TREBUCHET_TLS = 303,
    /// The connection broke during a write, and the write was found not to
    /// have been applied: making it again is safe.
    TREBUCHET_NOT_APPLIED = 304,
    /// The connection broke during a write, and whether it was applied could
    /// not be found out before the outcome timeout.
    TREBUCHET_OUTCOME_UNKNOWN = 305,
    /// The table or its companion objects are missing or wrong; run migrate.
    TREBUCHET_SCHEMA_MISSING = 400,
    /// A statement exceeded the configured statement timeout.
    TREBUCHET_STATEMENT_TIMEOUT = 401,
    /// Any other error from PostgreSQL or the driver.
    TREBUCHET_DATABASE = 402,
    /// A panic inside the library was caught; the message says where.
    TREBUCHET_PANIC = 900,
    /// An error without a more precise status.
    TREBUCHET_OTHER = 999,
}

use trebuchet_status::*;

impl trebuchet_status {
    /// Every status, for [`trebuchet_status::from_code`].
    const ALL: [trebuchet_status; 25] = [
        TREBUCHET_OK,
        TREBUCHET_NOT_FOUND,
        TREBUCHET_TIMEOUT,
        TREBUCHET_CLOSED,
        TREBUCHET_NULL_ARGUMENT,
        TREBUCHET_INVALID_UTF8,
        TREBUCHET_INVALID_ACTOR_ID,
        TREBUCHET_INVALID_CONFIG,
        TREBUCHET_WRONG_HANDLE,
        TREBUCHET_STATE_TOO_LARGE,
        TREBUCHET_INVALID_ARGUMENT,
        TREBUCHET_CONFLICT,
        TREBUCHET_TOO_MANY_CONFLICTS,
        TREBUCHET_CALLBACK_FAILED,
        TREBUCHET_CONNECT_FAILED,
        TREBUCHET_CONNECTION_LOST,
        TREBUCHET_POOL_EXHAUSTED,
        TREBUCHET_TLS,
        TREBUCHET_NOT_APPLIED,
        TREBUCHET_OUTCOME_UNKNOWN,
        TREBUCHET_SCHEMA_MISSING,
        TREBUCHET_STATEMENT_TIMEOUT,
        TREBUCHET_DATABASE,
        TREBUCHET_PANIC,
        TREBUCHET_OTHER,
    ];

    /// The status numbered `code`, or `None` for a number this library
    /// does not know. C may pass any `int` where the header says
    /// `trebuchet_status`, so a number from C is read as an integer and
    /// only then turned into the enum: an enum holding a number it has no
    /// variant for is undefined behaviour in Rust.
    fn from_code(code: c_int) -> Option<trebuchet_status> {
        Self::ALL
            .into_iter()
            .find(|status| *status as c_int == code)
    }

    /// The status's constant name.
    fn name(self) -> &'static CStr {
        match self {
            TREBUCHET_OK => c"TREBUCHET_OK",
            TREBUCHET_NOT_FOUND => c"TREBUCHET_NOT_FOUND",
            TREBUCHET_TIMEOUT => c"TREBUCHET_TIMEOUT",
            TREBUCHET_CLOSED => c"TREBUCHET_CLOSED",
            TREBUCHET_NULL_ARGUMENT => c"TREBUCHET_NULL_ARGUMENT",
            TREBUCHET_INVALID_UTF8 => c"TREBUCHET_INVALID_UTF8",
            TREBUCHET_INVALID_ACTOR_ID => c"TREBUCHET_INVALID_ACTOR_ID",
            TREBUCHET_INVALID_CONFIG => c"TREBUCHET_INVALID_CONFIG",
            TREBUCHET_WRONG_HANDLE => c"TREBUCHET_WRONG_HANDLE",
            TREBUCHET_STATE_TOO_LARGE => c"TREBUCHET_STATE_TOO_LARGE",
            TREBUCHET_INVALID_ARGUMENT => c"TREBUCHET_INVALID_ARGUMENT",
            TREBUCHET_CONFLICT => c"TREBUCHET_CONFLICT",
            TREBUCHET_TOO_MANY_CONFLICTS => c"TREBUCHET_TOO_MANY_CONFLICTS",
            TREBUCHET_CALLBACK_FAILED => c"TREBUCHET_CALLBACK_FAILED",
            TREBUCHET_CONNECT_FAILED => c"TREBUCHET_CONNECT_FAILED",
            TREBUCHET_CONNECTION_LOST => c"TREBUCHET_CONNECTION_LOST",
            TREBUCHET_POOL_EXHAUSTED => c"TREBUCHET_POOL_EXHAUSTED",
            TREBUCHET_TLS => c"TREBUCHET_TLS",
            TREBUCHET_NOT_APPLIED => c"TREBUCHET_NOT_APPLIED",
            TREBUCHET_OUTCOME_UNKNOWN => c"TREBUCHET_OUTCOME_UNKNOWN",
            TREBUCHET_SCHEMA_MISSING => c"TREBUCHET_SCHEMA_MISSING",
            TREBUCHET_STATEMENT_TIMEOUT => c"TREBUCHET_STATEMENT_TIMEOUT",
            TREBUCHET_DATABASE => c"TREBUCHET_DATABASE",
            TREBUCHET_PANIC => c"TREBUCHET_PANIC",
            TREBUCHET_OTHER => c"TREBUCHET_OTHER",
        }
    }
}

/// What the calling thread's last call left to read: its message, and for
/// a conflict the sequence number it found.
#[derive(Default)]
struct LastError {
    message: CString,
    /// `Some` when the last call failed with `TREBUCHET_CONFLICT`: the
    /// sequence number found, 0 when the actor did not exist.
    conflict_actual: Option<u64>,
}

thread_local! {
    static LAST_ERROR: RefCell<LastError> = RefCell::new(LastError::default());
}

/// Records `message` as this thread's last error, with no conflict.
pub(crate) fn set_last_error(message: impl Into<String>) {
    let mut message = message.into();
    message.retain(|c| c != '\0');
    let message = CString::new(message).unwrap_or_default();
    LAST_ERROR.with(|last| {
        *last.borrow_mut() = LastError {
            message,
            conflict_actual: None,
        }
    });
}

/// Records `message` and returns `status`.
pub(crate) fn fail(status: trebuchet_status, message: impl Into<String>) -> trebuchet_status {
    set_last_error(message);
    status
}

/// The status of a library error, without recording anything: for the
/// per-item results of the bulk calls, and for [`error_status`].
pub(crate) fn status_of(error: &Error) -> trebuchet_status {
    match error {
        Error::InvalidActorId(_) => TREBUCHET_INVALID_ACTOR_ID,
        Error::InvalidConnectionString { .. }
        | Error::InvalidConfig { .. }
        | Error::InvalidIdentifier { .. } => TREBUCHET_INVALID_CONFIG,
        Error::StateTooLarge { .. } => TREBUCHET_STATE_TOO_LARGE,
        Error::InvalidArgument { .. }
        | Error::SequenceOutOfRange(_)
        | Error::DuplicateActorId { .. } => TREBUCHET_INVALID_ARGUMENT,
        Error::Conflict { .. } | Error::StaleSequence { .. } => TREBUCHET_CONFLICT,
        Error::TooManyConflicts { .. } => TREBUCHET_TOO_MANY_CONFLICTS,
        Error::Connect { .. } => TREBUCHET_CONNECT_FAILED,
        Error::ConnectionLost(_) => TREBUCHET_CONNECTION_LOST,
        Error::NotApplied { .. } => TREBUCHET_NOT_APPLIED,
        Error::OutcomeUnknown { .. } => TREBUCHET_OUTCOME_UNKNOWN,
        Error::PoolExhausted { .. } => TREBUCHET_POOL_EXHAUSTED,
        Error::Tls(_) => TREBUCHET_TLS,
        Error::SchemaMissing { .. } => TREBUCHET_SCHEMA_MISSING,
        Error::StatementTimeout => TREBUCHET_STATEMENT_TIMEOUT,
        Error::Database(_)
        | Error::InsufficientPrivilege { .. }
        | Error::NotificationQueueFull(_) => TREBUCHET_DATABASE,
        _ => TREBUCHET_OTHER,
    }
}

/// For a conflict, the sequence number the write found (0 when the actor
/// did not exist); `None` for any other error.
pub(crate) fn conflict_actual_of(error: &Error) -> Option<u64> {
    match error {
        Error::Conflict { actual, .. } => Some(actual.unwrap_or(0)),
        Error::StaleSequence { current, .. } => Some(current.unwrap_or(0)),
        _ => None,
    }
}

/// Records the error's message (which never holds a password) and, for a
/// conflict, the number found; maps the error to a status.
pub(crate) fn error_status(error: &Error) -> trebuchet_status {
    let status = status_of(error);
    // C has no error chain: the message carries the cause these two give
    // only as their source.
    let message = match (error, std::error::Error::source(error)) {
        (Error::Decode { .. } | Error::ThreadStart { .. }, Some(cause)) => {
            format!("{error}: {cause}")
        }
        _ => error.to_string(),
    };
    fail(status, message);
    let conflict_actual = conflict_actual_of(error);
    LAST_ERROR.with(|last| last.borrow_mut().conflict_actual = conflict_actual);
    status
}

/// Runs `body`, turning a panic into [`TREBUCHET_PANIC`] so that no unwind
/// crosses into C. Clears the thread's last error first.
pub(crate) fn boundary(body: impl FnOnce() -> trebuchet_status) -> trebuchet_status {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(status) => status,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".to_owned());
            fail(
                TREBUCHET_PANIC,
                format!("internal error (panic: {what}); please report it"),
            )
        }
    }
}

/// The message of the last failed call on the calling thread, or `""`
/// when the last call succeeded. Never contains a password.
///
/// The pointer stays valid until the next `trebuchet_` call on this thread;
/// copy the text to keep it. Never NULL.
#[no_mangle]
pub extern "C" fn trebuchet_last_error() -> *const c_char {
    // No panic can happen here, but keep the rule: nothing unwinds into C.
    catch_unwind(|| LAST_ERROR.with(|last| last.borrow().message.as_ptr()))
        .unwrap_or(c"panic while reading the last error".as_ptr())
}

/// Whether the calling thread's last call failed with `TREBUCHET_CONFLICT`.
/// If it did, `*actual_out` (when `actual_out` is not NULL) receives the
/// sequence number the write found: the actor's current version, or 0
/// (`TREBUCHET_EXPECT_ABSENT`) when the actor did not exist. Either way it
/// is what a retry of `trebuchet_store_save_if` passes as
/// `expected_sequence` after reading the state again. Otherwise returns
/// false and leaves `*actual_out` untouched.
///
/// Like `trebuchet_last_error`, it reads what the last other `trebuchet_`
/// call on this thread left (this one, `trebuchet_last_error` and
/// `trebuchet_status_name` change nothing), so read it right after the
/// call that failed.
///
/// # Safety
///
/// `actual_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_last_conflict_actual(actual_out: *mut u64) -> bool {
    let actual = catch_unwind(|| LAST_ERROR.with(|last| last.borrow().conflict_actual));
    match actual {
        Ok(Some(actual)) => {
            if !actual_out.is_null() {
                // SAFETY: non-NULL and writable per the caller.
                unsafe { actual_out.write(actual) };
            }
            true
        }
        _ => false,
    }
}

/// A constant name for a status (`"TREBUCHET_NOT_FOUND"`), for logs. Takes
/// any `int`: a number this library does not know (from a newer header, or
/// a caller in another language) gets `"TREBUCHET_UNKNOWN_STATUS"`. Never
/// NULL; the string is static.
#[no_mangle]
pub extern "C" fn trebuchet_status_name(status: c_int) -> *const c_char {
    trebuchet_status::from_code(status)
        .map_or(c"TREBUCHET_UNKNOWN_STATUS", trebuchet_status::name)
        .as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: never NULL, valid until the next call on this thread.
        unsafe { CStr::from_ptr(trebuchet_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_with_a_message() {
        let status = boundary(|| panic!("boom in a test"));
        assert_eq!(status, TREBUCHET_PANIC);
        assert!(last().contains("boom in a test"), "{}", last());
        assert_eq!(boundary(|| TREBUCHET_OK), TREBUCHET_OK);
        assert_eq!(last(), "");
    }

    fn name_of(code: c_int) -> &'static str {
        // SAFETY: static strings.
        unsafe { CStr::from_ptr(trebuchet_status_name(code)) }
            .to_str()
            .unwrap()
    }

    #[test]
    fn every_status_has_its_name() {
        assert_eq!(
            name_of(TREBUCHET_WRONG_HANDLE as c_int),
            "TREBUCHET_WRONG_HANDLE"
        );
        assert_eq!(TREBUCHET_CONFLICT as u32, 200);
        assert_eq!(TREBUCHET_PANIC as u32, 900);
        for status in trebuchet_status::ALL {
            assert_eq!(name_of(status as c_int), format!("{status:?}"));
        }
        // ALL lists every status the header declares.
        let header = include_str!("../../ffi/include/trebuchet_postgres.h");
        let statuses = header
            .split("typedef enum trebuchet_status {")
            .nth(1)
            .and_then(|rest| rest.split("} trebuchet_status;").next())
            .expect("the header declares trebuchet_status");
        let declared = statuses
            .lines()
            .filter(|line| line.trim_start().starts_with("TREBUCHET_"))
            .count();
        assert_eq!(declared, trebuchet_status::ALL.len());
    }

    #[test]
    fn an_unknown_number_has_a_name_too() {
        for code in [4, 99, 107, 1000, -1, c_int::MAX, c_int::MIN] {
            assert_eq!(name_of(code), "TREBUCHET_UNKNOWN_STATUS", "{code}");
        }
    }

    #[test]
    fn a_conflict_is_recorded_until_the_next_call() {
        let status = boundary(|| {
            error_status(&Error::Conflict {
                actor_id: "a".into(),
                expected: crate::Expected::Absent,
                actual: Some(7),
            })
        });
        assert_eq!(status, TREBUCHET_CONFLICT);
        let mut actual = 0;
        // SAFETY: a writable u64.
        assert!(unsafe { trebuchet_last_conflict_actual(&mut actual) });
        assert_eq!(actual, 7);
        assert_eq!(boundary(|| fail(TREBUCHET_OTHER, "later")), TREBUCHET_OTHER);
        // SAFETY: NULL is allowed.
        assert!(!unsafe { trebuchet_last_conflict_actual(std::ptr::null_mut()) });
    }

    #[test]
    fn a_decode_error_tells_c_its_cause() {
        let status = error_status(&Error::Decode {
            actor_id: "a".into(),
            source: "invalid type: string, expected u32".into(),
        });
        assert_eq!(status, TREBUCHET_OTHER);
        let message = last();
        assert!(message.contains("actor \"a\""), "{message}");
        assert!(
            message.ends_with(": invalid type: string, expected u32"),
            "{message}"
        );
    }

    #[test]
    fn messages_with_nul_bytes_are_kept_without_them() {
        set_last_error("a\0b");
        assert_eq!(last(), "ab");
    }
}
