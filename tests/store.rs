//! The store's operations against a real PostgreSQL.
//!
//! Conflicts of conditional writes are in tests/optimistic_locking_is_real.rs,
//! and sequence numbers after a delete in
//! tests/numbers_never_repeat_tables_never_cross.rs.

mod common;

use common::GameState;

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Codec, Error, ErrorKind, Expected, WriteOptions};

#[test]
fn sequence_numbers_count_up_from_one() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut state = GameState::default();
    for expected in 1..=3 {
        state.round = expected as u32;
        assert_eq!(store.save("room-1", &state).unwrap(), expected);
    }
    assert_eq!(store.sequence("room-1").unwrap(), Some(3));
    assert_eq!(store.load::<GameState>("room-1").unwrap(), Some(state));
    assert!(store.exists("room-1").unwrap());
    assert_eq!(store.load::<GameState>("nobody").unwrap(), None);
    assert_eq!(store.sequence("nobody").unwrap(), None);
}

#[test]
fn delete_reports_whether_the_actor_existed() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    store.save("b", &2u32).unwrap();
    assert!(store.delete("a").unwrap());
    assert!(!store.delete("a").unwrap());
    assert!(!store.delete("never-existed").unwrap());
    assert!(!store.exists("a").unwrap());
    assert_eq!(store.load::<u32>("a").unwrap(), None);
    assert_eq!(store.sequence("a").unwrap(), None);
    // Only the named actor went.
    assert_eq!(store.load::<u32>("b").unwrap(), Some(2));
}

#[test]
fn save_with_sequence_only_moves_forward() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store
        .save_with("a", &"ten", WriteOptions::new().sequence(10))
        .unwrap();
    assert_eq!(store.sequence("a").unwrap(), Some(10));

    for stale in [5, 10] {
        let err = store
            .save_with("a", &"stale", WriteOptions::new().sequence(stale))
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::StaleSequence { actor_id, sequence, current: Some(10) }
                    if actor_id == "a" && *sequence == stale
            ),
            "{stale}: {err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::StaleSequence);
        assert!(!err.is_conflict(), "a conflict is a conditional write's");
    }
    assert_eq!(store.load::<String>("a").unwrap().as_deref(), Some("ten"));

    // An ordinary save continues from the explicit number.
    assert_eq!(store.save("a", &"eleven").unwrap(), 11);
    store
        .save_with("a", &"twenty", WriteOptions::new().sequence(20))
        .unwrap();
    assert_eq!(store.sequence("a").unwrap(), Some(20));

    // The delete takes 21; a re-create must go above it.
    assert!(store.delete("a").unwrap());
    for stale in [1, 20, 21] {
        let err = store
            .save_with("a", &"stale", WriteOptions::new().sequence(stale))
            .unwrap_err();
        assert!(
            matches!(err, Error::StaleSequence { sequence, current: None, .. } if sequence == stale),
            "{stale}: {err:?}"
        );
    }
    assert!(!store.exists("a").unwrap());
    store
        .save_with("a", &"back", WriteOptions::new().sequence(22))
        .unwrap();
    assert_eq!(store.sequence("a").unwrap(), Some(22));
    assert_eq!(store.load::<String>("a").unwrap().as_deref(), Some("back"));

    // Numbers beyond BIGINT are refused before anything is sent.
    let err = store
        .save_with("a", &"huge", WriteOptions::new().sequence(u64::MAX))
        .unwrap_err();
    assert!(
        matches!(err, Error::SequenceOutOfRange(u64::MAX)),
        "{err:?}"
    );
}

/// Timestamps are UTC whatever the writer's session time zone: the store
/// below connects with `TimeZone=America/New_York` (proved by a column that
/// records the inserting session's setting), and `updated_at` still reads
/// within minutes of the test's clock (not hours off). `created_at` stays put on updates.
#[test]
fn load_versioned_timestamps_are_utc_in_any_session_time_zone() {
    let schema = TestDatabase::shared().schema();
    let store = trebuchet_postgres::StateStore::builder()
        .url(&common::new_york_url())
        .table(schema.table("actor_states"))
        .channel(schema.channel())
        .migrate(true)
        .build()
        .unwrap();
    let mut client = schema.client().unwrap();
    client
        .batch_execute(&format!(
            "ALTER TABLE \"{}\".actor_states ADD COLUMN session_tz TEXT DEFAULT current_setting('TimeZone')",
            schema.name()
        ))
        .unwrap();

    let mut state = GameState::default();
    assert_eq!(store.save("room", &state).unwrap(), 1);
    let tz: String = client
        .query_one(
            &format!(
                "SELECT session_tz FROM \"{}\".actor_states WHERE actor_id = 'room'",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        tz,
        common::NEW_YORK,
        "the writer's session must be in New York"
    );

    let v1 = store.load_versioned::<GameState>("room").unwrap().unwrap();
    assert_eq!(v1.sequence, 1);
    assert_eq!(v1.value, state);
    common::assert_recent("updated_at", v1.updated_at);
    common::assert_recent("created_at", v1.created_at);
    assert_eq!(v1.updated_at, v1.created_at);

    std::thread::sleep(std::time::Duration::from_millis(20));
    state.round = 2;
    assert_eq!(store.save("room", &state).unwrap(), 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let t = store
        .transform("room", |s: Option<GameState>| {
            let mut s = s.unwrap();
            s.round += 1;
            s
        })
        .unwrap();
    assert_eq!(t.sequence, 3);
    common::assert_recent("transform's updated_at", t.updated_at);
    assert_eq!(t.created_at, v1.created_at, "transform reports created_at");

    let v3 = store.load_versioned::<GameState>("room").unwrap().unwrap();
    assert_eq!(v3.sequence, 3);
    assert_eq!(v3.value.round, 3);
    assert_eq!(
        v3.created_at, v1.created_at,
        "created_at must not move on update"
    );
    assert_eq!(v3.updated_at, t.updated_at);
    assert!(
        v3.updated_at > v1.updated_at,
        "updated_at must move on update"
    );
    common::assert_recent("updated_at after updates", v3.updated_at);

    // Every other write path stores UTC too.
    store
        .save_if("room", &state, Expected::Sequence(3))
        .unwrap();
    store
        .save_with("room", &state, WriteOptions::new().sequence(10))
        .unwrap();
    store.raw().save("raw", b"x").unwrap();
    for id in ["room", "raw"] {
        let v = store.raw().load_versioned(id).unwrap().unwrap();
        common::assert_recent("updated_at", v.updated_at);
        common::assert_recent("created_at", v.created_at);
    }
    let room = store.raw().load_versioned("room").unwrap().unwrap();
    assert_eq!(room.created_at, v1.created_at);
}

/// The bytes API stores exactly what it is given: empty, zeros, every
/// byte value, invalid UTF-8, and a large random blob.
#[test]
fn bytes_round_trip_exactly() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut big = vec![0u8; 1 << 20];
    big.iter_mut().for_each(|b| *b = fastrand::u8(..));
    let payloads: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0; 17],
        (0..=255).collect(),
        vec![0xff, 0xfe, 0x00, 0xc3, 0x28, b'\\', b'\'', 0x00],
        b"\\x00 looks like bytea hex".to_vec(),
        big,
    ];
    for (i, bytes) in payloads.iter().enumerate() {
        let id = format!("actor-{i}");
        assert_eq!(store.raw().save(&id, bytes).unwrap(), 1);
        assert_eq!(store.raw().load(&id).unwrap().as_ref(), Some(bytes), "{i}");
        let v = store.raw().load_versioned(&id).unwrap().unwrap();
        assert_eq!((&v.value, v.sequence), (bytes, 1));
    }

    assert_eq!(
        store.raw().save_if("z", &[0, 0], Expected::Absent).unwrap(),
        1
    );
    assert_eq!(
        store
            .raw()
            .save_if("z", &[0, 1, 0], Expected::Sequence(1))
            .unwrap(),
        2
    );
    let err = store
        .raw()
        .save_if("z", &[9], Expected::Sequence(1))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                actual: Some(2),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.raw().load("z").unwrap(), Some(vec![0, 1, 0]));

    let v = store
        .raw()
        .transform("z", |old| {
            let mut next = old.expect("z exists").to_vec();
            next.push(0);
            next
        })
        .unwrap();
    assert_eq!((v.value.as_slice(), v.sequence), (&[0, 1, 0, 0][..], 3));
    let v = store
        .raw()
        .transform("fresh", |old| {
            assert_eq!(old, None);
            vec![0; 3]
        })
        .unwrap();
    assert_eq!((v.value, v.sequence), (vec![0; 3], 1));
    assert_eq!(store.raw().load("z").unwrap(), Some(vec![0, 1, 0, 0]));
    assert_eq!(store.raw().load("fresh").unwrap(), Some(vec![0; 3]));
    assert_eq!(store.raw().load("nobody").unwrap(), None);
}

/// With `Codec::Json` the column holds UTF-8 JSON that SQL (or a Swift
/// instance) can read, written the way Swift's `JSONEncoder` writes it.
#[test]
fn json_codec_stores_readable_json() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .codec(Codec::Json)
        .migrate(true)
        .build()
        .unwrap();
    assert_eq!(store.codec(), Codec::Json);
    let mut state = GameState::default();
    state.scores.insert("alice".into(), 10);
    state.scores.insert("red/blue".into(), -3);
    state.round = 7;
    store.save("room", &state).unwrap();

    let mut client = schema.client().unwrap();
    let text: String = client
        .query_one(
            &format!(
                "SELECT convert_from(state, 'UTF8') FROM \"{}\".actor_states WHERE actor_id = 'room'",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .get(0);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"scores": {"alice": 10, "red/blue": -3}, "round": 7})
    );
    // Compact, and "/" escaped as Swift's JSONEncoder does by default.
    assert!(!text.contains(' '), "{text}");
    assert!(text.contains(r#""red\/blue""#), "{text}");
    // The server can read it as JSON too.
    let round: i64 = client
        .query_one(
            &format!(
                "SELECT (convert_from(state, 'UTF8')::jsonb ->> 'round')::bigint \
                 FROM \"{}\".actor_states WHERE actor_id = 'room'",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(round, 7);

    assert_eq!(
        store.load::<GameState>("room").unwrap(),
        Some(state.clone())
    );
    // A row written as JSON by another client (a Swift instance) loads.
    store
        .raw()
        .save("swift", br#"{"scores":{"bob":2},"round":1}"#)
        .unwrap();
    let swift: GameState = store.load("swift").unwrap().unwrap();
    assert_eq!((swift.scores["bob"], swift.round), (2, 1));
}

#[test]
fn cbor_is_the_default_codec() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    assert_eq!(store.codec(), Codec::Cbor);
    let mut state = GameState::default();
    state.scores.insert("alice".into(), 10);
    state.round = 7;
    store.save("room", &state).unwrap();

    let bytes = store.raw().load("room").unwrap().unwrap();
    assert_eq!(bytes, Codec::Cbor.encode(&state).unwrap());
    let decoded: GameState = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(decoded, state);
    assert_eq!(bytes[0] & 0xe0, 0xa0, "a CBOR map, not JSON: {bytes:?}");

    // A JSON store reading CBOR bytes reports a decode error naming the actor.
    let json = schema.store_builder().codec(Codec::Json).build().unwrap();
    let err = json.load::<GameState>("room").unwrap_err();
    assert!(
        matches!(&err, Error::Decode { actor_id, .. } if actor_id == "room"),
        "{err:?}"
    );
}
