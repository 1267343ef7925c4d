//! What an [`Error`] says: short, lower case, and what to do.

use std::fmt;

use super::*;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConnectionString { reason } => {
                write!(f, "invalid connection string: {reason}")
            }
            Error::InvalidConfig { reason } => write!(f, "invalid configuration: {reason}"),
            Error::ConfigFile {
                origin,
                line,
                key,
                reason,
            } => {
                write!(f, "{origin}")?;
                if let Some(line) = line {
                    write!(f, ", line {line}")?;
                }
                if let Some(key) = key {
                    write!(f, ", {key}")?;
                }
                write!(f, ": {reason}")
            }
            Error::InvalidActorId(why) => write!(f, "invalid actor id: {why}"),
            Error::InvalidArgument { what, reason } => write!(f, "invalid {what}: {reason}"),
            Error::InvalidIdentifier { what, reason } => write!(f, "invalid {what} name: {reason}"),
            Error::StateTooLarge { size, max } => write!(
                f,
                "state is {size} bytes, over the store's maximum of {max} bytes; \
                 raise it with StateStoreBuilder::max_state_size"
            ),
            Error::SequenceOutOfRange(n) => {
                write!(f, "sequence number {n} does not fit PostgreSQL's BIGINT")
            }
            Error::DuplicateActorId { actor_id } => write!(
                f,
                "actor {actor_id:?} appears more than once in one bulk write: \
                 write each actor once per call, or use a batch, whose steps run in order"
            ),
            Error::Encode(e) => write!(f, "could not encode state: {e}"),
            Error::Decode { actor_id, .. } => write!(
                f,
                "could not decode the stored state of actor {actor_id:?} (written with \
                 another codec or type?)"
            ),
            Error::Conflict {
                actor_id,
                expected,
                actual,
            } => {
                let actual = actual.map_or_else(|| "absent".to_owned(), |n| format!("sequence {n}"));
                write!(
                    f,
                    "conflict on actor {actor_id:?}: expected {expected}, found {actual}"
                )
            }
            Error::StaleSequence {
                actor_id,
                sequence,
                current,
            } => match current {
                Some(current) => write!(
                    f,
                    "sequence {sequence} for actor {actor_id:?} is not above the stored {current}"
                ),
                None => write!(
                    f,
                    "sequence {sequence} for actor {actor_id:?} is not above the number its \
                     deleted predecessor reached"
                ),
            },
            Error::TooManyConflicts { actor_id, attempts } => write!(
                f,
                "gave up on actor {actor_id:?} after {attempts} conflicting attempts; \
                 raise RetryPolicy::max_attempts or reduce contention"
            ),
            Error::Connect {
                failure,
                target,
                user,
                source,
            } => match failure {
                ConnectFailure::Refused => write!(
                    f,
                    "connection refused at {target}: is PostgreSQL running? try `pg_isready`, \
                     check the port, and check that pg_hba.conf allows this client"
                ),
                ConnectFailure::AuthenticationFailed => {
                    let wrong_password = source.as_ref().is_some_and(server::is_wrong_password);
                    write!(
                        f,
                        "{}authentication failed for user {user:?} at {target}: verify the \
                         user name and password, check the pg_hba.conf method, \
                         try `psql -U {user} -W`",
                        if wrong_password { "password " } else { "" }
                    )
                }
                ConnectFailure::TooManyClients => write!(
                    f,
                    "too many clients already at {target}: share one pool between stores, \
                     lower PoolOptions::max_size, raise max_connections in postgresql.conf, \
                     or put PgBouncer in front"
                ),
                ConnectFailure::DatabaseMissing => write!(
                    f,
                    "the database does not exist at {target}: create it (CREATE DATABASE) \
                     or fix the database name"
                ),
                ConnectFailure::NotReady => write!(
                    f,
                    "the server at {target} is starting up or shutting down: retry shortly"
                ),
                ConnectFailure::Tls => write!(
                    f,
                    "TLS failed with {target}: check sslmode and sslrootcert \
                     (verify-full also checks the host name)"
                ),
                ConnectFailure::Timeout => write!(
                    f,
                    "timed out connecting to {target}: check the host, the network, \
                     and connect_timeout"
                ),
                ConnectFailure::Other => write!(f, "could not connect to {target}"),
            },
            Error::PoolExhausted { max_size, waited } => write!(
                f,
                "connection pool exhausted: all {max_size} connections stayed in use for {:.1}s; \
                 raise PoolOptions::max_size or connection_timeout, or hold connections for less time",
                waited.as_secs_f64()
            ),
            Error::SchemaMissing { table } => write!(
                f,
                "table {table} or its trigger objects do not exist: run StateStore::migrate() \
                 or apply sql/schema.sql"
            ),
            Error::InsufficientPrivilege {
                migrating,
                table,
                tombstones,
                source,
            } => {
                let refused = source
                    .as_db_error()
                    .map_or("permission denied", |db| db.message());
                if *migrating {
                    write!(
                        f,
                        "insufficient privilege to migrate {table}: {refused} (SQLSTATE 42501); \
                         migrate creates and alters the table, {tombstones}, the notification \
                         function and the trigger: run it as the schema's owner (for example \
                         `trebuchet-postgres migrate`), and build this role's stores without \
                         migrate(true)"
                    )
                } else {
                    write!(
                        f,
                        "insufficient privilege on {table}: {refused} (SQLSTATE 42501); \
                         GRANT SELECT, INSERT, UPDATE, DELETE ON {table} and \
                         GRANT SELECT, INSERT, UPDATE ON {tombstones} to the role, with \
                         USAGE on their schema (crate docs, guide::schema, \"Least privilege\")"
                    )
                }
            }
            Error::StatementTimeout => f.write_str(
                "statement cancelled by statement_timeout; raise PoolOptions::statement_timeout",
            ),
            Error::NotificationQueueFull(_) => f.write_str(
                "the server's NOTIFY queue is full, so the write was not applied: a listening \
                 session has stopped reading notifications, usually inside a long open \
                 transaction; find it in pg_stat_activity (StateStore::stats lists listeners \
                 and notification_queue_usage) and end its transaction",
            ),
            Error::ConnectionLost(_) => f.write_str(
                "connection to the server was lost during the call; \
                 a write may or may not have been applied",
            ),
            Error::NotApplied { actor_id, .. } => write!(
                f,
                "connection to the server was lost during a write to {actor_id:?}; \
                 the write was not applied and can be made again"
            ),
            Error::OutcomeUnknown { actor_id, .. } => write!(
                f,
                "connection to the server was lost during a write to {actor_id:?}, and whether \
                 it was applied could not be found out (the server did not come back within \
                 outcome_timeout, or the actor was rewritten too often meanwhile); read the \
                 actor to see its state"
            ),
            Error::Tls(_) => f.write_str("could not set up TLS"),
            Error::ThreadStart { what, .. } => write!(
                f,
                "cannot start {what} (is the process or the system at its limit of threads \
                 or memory?)"
            ),
            Error::Database(e) => match e.as_db_error() {
                Some(db) => write!(f, "database error {}: {}", db.code().code(), db.message()),
                None => f.write_str("database client error"),
            },
        }
    }
}
