//! Bad input gets a typed error, leaves the database untouched, and never
//! panics: actor ids, table and channel names, oversized states, undecodable
//! bytes, sequence numbers beyond `BIGINT`, malformed connection strings and
//! impossible pool settings.

use std::cell::Cell;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trebuchet_postgres::postgres::Client;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{
    Codec, ConnectFailure, ConnectOptions, Error, Expected, InvalidActorId, Pool, PoolOptions,
    RetryPolicy, StateStore, WriteOptions,
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
fn states_over_max_state_size_are_rejected_and_nothing_is_stored() {
    const MAX: usize = 16;
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .max_state_size(MAX)
        .migrate(true)
        .build()
        .unwrap();
    let mut client = schema.client().unwrap();

    // Exactly the maximum is accepted, typed and raw.
    let small = "x".repeat(15);
    assert_eq!(Codec::Cbor.encode(&small).unwrap().len(), MAX);
    assert_eq!(store.save("small", &small).unwrap(), 1);
    assert_eq!(store.raw().save("exact", &[7u8; MAX]).unwrap(), 1);

    let big = "x".repeat(100);
    let big_size = Codec::Cbor.encode(&big).unwrap().len();
    assert!(big_size > MAX);
    let big_bytes = vec![1u8; MAX + 1];
    for id in ["small", "fresh"] {
        let results: Vec<(&str, usize, trebuchet_postgres::Result<()>)> = vec![
            ("save", big_size, store.save(id, &big).map(drop)),
            (
                "save_if(absent)",
                big_size,
                store.save_if(id, &big, Expected::Absent).map(drop),
            ),
            (
                "save_if(sequence)",
                big_size,
                store.save_if(id, &big, Expected::Sequence(1)).map(drop),
            ),
            (
                "save_with(sequence)",
                big_size,
                store
                    .save_with(id, &big, WriteOptions::new().sequence(5))
                    .map(drop),
            ),
            (
                "transform",
                big_size,
                store
                    .transform(id, |_: Option<String>| big.clone())
                    .map(drop),
            ),
            (
                "save_bytes",
                MAX + 1,
                store.raw().save(id, &big_bytes).map(drop),
            ),
            (
                "save_bytes_if",
                MAX + 1,
                store
                    .raw()
                    .save_if(id, &big_bytes, Expected::Sequence(1))
                    .map(drop),
            ),
            (
                "raw save_with(sequence)",
                MAX + 1,
                store
                    .raw()
                    .save_with(id, &big_bytes, WriteOptions::new().sequence(5))
                    .map(drop),
            ),
            (
                "transform_bytes",
                MAX + 1,
                store.raw().transform(id, |_| big_bytes.clone()).map(drop),
            ),
        ];
        for (op, size, result) in results {
            match result {
                Err(Error::StateTooLarge { size: s, max }) => {
                    assert_eq!((s, max), (size, MAX), "{op} on {id}");
                    let err = Error::StateTooLarge { size: s, max };
                    assert!(err.to_string().contains("max_state_size"), "{err}");
                }
                other => panic!("{op} on {id}: expected StateTooLarge, got {other:?}"),
            }
        }
    }
    // Nothing stored: no new actor, the small one unchanged at sequence 1.
    assert!(!store.exists("fresh").unwrap());
    assert_eq!(counts(&mut client, &schema, "actor_states"), (2, 0));
    let stored = store.load_versioned::<String>("small").unwrap().unwrap();
    assert_eq!((stored.value, stored.sequence), (small, 1));
}

#[test]
fn undecodable_bytes_give_a_decode_error_naming_the_actor() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    // 0xff is a CBOR "break" with nothing to break out of.
    let garbage = [0xffu8, 0xfe, 0x00, 0x13];
    assert_eq!(store.raw().save("garbage-1", &garbage).unwrap(), 1);

    let check = |op: &str, err: Error| match &err {
        Error::Decode { actor_id, .. } => {
            assert_eq!(actor_id, "garbage-1", "{op}");
            let text = err.to_string();
            assert!(text.contains("\"garbage-1\""), "{op}: {text}");
            assert!(std::error::Error::source(&err).is_some(), "{op}");
            assert!(!err.is_invalid_input() && !err.is_connection());
        }
        other => panic!("{op}: expected Decode, got {other:?}"),
    };
    check("load", store.load::<GameState>("garbage-1").unwrap_err());
    check(
        "load_versioned",
        store.load_versioned::<GameState>("garbage-1").unwrap_err(),
    );
    let called = Cell::new(false);
    check(
        "transform",
        store
            .transform("garbage-1", |s: Option<GameState>| {
                called.set(true);
                s.unwrap_or_default()
            })
            .unwrap_err(),
    );
    assert!(
        !called.get(),
        "transform ran its closure on undecodable state"
    );
    // The stored bytes are untouched.
    let stored = store.raw().load_versioned("garbage-1").unwrap().unwrap();
    assert_eq!(
        (stored.value.as_slice(), stored.sequence),
        (&garbage[..], 1)
    );

    // The same with the JSON codec.
    let json = schema
        .store_builder()
        .table(schema.table("json_states"))
        .codec(Codec::Json)
        .migrate(true)
        .build()
        .unwrap();
    json.raw().save("garbage-1", b"{not json").unwrap();
    check(
        "json load",
        json.load::<GameState>("garbage-1").unwrap_err(),
    );
}

#[test]
fn loading_the_wrong_type_is_a_decode_error() {
    let schema = TestDatabase::shared().schema();
    let cbor = schema.store();
    let json = schema
        .store_builder()
        .table(schema.table("json_states"))
        .codec(Codec::Json)
        .migrate(true)
        .build()
        .unwrap();
    for store in [&cbor, &json] {
        store.save("text", &"hello".to_owned()).unwrap();
        let err = store.load::<GameState>("text").unwrap_err();
        assert!(
            matches!(&err, Error::Decode { actor_id, .. } if actor_id == "text"),
            "{:?}: {err:?}",
            store.codec()
        );
        let err = store.load_versioned::<u64>("text").unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err:?}");
        // The right type still reads it, and the row is unchanged.
        assert_eq!(
            store.load::<String>("text").unwrap().as_deref(),
            Some("hello")
        );
        assert_eq!(store.sequence("text").unwrap(), Some(1));

        store.save("struct", &game(3)).unwrap();
        let err = store.load::<Vec<String>>("struct").unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    }
}

#[test]
fn sequence_numbers_beyond_bigint_are_rejected() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    assert_eq!(store.save("existing", &game(1)).unwrap(), 1);
    let too_big = i64::MAX as u64 + 1;

    for id in ["existing", "fresh"] {
        let results: Vec<(&str, u64, trebuchet_postgres::Result<()>)> = vec![
            (
                "save_with(sequence)",
                too_big,
                store
                    .save_with(id, &game(2), WriteOptions::new().sequence(too_big))
                    .map(drop),
            ),
            (
                "save_with_sequence(u64::MAX)",
                u64::MAX,
                store
                    .save_with(id, &game(2), WriteOptions::new().sequence(u64::MAX))
                    .map(drop),
            ),
            (
                "raw save_with(sequence)",
                too_big,
                store
                    .raw()
                    .save_with(id, b"raw", WriteOptions::new().sequence(too_big))
                    .map(drop),
            ),
            (
                "save_if",
                u64::MAX,
                store
                    .save_if(id, &game(2), Expected::Sequence(u64::MAX))
                    .map(drop),
            ),
            (
                "save_if(i64::MAX + 1)",
                too_big,
                store
                    .save_if(id, &game(2), Expected::Sequence(too_big))
                    .map(drop),
            ),
            (
                "save_bytes_if",
                u64::MAX,
                store
                    .raw()
                    .save_if(id, b"raw", Expected::Sequence(u64::MAX))
                    .map(drop),
            ),
        ];
        for (op, n, result) in results {
            match result {
                Err(Error::SequenceOutOfRange(got)) => {
                    assert_eq!(got, n, "{op} on {id}");
                    let err = Error::SequenceOutOfRange(got);
                    assert!(err.to_string().contains("BIGINT"), "{err}");
                    assert!(err.is_invalid_input());
                }
                other => panic!("{op} on {id}: expected SequenceOutOfRange, got {other:?}"),
            }
        }
    }
    assert!(!store.exists("fresh").unwrap());
    assert_eq!(counts(&mut client, &schema, "actor_states"), (1, 0));
    assert_eq!(store.sequence("existing").unwrap(), Some(1));
    assert_eq!(store.load::<GameState>("existing").unwrap(), Some(game(1)));

    // i64::MAX itself is in range.
    store
        .save_with(
            "edge",
            &game(4),
            WriteOptions::new().sequence(i64::MAX as u64),
        )
        .unwrap();
    assert_eq!(store.sequence("edge").unwrap(), Some(i64::MAX as u64));
    // One more write would overflow: a typed database error, nothing changed.
    let err = store.save("edge", &game(5)).unwrap_err();
    assert!(matches!(err, Error::Database(_)), "{err:?}");
    assert_eq!(
        err.sql_state().map(|c| c.code()),
        Some("22003"),
        "numeric_value_out_of_range: {err:?}"
    );
    assert_eq!(store.load::<GameState>("edge").unwrap(), Some(game(4)));
}

#[test]
fn malformed_connection_strings_say_why() {
    for (s, why) in [
        ("not-a-url", "neither a URL"),
        ("postgresql://", "names no host"),
        ("http://localhost/db", "unsupported scheme"),
        ("", "empty"),
    ] {
        let errors = [
            ("StateStore::connect", StateStore::connect(s).map(drop)),
            ("Pool::connect", Pool::connect(s).map(drop)),
            (
                "builder.url",
                StateStore::builder().url(s).build().map(drop),
            ),
            ("parse", s.parse::<ConnectOptions>().map(drop)),
        ];
        for (via, result) in errors {
            match result {
                Err(Error::InvalidConnectionString { reason }) => {
                    assert!(reason.contains(why), "{via}({s:?}): {reason}");
                    let err = Error::InvalidConnectionString { reason };
                    assert!(
                        err.to_string().starts_with("invalid connection string: "),
                        "{err}"
                    );
                    assert!(err.is_invalid_input());
                }
                other => {
                    panic!("{via}({s:?}): expected InvalidConnectionString, got {other:?}")
                }
            }
        }
    }
    // A password in a rejected string is not echoed back.
    let err = StateStore::connect("https://user:hunter2@localhost/db").unwrap_err();
    assert!(matches!(err, Error::InvalidConnectionString { .. }));
    assert!(!format!("{err} {err:?}").contains("hunter2"));
}

#[test]
fn impossible_pool_and_store_settings_are_invalid_config() {
    let silent = SilentServer::new();
    let pool_cases = [
        ("max_size 0", PoolOptions::default().max_size(0), "max_size"),
        (
            "min_idle > max_size",
            PoolOptions::default().max_size(2).min_idle(Some(3)),
            "min_idle",
        ),
        (
            "zero connection_timeout",
            PoolOptions::default().connection_timeout(Duration::ZERO),
            "connection_timeout",
        ),
        (
            "zero statement_timeout",
            PoolOptions::default().statement_timeout(Some(Duration::from_micros(10))),
            "statement_timeout",
        ),
    ];
    for (label, options, needle) in pool_cases {
        let results = [
            Pool::new(silent.options(), options.clone()).map(drop),
            StateStore::builder()
                .connect_options(silent.options())
                .pool_options(options.clone())
                .build()
                .map(drop),
            // Also when the server cannot be reached at all.
            StateStore::builder()
                .url(CLOSED)
                .pool_options(options)
                .build()
                .map(drop),
        ];
        for result in results {
            match result {
                Err(Error::InvalidConfig { reason }) => {
                    assert!(reason.contains(needle), "{label}: {reason}");
                    let err = Error::InvalidConfig { reason };
                    assert!(err.to_string().starts_with("invalid configuration: "));
                    assert!(err.is_invalid_input());
                }
                other => panic!("{label}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
    let store_cases = [
        (
            "max_attempts 0",
            StateStore::builder()
                .url(&silent.url())
                .retry_policy(RetryPolicy {
                    max_attempts: 0,
                    ..RetryPolicy::default()
                }),
            "max_attempts",
        ),
        (
            "max_state_size over 1 GB",
            StateStore::builder()
                .url(&silent.url())
                .max_state_size(usize::MAX),
            "max_state_size",
        ),
    ];
    for (label, builder, needle) in store_cases {
        match builder.build() {
            Err(Error::InvalidConfig { reason }) => {
                assert!(reason.contains(needle), "{label}: {reason}")
            }
            other => panic!("{label}: expected InvalidConfig, got {other:?}"),
        }
    }
    silent.assert_untouched();
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

#[test]
fn unencoded_at_sign_in_a_password_never_leaks_into_messages() {
    // The `@` of a password must be written %40; when it is not, the tail of
    // the password must not turn up as a host name in messages or Debug.
    for s in [
        "postgresql://app:p@ss-hunter2@db.example.com:5432/game",
        "postgres://app:p@ss-hunter2@db.example.com/game?sslmode=require",
    ] {
        match s.parse::<ConnectOptions>() {
            Err(err @ Error::InvalidConnectionString { .. }) => {
                let text = format!("{err} {err:?}");
                assert!(!text.contains("hunter2"), "{s}: {text}");
                assert!(text.contains("%40"), "{s}: say how to encode it: {text}");
            }
            Err(other) => panic!("{s}: expected InvalidConnectionString, got {other:?}"),
            Ok(options) => {
                // Accepting it is fine only if the password stayed a password.
                let shown = format!("{} {options:?}", options.target());
                assert!(
                    !shown.contains("hunter2"),
                    "{s}: part of the password became the host: {shown}"
                );
                assert_eq!(options.target(), "db.example.com:5432", "{s}");
            }
        }
        // The builder keeps the parse error for build(), before connecting.
        let builder = StateStore::builder().url(s);
        let debug = format!("{builder:?}");
        assert!(!debug.contains("hunter2"), "builder Debug: {debug}");
    }
}
