//! Hostile input from those who may write or connect: actor ids that would
//! break a statement or a payload built from strings are stored, listed,
//! announced and deleted as data; malformed, huge, deeply nested and forged
//! payloads another client sends on the channel are counted and skipped, and
//! cannot poison a cache.

use crate::common;

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{ChangeKind, Event, Expected, StateCache};

use super::{capture_logs, next_event, WAIT};

// ----- hostile actor ids are data -------------------------------------------------

/// Ids that would break a statement assembled from strings, a JSON payload
/// built by concatenation, a LIKE pattern, a terminal or a byte-length limit.
fn hostile_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "it's",
        "\"quoted\"",
        "'; DROP TABLE actor_states; --",
        "\"; DROP TABLE actor_states; --",
        "x' OR '1'='1",
        "$1",
        "%s%n%x",
        "%",
        "_",
        "\\",
        "\\'\\\"",
        "back`tick`",
        "line\nbreak\r\ttab",
        "\u{7}\u{1b}[31mred",
        "{\"actorID\":\"evil\",\"sequenceNumber\":99}",
        "null",
        " ",
        "  padded  ",
        "🦀",
        "日本語のアクター",
        "\u{202E}txt.exe",
        "zero\u{200B}width",
        "e\u{301}",
        "\u{FEFF}bom",
        "\u{10FFFF}",
        "Ω≈ç√",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // 255 characters of four, two and three bytes: the column's limit is
    // in characters (1,020 bytes here), not bytes.
    ids.push("🦀".repeat(255));
    ids.push("é".repeat(255));
    ids.push("€".repeat(254) + "'");
    ids
}

/// Hostile actor ids are accepted and stored, loaded, listed, announced and
/// deleted exactly as given: no statement or payload is ever built from them.
#[test]
fn hostile_actor_ids_round_trip_as_data() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();
    let ids = hostile_ids();
    assert_eq!(ids[ids.len() - 3].len(), 1020);
    let mut client = schema.client().unwrap();

    for id in &ids {
        trebuchet_postgres::validate_actor_id(id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
        let only = listener.subscribe_actor(id.clone());
        assert_eq!(store.save(id, &1u32).unwrap(), 1, "{id:?}");
        assert_eq!(store.load::<u32>(id).unwrap(), Some(1), "{id:?}");
        assert_eq!(store.save_if(id, &2u32, Expected::Sequence(1)).unwrap(), 2);
        let t = store
            .transform(id, |n: Option<u32>| n.unwrap_or(0) + 1)
            .unwrap();
        assert_eq!((t.value, t.sequence), (3, 3), "{id:?}");
        assert!(store.exists(id).unwrap());
        assert_eq!(store.sequence(id).unwrap(), Some(3));
        assert_eq!(store.raw().load_versioned(id).unwrap().unwrap().sequence, 3);
        for sequence in 1..=3 {
            common::expect_change(&only, id, sequence, ChangeKind::Saved);
        }
        // Stored as given, byte for byte, and found by the server's own
        // comparison with the parameter.
        let stored: String = client
            .query_one(
                &format!(
                    "SELECT actor_id::TEXT FROM \"{}\".actor_states WHERE actor_id = $1",
                    schema.name()
                ),
                &[id],
            )
            .unwrap()
            .get(0);
        assert_eq!(&stored, id);
        // A prefix is a prefix, never a pattern.
        let expected = ids
            .iter()
            .filter(|other| other.starts_with(id.as_str()))
            .count();
        let before = ids
            .iter()
            .take_while(|other| *other != id)
            .collect::<Vec<_>>();
        let saved_so_far = before
            .iter()
            .filter(|other| other.starts_with(id.as_str()))
            .count()
            + 1;
        assert!(saved_so_far <= expected);
        assert_eq!(
            store.count_actors(id).unwrap(),
            saved_so_far as u64,
            "prefix {id:?}"
        );
        let page = store.list_actors(id, None, 1000).unwrap();
        assert!(page.actors.iter().any(|a| &a.actor_id == id), "{id:?}");
        assert!(page
            .actors
            .iter()
            .all(|a| a.actor_id.starts_with(id.as_str())));
    }
    // Bulk paths and the unfiltered subscriber see the same ids.
    let loaded = store.load_many::<u32, _>(&ids).unwrap();
    assert!(loaded.iter().all(|v| *v == Some(3)));
    let saved = store
        .save_many(&ids.iter().map(|id| (id.as_str(), 4u32)).collect::<Vec<_>>())
        .unwrap();
    assert!(saved.iter().all(|s| *s == 4));
    let mut announced = std::collections::HashMap::new();
    while announced.len() < ids.len() || announced.values().any(|s| *s < 4) {
        match next_event(&all) {
            Event::Change(c) => {
                assert!(ids.contains(&c.actor_id), "unknown actor {:?}", c.actor_id);
                announced.insert(c.actor_id.clone(), c.sequence);
            }
            other => panic!("{other:?}"),
        }
    }
    // Deletes are announced with the exact id too, and leave tombstones.
    for id in &ids {
        assert!(store.delete(id).unwrap(), "{id:?}");
        common::expect_change(&all, id, 5, ChangeKind::Deleted);
        assert_eq!(store.load::<u32>(id).unwrap(), None);
    }
    let (rows, tombstones): (i64, i64) = {
        let row = client
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM \"{s}\".actor_states), \
                     (SELECT count(*) FROM \"{s}\".actor_states_tombstones)",
                    s = schema.name()
                ),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((rows, tombstones), (0, ids.len() as i64));
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(listener.health().malformed, 0);
}

// ----- hostile notification payloads ------------------------------------------------

/// Payloads another client can send on the channel, none of which the
/// trigger would write. Each is under PostgreSQL's 8,000-byte limit.
fn hostile_payloads() -> Vec<(&'static str, String)> {
    let deep = |open: &str, close: &str, n: usize| open.repeat(n) + &close.repeat(n);
    vec![
        ("empty", String::new()),
        ("blank", "   ".into()),
        ("not JSON", "not json".into()),
        ("null", "null".into()),
        ("a number", "42".into()),
        ("a string", "\"room-1\"".into()),
        ("an array", "[\"room-1\",1]".into()),
        ("truncated", "{\"actorID\":\"a\",\"sequenceNumber\":".into()),
        (
            "trailing garbage",
            "{\"actorID\":\"a\",\"sequenceNumber\":1}}".into(),
        ),
        ("empty object", "{}".into()),
        ("no actorID", "{\"sequenceNumber\":1}".into()),
        ("no sequenceNumber", "{\"actorID\":\"a\"}".into()),
        (
            "actorID a number",
            "{\"actorID\":1,\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID null",
            "{\"actorID\":null,\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID an array",
            "{\"actorID\":[\"a\"],\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID an object",
            "{\"actorID\":{\"a\":1},\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID empty",
            "{\"actorID\":\"\",\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID with NUL",
            "{\"actorID\":\"a\\u0000b\",\"sequenceNumber\":1}".into(),
        ),
        (
            "actorID of 256 characters",
            format!(
                "{{\"actorID\":\"{}\",\"sequenceNumber\":1}}",
                "é".repeat(256)
            ),
        ),
        (
            "actorID of 7,900 characters",
            format!(
                "{{\"actorID\":\"{}\",\"sequenceNumber\":1}}",
                "x".repeat(7900)
            ),
        ),
        (
            "duplicate actorID",
            "{\"actorID\":\"a\",\"actorID\":\"b\",\"sequenceNumber\":1}".into(),
        ),
        (
            "sequenceNumber a string",
            "{\"actorID\":\"a\",\"sequenceNumber\":\"1\"}".into(),
        ),
        (
            "sequenceNumber a fraction",
            "{\"actorID\":\"a\",\"sequenceNumber\":1.5}".into(),
        ),
        (
            "sequenceNumber a bool",
            "{\"actorID\":\"a\",\"sequenceNumber\":true}".into(),
        ),
        (
            "sequenceNumber 1e30",
            "{\"actorID\":\"a\",\"sequenceNumber\":1e30}".into(),
        ),
        (
            "sequenceNumber 2^64",
            "{\"actorID\":\"a\",\"sequenceNumber\":18446744073709551616}".into(),
        ),
        (
            "sequenceNumber negative",
            "{\"actorID\":\"a\",\"sequenceNumber\":-1}".into(),
        ),
        (
            "timestamp a string",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"timestamp\":\"now\"}".into(),
        ),
        (
            "timestamp 1e300",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"timestamp\":1e300}".into(),
        ),
        (
            "op a number",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"op\":5}".into(),
        ),
        (
            "op unknown",
            "{\"actorID\":\"a\",\"sequenceNumber\":1,\"op\":\"drop\"}".into(),
        ),
        (
            "op of 7,900 characters",
            format!(
                "{{\"actorID\":\"a\",\"sequenceNumber\":1,\"op\":\"{}\"}}",
                "d".repeat(7900)
            ),
        ),
        (
            "huge wrong-typed value",
            format!(
                "{{\"actorID\":\"a\",\"sequenceNumber\":\"{}\"}}",
                "9".repeat(7900)
            ),
        ),
        ("huge non-JSON", "x".repeat(7999)),
        ("7,999 open brackets", "[".repeat(7999)),
        ("nested arrays", deep("[", "]", 3999)),
        ("nested objects", deep("{\"a\":", "}", 1300)),
        (
            "nested actorID",
            format!(
                "{{\"actorID\":{},\"sequenceNumber\":1}}",
                deep("[", "]", 3900)
            ),
        ),
        (
            "nested timestamp",
            format!(
                "{{\"actorID\":\"a\",\"sequenceNumber\":1,\"timestamp\":{}}}",
                deep("{\"t\":", "}", 1000)
            ),
        ),
    ]
}

/// Another client sends malformed, huge and deeply nested payloads on the
/// channel, once each and then as a flood: each is counted and skipped,
/// nothing reaches a subscriber or a cache, the listener stays connected,
/// and the log gets a few short lines rather than one long line per payload.
#[test]
fn hostile_notify_payloads_are_counted_and_skipped() {
    let capture = capture_logs();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();
    let channel = schema.channel();
    store.save("victim", &1u32).unwrap();
    common::expect_change(&all, "victim", 1, ChangeKind::Saved);
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&1));

    let payloads = hostile_payloads();
    let mut attacker = schema.client().unwrap();
    for (label, payload) in &payloads {
        assert!(payload.len() < 8000, "{label}: {} bytes", payload.len());
        attacker
            .execute("SELECT pg_notify($1, $2)", &[&channel, payload])
            .unwrap_or_else(|e| panic!("{label}: {e}"));
    }
    // A flood in one transaction: 2,000 distinct 7,900-byte payloads with a
    // wrong type (identical payloads in a transaction would be folded).
    const FLOOD: i64 = 2000;
    attacker
        .execute(
            "SELECT count(pg_notify($1, '{\"actorID\":\"victim\",\"sequenceNumber\":\"' \
             || i || repeat('9', 7900) || '\"}')) FROM generate_series(1, $2::INT8) i",
            &[&channel, &FLOOD],
        )
        .unwrap();
    // Unknown keys are ignored, however deeply nested: a valid change.
    let nested_extra = format!(
        "{{\"actorID\":\"victim\",\"sequenceNumber\":2,\"extra\":{}}}",
        "[".repeat(3900) + &"]".repeat(3900)
    );
    attacker
        .execute("SELECT pg_notify($1, $2)", &[&channel, &nested_extra])
        .unwrap();
    store.save("victim", &3u32).unwrap();

    // Nothing was made of the hostile ones: the next events are the valid
    // payload and the real save.
    common::expect_change(&all, "victim", 2, ChangeKind::Saved);
    common::expect_change(&all, "victim", 2, ChangeKind::Saved);
    let health = listener.health();
    let hostile = payloads.len() as u64 + FLOOD as u64;
    assert_eq!(health.malformed, hostile, "{health:?}");
    assert_eq!(health.received, hostile + 3, "{health:?}");
    assert!(health.connected && health.reconnects == 0, "{health:?}");
    assert_eq!(health.dropped, 0);
    common::wait_until("the cache reloads the real save", WAIT, || {
        cache.sequence("victim") == Some(2)
    });
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&3));

    // The log: a few short lines about this channel, not one per payload.
    let lines: Vec<String> = capture
        .lines()
        .into_iter()
        .filter(|l| l.contains(&channel) && l.contains("malformed"))
        .collect();
    assert!(!lines.is_empty(), "malformed payloads are logged");
    assert!(lines.len() <= 5, "{} log lines: {lines:#?}", lines.len());
    for line in &lines {
        assert!(line.len() < 600, "a {}-byte log line: {line}", line.len());
    }
    assert!(
        lines.iter().any(|l| l.contains("more")) || lines.len() == 1,
        "the count of suppressed messages is logged: {lines:#?}"
    );
}

/// A well-formed forged payload (any role that may connect may NOTIFY any
/// channel) cannot make a cache believe an actor deleted, or hide the
/// actor's later changes behind a huge sequence number: the cache takes
/// announcements as hints and reads the table.
#[test]
fn forged_payloads_cannot_poison_a_cache() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();
    store.save("victim", &1u32).unwrap();
    common::expect_change(&all, "victim", 1, ChangeKind::Saved);
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&1));

    let mut attacker = schema.client().unwrap();
    let max = i64::MAX;
    for payload in [
        format!("{{\"actorID\":\"victim\",\"sequenceNumber\":{max},\"op\":\"delete\"}}"),
        format!(
            "{{\"actorID\":\"victim\",\"sequenceNumber\":{},\"op\":\"save\"}}",
            max - 1
        ),
        "{\"actorID\":\"victim\",\"sequenceNumber\":2,\"op\":\"delete\"}".to_owned(),
    ] {
        attacker
            .execute("SELECT pg_notify($1, $2)", &[&schema.channel(), &payload])
            .unwrap();
    }
    for _ in 0..3 {
        next_event(&all);
    }
    // The cache still holds the stored state, and follows real changes.
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&1));
    store.save("victim", &2u32).unwrap();
    common::wait_until("the cache follows the real save", WAIT, || {
        cache.sequence("victim") == Some(2)
    });
    assert_eq!(cache.get("victim").unwrap().as_deref(), Some(&2));
    // A real delete still empties it.
    assert!(store.delete("victim").unwrap());
    common::wait_until("the cache sees the real delete", WAIT, || {
        cache.get("victim").unwrap().is_none()
    });
    store.save("victim", &4u32).unwrap();
    common::wait_until("the cache sees the actor again", WAIT, || {
        cache.get("victim").unwrap().as_deref() == Some(&4)
    });
}
