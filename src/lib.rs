//! Actor state in PostgreSQL, with ACID guarantees and a change feed that
//! keeps many processes in sync through `LISTEN`/`NOTIFY`.
//!
//! A synchronous, blocking library: no `async`, no runtime to start. Every
//! handle is `Send + Sync` and cheap to clone; share one [`StateStore`]
//! between all threads of a program. It stores state as the Swift
//! `TrebuchetPostgreSQL` module does (same table, columns, channel and
//! notification payload), so Rust and Swift instances can share one database.
//!
//! The sections below introduce each concept; the [`guide`] has a chapter
//! for each, with the details, the caveats and the measurements.
//!
//! # Quick start
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use trebuchet_postgres::StateStore;
//!
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Counter { value: u64 }
//!
//! let store = StateStore::connect("postgresql://postgres@localhost:5432/trebuchet")?;
//! store.migrate()?; // creates the table, tombstones, function and trigger
//!
//! store.save("counter-1", &Counter { value: 1 })?;            // sequence 1
//! let c: Option<Counter> = store.load("counter-1")?;
//! let next = store.transform("counter-1", |c: Option<Counter>| {
//!     Counter { value: c.unwrap_or_default().value + 1 }        // never loses an update
//! })?;
//! assert_eq!(next.sequence, 2);
//! store.delete("counter-1")?;
//! # Ok::<(), trebuchet_postgres::Error>(())
//! ```
//!
//! # Connecting
//!
//! A [`ConnectOptions`] comes from a URL (`postgresql://user:pass@host:5432/db?sslmode=require`),
//! libpq `key=value` text, explicit parts, or the environment (`DATABASE_URL`, else
//! `POSTGRES_HOST`, `POSTGRES_PORT`, `POSTGRES_DATABASE`, `POSTGRES_USER`,
//! `POSTGRES_PASSWORD`). TLS follows libpq's `sslmode` meanings ([`SslMode`]).
//! A [`Pool`] can be shared by several stores, for example one per table.
//! Behind PgBouncer, declare it ([`PoolerMode`]). More in
//! [`guide::connecting`].
//!
//! # Versions and conflicts
//!
//! Every actor has a sequence number that starts at 1 and grows with every
//! write, and never repeats, even across delete and re-create.
//! [`StateStore::save_if`] writes only when the stored version is the one
//! expected ([`Expected`]) and otherwise fails with [`Error::Conflict`], which
//! names both. [`StateStore::transform`] is an atomic read-modify-write built on
//! it, retrying with jittered back-off. [`StateStore::save_with`] takes
//! [`WriteOptions`]: a condition, a time to live, a sequence number of the
//! caller's choosing. When a connection breaks after a write was sent, the
//! store finds out whether it landed ([`Error::NotApplied`],
//! [`Error::OutcomeUnknown`]). More in [`guide::operations`].
//!
//! # Bulk writes, batches and group commit
//!
//! [`StateStore::load_many`], [`StateStore::save_many`],
//! [`StateStore::save_many_if`] (one outcome per item) and
//! [`StateStore::delete_many`] take one statement each.
//! [`StateStore::batch`] applies saves, conditional saves and deletes over
//! several actors in one transaction, all or nothing.
//! [`StateStoreBuilder::group_commit`] combines concurrent saves into one
//! commit, past the one-notifying-commit-at-a-time ceiling of the server.
//!
//! # Change feed
//!
//! A [`ChangeListener`] (from [`StateStore::listener`] or on its own) holds one
//! connection and one thread that `LISTEN`s on the channel and fans every
//! [`Change`] out to [`Subscription`]s, each with its own bounded queue. After
//! any gap (a lost connection, a full queue) a subscriber receives
//! [`Event::Resync`] before anything newer. A [`StateCache`] keeps decoded
//! states fresh from it. More in [`guide::change_feed`].
//!
//! ```no_run
//! use trebuchet_postgres::{Event, StateStore};
//!
//! let store = StateStore::connect("postgresql://localhost/trebuchet")?;
//! let listener = store.listener()?;
//! let room = listener.subscribe_actor("room-1");
//! store.save("room-1", &1u32)?;
//! match room.recv_timeout(std::time::Duration::from_secs(1)) {
//!     Ok(Event::Change(c)) => println!("room-1 is at sequence {}", c.sequence),
//!     Ok(Event::Resync(_)) => println!("reload everything"),
//!     other => println!("{other:?}"),
//! }
//! # Ok::<(), trebuchet_postgres::Error>(())
//! ```
//!
//! # Encoding
//!
//! Typed states go through a [`Codec`]: CBOR by default, or JSON that matches
//! Swift's `JSONEncoder` for tables shared with Swift instances.
//! [`StateStore::raw`] gives the same verbs on stored bytes, bypassing the
//! codec. More in [`guide::encoding`].
//!
//! # Schema
//!
//! [`StateStore::migrate`] creates the seed's table (`actor_states`: `actor_id`,
//! `state`, `sequence_number`, `updated_at`, `created_at`), a tombstone table, and
//! a trigger that notifies `actor_state_changes` with the seed's JSON payload
//! (`actorID`, `sequenceNumber`, `timestamp`) plus `op`. [`StateStore::verify`]
//! reports what is missing. `sql/schema.sql` holds the same SQL for the default
//! names. More, with the grants a least-privileged role needs, in
//! [`guide::schema`].
//!
//! # Configuration file
//!
//! [`StateConfig`] reads the `state:` section of the seed's `trebuchet.yaml`
//! (`type: postgresql`, `host`, `port`, `database`, `username`, `password` or
//! `connectionString: ${DATABASE_URL}`, plus `table`, `channel`, `poolSize`,
//! `sslmode`, `sslrootcert`, `codec`) and builds the store and the listener
//! from it. The file's other keys belong to other tools and are ignored.
//! More in [`guide::config_file`].
//!
//! ```no_run
//! let store = trebuchet_postgres::StateConfig::from_file("trebuchet.yaml")?.store()?;
//! # Ok::<(), trebuchet_postgres::Error>(())
//! ```
//!
//! # Monitoring
//!
//! [`StateStore::stats`] gives the seed's Monitoring figures as a
//! [`StoreStats`]: table size, actor count, writes per second over a window,
//! the channel's listeners, the notification queue, server connections and
//! slow statements from `pg_stat_statements`. [`StateStore::connection_info`]
//! and [`StateStore::notify_round_trip`] check a deployment as the seed's
//! Troubleshooting section does. Without SQL, [`Pool::state`] tells a pool's
//! connections and waits, and [`ChangeListener::health`] a listener's
//! connection and counters. More in [`guide::monitoring`].
//!
//! # Whole tables
//!
//! [`StateStore::list_actors`] pages through actors in a stable order,
//! [`Raw::for_each`] walks every actor from one snapshot (an
//! export), and [`Raw::restore_many`] writes actors back with
//! their own sequence numbers and timestamps (an import that never replaces a
//! newer version and can run twice). More in [`guide::listing`].
//!
//! # Expiry
//!
//! [`StateStore::save_with`] and [`WriteOptions::ttl`] give a
//! state a time to live: once it has passed the actor reads as absent
//! everywhere, and [`StateStore::sweep_expired`] (or a sweeper thread from
//! [`StateStoreBuilder::expiry_sweeper`], or `trebuchet-postgres sweep` from
//! cron) deletes it in batches, announcing each removal as a delete. At most
//! one sweeper works on a table at a time across all processes. More in
//! [`guide::expiry`].
//!
//! ```no_run
//! # use std::time::Duration;
//! # let store = trebuchet_postgres::StateStore::from_env()?;
//! # use trebuchet_postgres::WriteOptions;
//! store.save_with("session-1", &"token", WriteOptions::new().ttl(Duration::from_secs(3600)))?;
//! let swept = store.sweep_expired(1000)?;
//! # Ok::<(), trebuchet_postgres::Error>(())
//! ```
//!
//! # Large tables
//!
//! [`StateStoreBuilder::partitions`] creates the table hash-partitioned by
//! `actor_id`; [`StateStore::partition_table`] converts an existing table
//! without losing anything. Every operation, the change feed and `verify`
//! work the same on it, and every statement on one actor touches one
//! partition. [`guide::large_tables`] covers autovacuum settings and HOT
//! updates for a table this busy, and [`guide::design`] running it on a
//! distributed PostgreSQL engine.
//!
//! # Errors
//!
//! One error type, [`Error`], with its category as a small `Copy`
//! [`ErrorKind`]. Bad input (actor ids, table and channel names,
//! oversized states, malformed connection strings) is rejected before anything is
//! sent. Messages say what to do, and never contain a password. Every name in
//! SQL text, checked or read back from the catalog (an index, the schema
//! a table was found in), is quoted by [`quote_identifier`]. What the common
//! messages mean: [`guide::errors`].
//!
//! # Threads
//!
//! [`StateStore`], [`Pool`], [`ChangeListener`] and [`StateCache`] are
//! `Send + Sync` and cheap to clone (an `Arc` inside); clone them into every
//! thread. A call blocks its thread for its round trip; nothing runs on the
//! caller's thread in the background. The pool runs r2d2's three maintenance
//! threads, and one more with a [`PoolOptions::call_timeout`]; each listener
//! runs one thread, each `on_change` callback and each cache one more. A
//! connect, and a listener's heartbeat, run on a short-lived thread of their
//! own, so that a server that stops answering cannot hold them past their
//! timeouts.
//!
//! # Testing
//!
//! The `testing` feature gives your tests a real throwaway PostgreSQL
//! (the `testing` module), started from the system's `initdb`/`pg_ctl`, or
//! the server named by `TEST_DATABASE_URL` or `DATABASE_URL`. More in
//! [`guide::testing`].
//!
//! # Features
//!
//! - `config-file` (default): [`StateConfig`], through the `saphyr` YAML parser.
//! - `testing`: the `testing` module, a throwaway PostgreSQL cluster for
//!   tests and examples, started from the system's `initdb`/`pg_ctl`.
//! - `ffi`: the C ABI in the `ffi` module (the only place with `unsafe`).
//!   The C library itself (`cdylib` and `staticlib`) is built by the
//!   `trebuchet-postgres-ffi` package in `ffi/`, so Rust users never build
//!   it; `ffi/README.md` is its guide.
//!
//! The `trebuchet-postgres` command-line program is the
//! `trebuchet-postgres-cli` package in `cli/`: depending on the library
//! builds none of its dependencies. `cli/README.md` is its reference.
#![deny(missing_docs)]
#![warn(rust_2018_idioms, clippy::all)]
#![deny(unsafe_code)]
// docs.rs builds with `--cfg docsrs` on nightly: show which feature each
// gated item needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod change;
mod codec;
mod config;
#[cfg(feature = "config-file")]
mod config_file;
mod error;
mod expected;
// The C ABI is the one module that needs `unsafe`: raw pointers from C and
// `#[no_mangle]` exports. Every block carries a `SAFETY:` comment.
#[cfg(feature = "ffi")]
#[cfg_attr(docsrs, doc(cfg(feature = "ffi")))]
#[allow(unsafe_code)]
pub mod ffi;
mod group;
pub mod guide;
mod ident;
mod listener;
mod monitor;
mod outcome;
mod partition;
mod pool;
mod schema;
mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod transfer;

pub use crate::cache::StateCache;
pub use crate::change::{Change, ChangeKind, Event, MalformedPayload, ResyncReason};
pub use crate::codec::Codec;
pub use crate::config::{ConnectOptions, PoolerMode, SslMode};
#[cfg(feature = "config-file")]
#[cfg_attr(docsrs, doc(cfg(feature = "config-file")))]
pub use crate::config_file::{ConnectionSource, StateConfig};
pub use crate::error::{ConnectFailure, Error, ErrorKind, InvalidActorId, Result};
pub use crate::expected::Expected;
pub use crate::ident::quote_identifier;
pub use crate::listener::{
    CallbackHandle, ChangeListener, ChangeListenerBuilder, EventBatch, Events, ListenerHealth,
    Subscription,
};
pub use crate::monitor::{
    ConnectionInfo, ListenerSession, SlowStatement, SlowStatements, StoreStats, WorkerListeners,
};
pub use crate::outcome::LostWrites;
pub use crate::partition::Partitioning;
pub use crate::pool::{Pool, PoolOptions, PoolState};
pub use crate::schema::{Problem, VerifyReport, DEFAULT_CHANNEL, DEFAULT_TABLE, MAX_PARTITIONS};
pub use crate::store::{
    validate_actor_id, Batch, BatchResult, Raw, RawBatch, RetryPolicy, StateStore,
    StateStoreBuilder, Sweep, SweepOptions, Versioned, WriteOptions, DEFAULT_MAX_STATE_SIZE,
    DEFAULT_OUTCOME_TIMEOUT, MAX_SWEEP_BATCH,
};
pub use crate::transfer::{ActorPage, ActorSummary, RestoreOutcome};

/// The driver this crate is built on, for its types (`SqlState`, `Host`).
pub use postgres;

/// The channel crate behind [`Subscription`], for `select!` and its error types.
pub use crossbeam_channel;

/// Compiles the README's examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
