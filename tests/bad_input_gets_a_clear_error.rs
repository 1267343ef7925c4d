//! Guarantee 7 of the design, **Bad input gets a clear error and touches
//! nothing**:
//!
//! > Empty, over-long (>255 chars) or NUL-containing actor ids, invalid
//! > table/channel names, oversized state, undecodable bytes, wrong types,
//! > malformed notification payloads, malformed connection strings: each a
//! > typed error naming the problem.
//!
//! Bad input gets a typed error, leaves the database untouched, and never
//! panics:
//!
//! - this file: actor ids, and table and channel names (hostile ones never
//!   reach the database; valid ones are quoted, so their case is kept);
//! - `values_and_settings`: oversized states, undecodable bytes, the wrong
//!   type, sequence numbers beyond `BIGINT`, malformed connection strings
//!   and impossible pool settings;
//! - `decode_fuzz`: hostile and fuzzed stored bytes give a decode error,
//!   with the memory and stack a decode takes bounded.
//!
//! Malformed notification payloads are counted and skipped in
//! tests/listener.rs (`malformed_payloads_are_counted_and_skipped`) and
//! tests/secrets_stay_secret.rs (`security::hostile_input`).

#[path = "bad_input_gets_a_clear_error/decode_fuzz.rs"]
mod decode_fuzz;
#[path = "bad_input_gets_a_clear_error/values_and_settings.rs"]
mod values_and_settings;

use std::cell::Cell;
use std::io::ErrorKind;
use std::net::TcpListener;

use serde::{Deserialize, Serialize};
use trebuchet_postgres::postgres::Client;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{
    ConnectFailure, ConnectOptions, Error, Expected, InvalidActorId, StateStore, WriteOptions,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct GameState {
    scores: std::collections::BTreeMap<String, i64>,
    round: u32,
}

fn game(round: u32) -> GameState {
    GameState {
        scores: [("alice".to_owned(), 10)].into_iter().collect(),
        round,
    }
}

/// A URL whose port nothing listens on: connecting to it is refused at once.
const CLOSED: &str = "postgresql://postgres@127.0.0.1:1/postgres?sslmode=disable";

/// A listener that never answers: any connection attempt to it shows up as a
/// pending `accept`, so a test can prove that nothing was contacted.
struct SilentServer {
    listener: TcpListener,
}

impl SilentServer {
    fn new() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        SilentServer { listener }
    }

    fn url(&self) -> String {
        let port = self.listener.local_addr().unwrap().port();
        format!("postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable&connect_timeout=2")
    }

    fn options(&self) -> ConnectOptions {
        self.url().parse().expect("a valid URL")
    }

    #[track_caller]
    fn assert_untouched(&self) {
        match self.listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("a connection was attempted (from {peer})"),
            Err(e) => panic!("accept failed: {e}"),
        }
    }
}

/// Rows in the schema's state table and its tombstone table.
fn counts(client: &mut Client, schema: &TestSchema, table: &str) -> (i64, i64) {
    let rows: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".\"{table}\"", schema.name()),
            &[],
        )
        .unwrap()
        .get(0);
    let tombstones: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".\"{table}_tombstones\"",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .get(0);
    (rows, tombstones)
}

/// Every operation that takes an actor id, each reduced to `Result<()>`.
/// `called` records whether a transform closure ran.
fn every_operation(
    store: &StateStore,
    id: &str,
    called: &Cell<bool>,
) -> Vec<(&'static str, trebuchet_postgres::Result<()>)> {
    let state = game(1);
    vec![
        ("save", store.save(id, &state).map(drop)),
        ("load", store.load::<GameState>(id).map(drop)),
        (
            "load_versioned",
            store.load_versioned::<GameState>(id).map(drop),
        ),
        (
            "save_if(absent)",
            store.save_if(id, &state, Expected::Absent).map(drop),
        ),
        (
            "save_if(sequence)",
            store.save_if(id, &state, Expected::Sequence(1)).map(drop),
        ),
        (
            "save_with(sequence)",
            store
                .save_with(id, &state, WriteOptions::new().sequence(7))
                .map(drop),
        ),
        (
            "transform",
            store
                .transform(id, |s: Option<GameState>| {
                    called.set(true);
                    s.unwrap_or_default()
                })
                .map(drop),
        ),
        ("delete", store.delete(id).map(drop)),
        ("exists", store.exists(id).map(drop)),
        ("sequence", store.sequence(id).map(drop)),
        ("save_bytes", store.raw().save(id, b"raw").map(drop)),
        ("load_bytes", store.raw().load(id).map(drop)),
        (
            "load_versioned_bytes",
            store.raw().load_versioned(id).map(drop),
        ),
        (
            "save_bytes_if(absent)",
            store.raw().save_if(id, b"raw", Expected::Absent).map(drop),
        ),
        (
            "save_bytes_if(sequence)",
            store
                .raw()
                .save_if(id, b"raw", Expected::Sequence(1))
                .map(drop),
        ),
        (
            "raw save_with(sequence)",
            store
                .raw()
                .save_with(id, b"raw", WriteOptions::new().sequence(7))
                .map(drop),
        ),
        (
            "transform_bytes",
            store
                .raw()
                .transform(id, |b| {
                    called.set(true);
                    b.map(<[u8]>::to_vec).unwrap_or_default()
                })
                .map(drop),
        ),
    ]
}

#[test]
fn invalid_actor_ids_are_rejected_by_every_operation() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    // A neighbour that must come through unchanged.
    assert_eq!(store.save("existing", &game(0)).unwrap(), 1);
    let before = store.raw().load_versioned("existing").unwrap().unwrap();

    let cases: [(&str, String, InvalidActorId); 4] = [
        ("empty", String::new(), InvalidActorId::Empty),
        (
            "256 ASCII characters",
            "x".repeat(256),
            InvalidActorId::TooLong { chars: 256 },
        ),
        (
            "256 two-byte characters",
            "é".repeat(256),
            InvalidActorId::TooLong { chars: 256 },
        ),
        (
            "NUL inside",
            "actor\0one".to_owned(),
            InvalidActorId::ContainsNul,
        ),
    ];
    for (label, id, expected) in &cases {
        let called = Cell::new(false);
        let results = every_operation(&store, id, &called);
        assert_eq!(results.len(), 17);
        for (op, result) in results {
            match result {
                Err(Error::InvalidActorId(why)) => {
                    assert_eq!(why, *expected, "{op} with {label} id");
                    let err = Error::InvalidActorId(why);
                    assert!(err.is_invalid_input());
                    assert!(
                        err.to_string().starts_with("invalid actor id: "),
                        "{op}: {err}"
                    );
                }
                other => panic!("{op} with {label} id: expected InvalidActorId, got {other:?}"),
            }
        }
        assert!(!called.get(), "a transform closure ran for the {label} id");
    }

    // The database is exactly as before: one row, no tombstone, same version.
    assert_eq!(counts(&mut client, &schema, "actor_states"), (1, 0));
    let after = store.raw().load_versioned("existing").unwrap().unwrap();
    assert_eq!(after, before);
    let stored: Vec<String> = client
        .query(
            &format!("SELECT actor_id FROM \"{}\".actor_states", schema.name()),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ["existing"]);

    // The limits are exact: 255 characters (even of two bytes each) are fine.
    for id in ["x".repeat(255), "é".repeat(255)] {
        assert_eq!(store.save(&id, &game(2)).unwrap(), 1);
        assert_eq!(store.load::<GameState>(&id).unwrap(), Some(game(2)));
        assert!(store.delete(&id).unwrap());
    }
}

const BAD_NAMES: [&str; 10] = [
    "actor'; DROP TABLE actor_states; --",
    "123abc",
    // 64 letters: one more than PostgreSQL's 63-byte limit.
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl",
    "a;b",
    "a b",
    "a\"b",
    "a$b",
    "bad-schema.t",
    "",
    "tä",
];

#[test]
fn invalid_table_names_are_rejected_before_connecting() {
    assert_eq!(BAD_NAMES[2].len(), 64);
    let silent = SilentServer::new();
    for name in BAD_NAMES {
        // `bad-schema.t` fails on its schema part, everything else on the table.
        let what = if name == "bad-schema.t" {
            "schema"
        } else {
            "table"
        };
        for url in [CLOSED.to_owned(), silent.url()] {
            let err = StateStore::builder()
                .url(&url)
                .table(name)
                .build()
                .expect_err(name);
            match &err {
                Error::InvalidIdentifier { what: w, reason } => {
                    assert_eq!(*w, what, "{name:?}: {err}");
                    assert!(!reason.is_empty());
                }
                other => panic!("table {name:?}: expected InvalidIdentifier, got {other:?}"),
            }
            assert!(err.is_invalid_input());
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid {what} name: ")),
                "{err}"
            );
        }
        // The same name as the table part of a schema-qualified name.
        let err = StateStore::builder()
            .url(&silent.url())
            .table(format!("good_schema.{name}"))
            .build()
            .expect_err(name);
        assert!(
            matches!(err, Error::InvalidIdentifier { .. }),
            "good_schema.{name}: {err:?}"
        );
    }
    silent.assert_untouched();

    // The control: a valid name at the closed port does try to connect, so the
    // errors above really came before any connection attempt.
    let err = StateStore::builder()
        .url(CLOSED)
        .table("a".repeat(63))
        .build()
        .unwrap_err();
    assert_refused(&err);
}

/// The control of the "before connecting" tests: a valid name at the closed
/// port does try to connect, so their errors came before any attempt.
fn assert_refused(err: &Error) {
    assert!(
        matches!(
            err,
            Error::Connect {
                failure: ConnectFailure::Refused,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_channel_names_are_rejected_before_connecting() {
    let silent = SilentServer::new();
    for name in BAD_NAMES {
        for url in [CLOSED.to_owned(), silent.url()] {
            let err = StateStore::builder()
                .url(&url)
                .channel(name)
                .build()
                .expect_err(name);
            match &err {
                Error::InvalidIdentifier {
                    what: "channel",
                    reason,
                } => assert!(!reason.is_empty()),
                other => panic!("channel {name:?}: expected InvalidIdentifier, got {other:?}"),
            }
            assert!(
                err.to_string().starts_with("invalid channel name: "),
                "{err}"
            );
        }
    }
    silent.assert_untouched();
    let err = StateStore::builder()
        .url(CLOSED)
        .channel("_Chan_2")
        .build()
        .unwrap_err();
    assert_refused(&err);
}

#[test]
fn injection_in_a_table_name_never_reaches_the_database() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("survivor", &game(1)).unwrap();
    for table in [
        "actor'; DROP TABLE actor_states; --".to_owned(),
        schema.table("actor'; DROP TABLE actor_states; --"),
        schema.table("actor_states\"; DROP TABLE actor_states; --"),
    ] {
        let err = schema.store_builder().table(&table).build().unwrap_err();
        assert!(
            matches!(err, Error::InvalidIdentifier { what: "table", .. }),
            "{table}: {err:?}"
        );
        let err = schema
            .store_builder()
            .channel("x'); DROP TABLE actor_states; --")
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidIdentifier {
                    what: "channel",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    let mut client = schema.client().unwrap();
    assert_eq!(counts(&mut client, &schema, "actor_states"), (1, 0));
    assert_eq!(store.load::<GameState>("survivor").unwrap(), Some(game(1)));
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn table_names_are_quoted_so_case_is_kept() {
    let schema = TestDatabase::shared().schema();
    let mixed = schema
        .store_builder()
        .table(schema.table("MixedCase"))
        .migrate(true)
        .build()
        .unwrap();
    assert_eq!(
        mixed.table(),
        format!("\"{}\".\"MixedCase\"", schema.name())
    );
    assert_eq!(mixed.save("a", &game(1)).unwrap(), 1);
    assert_eq!(mixed.load::<GameState>("a").unwrap(), Some(game(1)));
    assert!(mixed.delete("a").unwrap());
    assert_eq!(mixed.save("a", &game(2)).unwrap(), 3);
    assert!(
        mixed.verify().unwrap().is_ok(),
        "{}",
        mixed.verify().unwrap()
    );

    let mut client = schema.client().unwrap();
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
            &[&schema.name()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        tables.contains(&"MixedCase".to_owned()),
        "tables: {tables:?}"
    );
    assert!(
        tables.contains(&"MixedCase_tombstones".to_owned()),
        "tables: {tables:?}"
    );
    assert!(
        !tables.iter().any(|t| t == "mixedcase"),
        "an unquoted (folded) table was made: {tables:?}"
    );
    let rows: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".\"MixedCase\"", schema.name()),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);

    // The lower-case name is another table.
    let lower = schema
        .store_builder()
        .table(schema.table("mixedcase"))
        .migrate(true)
        .build()
        .unwrap();
    assert_eq!(lower.load::<GameState>("a").unwrap(), None);
    lower.save("b", &game(9)).unwrap();
    assert!(!mixed.exists("b").unwrap());
    assert_eq!(mixed.load::<GameState>("a").unwrap(), Some(game(2)));
}
