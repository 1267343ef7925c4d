//! A write that races a delete of the same actor continues above the
//! delete's tombstone, on every path that can create an actor.
//!
//! Each test holds a delete open in a transaction of its own, starts the
//! write, waits until the server shows the write waiting for that delete's
//! lock, and then commits the delete. The write's statement was planned
//! before the tombstone existed; the number it returns must still be above
//! the tombstone's.

use crate::common;

use std::thread;

use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{Expected, RestoreOutcome, StateStore, Versioned, WriteOptions};

/// Saves `id` five times (sequence 5), so that its delete leaves a
/// tombstone at 6.
const SAVES: u64 = 5;
const TOMBSTONE: u64 = SAVES + 1;

/// Runs `write` while a delete of `id` is in flight, and commits the delete
/// once `write` waits for it. Returns what `write` returned.
fn race_with_delete<R: Send + 'static>(
    schema: &TestSchema,
    store: &StateStore,
    id: &str,
    write: impl FnOnce(&StateStore) -> R + Send + 'static,
) -> R {
    for n in 1..=SAVES {
        store.save(id, &n).unwrap();
    }
    let table = schema.table("actor_states");
    let mut deleter = schema.client().unwrap();
    let mut tx = deleter.transaction().unwrap();
    let deleted = tx
        .execute(&format!("DELETE FROM {table} WHERE actor_id = $1"), &[&id])
        .unwrap();
    assert_eq!(deleted, 1);
    let deleter_pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);

    let writer_store = store.clone();
    let writer = thread::spawn(move || write(&writer_store));
    common::wait_for_a_waiter(&mut schema.client().unwrap(), deleter_pid, || false);
    tx.commit().unwrap();
    writer.join().expect("the write panicked")
}

/// The tombstone's number and the stored row's, after the race.
fn stored(schema: &TestSchema, id: &str) -> (Option<u64>, Option<u64>) {
    let mut client = schema.client().unwrap();
    let mut one = |sql: String| -> Option<u64> {
        client
            .query_opt(&sql, &[&id])
            .unwrap()
            .map(|row| row.get::<_, i64>(0) as u64)
    };
    let tombstone = one(format!(
        "SELECT sequence_number FROM {} WHERE actor_id = $1",
        schema.table("actor_states_tombstones")
    ));
    let row = one(format!(
        "SELECT sequence_number FROM {} WHERE actor_id = $1",
        schema.table("actor_states")
    ));
    (tombstone, row)
}

#[track_caller]
fn assert_above_tombstone(schema: &TestSchema, id: &str, returned: u64) {
    let (tombstone, row) = stored(schema, id);
    assert_eq!(tombstone, Some(TOMBSTONE), "the delete left its tombstone");
    assert!(
        returned > TOMBSTONE,
        "the write racing the delete returned {returned}, at or below the tombstone's {TOMBSTONE}"
    );
    assert_eq!(row, Some(returned), "the row holds the number returned");
}

#[test]
fn a_save_racing_a_delete_continues_above_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let n = race_with_delete(&schema, &store, "a", |s| s.save("a", &100u64).unwrap());
    assert_above_tombstone(&schema, "a", n);
    assert_eq!(store.load::<u64>("a").unwrap(), Some(100));
}

#[test]
fn a_create_racing_a_delete_continues_above_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let n = race_with_delete(&schema, &store, "a", |s| {
        s.save_if("a", &100u64, Expected::Absent)
    });
    // The actor existed when the create was sent: it may fail as a
    // conflict, or succeed once the delete committed, but never repeat a
    // number.
    match n {
        Ok(n) => assert_above_tombstone(&schema, "a", n),
        Err(e) => {
            assert!(e.is_conflict(), "{e}");
            assert_eq!(stored(&schema, "a"), (Some(TOMBSTONE), None));
        }
    }
}

#[test]
fn a_transform_racing_a_delete_continues_above_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let v = race_with_delete(&schema, &store, "a", |s| {
        s.transform("a", |n: Option<u64>| n.unwrap_or(0) + 1000)
            .unwrap()
    });
    assert_above_tombstone(&schema, "a", v.sequence);
}

#[test]
fn save_many_racing_a_delete_continues_above_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let numbers = race_with_delete(&schema, &store, "a", |s| {
        s.save_many(&[("a", 100u64), ("b", 200u64)]).unwrap()
    });
    assert_above_tombstone(&schema, "a", numbers[0]);
    assert_eq!(numbers[1], 1);
}

#[test]
fn save_many_if_racing_a_delete_continues_above_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let results = race_with_delete(&schema, &store, "a", |s| {
        s.save_many_if(&[
            ("a", 100u64, Expected::Absent),
            ("b", 200, Expected::Absent),
        ])
        .unwrap()
    });
    match &results[0] {
        Ok(n) => assert_above_tombstone(&schema, "a", *n),
        Err(e) => assert!(e.is_conflict(), "{e}"),
    }
    assert_eq!(*results[1].as_ref().unwrap(), 1);
}

#[test]
fn a_batch_racing_a_delete_continues_above_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let results = race_with_delete(&schema, &store, "a", |s| {
        s.batch()
            .save("a", &100u64)
            .save("b", &200u64)
            .commit()
            .unwrap()
    });
    let trebuchet_postgres::BatchResult::Saved(n) = results[0] else {
        panic!("{results:?}");
    };
    assert_above_tombstone(&schema, "a", n);
}

#[test]
fn grouped_saves_racing_a_delete_continue_above_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store_builder().group_commit(true).build().unwrap();
    store.migrate().unwrap();
    // Two writers at once, so that the group commit may combine them into
    // one statement; either way, the raced actor continues above.
    let numbers = race_with_delete(&schema, &store, "a", |s| {
        let other = s.clone();
        let b = thread::spawn(move || other.save("b", &200u64).unwrap());
        let a = s.save("a", &100u64).unwrap();
        (a, b.join().unwrap())
    });
    assert_above_tombstone(&schema, "a", numbers.0);
    assert_eq!(numbers.1, 1);
}

#[test]
fn a_restore_racing_a_delete_never_goes_below_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let now = std::time::SystemTime::now();
    let outcomes = race_with_delete(&schema, &store, "a", move |s| {
        let item = Versioned::new(vec![0xa0], 3, now, now);
        s.raw().restore_many(&[("a", item)]).unwrap()
    });
    assert!(
        !matches!(outcomes[0], RestoreOutcome::Written),
        "{outcomes:?}"
    );
    assert_eq!(
        stored(&schema, "a"),
        (Some(TOMBSTONE), None),
        "number 3 was restored under a tombstone at {TOMBSTONE}"
    );
}

#[test]
fn a_save_at_a_given_sequence_racing_a_delete_never_goes_below_the_tombstone() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let result = race_with_delete(&schema, &store, "a", |s| {
        s.save_with("a", &100u64, WriteOptions::new().sequence(TOMBSTONE))
    });
    // Sequence 6 is the tombstone's own number: never written again.
    assert!(result.is_err(), "{result:?}");
    assert_eq!(stored(&schema, "a"), (Some(TOMBSTONE), None));
}
