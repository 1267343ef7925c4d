//! Guarantee 10 of the design, **Numbers never repeat, tables never cross**:
//!
//! > Under any interleaving of writes and deletes (threads, processes, cuts),
//! > no two successful writes of one actor return the same sequence number,
//! > and a number never repeats after a delete. A listener obtained from a
//! > store hears only that store's table.
//!
//! - This file: a delete takes the next number and leaves a tombstone
//!   holding it, and an actor created again goes above it, whatever the
//!   write path (`sequence_numbers_continue_after_delete_and_never_repeat`).
//! - `delete_race`: a write that races a delete of the same actor continues
//!   above the delete's tombstone, on every path that can create an actor.
//! - `tombstones`: `purge_tombstones`: old tombstones go, young ones stay,
//!   and what a purge forgets.
//! - `shared_channel`: two tables announcing on one channel: a store's
//!   listener hears only its own table.
//!
//! The randomised history suite (`tests/history/`, the `history` test
//! target) checks this guarantee too.

mod common;
#[path = "numbers_never_repeat_tables_never_cross/delete_race.rs"]
mod delete_race;
#[path = "numbers_never_repeat_tables_never_cross/shared_channel.rs"]
mod shared_channel;
#[path = "numbers_never_repeat_tables_never_cross/tombstones.rs"]
mod tombstones;

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::Expected;

/// The rule (src/store.rs, "Sequence numbers", and the trigger): a delete
/// takes the next number and leaves a tombstone holding it; a new actor
/// under the same id starts above the tombstone. Whatever the write path,
/// numbers for one id never repeat.
#[test]
fn sequence_numbers_continue_after_delete_and_never_repeat() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut seen = vec![
        store.save("a", &1u32).unwrap(),
        store.save("a", &2u32).unwrap(),
    ];
    assert_eq!(seen, [1, 2]);
    assert!(store.delete("a").unwrap());
    let tombstone = |client: &mut postgres::Client| -> i64 {
        client
            .query_one(
                &format!(
                    "SELECT sequence_number FROM \"{}\".actor_states_tombstones WHERE actor_id = 'a'",
                    schema.name()
                ),
                &[],
            )
            .unwrap()
            .get(0)
    };
    let mut client = schema.client().unwrap();
    assert_eq!(tombstone(&mut client), 3, "the delete takes 3");
    seen.push(3);

    // Re-created by an unconditional save.
    assert_eq!(store.save("a", &3u32).unwrap(), 4);
    seen.push(4);
    assert_eq!(store.sequence("a").unwrap(), Some(4));
    assert_eq!(store.load::<u32>("a").unwrap(), Some(3));

    // Re-created by save_if(Absent).
    assert!(store.delete("a").unwrap());
    assert_eq!(tombstone(&mut client), 5);
    seen.push(5);
    seen.push(store.save_if("a", &4u32, Expected::Absent).unwrap());
    assert_eq!(seen.last(), Some(&6));

    // Re-created by transform, on both the typed and the bytes API.
    assert!(store.delete("a").unwrap());
    seen.push(7);
    let v = store
        .transform("a", |old: Option<u32>| {
            assert_eq!(old, None, "a deleted actor starts from nothing");
            5
        })
        .unwrap();
    seen.push(v.sequence);
    assert_eq!(v.sequence, 8);
    assert!(store.delete("a").unwrap());
    seen.push(9);
    let v = store
        .raw()
        .transform("a", |old| {
            assert_eq!(old, None);
            vec![6]
        })
        .unwrap();
    seen.push(v.sequence);
    assert_eq!(v.sequence, 10);

    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers repeat or go back: {seen:?}"
    );
    // Other actors are unaffected by a's tombstone.
    assert_eq!(store.save("b", &1u32).unwrap(), 1);
}
