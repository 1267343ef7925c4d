//! Monitoring and diagnostics: the figures of the seed's Monitoring section
//! (table size, actor count, updates per second, listeners, slow queries)
//! and the checks of its Troubleshooting section, as data.
//!
//! The catalog queries live here; the statements on the store's own table
//! are built with the others in the `schema` module.

mod connection;
mod notify;
mod sessions;
mod slow_statements;
mod stats;

pub use connection::ConnectionInfo;
pub use sessions::{ListenerSession, WorkerListeners};
pub use slow_statements::{SlowStatement, SlowStatements};
pub use stats::StoreStats;

#[cfg(test)]
mod tests;
