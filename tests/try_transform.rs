//! A transform whose step may fail: the step's error reaches the caller in
//! the caller's own type, and nothing is written; a step that succeeds
//! writes as `transform` does, also after losing a race.

use std::sync::atomic::{AtomicU32, Ordering};

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Error, Expected};

/// An application's error, with a variant for the store's.
#[derive(Debug)]
enum Spend {
    Insufficient { balance: u64 },
    Store(Error),
}

impl From<Error> for Spend {
    fn from(e: Error) -> Self {
        Spend::Store(e)
    }
}

fn spend(balance: Option<u64>, amount: u64) -> Result<u64, Spend> {
    let balance = balance.unwrap_or(0);
    balance
        .checked_sub(amount)
        .ok_or(Spend::Insufficient { balance })
}

#[test]
fn a_failing_step_returns_its_error_and_writes_nothing() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("wallet", &50u64).unwrap();

    let result = store.try_transform("wallet", |b: Option<u64>| spend(b, 80));
    match result {
        Err(Spend::Insufficient { balance }) => assert_eq!(balance, 50),
        other => panic!("expected the step's error, got {other:?}"),
    }
    let v = store.load_versioned::<u64>("wallet").unwrap().unwrap();
    assert_eq!((v.value, v.sequence), (50, 1), "nothing was written");

    // A failing step on an actor that does not exist creates nothing.
    let result = store.try_transform("nobody", |b: Option<u64>| spend(b, 1));
    assert!(matches!(result, Err(Spend::Insufficient { balance: 0 })));
    assert!(!store.exists("nobody").unwrap());
}

#[test]
fn a_succeeding_step_writes_like_transform() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("wallet", &50u64).unwrap();
    let v = store
        .try_transform("wallet", |b: Option<u64>| spend(b, 30))
        .unwrap();
    assert_eq!((v.value, v.sequence), (20, 2));
    assert_eq!(store.load::<u64>("wallet").unwrap(), Some(20));

    // With the store's own error type.
    let v = store
        .try_transform("counter", |n: Option<u32>| {
            Ok::<_, Error>(n.unwrap_or(0) + 1)
        })
        .unwrap();
    assert_eq!((v.value, v.sequence), (1, 1));
}

#[test]
fn the_stores_errors_arrive_converted() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    // Invalid input is refused before the step runs.
    let result = store.try_transform("", |b: Option<u64>| spend(b, 1));
    assert!(
        matches!(result, Err(Spend::Store(Error::InvalidActorId(_)))),
        "{result:?}"
    );
    // A state that is not the step's type.
    store.save("text", &"not a number").unwrap();
    let result = store.try_transform("text", |b: Option<u64>| spend(b, 1));
    assert!(
        matches!(result, Err(Spend::Store(Error::Decode { .. }))),
        "{result:?}"
    );
}

#[test]
fn a_step_that_lost_a_race_runs_again_on_the_new_state() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("wallet", &100u64).unwrap();
    let runs = AtomicU32::new(0);
    let v = store
        .try_transform("wallet", |b: Option<u64>| {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                // Another writer spends first, between this step's read and
                // its write.
                store
                    .save_if("wallet", &40u64, Expected::Sequence(1))
                    .unwrap();
            }
            spend(b, 30)
        })
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the step ran again");
    assert_eq!((v.value, v.sequence), (10, 3));

    // And when the new state makes the step fail, its error ends the call.
    let runs = AtomicU32::new(0);
    let result = store.try_transform("wallet", |b: Option<u64>| {
        if runs.fetch_add(1, Ordering::SeqCst) == 0 {
            store
                .save_if("wallet", &5u64, Expected::Sequence(3))
                .unwrap();
        }
        spend(b, 8)
    });
    assert!(
        matches!(result, Err(Spend::Insufficient { balance: 5 })),
        "{result:?}"
    );
    assert_eq!(store.sequence("wallet").unwrap(), Some(4));
}
