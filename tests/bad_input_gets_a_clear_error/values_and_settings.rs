//! Bad values and settings: oversized states, undecodable bytes, the wrong
//! type, sequence numbers beyond `BIGINT`, malformed connection strings and
//! impossible pool and store settings each get a typed error, and leave the
//! database as it was.

use std::cell::Cell;
use std::time::Duration;

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{
    Codec, ConnectOptions, Error, Expected, Pool, PoolOptions, RetryPolicy, StateStore,
    WriteOptions,
};

use super::{counts, game, GameState, SilentServer, CLOSED};

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
