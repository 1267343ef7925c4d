//! What a write reports is true at some moment while it ran.
//!
//! A conditional write that fails reports a version other than the one it
//! expected: the actor was in that version at some point between the call
//! and its return. It never reports the expected version, nor an actor that
//! never stopped existing as absent, even when writers and deletes commit
//! between its statement's snapshot and its answer.
//!
//! A write whose connection broke and that landed reports the sequence
//! numbers it produced; when others have written the actor so often since
//! that the number can no longer be read back, it says the outcome is
//! unknown instead of handing out another write's number.

use crate::common;

use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use trebuchet_postgres::testing::{ProxyRequest, TcpProxy, TestCluster, TestDatabase, TestSchema};
use trebuchet_postgres::{BatchResult, Error, Expected, PoolOptions, StateStore, WriteOptions};

/// How long a statement may take to reach a lock before the test gives up.
const LOCK_WAIT: Duration = Duration::from_secs(60);

// ----- conflicts ---------------------------------------------------------------

fn backend_pid(client: &mut impl postgres::GenericClient) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0)
}

/// Runs `write` (a create of `id`, expecting it absent) while another
/// session creates `id`, and deletes it again between the write's
/// statement and whatever the write does next.
///
/// The other session's insert is held open until the write waits for it;
/// a third session then queues for an exclusive lock on the table behind
/// the write's statement, so that the write's next statement waits for it;
/// the third session deletes the actor and commits. The actor existed only
/// from the insert's commit to the delete's: a write that gives up must
/// report that version, and a write that finds the actor absent again may
/// create it.
fn created_and_deleted_around<R: Send + 'static>(
    schema: &TestSchema,
    store: &StateStore,
    id: &'static str,
    write: impl FnOnce(&StateStore) -> R + Send + 'static,
) -> R {
    let table = schema.table("actor_states");
    let mut observer = schema.client().unwrap();
    let mut creator = schema.client().unwrap();
    let mut create = creator.transaction().unwrap();
    create
        .execute(
            &format!(
                "INSERT INTO {table} (actor_id, state, sequence_number) VALUES ($1, '\\x31', 1)"
            ),
            &[&id],
        )
        .unwrap();
    let creator_pid = backend_pid(&mut create);

    let writer_store = store.clone();
    let writer = thread::spawn(move || write(&writer_store));
    common::wait_for_a_waiter(&mut observer, creator_pid, || false);

    // The third session: its pid, then (blocking) the exclusive lock.
    let (pid_tx, pid_rx) = mpsc::channel();
    let (locked_tx, locked_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let mut deleter = schema.client().unwrap();
    let delete_table = table.clone();
    let deleting = thread::spawn(move || {
        pid_tx.send(backend_pid(&mut deleter)).unwrap();
        let mut tx = deleter.transaction().unwrap();
        tx.batch_execute(&format!(
            "LOCK TABLE {delete_table} IN ACCESS EXCLUSIVE MODE"
        ))
        .unwrap();
        locked_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        tx.execute(
            &format!("DELETE FROM {delete_table} WHERE actor_id = $1"),
            &[&id],
        )
        .unwrap();
        tx.commit().unwrap();
    });
    let deleter_pid = pid_rx.recv_timeout(LOCK_WAIT).unwrap();
    // The lock request queues behind the write's statement.
    common::wait_until(
        "the delete's session waits for the table lock",
        LOCK_WAIT,
        || {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE pid = $1 AND wait_event_type = 'Lock'",
                    &[&deleter_pid],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        },
    );
    create.commit().unwrap();
    // The write's statement ends (the actor exists now); the third session
    // gets the table, and the write's next statement, if any, waits for it.
    locked_rx.recv_timeout(LOCK_WAIT).unwrap();
    common::wait_for_a_waiter(&mut observer, deleter_pid, || writer.is_finished());
    go_tx.send(()).unwrap();
    deleting.join().expect("the delete's session");
    writer.join().expect("the write panicked")
}

/// The stored sequence number of `id` and its tombstone's.
fn stored(schema: &TestSchema, id: &str) -> (Option<u64>, Option<u64>) {
    let mut client = schema.client().unwrap();
    let mut one = |table: &str| -> Option<u64> {
        client
            .query_opt(
                &format!(
                    "SELECT sequence_number FROM {} WHERE actor_id = $1",
                    schema.table(table)
                ),
                &[&id],
            )
            .unwrap()
            .map(|row| row.get::<_, i64>(0) as u64)
    };
    (one("actor_states"), one("actor_states_tombstones"))
}

/// A create that raced a create and a delete either failed reporting the
/// version that existed in between, or created the actor above the
/// tombstone once it found it absent again.
#[track_caller]
fn assert_truthful_create(schema: &TestSchema, id: &str, outcome: Result<u64, Error>) {
    let (row, tombstone) = stored(schema, id);
    assert_eq!(tombstone, Some(2), "the delete left its tombstone");
    match outcome {
        Ok(sequence) => {
            assert!(
                sequence > 2,
                "created at {sequence}, not above the tombstone"
            );
            assert_eq!(row, Some(sequence), "the row holds the number returned");
        }
        Err(Error::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(expected, Expected::Absent);
            assert_eq!(
                actual,
                Some(1),
                "the conflict reports the version that existed, not {actual:?}"
            );
            assert_eq!(row, None, "nothing was written");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_create_that_meets_a_create_and_a_delete_reports_the_truth() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .group_commit(false)
        .migrate(true)
        .build()
        .unwrap();
    let outcome = created_and_deleted_around(&schema, &store, "a", |s| {
        s.save_if("a", &5u32, Expected::Absent)
    });
    assert_truthful_create(&schema, "a", outcome);
}

#[test]
fn a_grouped_create_that_meets_a_create_and_a_delete_reports_the_truth() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .group_commit(true)
        .migrate(true)
        .build()
        .unwrap();
    let outcome = created_and_deleted_around(&schema, &store, "a", |s| {
        s.save_if("a", &5u32, Expected::Absent)
    });
    assert_truthful_create(&schema, "a", outcome);
}

#[test]
fn a_bulk_create_that_meets_a_create_and_a_delete_reports_the_truth() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let outcome = created_and_deleted_around(&schema, &store, "a", |s| {
        let mut results = s.save_many_if(&[("a", 5u32, Expected::Absent)]).unwrap();
        assert_eq!(results.len(), 1);
        results.remove(0)
    });
    assert_truthful_create(&schema, "a", outcome);
}

#[test]
fn a_batch_create_that_meets_a_create_and_a_delete_reports_the_truth() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let outcome = created_and_deleted_around(&schema, &store, "a", |s| {
        s.batch()
            .save_if("a", &5u32, Expected::Absent)
            .commit()
            .map(|results| match results[..] {
                [BatchResult::Saved(sequence)] => sequence,
                ref other => panic!("unexpected results {other:?}"),
            })
    });
    assert_truthful_create(&schema, "a", outcome);
}

/// Runs `write` (expecting `id` at sequence 1) while another session
/// updates `id` to 2, committing once the write waits for it.
fn updated_under<R: Send + 'static>(
    schema: &TestSchema,
    store: &StateStore,
    id: &'static str,
    write: impl FnOnce(&StateStore) -> R + Send + 'static,
) -> R {
    updated_to(schema, store, id, 2, write)
}

/// Runs `write` (expecting `id` at sequence 1) while another session
/// updates `id` to `sequence`, committing once the write waits for it.
fn updated_to<R: Send + 'static>(
    schema: &TestSchema,
    store: &StateStore,
    id: &'static str,
    sequence: i64,
    write: impl FnOnce(&StateStore) -> R + Send + 'static,
) -> R {
    assert_eq!(store.save(id, &1u32).unwrap(), 1);
    let mut observer = schema.client().unwrap();
    let mut updater = schema.client().unwrap();
    let mut update = updater.transaction().unwrap();
    update
        .execute(
            &format!(
                "UPDATE {} SET sequence_number = $2 WHERE actor_id = $1",
                schema.table("actor_states")
            ),
            &[&id, &sequence],
        )
        .unwrap();
    let updater_pid = backend_pid(&mut update);
    let writer_store = store.clone();
    let writer = thread::spawn(move || write(&writer_store));
    common::wait_for_a_waiter(&mut observer, updater_pid, || writer.is_finished());
    update.commit().unwrap();
    writer.join().expect("the write panicked")
}

#[track_caller]
fn assert_conflict_at_2(outcome: Result<u64, Error>) {
    match outcome {
        Err(Error::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(expected, Expected::Sequence(1));
            assert_eq!(
                actual,
                Some(2),
                "the conflict reports the version that blocked it"
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn an_update_that_meets_an_update_reports_the_new_version() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .group_commit(false)
        .migrate(true)
        .build()
        .unwrap();
    assert_conflict_at_2(updated_under(&schema, &store, "a", |s| {
        s.save_if("a", &5u32, Expected::Sequence(1))
    }));
}

#[test]
fn a_bulk_update_that_meets_an_update_reports_the_new_version() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    assert_conflict_at_2(updated_under(&schema, &store, "a", |s| {
        let mut results = s
            .save_many_if(&[("a", 5u32, Expected::Sequence(1))])
            .unwrap();
        results.remove(0)
    }));
}

#[test]
fn a_batch_update_that_meets_an_update_reports_the_new_version() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    assert_conflict_at_2(updated_under(&schema, &store, "a", |s| {
        s.batch()
            .save_if("a", &5u32, Expected::Sequence(1))
            .commit()
            .map(|_| 0)
    }));
}

#[test]
fn an_import_that_meets_a_higher_number_reports_it() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let outcome = updated_to(&schema, &store, "a", 10, |s| {
        s.save_with("a", &5u32, WriteOptions::new().sequence(5))
    });
    match outcome {
        Err(Error::StaleSequence {
            sequence, current, ..
        }) => {
            assert_eq!(sequence, 5);
            assert_eq!(current, Some(10), "the number that blocked the write");
        }
        other => panic!("expected StaleSequence, got {other:?}"),
    }
}

// ----- numbers after a broken connection ----------------------------------------

fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| TestCluster::start().expect("start a throwaway cluster"))
}

/// Writes more than the 64 tags an actor keeps.
const PUSHES: u32 = 70;

/// Runs `write` on a store whose one connection is cut right after the
/// `request` was answered, and, before the store can look at what landed,
/// writes actor `a` so often that the write's tag on it is gone; actor `b`
/// keeps its tag. Returns what `write` returned.
fn landed_then_pushed_out<R: Send + 'static>(
    table: &str,
    request: ProxyRequest,
    write: impl FnOnce(&StateStore) -> R + Send + 'static,
) -> R {
    let cluster = cluster();
    let direct = StateStore::builder()
        .connect_options(cluster.connect_options())
        .table(table)
        .channel(table)
        .migrate(true)
        .build()
        .unwrap();
    let proxy = TcpProxy::start(cluster.port()).unwrap();
    let mut options = cluster.connect_options();
    options.port(proxy.port());
    let store = StateStore::builder()
        .connect_options(options)
        .table(table)
        .channel(table)
        .group_commit(false)
        .outcome_timeout(Duration::from_secs(120))
        .pool_options(PoolOptions::default().max_size(1).min_idle(Some(0)))
        .build()
        .unwrap();
    direct.save("a", &0u32).unwrap();
    direct.save("b", &0u32).unwrap();
    // The store's connection is open, and new ones are refused until the
    // other writes are done: the store cannot look before then.
    store.exists("warm-up").unwrap();
    proxy.refuse(true);
    proxy.cut_after(request);
    let writer = thread::spawn(move || write(&store));
    common::wait_until("the write's connection is cut", LOCK_WAIT, || {
        proxy.cuts() == 1
    });
    for n in 0..PUSHES {
        direct.save("a", &(100 + n)).unwrap();
    }
    proxy.refuse(false);
    writer.join().expect("the write panicked")
}

/// The number the last of the pushing saves got: what a write that
/// guessed its own number from the row would report.
const LAST_PUSH: u64 = 2 + PUSHES as u64;

#[track_caller]
fn assert_unknown<T: std::fmt::Debug>(outcome: Result<T, Error>) {
    match outcome {
        Err(e) => assert!(e.is_outcome_unknown(), "expected OutcomeUnknown, got {e:?}"),
        Ok(v) => {
            panic!("expected OutcomeUnknown, got Ok({v:?}) ({LAST_PUSH} is another write's number)")
        }
    }
}

#[test]
fn a_bulk_save_whose_number_was_pushed_out_is_unknown() {
    assert_unknown(landed_then_pushed_out(
        "pushed_save_many",
        ProxyRequest::Statement,
        |s| s.save_many(&[("a", 1u32), ("b", 1u32)]),
    ));
}

#[test]
fn a_batch_whose_number_was_pushed_out_is_unknown() {
    assert_unknown(landed_then_pushed_out(
        "pushed_batch",
        ProxyRequest::Commit,
        |s| {
            s.batch()
                .save("a", &1u32)
                .save_if("b", &1u32, Expected::Sequence(1))
                .commit()
        },
    ));
}

#[test]
fn a_batch_condition_whose_number_was_pushed_out_is_unknown() {
    assert_unknown(landed_then_pushed_out(
        "pushed_batch_if",
        ProxyRequest::Commit,
        |s| {
            s.batch()
                .save_if("a", &1u32, Expected::Sequence(1))
                .save("b", &1u32)
                .commit()
        },
    ));
}

#[test]
fn a_conditional_bulk_save_whose_number_was_pushed_out_is_unknown_not_a_conflict() {
    let results = landed_then_pushed_out("pushed_save_many_if", ProxyRequest::Statement, |s| {
        s.save_many_if(&[
            ("a", 1u32, Expected::Sequence(1)),
            ("b", 1u32, Expected::Sequence(1)),
        ])
    })
    .expect("the write landed");
    assert_eq!(results.len(), 2);
    let mut results = results.into_iter();
    assert_unknown(results.next().unwrap());
    assert_eq!(results.next().unwrap().unwrap(), 2, "b kept its tag");
}
