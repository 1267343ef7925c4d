//! Batches run their steps in the order given, and an actor may appear
//! more than once: each step sees what the earlier ones left, as Dapr's
//! transactional state API does. Conditions are checked against that state,
//! a failed one rolls everything back, numbers keep growing through deletes,
//! a listener hears each actor's changes in order, and a batch whose reply
//! is lost at commit is settled exactly or reported unknown.

mod common;

use std::thread;
use std::time::Duration;

use common::expect_change;
use trebuchet_postgres::testing::{ProxyRequest, TestDatabase};
use trebuchet_postgres::{BatchResult, ChangeKind, Error, Expected, StateStore};

use BatchResult::{Deleted, Saved};

// ----- order and repeated actors ------------------------------------------------

#[test]
fn the_dapr_example_deletes_saves_and_deletes_in_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("k1", &"one").unwrap();

    let results = store
        .batch()
        .delete("k1")
        .save("k2", &"two")
        .delete("k2")
        .save("k3", &"three")
        .commit()
        .unwrap();
    assert_eq!(
        results,
        vec![Deleted(true), Saved(1), Deleted(true), Saved(1)]
    );
    assert!(!store.exists("k1").unwrap());
    assert!(!store.exists("k2").unwrap());
    assert_eq!(
        store.load::<String>("k3").unwrap().as_deref(),
        Some("three")
    );
    // The delete of k2 took number 2: a later save continues above it.
    assert_eq!(store.save("k2", &"again").unwrap(), 3);
}

#[test]
fn an_actor_saved_twice_gets_two_numbers_and_keeps_the_last_state() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let n = store.save("a", &0u32).unwrap();

    let results = store
        .batch()
        .save("a", &1u32)
        .save("b", &1u32)
        .save("a", &2u32)
        .commit()
        .unwrap();
    assert_eq!(results, vec![Saved(n + 1), Saved(1), Saved(n + 2)]);
    let a = store.load_versioned::<u32>("a").unwrap().unwrap();
    assert_eq!((a.value, a.sequence), (2, n + 2));
}

#[test]
fn save_delete_save_continues_above_the_delete() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let n = store.save("a", &0u32).unwrap();

    let results = store
        .batch()
        .save("a", &1u32)
        .delete("a")
        .save("a", &3u32)
        .commit()
        .unwrap();
    assert_eq!(results, vec![Saved(n + 1), Deleted(true), Saved(n + 3)]);
    let a = store.load_versioned::<u32>("a").unwrap().unwrap();
    assert_eq!((a.value, a.sequence), (3, n + 3));

    // Ending on a delete: the tombstone holds the last number.
    let results = store
        .batch()
        .delete("a")
        .save("a", &5u32)
        .delete("a")
        .delete("a")
        .commit()
        .unwrap();
    assert_eq!(
        results,
        vec![Deleted(true), Saved(n + 5), Deleted(true), Deleted(false)]
    );
    assert!(!store.exists("a").unwrap());
    assert_eq!(store.save("a", &7u32).unwrap(), n + 7);

    // An actor that never existed: the leading delete finds nothing.
    let results = store
        .batch()
        .delete("new")
        .save("new", &1u32)
        .delete("new")
        .save("new", &2u32)
        .commit()
        .unwrap();
    assert_eq!(
        results,
        vec![Deleted(false), Saved(1), Deleted(true), Saved(3)]
    );
}

#[test]
fn a_condition_sees_the_state_the_earlier_steps_left() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let n = store.save("a", &0u32).unwrap();
    store.save("b", &0u32).unwrap();

    let results = store
        .batch()
        .save("a", &1u32)
        .save_if("a", &2u32, Expected::Sequence(n + 1))
        .delete("b")
        .save_if("b", &1u32, Expected::Absent)
        .save_if("c", &1u32, Expected::Absent)
        .save_if("c", &2u32, Expected::Sequence(1))
        .commit()
        .unwrap();
    assert_eq!(
        results,
        vec![
            Saved(n + 1),
            Saved(n + 2),
            Deleted(true),
            Saved(3),
            Saved(1),
            Saved(2)
        ]
    );
    assert_eq!(store.load::<u32>("a").unwrap(), Some(2));
    assert_eq!(store.sequence("b").unwrap(), Some(3));
    assert_eq!(store.load::<u32>("c").unwrap(), Some(2));
}

#[test]
fn a_failed_later_condition_rolls_everything_back_and_announces_nothing() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let n = store.save("a", &0u32).unwrap();
    store.save("gone", &0u32).unwrap();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();

    // The condition names the number a had before the batch: the earlier
    // step moved it on, and the conflict reports where it stood then.
    let err = store
        .batch()
        .save("a", &1u32)
        .delete("gone")
        .save("b", &1u32)
        .save_if("a", &2u32, Expected::Sequence(n))
        .commit()
        .unwrap_err();
    match err {
        Error::Conflict {
            ref actor_id,
            expected,
            actual,
        } => {
            assert_eq!(actor_id, "a");
            assert_eq!(expected, Expected::Sequence(n));
            assert_eq!(actual, Some(n + 1), "the version as the step saw it");
        }
        ref other => panic!("expected a conflict, got {other:?}"),
    }
    // After a delete in the batch, the actor is absent at that step.
    let err = store
        .batch()
        .delete("a")
        .save_if("a", &2u32, Expected::Sequence(n))
        .commit()
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { ref actor_id, actual: None, .. } if actor_id == "a"),
        "{err:?}"
    );
    // After a save in the batch, it is not absent any more.
    let err = store
        .batch()
        .save("new", &1u32)
        .save_if("new", &2u32, Expected::Absent)
        .commit()
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { ref actor_id, actual: Some(1), .. } if actor_id == "new"),
        "{err:?}"
    );

    // The table is untouched.
    let a = store.load_versioned::<u32>("a").unwrap().unwrap();
    assert_eq!((a.value, a.sequence), (0, n));
    assert!(store.exists("gone").unwrap());
    assert!(!store.exists("b").unwrap());
    assert!(!store.exists("new").unwrap());
    // Nothing was announced: the next change heard is the one made now.
    store.save("marker", &1u32).unwrap();
    expect_change(&all, "marker", 1, ChangeKind::Saved);
    // And no number was used up.
    assert_eq!(store.save("a", &9u32).unwrap(), n + 1);
}

#[test]
fn a_listener_hears_each_actors_changes_in_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &0u32).unwrap();
    let listener = store.listener().unwrap();
    let a = listener.subscribe_actor("a");
    let b = listener.subscribe_actor("b");
    let all = listener.subscribe();

    let results = store
        .batch()
        .save("a", &1u32)
        .save("b", &1u32)
        .delete("a")
        .save_if("a", &3u32, Expected::Absent)
        .delete("b")
        .save("a", &4u32)
        .commit()
        .unwrap();
    assert_eq!(
        results,
        vec![
            Saved(2),
            Saved(1),
            Deleted(true),
            Saved(4),
            Deleted(true),
            Saved(5)
        ]
    );
    expect_change(&a, "a", 2, ChangeKind::Saved);
    expect_change(&a, "a", 3, ChangeKind::Deleted);
    expect_change(&a, "a", 4, ChangeKind::Saved);
    expect_change(&a, "a", 5, ChangeKind::Saved);
    expect_change(&b, "b", 1, ChangeKind::Saved);
    expect_change(&b, "b", 2, ChangeKind::Deleted);
    // Every change of the batch, and nothing else, reaches a subscriber of
    // all actors; each actor's in order.
    let mut heard = Vec::new();
    for _ in 0..6 {
        match all.recv_timeout(Duration::from_secs(60)) {
            Ok(trebuchet_postgres::Event::Change(c)) => {
                heard.push((c.actor_id.clone(), c.sequence))
            }
            other => panic!("expected a change, got {other:?}"),
        }
    }
    let of = |id: &str| -> Vec<u64> {
        heard
            .iter()
            .filter(|(actor, _)| actor == id)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(of("a"), vec![2, 3, 4, 5], "{heard:?}");
    assert_eq!(of("b"), vec![1, 2], "{heard:?}");
}

#[test]
fn batches_that_write_one_actor_twice_lose_no_increment() {
    // Counting through batches that each add to one counter twice: no
    // increment is lost, and every batch gets two consecutive numbers.
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("counter", &0u64).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            thread::spawn(move || {
                let mut done = 0;
                while done < 20 {
                    let v = store.load_versioned::<u64>("counter").unwrap().unwrap();
                    let outcome = store
                        .batch()
                        .save_if("counter", &(v.value + 1), Expected::Sequence(v.sequence))
                        .save_if(
                            "counter",
                            &(v.value + 2),
                            Expected::Sequence(v.sequence + 1),
                        )
                        .commit();
                    match outcome {
                        Ok(results) => {
                            assert_eq!(results, vec![Saved(v.sequence + 1), Saved(v.sequence + 2)]);
                            done += 1;
                        }
                        Err(e) if e.is_conflict() => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let v = store.load_versioned::<u64>("counter").unwrap().unwrap();
    assert_eq!((v.value, v.sequence), (160, 161));
}

#[test]
fn a_create_after_a_delete_that_found_nothing_does_not_write_over_an_actor_created_meanwhile() {
    // The batch deletes x (absent: nothing to lock), then creates it. Another
    // session creates x in between: the batch must not take that actor
    // over as if its delete had seen it absent. It runs again, and then its
    // delete finds x.
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let table = schema.table("actor_states");
    let mut observer = schema.client().unwrap();
    // Holds the batch between its delete of x and its create of x: the
    // create of "blocker" sorts first in the same statement and waits for
    // this uncommitted row.
    let mut holder = schema.client().unwrap();
    let mut hold = holder.transaction().unwrap();
    hold.execute(
        &format!(
            "INSERT INTO {table} (actor_id, state, sequence_number) VALUES ('blocker', '\\x31', 1)"
        ),
        &[],
    )
    .unwrap();
    let holder_pid: i32 = hold
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);

    let batch_store = store.clone();
    let writer = thread::spawn(move || {
        batch_store
            .batch()
            .delete("x")
            .delete("blocker")
            .save("blocker", &1u32)
            .save("x", &2u32)
            .commit()
    });
    common::wait_for_a_waiter(&mut observer, holder_pid, || writer.is_finished());
    schema
        .client()
        .unwrap()
        .execute(
            &format!(
                "INSERT INTO {table} (actor_id, state, sequence_number) VALUES ('x', '\\x31', 5)"
            ),
            &[],
        )
        .unwrap();
    hold.rollback().unwrap();
    let results = writer.join().expect("the batch panicked").unwrap();
    assert_eq!(
        results,
        vec![Deleted(true), Deleted(false), Saved(1), Saved(7)]
    );
    let x = store.load_versioned::<u32>("x").unwrap().unwrap();
    assert_eq!((x.value, x.sequence), (2, 7));
}

// ----- lost replies -------------------------------------------------------------

use common::cut::Rig;

/// Runs `op` on `rig`'s store with the connection cut at its commit:
/// `after` the server committed (the reply is lost), or before the commit
/// reached it.
fn cut_at_commit<T>(rig: &Rig, after: bool, op: impl FnOnce(&StateStore) -> T) -> T {
    if after {
        rig.after(ProxyRequest::Commit, 1, op)
    } else {
        rig.before(ProxyRequest::Commit, 1, op)
    }
}

/// A rig whose store waits long for a lost write's outcome.
fn rig(table: &str) -> Rig {
    Rig::with(table, |b| {
        b.group_commit(false)
            .outcome_timeout(Duration::from_secs(120))
    })
}

#[test]
fn a_lost_reply_at_commit_of_a_batch_with_repeated_actors_is_settled_exactly() {
    let rig = rig("cut_batch_order");
    rig.direct.save("a", &0u32).unwrap();
    rig.direct.save("gone", &0u32).unwrap();
    rig.direct.save("c", &0u32).unwrap();
    let batch = |s: &StateStore| {
        s.batch()
            .save("a", &1u32)
            .save("a", &2u32)
            .delete("gone")
            .save("b", &1u32)
            .delete("b")
            .save("b", &3u32)
            .save_if("a", &4u32, Expected::Sequence(3))
            .delete("c")
            .save("c", &5u32)
            .delete("nobody")
            .save("nobody", &6u32)
            .delete("d")
            .delete("d")
            .save("e", &7u32)
            .delete("e")
            .delete("e")
            .commit()
    };
    let expected = vec![
        Saved(2),
        Saved(3),
        Deleted(true),
        Saved(1),
        Deleted(true),
        Saved(3),
        Saved(4),
        Deleted(true),
        Saved(3),
        Deleted(false),
        Saved(1),
        Deleted(false),
        Deleted(false),
        Saved(1),
        Deleted(true),
        Deleted(false),
    ];

    // The reply is lost, but it committed: the tags say what each step did.
    let results = cut_at_commit(&rig, true, batch).unwrap();
    assert_eq!(results, expected);
    assert_eq!(rig.version("a"), Some((4, 4)));
    assert_eq!(rig.version("gone"), None);
    assert_eq!(rig.version("b"), Some((3, 3)));
    assert_eq!(rig.version("c"), Some((5, 3)));
    assert_eq!(rig.version("nobody"), Some((6, 1)));
    assert_eq!(rig.version("e"), None);
    assert_eq!(rig.store.lost_writes().applied, 1);

    // The commit never reached the server: not applied, nothing changed.
    let err = cut_at_commit(&rig, false, |s| {
        s.batch()
            .save("a", &7u32)
            .delete("a")
            .save("a", &8u32)
            .save("b", &7u32)
            .commit()
    })
    .unwrap_err();
    assert!(err.is_not_applied(), "{err:?}");
    assert_eq!(rig.version("a"), Some((4, 4)));
    assert_eq!(rig.version("b"), Some((3, 3)));
    // The numbers it would have used are free.
    assert_eq!(rig.direct.save("a", &9u32).unwrap(), 5);
}

#[test]
fn a_lost_reply_of_a_batch_of_deletes_only_is_settled() {
    let rig = rig("cut_batch_deletes");
    rig.direct.save("a", &0u32).unwrap();
    let results = cut_at_commit(&rig, true, |s| {
        s.batch().delete("a").delete("a").delete("nobody").commit()
    })
    .unwrap();
    assert_eq!(results, vec![Deleted(true), Deleted(false), Deleted(false)]);
    assert_eq!(rig.version("a"), None);
}

/// Writes more than the 64 tags an actor keeps.
const PUSHES: u32 = 70;

#[test]
fn a_lost_batch_whose_repeated_actor_was_written_over_since_is_unknown() {
    let rig = rig("pushed_batch_order");
    rig.direct.save("a", &0u32).unwrap();
    rig.direct.save("b", &0u32).unwrap();
    // The store's connection is open; new ones are refused until the other
    // writes are done, so that the store cannot look before then.
    rig.store.exists("warm-up").unwrap();
    rig.proxy.refuse(true);
    rig.proxy.cut_after(ProxyRequest::Commit);
    let store = rig.store.clone();
    let writer = thread::spawn(move || {
        store
            .batch()
            .save("a", &1u32)
            .save("b", &1u32)
            .save("a", &2u32)
            .commit()
    });
    common::wait_until(
        "the batch's connection is cut",
        Duration::from_secs(60),
        || rig.proxy.cuts() == 1,
    );
    for n in 0..PUSHES {
        rig.direct.save("a", &(100 + n)).unwrap();
    }
    rig.proxy.refuse(false);
    let outcome = writer.join().expect("the batch panicked");
    // b's tag says the batch committed; a's two numbers can no longer be
    // read back, and are not guessed.
    match outcome {
        Err(e) => assert!(e.is_outcome_unknown(), "expected OutcomeUnknown, got {e:?}"),
        Ok(v) => panic!("expected OutcomeUnknown, got Ok({v:?})"),
    }
    assert_eq!(rig.version("b"), Some((1, 2)));
}
