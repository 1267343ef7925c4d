//! Exit codes, and library errors turned into one-line messages with the
//! command line's own hints.

use std::fmt;

use trebuchet_postgres::postgres::error::SqlState;
use trebuchet_postgres::{ConnectFailure, Error, Expected};

use crate::output::escape;

/// Success.
pub const OK: u8 = 0;
/// Anything else that went wrong.
pub const ERROR: u8 = 1;
/// Bad arguments, or input rejected before anything was sent.
pub const USAGE: u8 = 2;
/// A conditional write or an import found another version.
pub const CONFLICT: u8 = 3;
/// The actor does not exist.
pub const NOT_FOUND: u8 = 4;

/// Why a command failed: its exit code and a message for standard error.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(USAGE, message)
    }

    pub fn error(message: impl Into<String>) -> Self {
        Failure::new(ERROR, message)
    }

    pub fn not_found(id: &str) -> Self {
        Failure::new(
            NOT_FOUND,
            format!("actor {id:?} not found: `trebuchet-postgres ls` lists the actors"),
        )
    }

    /// Adds a sentence to the message.
    pub fn append(&mut self, more: &str) {
        self.message = format!("{} {more}", self.message);
    }

    /// A library error, with where the connection settings came from for
    /// connection errors.
    pub fn from_store(error: Error, settings: &str) -> Self {
        let connecting = matches!(error, Error::Connect { .. } | Error::Tls(_));
        let mut failure = Failure::from(error);
        if connecting {
            failure.message = format!("{} (settings from {settings})", failure.message);
        }
        failure
    }
}

impl fmt::Display for Failure {
    /// One line, whatever the message holds: its lines joined with `; `,
    /// any other control character escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = self
            .message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(escape);
        if let Some(first) = lines.next() {
            f.write_str(&first)?;
        }
        for line in lines {
            write!(f, "; {line}")?;
        }
        Ok(())
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::Conflict { .. }
            | Error::StaleSequence { .. }
            | Error::TooManyConflicts { .. } => CONFLICT,
            Error::ConfigFile { .. } | Error::InvalidConfig { .. } => ERROR,
            e if e.is_invalid_input() => USAGE,
            _ => ERROR,
        };
        let message = match &error {
            Error::Conflict {
                expected, actual, ..
            } => {
                let hint = match (expected, actual) {
                    (Expected::Absent, Some(n)) => {
                        format!("it exists at sequence {n}; --if-sequence {n} replaces it")
                    }
                    (_, Some(n)) => format!("read it again and retry with --if-sequence {n}"),
                    (Expected::Sequence(_), None) => {
                        "it does not exist: write it with --if-absent".to_owned()
                    }
                    (Expected::Absent, None) => "retry".to_owned(),
                };
                format!("{error}: {hint}")
            }
            Error::SchemaMissing { table } => format!(
                "table {table} or its trigger objects do not exist: run `trebuchet-postgres \
                 migrate` (or apply sql/schema.sql), and check --table and --config"
            ),
            Error::Decode { .. } => format!(
                "{}; try the other --codec, or --raw for the bytes as stored",
                with_causes(&error)
            ),
            Error::StateTooLarge { size, max } => {
                format!("state is {size} bytes, over the store's maximum of {max} bytes")
            }
            Error::InsufficientPrivilege {
                migrating: false, ..
            } => format!("{error}; `trebuchet-postgres doctor` shows what is missing"),
            Error::Database(e) => match e.code() {
                Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => format!(
                    "{error}: grant the role SELECT, INSERT, UPDATE and DELETE on the table \
                     (and USAGE on its schema); `trebuchet-postgres doctor` shows what is missing"
                ),
                Some(c) if *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
                    format!("{error}: this server is a read-only replica; connect to the primary")
                }
                _ if e.as_db_error().is_none() => with_causes(&error),
                _ => error.to_string(),
            },
            Error::InvalidIdentifier { .. } => {
                format!("{error} (check --table, --channel and the config file)")
            }
            // These say what happened only through their sources.
            Error::Connect {
                failure: ConnectFailure::Other,
                ..
            }
            | Error::Tls(_)
            | Error::ThreadStart { .. }
            | Error::ConnectionLost(_) => with_causes(&error),
            _ => error.to_string(),
        };
        Failure { code, message }
    }
}

/// The error's message and each cause it does not already show. Causes
/// are driver and I/O errors, which never hold a password.
fn with_causes(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        let f = Failure::error("first\n- second\r\n\n- third");
        assert_eq!(f.to_string(), "first; - second; - third");
        let f = Failure::error("a \u{1b}[2J b\rc");
        assert_eq!(f.to_string(), "a \\u{1b}[2J b\\rc");
    }

    #[test]
    fn conflicts_exit_3_with_what_to_retry() {
        let f = Failure::from(Error::Conflict {
            actor_id: "a".into(),
            expected: Expected::Sequence(1),
            actual: Some(2),
        });
        assert_eq!(f.code, CONFLICT);
        assert!(f.to_string().ends_with("retry with --if-sequence 2"), "{f}");
    }
}
