//! Expiry: states saved with a time to live read as absent once it has
//! passed, writes treat them as deleted, and the sweeper removes them in
//! batches, announcing each removal as a delete, one sweeper at a time.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::wait_until;

use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{Error, Expected, StateCache, StateStore, SweepOptions, WriteOptions};

/// A time to live short enough for a test, long enough that the few calls
/// a test makes before it expires (a save and the reads that follow it)
/// finish well within it, even on a busy machine.
const TTL: Duration = Duration::from_secs(3);

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(60);

/// Waits until the server's clock has passed the expiry of each of `ids`
/// (failing after 30 s).
fn outlive(schema: &TestSchema, ids: &[&str]) {
    let mut client = schema.client().unwrap();
    let table = format!("\"{}\".actor_states", schema.name());
    common::wait_expired(&mut client, &table, ids);
}

/// A plain connection listening on the schema's channel.
fn listening(schema: &TestSchema) -> postgres::Client {
    let mut client = schema.client().unwrap();
    client
        .batch_execute(&format!("LISTEN \"{}\"", schema.channel()))
        .unwrap();
    client
}

/// Rows physically in the table, expired or not.
fn rows(schema: &TestSchema) -> i64 {
    schema
        .client()
        .unwrap()
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".actor_states", schema.name()),
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn expired_states_read_as_absent_everywhere_at_once() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    assert_eq!(
        store
            .save_with("brief", &1u32, WriteOptions::new().ttl(TTL))
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .raw()
            .save_with("brief-bytes", b"x", WriteOptions::new().ttl(TTL))
            .unwrap(),
        1
    );
    store.save("kept", &2u32).unwrap();
    assert_eq!(store.load::<u32>("brief").unwrap(), Some(1));
    assert!(store.exists("brief").unwrap());

    outlive(&schema, &["brief", "brief-bytes"]);
    assert_eq!(store.load::<u32>("brief").unwrap(), None);
    assert_eq!(store.raw().load("brief-bytes").unwrap(), None);
    assert!(store.load_versioned::<u32>("brief").unwrap().is_none());
    assert!(!store.exists("brief").unwrap());
    assert_eq!(store.sequence("brief").unwrap(), None);
    assert_eq!(
        store.load_many::<u32, _>(&["brief", "kept"]).unwrap(),
        vec![None, Some(2)]
    );
    assert!(store
        .raw()
        .load_many_versioned(&["brief", "brief-bytes"])
        .unwrap()
        .iter()
        .all(Option::is_none));
    let listed: Vec<String> = store
        .list_actors("", None, 100)
        .unwrap()
        .actors
        .into_iter()
        .map(|a| a.actor_id)
        .collect();
    assert_eq!(listed, vec!["kept"]);
    let listed = store.list_actors("", None, 100).unwrap().actors;
    assert_eq!(
        listed
            .iter()
            .map(|a| a.actor_id.as_str())
            .collect::<Vec<_>>(),
        vec!["kept"]
    );
    assert_eq!(store.count_actors("").unwrap(), 1);
    let mut walked = Vec::new();
    store
        .raw()
        .for_each("", |id, _| {
            walked.push(id);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(walked, vec!["kept"]);
    assert_eq!(store.stats().unwrap().actors, 1);
    // Still in the table until swept.
    assert_eq!(rows(&schema), 3);
}

#[test]
fn writes_treat_an_expired_actor_as_deleted_at_the_next_number() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store
        .save_with("a", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap(); // 1
    store
        .save_with("b", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap(); // 1
    store
        .save_with("c", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap(); // 1
    store
        .save_with("d", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap(); // 1
    store
        .save_with("e", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap(); // 1
    let created = store
        .load_versioned::<u32>("a")
        .unwrap()
        .unwrap()
        .created_at;
    outlive(&schema, &["a", "b", "c", "d", "e"]);

    // A sequence number expected of an expired actor finds it absent.
    let err = store
        .save_if("a", &2u32, Expected::Sequence(1))
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
        "{err}"
    );
    // Absent is what it is: the save creates it again, above the number
    // its expiry took (2), with a new created_at.
    assert_eq!(store.save_if("a", &2u32, Expected::Absent).unwrap(), 3);
    let a = store.load_versioned::<u32>("a").unwrap().unwrap();
    assert_eq!((a.value, a.sequence), (2, 3));
    assert!(a.created_at > created, "created_at starts anew");

    // A plain save, a transform, a bulk save and a conditional bulk save do
    // the same.
    assert_eq!(store.save("b", &2u32).unwrap(), 3);
    let c = store
        .transform("c", |current: Option<u32>| {
            assert_eq!(current, None, "transform sees the expired actor as absent");
            7
        })
        .unwrap();
    assert_eq!(c.sequence, 3);
    assert_eq!(store.save_many(&[("d", 2u32)]).unwrap(), vec![3]);
    let outcomes = store
        .save_many_if(&[("e", 2u32, Expected::Absent)])
        .unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap(), &3);

    // An explicit sequence number must be above the number expiry took.
    store
        .save_with("f", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap();
    store
        .save_with("f", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap(); // 2
    outlive(&schema, &["f"]);
    let err = store
        .save_with("f", &9u32, WriteOptions::new().sequence(3))
        .unwrap_err();
    assert!(matches!(err, Error::StaleSequence { .. }), "{err}");
    store
        .save_with("f", &9u32, WriteOptions::new().sequence(4))
        .unwrap();
    assert_eq!(store.sequence("f").unwrap(), Some(4));
}

#[test]
fn a_later_save_without_a_ttl_clears_it_and_a_ttl_can_be_renewed() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store_builder().group_commit(false).build().unwrap();
    store.migrate().unwrap();
    let grouped = schema.store();
    for id in ["plain", "if", "transform", "bulk", "grouped"] {
        store
            .save_with(id, &1u32, WriteOptions::new().ttl(TTL))
            .unwrap();
    }
    store
        .save_with("renewed", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap();
    store
        .save_with("shortened", &1u32, WriteOptions::new().ttl(TTL * 10))
        .unwrap();

    store.save("plain", &2u32).unwrap();
    store.save_if("if", &2u32, Expected::Sequence(1)).unwrap();
    store
        .transform("transform", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();
    store.save_many(&[("bulk", 2u32)]).unwrap();
    grouped.save("grouped", &2u32).unwrap();
    store
        .save_with(
            "renewed",
            &2u32,
            WriteOptions::new()
                .expect(Expected::Sequence(1))
                .ttl(TTL * 10),
        )
        .unwrap();
    store
        .save_with("shortened", &2u32, WriteOptions::new().ttl(TTL))
        .unwrap();

    // Saved last, with the first saves' time to live: once it has expired,
    // so would have they.
    outlive(&schema, &["shortened"]);
    for id in ["plain", "if", "transform", "bulk", "grouped", "renewed"] {
        assert_eq!(
            store.sequence(id).unwrap(),
            Some(2),
            "{id} should still be there"
        );
    }
    assert!(!store.exists("shortened").unwrap());
}

#[test]
fn a_cache_stops_serving_a_state_once_it_expires() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let cache: StateCache<u64> = StateCache::new(&store, &listener).unwrap();
    store
        .save_with("brief", &1u64, WriteOptions::new().ttl(TTL))
        .unwrap();
    store
        .save_with("renewed", &1u64, WriteOptions::new().ttl(TTL))
        .unwrap();
    assert_eq!(cache.get("brief").unwrap().as_deref(), Some(&1));
    assert_eq!(cache.get("renewed").unwrap().as_deref(), Some(&1));
    assert_eq!(cache.sequence("brief"), Some(1));
    // Saved again without a time to live: kept for good, and the cache
    // hears of it.
    store.save("renewed", &2u64).unwrap();
    wait_until("the cache sees the renewal", WAIT, || {
        cache.get("renewed").unwrap().as_deref() == Some(&2)
    });

    // No sweeper runs: nothing is announced when "brief" expires, and the
    // cache alone has to know.
    outlive(&schema, &["brief"]);
    assert_eq!(store.load::<u64>("brief").unwrap(), None);
    assert_eq!(cache.sequence("brief"), None);
    assert_eq!(cache.get("brief").unwrap(), None);
    assert_eq!(cache.get("renewed").unwrap().as_deref(), Some(&2));
    // Saved again, it is served again.
    store.save("brief", &3u64).unwrap();
    wait_until("the cache sees the new save", WAIT, || {
        cache.get("brief").unwrap().as_deref() == Some(&3)
    });
}

#[test]
fn bad_ttls_are_rejected_and_touch_nothing() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    for ttl in [
        Duration::ZERO,
        Duration::from_micros(500),
        Duration::from_secs(2000 * 366 * 24 * 3600),
    ] {
        for result in [
            store.save_with("a", &1u32, WriteOptions::new().ttl(ttl)),
            store.save_with(
                "a",
                &1u32,
                WriteOptions::new().expect(Expected::Absent).ttl(ttl),
            ),
            store
                .raw()
                .save_with("a", b"x", WriteOptions::new().ttl(ttl)),
            store.raw().save_with(
                "a",
                b"x",
                WriteOptions::new().expect(Expected::Absent).ttl(ttl),
            ),
        ] {
            let err = result.unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { what: "ttl", .. }),
                "{ttl:?}: {err}"
            );
            assert!(err.is_invalid_input());
        }
    }
    assert!(!store.exists("a").unwrap());
    assert_eq!(rows(&schema), 0);
}

#[test]
fn deleting_an_expired_actor_says_it_did_not_exist_but_removes_it() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store
        .save_with("a", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap();
    store
        .save_with("b", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap();
    store
        .save_with("c", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap();
    outlive(&schema, &["a", "b", "c"]);
    let mut client = listening(&schema);
    assert!(!store.delete("a").unwrap());
    assert_eq!(store.delete_many(&["b", "x"]).unwrap(), vec![false, false]);
    let done = store.batch().delete("c").commit().unwrap();
    assert_eq!(done, vec![trebuchet_postgres::BatchResult::Deleted(false)]);
    assert_eq!(rows(&schema), 0);
    for id in ["a", "b", "c"] {
        let (_, payload) = common::next_payload(&mut client);
        assert_eq!(payload["actorID"], id);
        assert_eq!(payload["op"], "delete");
        assert_eq!(payload["sequenceNumber"], 2);
    }
    // Created again above the tombstone, as after any delete.
    assert_eq!(store.save("a", &1u32).unwrap(), 3);
}

#[test]
fn the_sweeper_removes_expired_actors_in_batches_and_announces_each() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let expiring: Vec<(String, u32)> = (0..25).map(|i| (format!("e{i:02}"), i)).collect();
    for (id, n) in &expiring {
        store
            .save_with(id, n, WriteOptions::new().ttl(TTL))
            .unwrap();
    }
    let kept: Vec<(String, u32)> = (0..5).map(|i| (format!("k{i}"), i)).collect();
    store.save_many(&kept).unwrap();
    store
        .save_with("later", &0u32, WriteOptions::new().ttl(TTL * 50))
        .unwrap();
    assert_eq!(
        store.sweep_expired(10).unwrap().removed,
        0,
        "nothing expired yet"
    );
    let ids: Vec<&str> = expiring.iter().map(|(id, _)| id.as_str()).collect();
    outlive(&schema, &ids);

    let mut client = listening(&schema);
    let sweep = store.sweep_expired(10).unwrap();
    assert_eq!((sweep.removed, sweep.batches, sweep.busy), (25, 3, false));
    assert_eq!(rows(&schema), 6);

    let mut deleted = BTreeMap::new();
    for _ in 0..25 {
        let (_, payload) = common::next_payload(&mut client);
        assert_eq!(payload["op"], "delete", "{payload}");
        deleted.insert(
            payload["actorID"].as_str().unwrap().to_owned(),
            payload["sequenceNumber"].as_u64().unwrap(),
        );
    }
    common::assert_no_notification(&mut client);
    assert_eq!(deleted.len(), 25);
    assert!(deleted.values().all(|&s| s == 2), "{deleted:?}");

    // The tombstones keep the numbers: a new actor continues above them.
    assert_eq!(store.stats().unwrap().tombstones, 25);
    assert_eq!(store.save("e00", &1u32).unwrap(), 3);
    let again = store.sweep_expired(10).unwrap();
    assert_eq!((again.removed, again.batches, again.busy), (0, 1, false));
}

#[test]
fn bad_sweep_settings_are_rejected() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    for batch in [0, trebuchet_postgres::MAX_SWEEP_BATCH + 1] {
        let err = store.sweep_expired(batch).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    what: "batch size",
                    ..
                }
            ),
            "{err}"
        );
    }
    for options in [
        SweepOptions::default().interval(Duration::ZERO),
        SweepOptions::default().batch_size(0),
    ] {
        let err = schema
            .store_builder()
            .expiry_sweeper(options)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }
}

/// While one sweeper is inside a batch (held up here by a lock on the
/// tombstone table, which its deletes write to), another one, from another
/// store as another process would have, stops at once without removing
/// anything; afterwards the first finishes the job.
#[test]
fn only_one_sweeper_works_at_a_time() {
    let schema = TestDatabase::shared().schema();
    let first = schema.store();
    let second = schema.store();
    let items: Vec<(String, u32)> = (0..20).map(|i| (format!("a{i:02}"), i)).collect();
    for (id, n) in &items {
        first
            .save_with(id, n, WriteOptions::new().ttl(TTL))
            .unwrap();
    }
    let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).collect();
    outlive(&schema, &ids);

    let mut blocker = schema.client().unwrap();
    let mut tx = blocker.transaction().unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{}\".actor_states_tombstones IN EXCLUSIVE MODE",
        schema.name()
    ))
    .unwrap();
    let sweeping = std::thread::spawn(move || first.sweep_expired(1000));
    // Wait until the first sweeper waits on the lock inside its batch.
    let mut watcher = schema.client().unwrap();
    wait_until("the first sweeper waits on the lock", WAIT, || {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE 'WITH gone AS (DELETE%'",
                &[],
            )
            .unwrap()
            .get(0);
        waiting > 0
    });
    let other = second.sweep_expired(1000).unwrap();
    assert!(other.busy, "{other:?}");
    assert_eq!((other.removed, other.batches), (0, 0));

    tx.rollback().unwrap();
    let done = sweeping.join().unwrap().unwrap();
    assert_eq!((done.removed, done.busy), (20, false));
    assert_eq!(rows(&schema), 0);
}

/// Threads of this process with the sweeper's name.
fn sweeper_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "trebuchet-sweep")
        .count()
}

/// The only test of this file that starts a background sweeper, so that it
/// can count their threads.
#[test]
fn the_background_sweeper_sweeps_and_stops_with_the_store() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .migrate(true)
        .expiry_sweeper(
            SweepOptions::default()
                .interval(Duration::from_millis(100))
                .batch_size(3),
        )
        .build()
        .unwrap();
    wait_until("the sweeper thread starts", WAIT, || sweeper_threads() > 0);
    assert_eq!(sweeper_threads(), 1);
    let clone: StateStore = store.clone();
    let mut client = listening(&schema);
    for i in 0..10 {
        store
            .save_with(&format!("s{i}"), &i, WriteOptions::new().ttl(TTL))
            .unwrap();
    }
    store.save("kept", &1u32).unwrap();
    wait_until("the sweeper sweeps", WAIT, || rows(&schema) <= 1);
    // Ten saves, ten deletes, one more save, in any order; then nothing.
    let mut deletes = 0;
    for _ in 0..21 {
        let n = common::next_notification(&mut client, WAIT).expect("a notification");
        let payload: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
        if payload["op"] == "delete" {
            deletes += 1;
        }
    }
    common::assert_no_notification(&mut client);
    assert_eq!(deletes, 10);
    drop(store);
    assert_eq!(
        sweeper_threads(),
        1,
        "a clone keeps the store and its sweeper"
    );

    // The last handle is dropped while the thread is inside a batch (held
    // there by a lock on the tombstone table, which its deletes write to):
    // the drop waits for the batch and joins the thread, which never ends
    // up holding the store alone.
    clone
        .save_with("late", &1u32, WriteOptions::new().ttl(TTL))
        .unwrap();
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let mut blocker = schema.client().unwrap();
    let table = format!("\"{}\".actor_states_tombstones", schema.name());
    let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let releasing = std::sync::Arc::clone(&released);
    let holder = std::thread::spawn(move || {
        let mut tx = blocker.transaction().unwrap();
        tx.batch_execute(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
            .unwrap();
        locked_tx.send(()).unwrap();
        release.recv().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        releasing.store(true, std::sync::atomic::Ordering::SeqCst);
        tx.rollback().unwrap();
    });
    locked.recv().unwrap();
    outlive(&schema, &["late"]);
    let mut watcher = schema.client().unwrap();
    let pattern = format!("WITH gone AS (DELETE FROM \"{}\".%", schema.name());
    wait_until("the sweeper reaches the lock", WAIT, || {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE $1",
                &[&pattern],
            )
            .unwrap()
            .get(0);
        waiting > 0
    });
    release_tx.send(()).unwrap();
    let (dropped_tx, dropped) = std::sync::mpsc::channel();
    let dropper = std::thread::spawn(move || {
        let started = Instant::now();
        drop(clone);
        let _ = dropped_tx.send(started.elapsed());
    });
    let took = dropped
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("dropping the last handle did not return within {WAIT:?}"));
    dropper.join().unwrap();
    eprintln!("the last handle's drop returned after {took:?}");
    assert_eq!(sweeper_threads(), 0, "the sweeper thread is joined on drop");
    assert!(
        released.load(std::sync::atomic::Ordering::SeqCst),
        "the drop waited for the batch, which waited for the lock"
    );
    holder.join().unwrap();
    assert_eq!(
        rows(&schema),
        1,
        "the batch finished: only \"kept\" is left"
    );
}
