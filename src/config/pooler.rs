//! Connection poolers between the client and PostgreSQL (PgBouncer), and
//! what they forbid.

use crate::error::Error;

/// What stands between the client and PostgreSQL, when it is a
/// connection pooler such as PgBouncer. Set with
/// [`ConnectOptions::pooler`](crate::ConnectOptions::pooler).
///
/// | mode | statements | server process found again after a lost connection | `LISTEN` |
/// |---|---|---|---|
/// | `None` (default) | prepared once per connection, cached | yes | yes |
/// | `Session` | prepared once per connection, cached | no | yes |
/// | `Transaction` | unnamed, parsed on every call | no | refused |
///
/// Through a transaction-mode pooler each transaction may run on another
/// server connection, so a statement prepared in one is missing (or is
/// another client's) in the next, session settings leak between clients,
/// and notifications for a `LISTEN` go to whichever client holds that
/// server connection, or nowhere. Declare it: the store then sends every
/// statement unnamed with its parameter types, in one round trip, and a
/// listener refuses it (give the listener a direct URL). Behind any pooler,
/// the server process that served a broken connection may already serve
/// another client, so it is never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PoolerMode {
    /// Connected to PostgreSQL itself.
    #[default]
    None,
    /// Through a pooler that gives each client one server connection for
    /// its whole session (PgBouncer `pool_mode = session`).
    Session,
    /// Through a pooler that may give each transaction another server
    /// connection (PgBouncer `pool_mode = transaction`).
    Transaction,
}

/// Why a `LISTEN` connection is refused through a transaction-mode pooler.
pub(crate) fn listen_through_transaction_pooler() -> Error {
    Error::invalid_config(
        "LISTEN needs a session of its own, and a transaction-mode pooler \
         (PgBouncer pool_mode = transaction) hands each transaction to any server \
         connection, so notifications would be lost: give the listener a direct URL \
         (store.listener_builder().url(\"postgresql://db-host/db\")) or one through \
         a session-mode pool",
    )
}
