//! Group commit: concurrent writers share commits, each still gets its own
//! result after its row is committed, and every row is announced.

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use fallible_iterator::FallibleIterator;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{Error, Expected, PoolOptions, StateStore};

fn grouped_store(schema: &TestSchema) -> StateStore {
    schema
        .store_builder()
        .pool_options(PoolOptions::default().max_size(4))
        .group_commit(true)
        .migrate(true)
        .build()
        .unwrap()
}

#[test]
fn concurrent_saves_each_get_their_own_sequence_numbers() {
    let schema = TestDatabase::shared().schema();
    let store = grouped_store(&schema);
    let mut listener = schema.client().unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", schema.channel()))
        .unwrap();
    let threads = 16;
    let per_thread = 100;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                // Each thread writes its own actor and one shared actor.
                let mut own = Vec::new();
                for i in 0..per_thread {
                    own.push(store.save(&format!("own-{t}"), &(i as u32)).unwrap());
                    store.save("shared", &(t as u32)).unwrap();
                }
                own
            })
        })
        .collect();
    for handle in handles {
        let own = handle.join().unwrap();
        assert_eq!(
            own,
            (1..=per_thread as u64).collect::<Vec<_>>(),
            "in order, no gaps"
        );
    }
    assert_eq!(
        store.sequence("shared").unwrap(),
        Some((threads * per_thread) as u64)
    );
    for t in 0..threads {
        assert_eq!(
            store.load::<u32>(&format!("own-{t}")).unwrap(),
            Some(per_thread as u32 - 1)
        );
    }
    // Every row was announced, each actor's numbers in order.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut count = 0;
    let mut notifications = listener.notifications();
    let mut iter = notifications.timeout_iter(Duration::from_secs(30));
    while let Some(n) = iter.next().unwrap() {
        let v: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
        let id = v["actorID"].as_str().unwrap().to_owned();
        let seq = v["sequenceNumber"].as_u64().unwrap();
        let previous = last.insert(id.clone(), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "{id}: {previous} then {seq}");
        count += 1;
        if count == 2 * threads * per_thread {
            break;
        }
    }
    assert_eq!(count, 2 * threads * per_thread);
}

#[test]
fn a_conflict_in_a_group_fails_only_its_caller() {
    let schema = TestDatabase::shared().schema();
    let store = grouped_store(&schema);
    for i in 0..16 {
        store.save(&format!("a{i}"), &0u32).unwrap();
    }
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                // Odd threads expect a stale version.
                let expected = if i % 2 == 0 { 1 } else { 7 };
                store.save_if(&format!("a{i}"), &1u32, Expected::Sequence(expected))
            })
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        let result = handle.join().unwrap();
        if i % 2 == 0 {
            assert_eq!(result.unwrap(), 2);
        } else {
            assert!(matches!(
                result,
                Err(Error::Conflict {
                    expected: Expected::Sequence(7),
                    actual: Some(1),
                    ..
                })
            ));
            assert_eq!(store.load::<u32>(&format!("a{i}")).unwrap(), Some(0));
        }
    }
}

#[test]
fn grouped_compare_and_swap_loses_no_increment() {
    let schema = TestDatabase::shared().schema();
    let store = grouped_store(&schema);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                let mut attempts = 0;
                while done < 100 {
                    attempts += 1;
                    assert!(attempts < 100_000);
                    let current = store.load_versioned::<u64>("counter").unwrap();
                    let (value, expected) = match current {
                        Some(v) => (v.value, Expected::Sequence(v.sequence)),
                        None => (0, Expected::Absent),
                    };
                    match store.save_if("counter", &(value + 1), expected) {
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
    assert_eq!(store.load::<u64>("counter").unwrap(), Some(800));
    assert_eq!(store.sequence("counter").unwrap(), Some(800));
}

#[test]
fn bad_input_is_rejected_before_joining_a_group() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .group_commit(true)
        .max_state_size(8)
        .migrate(true)
        .build()
        .unwrap();
    assert!(matches!(
        store.save("", &1u8),
        Err(Error::InvalidActorId(_))
    ));
    assert!(matches!(
        store.raw().save("a", &[0; 9]),
        Err(Error::StateTooLarge { .. })
    ));
    assert!(matches!(
        store
            .raw()
            .save_if("a", &[0; 1], Expected::Sequence(u64::MAX)),
        Err(Error::SequenceOutOfRange(_))
    ));
    assert_eq!(store.save("a", &1u8).unwrap(), 1);
}
