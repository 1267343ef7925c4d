//! Guarantee 2 of the design, **Optimistic locking is real**:
//!
//! > `save_if(id, state, expected)` writes only when the stored sequence
//! > number equals `expected` (or the row is absent, when asked), and the
//! > error says expected vs actual.
//!
//! - This file: conditional writes expecting absence, a version two writers
//!   both read, or a wrong number write nothing and report what they found
//!   (`save_if_absent_then_conflict`, `two_writers_of_the_same_version_conflict`,
//!   `save_if_with_a_wrong_sequence_conflicts`).
//! - `reported_outcomes`: the version a failed conditional write reports
//!   was true at some moment while it ran, even when writers and deletes
//!   commit around its statement; a write whose connection broke reports
//!   the numbers it produced, or that its outcome is unknown.
//!
//! The randomised history suite (`tests/history/`, the `history` test
//! target) checks this guarantee too.

mod common;
#[path = "optimistic_locking_is_real/reported_outcomes.rs"]
mod reported_outcomes;

use common::GameState;
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Error, Expected};

#[test]
fn save_if_absent_then_conflict() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    assert_eq!(store.save_if("a", &1u32, Expected::Absent).unwrap(), 1);
    let err = store.save_if("a", &2u32, Expected::Absent).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                expected: Expected::Absent,
                actual: Some(1),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));
}

/// Two writers on separate pools read version 1; the first conditional write
/// wins with 2, the second gets a conflict that names both versions, and the
/// first value survives.
#[test]
fn two_writers_of_the_same_version_conflict() {
    let schema = TestDatabase::shared().schema();
    let first = schema.store();
    let second = schema.store_builder().build().unwrap();
    let mut state = GameState::default();
    assert_eq!(first.save("room", &state).unwrap(), 1);

    let mut a = first.load_versioned::<GameState>("room").unwrap().unwrap();
    let mut b = second.load_versioned::<GameState>("room").unwrap().unwrap();
    assert_eq!((a.sequence, b.sequence), (1, 1));
    a.value.scores.insert("alice".into(), 10);
    b.value.scores.insert("bob".into(), 20);

    assert_eq!(
        first
            .save_if("room", &a.value, Expected::Sequence(a.sequence))
            .unwrap(),
        2
    );
    let err = second
        .save_if("room", &b.value, Expected::Sequence(b.sequence))
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Conflict { actor_id, expected: Expected::Sequence(1), actual: Some(2) }
                if actor_id == "room"
        ),
        "{err:?}"
    );
    assert!(err.is_conflict());

    let stored = second.load_versioned::<GameState>("room").unwrap().unwrap();
    assert_eq!(stored.value, a.value);
    assert_eq!(stored.sequence, 2);
    state.scores.insert("alice".into(), 10);
    assert_eq!(stored.value, state);
}

/// A conditional write with the wrong sequence number writes nothing, and
/// the conflict reports what is there: the current number, or `None` for a
/// missing actor (which a `Sequence` expectation never creates).
#[test]
fn save_if_with_a_wrong_sequence_conflicts() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    store.save("a", &2u32).unwrap();

    for wrong in [0, 1, 3, 100] {
        let err = store
            .save_if("a", &99u32, Expected::Sequence(wrong))
            .unwrap_err();
        assert!(
            matches!(err, Error::Conflict { expected: Expected::Sequence(w), actual: Some(2), .. } if w == wrong),
            "{wrong}: {err:?}"
        );
    }
    assert_eq!(store.load::<u32>("a").unwrap(), Some(2));
    assert_eq!(store.sequence("a").unwrap(), Some(2));

    let err = store
        .save_if("ghost", &1u32, Expected::Sequence(1))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                expected: Expected::Sequence(1),
                actual: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!store.exists("ghost").unwrap());
    assert_eq!(store.load::<u32>("ghost").unwrap(), None);

    // The right sequence number still works after the failed attempts.
    assert_eq!(store.save_if("a", &3u32, Expected::Sequence(2)).unwrap(), 3);
}
