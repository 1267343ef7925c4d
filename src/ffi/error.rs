//! Status codes, the calling thread's last error message, and the panic
//! boundary every exported function runs inside.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
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
    /// limit of 0 or an index past a page's end; or a page token that is
    /// damaged or was made for another prefix.
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

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error.
pub(crate) fn set_last_error(message: impl Into<String>) {
    let mut message = message.into();
    message.retain(|c| c != '\0');
    let message = CString::new(message).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

/// Records `message` and returns `status`.
pub(crate) fn fail(status: trebuchet_status, message: impl Into<String>) -> trebuchet_status {
    set_last_error(message);
    status
}

/// Records the error's message (which never holds a password) and maps it
/// to a status.
pub(crate) fn error_status(error: &Error) -> trebuchet_status {
    let status = match error {
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
    };
    fail(status, error.to_string())
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
    catch_unwind(|| LAST_ERROR.with(|last| last.borrow().as_ptr()))
        .unwrap_or(c"panic while reading the last error".as_ptr())
}

/// A constant name for a status (`"TREBUCHET_NOT_FOUND"`), for logs.
/// Never NULL; the string is static.
#[no_mangle]
pub extern "C" fn trebuchet_status_name(status: trebuchet_status) -> *const c_char {
    let name: &'static std::ffi::CStr = match status {
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
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

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

    #[test]
    fn every_status_has_its_name() {
        // SAFETY: static strings.
        let name = unsafe { CStr::from_ptr(trebuchet_status_name(TREBUCHET_WRONG_HANDLE)) };
        assert_eq!(name.to_str().unwrap(), "TREBUCHET_WRONG_HANDLE");
        assert_eq!(TREBUCHET_CONFLICT as u32, 200);
        assert_eq!(TREBUCHET_PANIC as u32, 900);
    }

    #[test]
    fn messages_with_nul_bytes_are_kept_without_them() {
        set_last_error("a\0b");
        assert_eq!(last(), "ab");
    }
}
