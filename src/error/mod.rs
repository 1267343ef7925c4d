//! The error type of this crate.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::expected::Expected;

mod display;
mod kind;
pub(crate) mod server;

pub use kind::ErrorKind;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an actor id was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidActorId {
    /// The id is the empty string.
    Empty,
    /// The id has more than 255 characters (the column is `VARCHAR(255)`).
    TooLong {
        /// Its length in characters.
        chars: usize,
    },
    /// The id contains a NUL character, which PostgreSQL text cannot hold.
    ContainsNul,
}

impl fmt::Display for InvalidActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidActorId::Empty => f.write_str("actor id is empty"),
            InvalidActorId::TooLong { chars } => {
                write!(
                    f,
                    "actor id has {chars} characters; at most 255 are allowed"
                )
            }
            InvalidActorId::ContainsNul => f.write_str("actor id contains a NUL character"),
        }
    }
}

/// How a connection attempt failed, for the cases that have a known remedy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// Nothing accepted the connection at that address.
    Refused,
    /// The server rejected the user name or password.
    AuthenticationFailed,
    /// The server has no free connection slots (`too many clients already`).
    TooManyClients,
    /// The database named in the configuration does not exist.
    DatabaseMissing,
    /// The server is starting up, shutting down or in recovery.
    NotReady,
    /// The TLS handshake or certificate check failed.
    Tls,
    /// Connecting took longer than the configured `connect_timeout`.
    Timeout,
    /// Anything else; the source error says more.
    Other,
}

/// The error type of every fallible operation in this crate.
///
/// Messages are short, lower case, and end with what to do about the problem
/// where that is known. No variant ever holds or prints a password.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A connection string could not be parsed; nothing was contacted.
    InvalidConnectionString {
        /// What is wrong with it, naming a key or a byte position: never any
        /// of the string itself, which may hold a password.
        reason: String,
    },
    /// A configuration value is out of range or inconsistent.
    InvalidConfig {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A configuration file could not be read, or a key in it is unknown or
    /// has a wrong value. Never holds a password or a connection string.
    ConfigFile {
        /// The file's path as given, or `"configuration"` for text that
        /// came from no file.
        origin: String,
        /// The 1-based line of the offending key or value, when the problem
        /// is in one place.
        line: Option<usize>,
        /// The offending key, dotted from the top level (`state.port`), when
        /// the problem is one key.
        key: Option<String>,
        /// What is wrong and what to do about it.
        reason: String,
    },
    /// An actor id was rejected before reaching the database.
    InvalidActorId(InvalidActorId),
    /// An argument of a call is out of range or malformed (a time to live,
    /// a page token, a batch size); nothing was sent.
    InvalidArgument {
        /// What was given: `"ttl"`, `"page token"`, ...
        what: &'static str,
        /// Why it was rejected, and what is accepted.
        reason: String,
    },
    /// A table, schema or channel name is not a valid PostgreSQL identifier.
    InvalidIdentifier {
        /// What was being named: `"table"`, `"schema"` or `"channel"`.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An encoded state is larger than the store's configured maximum.
    StateTooLarge {
        /// The encoded size in bytes.
        size: usize,
        /// The configured maximum in bytes.
        max: usize,
    },
    /// A sequence number does not fit PostgreSQL's `BIGINT`.
    SequenceOutOfRange(u64),
    /// A bulk write ([`StateStore::save_many`](crate::StateStore::save_many),
    /// [`save_many_if`](crate::StateStore::save_many_if),
    /// [`Raw::restore_many`](crate::Raw::restore_many)) names
    /// the same actor more than once. A [`Batch`](crate::Batch) may: its
    /// steps run in order.
    DuplicateActorId {
        /// The repeated actor.
        actor_id: String,
    },
    /// A value could not be encoded by the store's codec.
    Encode(Box<dyn StdError + Send + Sync>),
    /// Stored bytes could not be decoded into the requested type.
    Decode {
        /// The actor whose state failed to decode.
        actor_id: String,
        /// The codec's error.
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A conditional write found something other than what it expected.
    Conflict {
        /// The actor written to.
        actor_id: String,
        /// What the write expected.
        expected: Expected,
        /// The sequence number found, or `None` when the actor did not exist.
        actual: Option<u64>,
    },
    /// An explicit sequence number was not above the stored one
    /// ([`WriteOptions::sequence`](crate::WriteOptions::sequence)).
    StaleSequence {
        /// The actor written to.
        actor_id: String,
        /// The sequence number given.
        sequence: u64,
        /// The stored sequence number, or `None` when the actor does not
        /// exist (then a deleted actor's last number blocked the write).
        current: Option<u64>,
    },
    /// [`StateStore::transform`](crate::StateStore::transform) kept losing races
    /// and gave up after its retry budget.
    TooManyConflicts {
        /// The contended actor.
        actor_id: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// Connecting to the server failed.
    Connect {
        /// The known cause, which decides the hint in the message.
        failure: ConnectFailure,
        /// Where the connection went (`host:port`, never credentials).
        target: String,
        /// The user name connected as.
        user: String,
        /// The driver's error.
        source: Option<postgres::Error>,
    },
    /// Every connection of the pool was in use and none came free in time.
    PoolExhausted {
        /// The pool's `max_size`.
        max_size: u32,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The table (or its companion objects) does not exist.
    SchemaMissing {
        /// The quoted, qualified table name.
        table: String,
    },
    /// The role lacks a privilege the call needs (SQLSTATE 42501): it may
    /// not create objects (`migrate`), or lacks a grant on the table or its
    /// tombstone table. The message lists the grants the store needs.
    InsufficientPrivilege {
        /// Whether `migrate` was refused, rather than an operation on rows.
        migrating: bool,
        /// The quoted, qualified table.
        table: String,
        /// The quoted, qualified tombstone table.
        tombstones: String,
        /// The server's error, naming what was refused.
        source: postgres::Error,
    },
    /// A statement ran longer than the configured `statement_timeout`.
    StatementTimeout,
    /// The server's notification queue is full, so the write's `NOTIFY`
    /// (and so the write) failed at commit; nothing was applied.
    ///
    /// The queue (8 GB on PostgreSQL 15) fills when a session that
    /// `LISTEN`s stops consuming notifications, usually because it sits in
    /// a long open transaction. Every notifying write on the server fails
    /// until that session ends its transaction or disconnects.
    /// [`StateStore::stats`](crate::StateStore::stats) shows how full the
    /// queue is (`notification_queue_usage`) and which sessions listen.
    NotificationQueueFull(postgres::Error),
    /// The connection broke while a read was in flight (and again on the
    /// read's second try), or a write's outcome was settled another way.
    ///
    /// Writes whose connection breaks report [`Error::NotApplied`] or
    /// [`Error::OutcomeUnknown`] instead.
    ///
    /// Shared (`Arc`) because one lost connection can fail every writer of
    /// a group commit.
    ConnectionLost(std::sync::Arc<postgres::Error>),
    /// The connection broke while a write was in flight, and the store then
    /// found out, on a new connection, that the write was **not** applied:
    /// the database is as if the call had never been made, so running it
    /// again is safe.
    NotApplied {
        /// The first actor the write was for.
        actor_id: String,
        /// How the connection broke.
        source: std::sync::Arc<postgres::Error>,
    },
    /// The connection broke while a write was in flight, and the store could
    /// not find out whether the write was applied, or, for a write of
    /// several actors that was, at which sequence number each one landed:
    /// the server did not come back within the store's `outcome_timeout`, or
    /// the actor was written more than 64 times by others before the store
    /// could look (see [`StateStore`](crate::StateStore)'s section on lost
    /// connections). The store never guesses a number.
    OutcomeUnknown {
        /// The first actor the write was for.
        actor_id: String,
        /// How the connection broke.
        source: std::sync::Arc<postgres::Error>,
    },
    /// The TLS configuration could not be built (for example an unreadable
    /// root certificate).
    Tls(Box<dyn StdError + Send + Sync>),
    /// A thread the library needs could not be started (the process or the
    /// system is at its limit of threads or memory).
    ThreadStart {
        /// Which thread: `"the listener thread"`, `"a connect thread"`, ...
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Any other error reported by PostgreSQL or the driver.
    Database(postgres::Error),
}

impl Error {
    /// True for [`Error::Conflict`] only: a conditional write found another
    /// version than it expected (see `expected` and `actual` there).
    /// [`Error::StaleSequence`] and [`Error::TooManyConflicts`] have kinds
    /// of their own.
    ///
    /// ```
    /// use trebuchet_postgres::{Error, Expected};
    ///
    /// // What `save_if` returns when another writer got there first.
    /// let err = Error::Conflict {
    ///     actor_id: "room-1".into(),
    ///     expected: Expected::Sequence(3),
    ///     actual: Some(5),
    /// };
    /// assert!(err.is_conflict());
    /// assert_eq!(
    ///     err.to_string(),
    ///     r#"conflict on actor "room-1": expected sequence 3, found sequence 5"#
    /// );
    /// // A spent retry budget is not.
    /// let err = Error::TooManyConflicts { actor_id: "room-1".into(), attempts: 100 };
    /// assert!(!err.is_conflict());
    /// ```
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// True when the input was rejected before anything reached the database
    /// ([`ErrorKind::InvalidInput`]).
    ///
    /// ```
    /// let err = trebuchet_postgres::validate_actor_id("").unwrap_err();
    /// assert!(err.is_invalid_input());
    /// assert_eq!(err.to_string(), "invalid actor id: actor id is empty");
    /// ```
    pub fn is_invalid_input(&self) -> bool {
        self.kind() == ErrorKind::InvalidInput
    }

    /// True for errors about reaching the server: connect failures, a broken
    /// connection (including [`Error::NotApplied`] and
    /// [`Error::OutcomeUnknown`]) and pool exhaustion. Retrying later may
    /// succeed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use trebuchet_postgres::Error;
    ///
    /// let err = Error::PoolExhausted { max_size: 16, waited: Duration::from_secs(30) };
    /// assert!(err.is_connection()); // worth a retry later
    /// assert!(!Error::StatementTimeout.is_connection());
    /// ```
    pub fn is_connection(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Connection | ErrorKind::NotApplied | ErrorKind::OutcomeUnknown
        )
    }

    /// True for [`Error::NotApplied`]: a write whose connection broke was
    /// found not to have been applied.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = match store.save("room-1", &1u32) {
    ///     // As if the call had never been made: make it again.
    ///     Err(e) if e.is_not_applied() => store.save("room-1", &1u32)?,
    ///     other => other?,
    /// };
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn is_not_applied(&self) -> bool {
        matches!(self, Error::NotApplied { .. })
    }

    /// True for [`Error::OutcomeUnknown`]: whether the write was applied
    /// could not be found out.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// match store.save("room-1", &1u32) {
    ///     Ok(seq) => println!("saved at {seq}"),
    ///     // Maybe written, maybe not: read the actor before deciding.
    ///     Err(e) if e.is_outcome_unknown() => {
    ///         println!("room-1 is now {:?}", store.load::<u32>("room-1")?);
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown { .. })
    }

    /// The SQLSTATE code when the server reported the error.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::postgres::error::SqlState;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// match store.save("room-1", &1u32) {
    ///     Err(e) if e.sql_state() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) => {
    ///         eprintln!("connected to a standby: point the store at the primary");
    ///     }
    ///     other => {
    ///         other?;
    ///     }
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn sql_state(&self) -> Option<&postgres::error::SqlState> {
        match self {
            Error::Connect {
                source: Some(e), ..
            }
            | Error::Database(e)
            | Error::InsufficientPrivilege { source: e, .. }
            | Error::NotificationQueueFull(e) => e.code(),
            Error::ConnectionLost(e)
            | Error::NotApplied { source: e, .. }
            | Error::OutcomeUnknown { source: e, .. } => e.code(),
            _ => None,
        }
    }

    pub(crate) fn invalid_identifier(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidIdentifier {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_connection_string(reason: impl Into<String>) -> Self {
        Error::InvalidConnectionString {
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_argument(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn thread_start(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Error::ThreadStart { what, source }
    }

    pub(crate) fn invalid_config(reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            reason: reason.into(),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Decode { source, .. } => Some(source.as_ref()),
            Error::Connect {
                source: Some(e), ..
            } => Some(e),
            Error::ConnectionLost(e)
            | Error::NotApplied { source: e, .. }
            | Error::OutcomeUnknown { source: e, .. } => Some(e.as_ref()),
            Error::Tls(e) => Some(e.as_ref()),
            Error::ThreadStart { source, .. } => Some(source),
            Error::NotificationQueueFull(e) => Some(e),
            Error::Database(e) if e.as_db_error().is_none() => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
