//! The store's operations against a real PostgreSQL.

use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Error, Expected};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct GameState {
    scores: std::collections::BTreeMap<String, i64>,
    round: u32,
}

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
fn save_if_absent_then_conflict() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    assert_eq!(store.save_if("a", &1u32, Expected::Absent).unwrap(), 1);
    let err = store.save_if("a", &2u32, Expected::Absent).unwrap_err();
    assert!(matches!(
        err,
        Error::Conflict { expected: Expected::Absent, actual: Some(1), .. }
    ), "{err:?}");
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));
}
