//! Coalesced reads: concurrent `load`, `load_versioned`, `exists` and
//! `sequence` calls share statements, and each caller still gets exactly
//! its own row, sees the writes that returned before it began, and gets
//! its own error.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use trebuchet_postgres::testing::{TcpProxy, TestDatabase, TestSchema};
use trebuchet_postgres::{Error, ErrorKind, PoolOptions, StateStore};

/// Actors `live-0` .. `live-63` hold their index; `gone-*` were deleted;
/// `never-*` never existed.
const LIVE: u32 = 64;

/// A store of up to 16 connections that opens them only when asked, so
/// that the connections it opened tell how many statements ran at once.
fn reader_store(schema: &TestSchema) -> StateStore {
    schema
        .store_builder()
        .pool_options(PoolOptions::default().max_size(16).min_idle(Some(0)))
        .coalesce_reads(true)
        .migrate(true)
        .build()
        .unwrap()
}

fn fill(store: &StateStore) {
    for i in 0..LIVE {
        store.save(&format!("live-{i}"), &i).unwrap();
        store.save(&format!("gone-{i}"), &i).unwrap();
        store.delete(&format!("gone-{i}")).unwrap();
    }
}

/// One read of `id`, checked against what the table holds.
fn read_and_check(store: &StateStore, id: &str, how: u32) {
    let live: Option<u32> = id.strip_prefix("live-").map(|n| n.parse().unwrap());
    match how % 4 {
        0 => assert_eq!(store.load::<u32>(id).unwrap(), live, "load {id}"),
        1 => {
            let found = store.load_versioned::<u32>(id).unwrap();
            assert_eq!(found.as_ref().map(|v| v.value), live, "load_versioned {id}");
            if let Some(v) = found {
                assert_eq!(v.sequence, 1, "{id}");
                assert!(v.expires_at.is_none(), "{id}");
            }
        }
        2 => assert_eq!(store.exists(id).unwrap(), live.is_some(), "exists {id}"),
        _ => assert_eq!(
            store.sequence(id).unwrap(),
            live.map(|_| 1),
            "sequence {id}"
        ),
    }
}

#[test]
fn every_reader_gets_its_own_row_under_sixteen_threads() {
    let schema = TestDatabase::shared().schema();
    let store = reader_store(&schema);
    fill(&store);
    let threads = 16;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads as u32)
        .map(|t| {
            let (store, barrier) = (store.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                for n in 0..400u32 {
                    let pick = (t * 7919 + n * 104_729) % (3 * LIVE + 8);
                    match pick / LIVE {
                        0 => read_and_check(&store, &format!("live-{}", pick % LIVE), n),
                        1 => read_and_check(&store, &format!("gone-{}", pick % LIVE), n),
                        2 => read_and_check(&store, &format!("never-{t}-{n}"), n),
                        // Bad ids fail alone, before anything is sent.
                        _ => {
                            let bad = if n % 2 == 0 {
                                String::new()
                            } else {
                                "x".repeat(1000)
                            };
                            let e = store.load::<u32>(&bad).unwrap_err();
                            assert!(matches!(e, Error::InvalidActorId(_)), "{e}");
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// While a lock holds the table, two readers' statements wait on it and
/// the other readers wait for them, not for statements of their own; once
/// the lock is gone, one statement answers the readers that waited.
#[test]
fn readers_that_come_while_two_statements_wait_share_one_statement() {
    let schema = TestDatabase::shared().schema();
    let store = reader_store(&schema);
    fill(&store);
    let table = schema.table("actor_states");
    let mut locker = schema.client().unwrap();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .unwrap();
    let called = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..16u32)
        .map(|t| {
            let (store, called) = (store.clone(), Arc::clone(&called));
            std::thread::spawn(move || {
                called.fetch_add(1, Ordering::SeqCst);
                store.load::<u32>(&format!("live-{t}")).unwrap()
            })
        })
        .collect();
    let mut observer = schema.client().unwrap();
    let mut waiting = || -> i64 {
        observer
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::TEXT::regclass",
                &[&table],
            )
            .unwrap()
            .get(0)
    };
    common::wait_until(
        "every reader has called and two statements wait on the lock",
        std::time::Duration::from_secs(60),
        || called.load(Ordering::SeqCst) == 16 && waiting() >= 2,
    );
    assert_eq!(waiting(), 2, "statements waiting on the lock");
    lock.commit().unwrap();
    for (t, r) in readers.into_iter().enumerate() {
        assert_eq!(r.join().unwrap(), Some(t as u32));
    }
    let shared: i64 = observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE '%WITH ORDINALITY AS i(id, whole, n)%' AND query LIKE '%' || $1 || '%'",
            &[&schema.name()],
        )
        .unwrap()
        .get(0);
    assert!(shared >= 1, "no statement answered several readers");
}

#[test]
fn a_read_sees_the_write_its_thread_made_before_it() {
    let schema = TestDatabase::shared().schema();
    let store = reader_store(&schema);
    fill(&store);
    let stop = Arc::new(AtomicBool::new(false));
    // Readers keep statements of many ids in flight.
    let readers: Vec<_> = (0..15u32)
        .map(|t| {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    read_and_check(&store, &format!("live-{}", (t + n) % LIVE), n);
                    n += 1;
                }
            })
        })
        .collect();
    for n in 1..=300u32 {
        let sequence = store.save("mine", &n).unwrap();
        assert_eq!(store.load::<u32>("mine").unwrap(), Some(n));
        assert_eq!(store.sequence("mine").unwrap(), Some(sequence));
        let v = store.load_versioned::<u32>("mine").unwrap().unwrap();
        assert_eq!((v.value, v.sequence), (n, sequence));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
}

#[test]
fn a_connection_cut_during_coalesced_reads_fails_only_its_readers_and_the_store_goes_on() {
    let cluster = common::cut::cluster();
    let direct = StateStore::builder()
        .connect_options(cluster.connect_options())
        .table("coalesced_cut")
        .migrate(true)
        .build()
        .unwrap();
    fill(&direct);
    let proxy = TcpProxy::start(cluster.port()).unwrap();
    let mut options = cluster.connect_options();
    options.port(proxy.port());
    let store = StateStore::builder()
        .connect_options(options)
        .table("coalesced_cut")
        .pool_options(PoolOptions::default().max_size(16).min_idle(Some(0)))
        .coalesce_reads(true)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..16u32)
        .map(|t| {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, 0u32);
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("live-{}", (t * 3 + n) % LIVE);
                    match store.load::<u32>(&id) {
                        Ok(found) => {
                            assert_eq!(found, Some((t * 3 + n) % LIVE), "{id}");
                            ok += 1;
                        }
                        Err(e) => {
                            assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
                            failed += 1;
                        }
                    }
                    n += 1;
                }
                (ok, failed)
            })
        })
        .collect();
    // Cut every connection a few times while the readers read; each cut
    // waits for reads to succeed again first.
    for _ in 0..5 {
        common::wait_until(
            "reads go on through the proxy",
            std::time::Duration::from_secs(30),
            || store.exists("live-1").unwrap_or(false),
        );
        proxy.sever_all();
    }
    stop.store(true, Ordering::Relaxed);
    let ok: u32 = readers.into_iter().map(|r| r.join().unwrap().0).sum();
    assert!(ok > 0);
    // The store goes on: every kind of read answers.
    for (i, id) in ["live-5", "gone-5", "never"].iter().enumerate() {
        read_and_check(&store, id, i as u32);
    }
}
