//! What kind of error an [`Error`] is: one small value to act on.

use super::Error;

/// What kind of error an [`Error`] is, from [`Error::kind`]: a small `Copy`
/// value to decide what to do (retry, fix the input, report), as
/// [`std::io::ErrorKind`] is for I/O errors. New kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input was rejected before anything reached the database: fix it.
    InvalidInput,
    /// Stored bytes are not the requested type (another codec or type).
    Decode,
    /// A conditional write found another version ([`Error::Conflict`]).
    Conflict,
    /// An explicit sequence number was not above the stored one
    /// ([`Error::StaleSequence`]).
    StaleSequence,
    /// A retried operation kept losing races ([`Error::TooManyConflicts`]);
    /// nothing was written.
    TooManyConflicts,
    /// The server could not be reached, the pool had no connection free,
    /// or a read's connection broke: retrying later may succeed.
    Connection,
    /// A write's connection broke and the write was found not applied:
    /// safe to repeat.
    NotApplied,
    /// A write's connection broke and whether it was applied is unknown.
    OutcomeUnknown,
    /// The table or its companion objects do not exist: migrate.
    SchemaMissing,
    /// The role lacks a privilege the call needs.
    PermissionDenied,
    /// A statement ran past the configured `statement_timeout`.
    Timeout,
    /// The server's notification queue is full; nothing was applied.
    NotificationQueueFull,
    /// The TLS configuration could not be built.
    Tls,
    /// The process could not get what it needs to run (a thread).
    Resources,
    /// Any other error reported by PostgreSQL or the driver.
    Database,
}

impl Error {
    /// What kind of error this is, to act on without matching every
    /// variant: see [`ErrorKind`].
    ///
    /// ```
    /// use trebuchet_postgres::{Error, ErrorKind};
    ///
    /// fn advice(e: &Error) -> &'static str {
    ///     match e.kind() {
    ///         ErrorKind::InvalidInput => "fix the input",
    ///         ErrorKind::Connection | ErrorKind::NotApplied => "try again later",
    ///         ErrorKind::SchemaMissing => "run migrate",
    ///         _ => "report it",
    ///     }
    /// }
    /// let err = trebuchet_postgres::validate_actor_id("").unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::InvalidInput);
    /// assert_eq!(advice(&err), "fix the input");
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidConnectionString { .. }
            | Error::InvalidConfig { .. }
            | Error::ConfigFile { .. }
            | Error::InvalidActorId(_)
            | Error::InvalidArgument { .. }
            | Error::InvalidIdentifier { .. }
            | Error::StateTooLarge { .. }
            | Error::SequenceOutOfRange(_)
            | Error::DuplicateActorId { .. }
            | Error::Encode(_) => ErrorKind::InvalidInput,
            Error::Decode { .. } => ErrorKind::Decode,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::StaleSequence { .. } => ErrorKind::StaleSequence,
            Error::TooManyConflicts { .. } => ErrorKind::TooManyConflicts,
            Error::Connect { .. } | Error::PoolExhausted { .. } | Error::ConnectionLost(_) => {
                ErrorKind::Connection
            }
            Error::NotApplied { .. } => ErrorKind::NotApplied,
            Error::OutcomeUnknown { .. } => ErrorKind::OutcomeUnknown,
            Error::SchemaMissing { .. } => ErrorKind::SchemaMissing,
            Error::InsufficientPrivilege { .. } => ErrorKind::PermissionDenied,
            Error::StatementTimeout => ErrorKind::Timeout,
            Error::NotificationQueueFull(_) => ErrorKind::NotificationQueueFull,
            Error::Tls(_) => ErrorKind::Tls,
            Error::ThreadStart { .. } => ErrorKind::Resources,
            Error::Database(_) => ErrorKind::Database,
        }
    }
}
