//! What a server's error means: the one place that reads SQLSTATE codes
//! (and, where a code is not enough, the driver's error chain), so that the
//! pool, the listener, the store and the schema classify alike.

use std::error::Error as StdError;

use postgres::error::SqlState;

use super::{ConnectFailure, Error};

/// Works out why a connection attempt failed.
pub(crate) fn classify_connect(e: &postgres::Error) -> ConnectFailure {
    if let Some(code) = e.code() {
        return match code {
            c if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
            {
                ConnectFailure::AuthenticationFailed
            }
            c if *c == SqlState::TOO_MANY_CONNECTIONS => ConnectFailure::TooManyClients,
            c if *c == SqlState::INVALID_CATALOG_NAME => ConnectFailure::DatabaseMissing,
            c if *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN =>
            {
                ConnectFailure::NotReady
            }
            _ => ConnectFailure::Other,
        };
    }
    let mut source: Option<&(dyn StdError + 'static)> = Some(e);
    let mut text = String::new();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return ConnectFailure::Refused,
                std::io::ErrorKind::TimedOut => return ConnectFailure::Timeout,
                _ => {}
            }
        }
        if err.is::<native_tls::Error>() {
            return ConnectFailure::Tls;
        }
        text.push_str(&err.to_string());
        text.push(' ');
        source = err.source();
    }
    if text.contains("password missing") || text.contains("authentication") {
        ConnectFailure::AuthenticationFailed
    } else if text.contains("TLS") {
        ConnectFailure::Tls
    } else if text.contains("timeout") {
        ConnectFailure::Timeout
    } else {
        ConnectFailure::Other
    }
}

/// Whether `e` says the server ended the session or is going away: a
/// shutdown, a server not accepting connections yet, or a connection
/// exception (class 08).
pub(crate) fn is_session_ended(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
            || c.code().starts_with("08")
    })
}

/// Whether `e` came from the network (an I/O error in its chain) rather
/// than from the server.
pub(crate) fn is_io(e: &postgres::Error) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = source {
        if err.is::<std::io::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A statement cancelled by `statement_timeout` (or a cancel request).
pub(crate) fn is_cancelled(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
}

/// A prepared statement the connection relies on is gone, or one of its
/// names is taken: what a transaction-mode pooler causes when it hands a
/// session's calls to another server connection.
pub(crate) fn is_lost_statement(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::INVALID_SQL_STATEMENT_NAME || *c == SqlState::DUPLICATE_PSTATEMENT
    })
}

/// PostgreSQL's "too many notifications in the NOTIFY queue", raised at
/// commit. The code alone (program limit exceeded) also covers other
/// limits, such as an over-long row; the message tells them apart.
pub(crate) fn is_notify_queue_full(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::PROGRAM_LIMIT_EXCEEDED)
        && e.as_db_error()
            .is_some_and(|db| db.message().contains("NOTIFY queue"))
}

/// A table the statement names does not exist.
pub(crate) fn is_undefined_table(e: &Error) -> bool {
    e.sql_state() == Some(&SqlState::UNDEFINED_TABLE)
}

/// The role may not do what the statement asked.
pub(crate) fn is_insufficient_privilege(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

/// The server rolled a transaction back for a reason that running it again
/// can cure (deadlock, serialization failure).
pub(crate) fn is_transient(e: &Error) -> bool {
    e.sql_state().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// The server refused the password itself (not the method or the role).
pub(crate) fn is_wrong_password(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::INVALID_PASSWORD)
}
