//! Guarantee 3: a server restart costs each caller at most one error, the
//! pool replaces its broken connections by itself, and an acknowledged
//! save is durable. Runs on a cluster of its own.

use crate::common;

use std::sync::{Arc, Barrier};

use trebuchet_postgres::testing::{StopMode, TestCluster};
use trebuchet_postgres::{Error, PoolOptions, StateStore};

/// Callers, and connections in the pool.
const CALLERS: usize = 4;

fn store_on(cluster: &TestCluster, group_commit: bool) -> StateStore {
    StateStore::builder()
        .connect_options(cluster.connect_options())
        .group_commit(group_commit)
        .pool_options(
            PoolOptions::default()
                .max_size(CALLERS as u32)
                .min_idle(None),
        )
        .migrate(true)
        .build()
        .unwrap()
}

/// Opens all pooled connections: as many calls at once, each holding its
/// connection until all of them hold one.
fn open_all(store: &StateStore) {
    let start = Arc::new(Barrier::new(CALLERS));
    let holding = Arc::new(Barrier::new(CALLERS));
    let threads: Vec<_> = (0..CALLERS)
        .map(|i| {
            let store = store.clone();
            let (start, holding) = (Arc::clone(&start), Arc::clone(&holding));
            std::thread::spawn(move || {
                start.wait();
                // Each its own actor: no conflict, the closure runs once.
                store
                    .transform(&format!("warm-{i}"), |n: Option<u32>| {
                        holding.wait();
                        n.unwrap_or(0) + 1
                    })
                    .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.pool().state().connections, CALLERS as u32);
}

#[test]
fn a_restart_costs_each_caller_at_most_one_error() {
    for mode in [StopMode::Fast, StopMode::Immediate] {
        restart_with_saves_in_flight(mode, false);
        restart_with_saves_in_flight(mode, true);
    }
}

/// Each caller's first save began before the restart and waited on a row
/// lock the test held, so the restart cut a save in flight for sure: every
/// caller's own without group commit, at least one grouped statement with
/// it. The pool's other connections broke with the server.
fn restart_with_saves_in_flight(mode: StopMode, group_commit: bool) {
    let cluster = TestCluster::start().unwrap();
    let store = store_on(&cluster, group_commit);
    open_all(&store);
    store.save("durable", &1u32).unwrap();
    let ids: Vec<String> = (0..CALLERS).map(|i| format!("after-{i}")).collect();
    for id in &ids {
        assert_eq!(store.save(id, &0u32).unwrap(), 1);
    }

    // The test's own connection locks the callers' rows.
    let locker = common::lock_rows(&cluster.url(), &store.table(), &ids);

    // Writes: at most one error per caller, then the pool has healed.
    let threads: Vec<_> = ids
        .iter()
        .map(|id| {
            let store = store.clone();
            let id = id.clone();
            std::thread::spawn(move || {
                let mut errors = 0;
                let mut acknowledged = 0;
                let mut first_ok = false;
                for n in 1..=20u32 {
                    match store.save(&id, &n) {
                        Ok(_) => {
                            acknowledged += 1;
                            first_ok |= n == 1;
                        }
                        Err(Error::ConnectionLost(_) | Error::NotApplied { .. }) => errors += 1,
                        Err(e) => panic!("{id}: an error other than the restart's: {e}"),
                    }
                }
                (errors, acknowledged, first_ok)
            })
        })
        .collect();
    // The callers' saves wait in flight on the rows the test locked:
    // without group commit each on a backend of its own, with it at least
    // one statement.
    let in_flight = if group_commit { 1 } else { CALLERS as i64 };
    common::wait_for_writes_on_locks(&cluster.url(), in_flight);

    cluster.stop(mode).unwrap();
    drop(locker); // died with the server
    cluster.restart().unwrap();

    // Reads retry once on a fresh connection: no error at all.
    assert_eq!(store.load::<u32>("durable").unwrap(), Some(1), "{mode:?}");

    let mut total_errors = 0;
    // In-flight saves answered as usual: a fast shutdown ends the locker's
    // session too, and a save granted its lock in that moment can commit
    // and answer before its own session ends.
    let mut answered = 0;
    for (id, t) in ids.iter().zip(threads) {
        let (errors, acknowledged, first_ok) = t.join().unwrap();
        answered += u64::from(first_ok);
        assert!(errors <= 1, "{mode:?}: caller {id} saw {errors} errors");
        total_errors += errors;
        // Every acknowledged save is there (one row, one increment each
        // after the first save).
        assert_eq!(
            store.sequence(id).unwrap(),
            Some(1 + acknowledged),
            "{mode:?}: {id}"
        );
    }
    let lost = store.lost_writes();
    let cut = lost.applied + lost.not_applied + lost.unknown;
    eprintln!(
        "{mode:?}, group commit {group_commit}: {total_errors} callers saw an error; \
         writes cut: {lost:?}; first saves answered: {answered}"
    );
    assert!(
        cut >= 1,
        "{mode:?}, group commit {group_commit}: the restart cut no write in flight"
    );
    // Every save in flight was cut, or answered (a cut save found applied
    // is answered too, so this counts it twice at worst).
    assert!(
        cut + answered >= in_flight as u64,
        "{mode:?}, group commit {group_commit}: {cut} writes cut and {answered} answered, \
         {in_flight} were in flight"
    );
    // Acknowledged before the restart, still there after it.
    assert_eq!(store.load::<u32>("durable").unwrap(), Some(1));
    assert!(store.pool().state().connections <= CALLERS as u32);
}
