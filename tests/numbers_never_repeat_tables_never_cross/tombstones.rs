//! `purge_tombstones`: old tombstones go, young ones stay, and what a purge
//! forgets.

use std::time::Duration;

use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::Error;

const HOUR: Duration = Duration::from_secs(3600);

/// Moves the tombstones of `ids` two hours into the past.
fn age(schema: &TestSchema, ids: &[&str]) {
    let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    schema
        .client()
        .unwrap()
        .execute(
            &format!(
                "UPDATE {} SET deleted_at = deleted_at - INTERVAL '2 hours' WHERE actor_id = ANY($1)",
                schema.table("actor_states_tombstones")
            ),
            &[&ids],
        )
        .unwrap();
}

#[test]
fn tombstones_older_than_asked_are_purged_and_younger_ones_kept() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    for id in ["old-1", "old-2", "young"] {
        store.save(id, &1u32).unwrap();
        store.save(id, &2u32).unwrap();
        assert!(store.delete(id).unwrap());
    }
    age(&schema, &["old-1", "old-2"]);
    assert_eq!(store.stats().unwrap().tombstones, 3);

    assert_eq!(store.purge_tombstones(HOUR).unwrap(), 2);
    assert_eq!(store.stats().unwrap().tombstones, 1);
    assert_eq!(
        store.purge_tombstones(HOUR).unwrap(),
        0,
        "nothing left that old"
    );

    // A kept tombstone still holds its number; a purged id starts again.
    assert_eq!(store.save("young", &3u32).unwrap(), 4);
    assert_eq!(store.save("old-1", &3u32).unwrap(), 1);
}

#[test]
fn the_tombstone_of_an_actor_created_again_goes_and_its_numbers_still_grow() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("x", &1u32).unwrap();
    store.delete("x").unwrap(); // tombstone at 2
    assert_eq!(store.save("x", &2u32).unwrap(), 3);
    age(&schema, &["x"]);
    assert_eq!(store.purge_tombstones(HOUR).unwrap(), 1);
    store.delete("x").unwrap(); // a new tombstone at 4
    assert_eq!(store.save("x", &3u32).unwrap(), 5);
}

#[test]
fn a_purge_of_many_tombstones_runs_in_batches_and_misses_none() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let ids: Vec<String> = (0..23_456).map(|i| format!("gone-{i:05}")).collect();
    let items: Vec<(&str, u32)> = ids.iter().map(|id| (id.as_str(), 1)).collect();
    store.save_many(&items).unwrap();
    store.delete_many(&ids).unwrap();
    store.save("kept", &1u32).unwrap();
    store.delete("kept").unwrap();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    age(&schema, &all);

    assert_eq!(store.purge_tombstones(HOUR).unwrap(), 23_456);
    assert_eq!(store.stats().unwrap().tombstones, 1);
    assert_eq!(
        store.purge_tombstones(Duration::ZERO).unwrap(),
        1,
        "zero: all"
    );
}

#[test]
fn an_age_past_what_the_server_can_hold_is_refused() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    store.delete("a").unwrap();
    let err = store.purge_tombstones(Duration::MAX).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    assert!(err.to_string().contains("older_than"), "{err}");
    assert_eq!(store.stats().unwrap().tombstones, 1, "nothing purged");
}
