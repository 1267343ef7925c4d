//! The guide: one chapter per concept, versioned with the code, with
//! examples that are compiled as doctests. Nothing here is code; the
//! chapters are the markdown files in `src/guide/`.
//!
//! 1. [Operations](operations): the calls, sequence numbers, group commit,
//!    and what a result means when the connection breaks.
//! 2. [Expiry](expiry): states with a time to live, and the sweeper.
//! 3. [Listing](listing): actors page by page, export and import.
//! 4. [Connecting](connecting): connection strings, the pool, TLS, PgBouncer.
//! 5. [Encoding](encoding): CBOR, Swift-compatible JSON, hostile bytes.
//! 6. [Schema](schema): the table, trigger and tombstones, `verify`, least
//!    privilege.
//! 7. [Large tables](large_tables): partitions, converting a table, vacuum
//!    and HOT updates, scale.
//! 8. [The change feed](change_feed): listeners, subscriptions, caches, and
//!    what they guarantee.
//! 9. [Configuration file](config_file): the `state:` section of
//!    `trebuchet.yaml`.
//! 10. [Monitoring](monitoring): the seed's Monitoring figures as data.
//! 11. [Errors](errors): the error type and troubleshooting.
//! 12. [Testing](testing): a real PostgreSQL in your tests, and the
//!     randomised histories.
//! 13. [Past one server](design): the table on Citus.
//!
//! The `trebuchet-postgres` command-line program has its reference in
//! `cli/README.md`, and the C library in `ffi/README.md`; the benchmarks'
//! figures are in `examples/README.md`.

/// Declares a chapter: a module whose documentation is a markdown file.
/// The glob import lets the chapter link to the crate's items by the names
/// the crate root exports (`[`StateStore`]`), as a reader writes them.
macro_rules! chapter {
    ($name:ident, $file:literal) => {
        pub mod $name {
            #![doc = include_str!($file)]
            #[allow(unused_imports)] // only the chapter's intra-doc links use it
            use crate::*;
        }
    };
}

chapter!(operations, "operations.md");
chapter!(expiry, "expiry.md");
chapter!(listing, "listing.md");
chapter!(connecting, "connecting.md");
chapter!(encoding, "encoding.md");
chapter!(schema, "schema.md");
chapter!(large_tables, "large_tables.md");
chapter!(change_feed, "change_feed.md");
chapter!(config_file, "config_file.md");
chapter!(monitoring, "monitoring.md");
chapter!(errors, "errors.md");
chapter!(testing, "testing.md");
chapter!(design, "design.md");
