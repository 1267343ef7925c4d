//! Guarantee 3: a server restart costs each caller at most one error, the
//! pool replaces its broken connections by itself, and an acknowledged
//! save is durable. Runs on a cluster of its own.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use trebuchet_postgres::testing::{StopMode, TestCluster};
use trebuchet_postgres::{Error, PoolOptions, StateStore};

fn store_on(cluster: &TestCluster) -> StateStore {
    StateStore::builder()
        .connect_options(cluster.connect_options())
        .pool_options(PoolOptions::default().max_size(4).min_idle(None))
        .migrate(true)
        .build()
        .unwrap()
}

/// Opens all four pooled connections by running four calls at once.
fn open_all(store: &StateStore) {
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                store
                    .transform(&format!("warm-{i}"), |n: Option<u32>| {
                        std::thread::sleep(Duration::from_millis(100));
                        n.unwrap_or(0) + 1
                    })
                    .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.pool().state().connections, 4);
}

#[test]
fn a_restart_costs_each_caller_at_most_one_error() {
    for mode in [StopMode::Fast, StopMode::Immediate] {
        let cluster = TestCluster::start().unwrap();
        let store = store_on(&cluster);
        open_all(&store);
        store.save("durable", &1u32).unwrap();

        cluster.stop(mode).unwrap();
        cluster.restart().unwrap();

        // Reads retry once on a fresh connection: no error at all.
        assert_eq!(store.load::<u32>("durable").unwrap(), Some(1), "{mode:?}");

        // Writes: at most one error per caller, then the pool has healed.
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut errors = 0;
                    let mut acknowledged = 0;
                    for n in 0..20u32 {
                        match store.save(&format!("after-{i}"), &n) {
                            Ok(_) => acknowledged += 1,
                            Err(Error::ConnectionLost(_)) => errors += 1,
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                    }
                    (errors, acknowledged)
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let (errors, acknowledged) = t.join().unwrap();
            assert!(errors <= 1, "{mode:?}: caller {i} saw {errors} errors");
            // Every acknowledged save is there (one row, one increment each).
            assert_eq!(
                store.sequence(&format!("after-{i}")).unwrap(),
                Some(acknowledged),
                "{mode:?}"
            );
        }
        // Acknowledged before the restart, still there after it.
        assert_eq!(store.load::<u32>("durable").unwrap(), Some(1));
        assert!(store.pool().state().connections <= 4);
    }
}
