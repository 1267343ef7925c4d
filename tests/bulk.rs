//! Bulk operations and atomic batches against a real PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use fallible_iterator::FallibleIterator;
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{BatchResult, Error, Expected};

#[test]
fn load_many_keeps_the_order_and_reports_missing_actors() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    store.save("b", &2u32).unwrap();
    let got: Vec<Option<u32>> = store.load_many(&["b", "missing", "a", "b"]).unwrap();
    assert_eq!(got, vec![Some(2), None, Some(1), Some(2)]);
    let bytes = store.raw().load_many(&["a", "nope"]).unwrap();
    assert_eq!(bytes[1], None);
    assert_eq!(
        store.load_many::<u32, &str>(&[]).unwrap(),
        Vec::<Option<u32>>::new()
    );
    assert!(matches!(
        store.load_many::<u32, &str>(&["ok", ""]),
        Err(Error::InvalidActorId(_))
    ));
}

#[test]
fn versioned_bulk_loads_keep_the_order_of_the_request() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    store.save("b", &2u32).unwrap();
    store.save("b", &3u32).unwrap();
    let ids = ["b", "missing", "a", "b"];

    let typed = store.load_many_versioned::<u32, _>(&ids).unwrap();
    let seen: Vec<Option<(u32, u64)>> = typed
        .iter()
        .map(|v| v.as_ref().map(|v| (v.value, v.sequence)))
        .collect();
    assert_eq!(seen, vec![Some((3, 2)), None, Some((1, 1)), Some((3, 2))]);
    let a = typed[2].as_ref().unwrap();
    assert!(a.created_at <= a.updated_at);

    let bytes = store.raw().load_many_versioned(&ids).unwrap();
    assert_eq!(bytes.len(), 4);
    assert_eq!(
        bytes
            .iter()
            .map(|v| v.as_ref().map(|v| v.sequence))
            .collect::<Vec<_>>(),
        vec![Some(2), None, Some(1), Some(2)]
    );
    assert_eq!(
        bytes[0].as_ref().map(|v| v.value.clone()),
        store.raw().load("b").unwrap()
    );
    assert!(store
        .load_many_versioned::<u32, &str>(&[])
        .unwrap()
        .is_empty());
    // A state that is not the requested type names its actor.
    store.save("text", &"words").unwrap();
    match store.load_many_versioned::<u32, _>(&["a", "text"]) {
        Err(Error::Decode { actor_id, .. }) => assert_eq!(actor_id, "text"),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn save_many_upserts_in_one_statement_and_numbers_like_save() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("old", &0u32).unwrap();
    store.save("gone", &0u32).unwrap();
    store.delete("gone").unwrap(); // tombstone at 2
    let seqs = store
        .save_many(&[("new", 1u32), ("old", 2u32), ("gone", 3u32)])
        .unwrap();
    assert_eq!(seqs, vec![1, 2, 3]);
    let got: Vec<Option<u32>> = store.load_many(&["new", "old", "gone"]).unwrap();
    assert_eq!(got, vec![Some(1), Some(2), Some(3)]);
    // A repeated actor is refused before anything is written.
    let err = store.save_many(&[("x", 1u32), ("x", 2u32)]).unwrap_err();
    assert!(
        matches!(err, Error::DuplicateActorId { ref actor_id } if actor_id == "x"),
        "{err}"
    );
    assert_eq!(store.load::<u32>("x").unwrap(), None);
    assert_eq!(
        store.save_many::<u32, &str>(&[]).unwrap(),
        Vec::<u64>::new()
    );
}

#[test]
fn save_many_if_gives_each_item_its_own_outcome() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("v1", &10u32).unwrap();
    store.save("v2", &20u32).unwrap();
    store.save("v2", &21u32).unwrap();
    let results = store
        .save_many_if(&[
            ("v1", 11u32, Expected::Sequence(1)), // matches
            ("v2", 22u32, Expected::Sequence(1)), // stale: actual 2
            ("fresh", 1u32, Expected::Absent),    // creates
            ("v1x", 5u32, Expected::Sequence(3)), // missing actor
        ])
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap(), &2);
    assert!(matches!(
        results[1],
        Err(Error::Conflict {
            expected: Expected::Sequence(1),
            actual: Some(2),
            ..
        })
    ));
    assert_eq!(results[2].as_ref().unwrap(), &1);
    assert!(matches!(
        results[3],
        Err(Error::Conflict { actual: None, .. })
    ));
    assert_eq!(store.load::<u32>("v1").unwrap(), Some(11));
    assert_eq!(
        store.load::<u32>("v2").unwrap(),
        Some(21),
        "the conflicting item is untouched"
    );
    assert_eq!(store.load::<u32>("v1x").unwrap(), None);
    // Absent on an existing actor conflicts with its version.
    let again = store
        .save_many_if(&[("fresh", 2u32, Expected::Absent)])
        .unwrap();
    assert!(matches!(
        again[0],
        Err(Error::Conflict {
            actual: Some(1),
            ..
        })
    ));
}

#[test]
fn delete_many_reports_each_actor_and_leaves_tombstones() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save_many(&[("a", 1u8), ("b", 1u8)]).unwrap();
    assert_eq!(
        store.delete_many(&["a", "zzz", "b"]).unwrap(),
        vec![true, false, true]
    );
    assert!(!store.exists("a").unwrap());
    // The delete took sequence 2, so a re-create continues at 3.
    assert_eq!(store.save("a", &1u8).unwrap(), 3);
}

#[test]
fn every_row_of_a_bulk_write_is_announced() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut listener = schema.client().unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", schema.channel()))
        .unwrap();
    let items: Vec<(String, u32)> = (0..1000).map(|i| (format!("actor-{i}"), i)).collect();
    store.save_many(&items).unwrap();
    let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).take(10).collect();
    store.delete_many(&ids).unwrap();
    let mut saves = 0;
    let mut deletes = 0;
    let mut notifications = listener.notifications();
    let mut iter = notifications.timeout_iter(Duration::from_secs(30));
    while let Some(n) = iter.next().unwrap() {
        let payload: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
        match payload["op"].as_str() {
            Some("save") => saves += 1,
            Some("delete") => deletes += 1,
            other => panic!("unexpected op {other:?}"),
        }
        if saves == 1000 && deletes == 10 {
            break;
        }
    }
    assert_eq!((saves, deletes), (1000, 10));
}

#[test]
fn a_batch_is_all_or_nothing() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let s1 = store.save("alice", &vec!["sword".to_string()]).unwrap();
    let s2 = store.save("bob", &Vec::<String>::new()).unwrap();
    store.save("offer", &1u8).unwrap();

    // A stale condition anywhere rolls back everything, deletes included.
    let err = store
        .batch()
        .save_if("alice", &Vec::<String>::new(), Expected::Sequence(s1))
        .save_if(
            "bob",
            &vec!["sword".to_string()],
            Expected::Sequence(s2 + 5),
        )
        .delete("offer")
        .commit()
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { ref actor_id, .. } if actor_id == "bob"),
        "{err}"
    );
    assert_eq!(
        store.load::<Vec<String>>("alice").unwrap(),
        Some(vec!["sword".into()])
    );
    assert_eq!(store.sequence("alice").unwrap(), Some(s1));
    assert!(store.exists("offer").unwrap());

    // The right versions: everything applies, results in order.
    let results = store
        .batch()
        .save_if("alice", &Vec::<String>::new(), Expected::Sequence(s1))
        .delete("offer")
        .save_if("bob", &vec!["sword".to_string()], Expected::Sequence(s2))
        .save("carol", &Vec::<String>::new())
        .delete("nobody")
        .commit()
        .unwrap();
    assert_eq!(
        results,
        vec![
            BatchResult::Saved(s1 + 1),
            BatchResult::Deleted(true),
            BatchResult::Saved(s2 + 1),
            BatchResult::Saved(1),
            BatchResult::Deleted(false),
        ]
    );
    assert_eq!(
        store.load::<Vec<String>>("bob").unwrap(),
        Some(vec!["sword".into()])
    );
    assert!(!store.exists("offer").unwrap());

    // Bad input anywhere fails before anything is sent.
    let err = store
        .batch()
        .save("x", &1u8)
        .save("", &1u8)
        .commit()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidActorId(_)));
    assert!(!store.exists("x").unwrap());
    assert_eq!(store.batch().commit().unwrap(), vec![]);
}

#[test]
fn concurrent_transfers_through_batches_conserve_the_total() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store
        .save_many(&[("acct-a", 1000i64), ("acct-b", 1000i64)])
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let (from, to) = if t % 2 == 0 {
                    ("acct-a", "acct-b")
                } else {
                    ("acct-b", "acct-a")
                };
                let mut done = 0;
                let mut attempts = 0;
                while done < 50 {
                    attempts += 1;
                    assert!(attempts < 10_000, "transfers starved");
                    let f = store.load_versioned::<i64>(from).unwrap().unwrap();
                    let g = store.load_versioned::<i64>(to).unwrap().unwrap();
                    match store
                        .batch()
                        .save_if(from, &(f.value - 1), Expected::Sequence(f.sequence))
                        .save_if(to, &(g.value + 1), Expected::Sequence(g.sequence))
                        .commit()
                    {
                        Ok(_) => done += 1,
                        Err(e) if e.is_conflict() => {
                            std::thread::sleep(Duration::from_micros(fastrand::u64(0..2000)))
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got: Vec<Option<i64>> = store.load_many(&["acct-a", "acct-b"]).unwrap();
    assert_eq!(got[0].unwrap() + got[1].unwrap(), 2000);
    let seqs: HashMap<&str, u64> = ["acct-a", "acct-b"]
        .iter()
        .map(|id| (*id, store.sequence(id).unwrap().unwrap()))
        .collect();
    assert_eq!(seqs["acct-a"], 201, "one write per transfer on each side");
    assert_eq!(seqs["acct-b"], 201);
}

#[test]
fn crossing_batches_do_not_fail_on_deadlocks() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save_many(&[("x", 0u64), ("y", 0u64)]).unwrap();
    // Each batch locks one actor through its condition and the other through
    // a plain save, in opposite orders: the server may detect a deadlock,
    // which the batch absorbs by running again.
    let threads: Vec<_> = [("x", "y"), ("y", "x")]
        .into_iter()
        .map(|(first, second)| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                let mut attempts = 0;
                while done < 100 {
                    attempts += 1;
                    assert!(attempts < 100_000, "starved");
                    let current = store.load_versioned::<u64>(first).unwrap().unwrap();
                    match store
                        .batch()
                        .save_if(
                            first,
                            &(current.value + 1),
                            Expected::Sequence(current.sequence),
                        )
                        .save(second, &7u64)
                        .commit()
                    {
                        Ok(_) => done += 1,
                        Err(e) if e.is_conflict() => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let values: Vec<Option<u64>> = store.load_many(&["x", "y"]).unwrap();
    assert!(values.iter().all(|v| v.is_some()));
}
