//! Definite outcomes: when the connection drops after a write was sent, the
//! store finds out whether it landed. A TCP proxy cuts the connection right
//! after the server answered (the write committed, the caller never heard)
//! or right before the request reached the server (nothing happened), for
//! each kind of write; then processes count increments across a restart.

use crate::common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trebuchet_postgres::testing::{ProxyRequest, StopMode, TcpProxy, TestCluster};
use trebuchet_postgres::{
    BatchResult, Error, Expected, PoolOptions, RetryPolicy, StateStore, WriteOptions,
};

use common::cut::Rig;

#[track_caller]
fn assert_not_applied<T: std::fmt::Debug>(result: Result<T, Error>) {
    match result {
        Err(e) => assert!(e.is_not_applied(), "expected NotApplied, got {e:?}"),
        Ok(v) => panic!("expected NotApplied, got Ok({v:?})"),
    }
}

use ProxyRequest::{Commit, Statement};

#[test]
fn save() {
    let rig = Rig::new("cut_save");
    rig.store.save("a", &1u32).unwrap();
    let seq = rig.after(Statement, 1, |s| s.save("a", &2u32)).unwrap();
    assert_eq!(seq, 2);
    assert_eq!(rig.version("a"), Some((2, 2)));
    assert_not_applied(rig.before(Statement, 1, |s| s.save("a", &3u32)));
    assert_eq!(rig.version("a"), Some((2, 2)));
    // A new actor too.
    assert_eq!(rig.after(Statement, 1, |s| s.save("b", &7u32)).unwrap(), 1);
    assert_eq!(rig.version("b"), Some((7, 1)));
}

#[test]
fn save_if() {
    let rig = Rig::new("cut_save_if");
    let seq = rig
        .after(Statement, 1, |s| s.save_if("a", &10u32, Expected::Absent))
        .unwrap();
    assert_eq!(seq, 1);
    assert_eq!(rig.version("a"), Some((10, 1)));
    assert_not_applied(rig.before(Statement, 1, |s| {
        s.save_if("a", &11u32, Expected::Sequence(1))
    }));
    assert_eq!(rig.version("a"), Some((10, 1)));
    let seq = rig
        .after(Statement, 1, |s| {
            s.save_if("a", &12u32, Expected::Sequence(1))
        })
        .unwrap();
    assert_eq!(seq, 2);
    assert_eq!(rig.version("a"), Some((12, 2)));
    assert_not_applied(rig.before(Statement, 1, |s| s.save_if("b", &1u32, Expected::Absent)));
    assert_eq!(rig.version("b"), None);
}

#[test]
fn save_with_sequence() {
    let rig = Rig::new("cut_save_with_sequence");
    rig.after(Statement, 1, |s| {
        s.save_with("a", &1u32, WriteOptions::new().sequence(10))
    })
    .unwrap();
    assert_eq!(rig.version("a"), Some((1, 10)));
    assert_not_applied(rig.before(Statement, 1, |s| {
        s.save_with("a", &2u32, WriteOptions::new().sequence(20))
    }));
    assert_eq!(rig.version("a"), Some((1, 10)));
}

#[test]
fn transform() {
    let rig = Rig::new("cut_transform");
    rig.store.save("t", &5u32).unwrap();
    // Statement 1 is the read, 2 the conditional write.
    let mut runs = 0;
    let v = rig
        .after(Statement, 2, |s| {
            s.transform("t", |n: Option<u32>| {
                runs += 1;
                n.unwrap() + 1
            })
        })
        .unwrap();
    assert_eq!((v.value, v.sequence, runs), (6, 2, 1));
    assert_eq!(rig.version("t"), Some((6, 2)));
    // Dropped before the server saw it: the step runs again, and the
    // increment is applied exactly once.
    let mut runs = 0;
    let v = rig
        .before(Statement, 2, |s| {
            s.transform("t", |n: Option<u32>| {
                runs += 1;
                n.unwrap() + 1
            })
        })
        .unwrap();
    assert_eq!((v.value, v.sequence, runs), (7, 3, 2));
    assert_eq!(rig.version("t"), Some((7, 3)));

    // With no attempts left the caller hears "not applied".
    let once = Rig::with("cut_transform_once", |b| {
        b.group_commit(false).retry_policy(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
    });
    once.store.save("t", &5u32).unwrap();
    assert_not_applied(once.before(Statement, 2, |s| {
        s.transform("t", |n: Option<u32>| n.unwrap() + 1)
    }));
    assert_eq!(once.version("t"), Some((5, 1)));
}

#[test]
fn delete() {
    let rig = Rig::new("cut_delete");
    rig.store.save("a", &1u32).unwrap();
    rig.store.save("b", &1u32).unwrap();
    assert!(rig.after(Statement, 1, |s| s.delete("a")).unwrap());
    assert_eq!(rig.version("a"), None);
    assert_not_applied(rig.before(Statement, 1, |s| s.delete("b")));
    assert_eq!(rig.version("b"), Some((1, 1)));
    // The deleted actor's next sequence number is still above its tombstone.
    assert_eq!(rig.store.save("a", &2u32).unwrap(), 3);
}

#[test]
fn save_many() {
    let rig = Rig::new("cut_save_many");
    rig.store.save("m1", &1u32).unwrap();
    let seqs = rig
        .after(Statement, 1, |s| {
            s.save_many(&[("m1", 10u32), ("m2", 20u32)])
        })
        .unwrap();
    assert_eq!(seqs, vec![2, 1]);
    assert_eq!(rig.version("m1"), Some((10, 2)));
    assert_eq!(rig.version("m2"), Some((20, 1)));
    assert_not_applied(rig.before(Statement, 1, |s| {
        s.save_many(&[("m1", 11u32), ("m3", 30u32)])
    }));
    assert_eq!(rig.version("m1"), Some((10, 2)));
    assert_eq!(rig.version("m3"), None);
}

#[test]
fn save_many_if() {
    let rig = Rig::new("cut_save_many_if");
    rig.store.save("m1", &1u32).unwrap();
    rig.store.save("m2", &2u32).unwrap();
    let results = rig
        .after(Statement, 1, |s| {
            s.save_many_if(&[
                ("m1", 10u32, Expected::Sequence(1)),
                ("m3", 30u32, Expected::Absent),
                ("m2", 20u32, Expected::Sequence(9)),
            ])
        })
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap(), &2);
    assert_eq!(results[1].as_ref().unwrap(), &1);
    assert!(
        results[2].as_ref().unwrap_err().is_conflict(),
        "{results:?}"
    );
    assert_eq!(rig.version("m1"), Some((10, 2)));
    assert_eq!(rig.version("m3"), Some((30, 1)));
    assert_eq!(rig.version("m2"), Some((2, 1)));
    assert_not_applied(rig.before(Statement, 1, |s| {
        s.save_many_if(&[
            ("m1", 11u32, Expected::Sequence(2)),
            ("m4", 40u32, Expected::Absent),
        ])
    }));
    assert_eq!(rig.version("m1"), Some((10, 2)));
    assert_eq!(rig.version("m4"), None);
}

#[test]
fn delete_many() {
    let rig = Rig::new("cut_delete_many");
    for id in ["d1", "d2", "d3"] {
        rig.store.save(id, &1u32).unwrap();
    }
    let deleted = rig
        .after(Statement, 1, |s| s.delete_many(&["d1", "d2", "nobody"]))
        .unwrap();
    assert_eq!(deleted, vec![true, true, false]);
    assert_eq!((rig.version("d1"), rig.version("d2")), (None, None));
    assert_not_applied(rig.before(Statement, 1, |s| s.delete_many(&["d3"])));
    assert_eq!(rig.version("d3"), Some((1, 1)));
}

#[test]
fn batch() {
    let rig = Rig::new("cut_batch");
    rig.store.save("from", &10u32).unwrap();
    rig.store.save("offer", &1u32).unwrap();
    let results = rig
        .after(Commit, 1, |s| {
            s.batch()
                .save_if("from", &7u32, Expected::Sequence(1))
                .save("to", &3u32)
                .delete("offer")
                .commit()
        })
        .unwrap();
    assert_eq!(
        results,
        vec![
            BatchResult::Saved(2),
            BatchResult::Saved(1),
            BatchResult::Deleted(true)
        ]
    );
    assert_eq!(rig.version("from"), Some((7, 2)));
    assert_eq!(rig.version("to"), Some((3, 1)));
    assert_eq!(rig.version("offer"), None);
    assert_not_applied(rig.before(Commit, 1, |s| {
        s.batch()
            .save_if("from", &0u32, Expected::Sequence(2))
            .save("to", &10u32)
            .commit()
    }));
    assert_eq!(rig.version("from"), Some((7, 2)));
    assert_eq!(rig.version("to"), Some((3, 1)));
}

/// Group commit: threads save through one connection while the proxy cuts
/// it twice, once after a grouped statement was answered and once before
/// one reached the server. Every caller's result matches its row, and the
/// second cut is found not applied.
#[test]
fn grouped_saves() {
    const THREADS: usize = 8;
    const EACH: u32 = 40;
    let rig = Arc::new(Rig::with("cut_grouped", |b| b.group_commit(true)));
    let done = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (rig, done) = (Arc::clone(&rig), Arc::clone(&done));
            std::thread::spawn(move || {
                let id = format!("g{t}");
                let mut results = Vec::new();
                for value in 1..=EACH {
                    let result = if value % 2 == 0 {
                        let expected = match rig.direct.sequence(&id).unwrap() {
                            Some(n) => Expected::Sequence(n),
                            None => Expected::Absent,
                        };
                        rig.store.save_if(&id, &value, expected)
                    } else {
                        rig.store.save(&id, &value)
                    };
                    results.push((value, result));
                    done.fetch_add(1, Ordering::SeqCst);
                }
                (id, results)
            })
        })
        .collect();
    let wait_for = |what: &str, ready: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    wait_for("progress", &|| done.load(Ordering::SeqCst) >= THREADS * 5);
    rig.proxy.cut_after(Statement);
    wait_for("the first cut", &|| rig.proxy.cuts() >= 1);
    // Cut the next grouped write, not the set-up of the new connection.
    let progress = done.load(Ordering::SeqCst);
    wait_for("progress after the cut", &|| {
        done.load(Ordering::SeqCst) >= progress + THREADS
    });
    // A cut before a statement can land on the check of a connection that
    // was idle at the first cut instead of on a write: arm it again, a
    // bounded number of times, until a write is found not applied.
    let total = THREADS * EACH as usize;
    for _ in 0..20 {
        let cuts = rig.proxy.cuts();
        rig.proxy.cut_before(Statement);
        wait_for("the next cut", &|| {
            rig.proxy.cuts() > cuts || done.load(Ordering::SeqCst) >= total
        });
        // A cut write holds its callers until the store has found out what
        // became of it: progress resumes only after that.
        let progress = done.load(Ordering::SeqCst);
        let settled = || {
            rig.store.lost_writes().not_applied > 0
                || done.load(Ordering::SeqCst) >= (progress + 2 * THREADS).min(total)
        };
        wait_for("the cut settled", &settled);
        if rig.store.lost_writes().not_applied > 0 || done.load(Ordering::SeqCst) >= total {
            break;
        }
    }
    let mut not_applied = 0;
    for handle in handles {
        let (id, results) = handle.join().unwrap();
        let mut applied = 0;
        let mut last = None;
        for (value, result) in results {
            match result {
                Ok(seq) => {
                    applied += 1;
                    assert_eq!(
                        seq, applied,
                        "{id}: sequence numbers count the applied saves"
                    );
                    last = Some(value);
                }
                Err(e) if e.is_not_applied() => not_applied += 1,
                Err(e) if e.is_conflict() => panic!("{id}: no other writer, yet {e}"),
                Err(e) => panic!("{id}: {e:?}"),
            }
        }
        assert_eq!(
            rig.version(&id),
            last.map(|v| (v, applied)),
            "{id}: the row holds the last applied save"
        );
    }
    // The cut before a statement was found not applied, and counted: its
    // callers got `NotApplied`, or, on a connection just checked after the
    // first cut, the store made the write again and they got its result.
    assert!(
        rig.store.lost_writes().not_applied > 0,
        "the cut before a statement was found not applied ({not_applied} callers told)"
    );
}

// ----- processes across a restart --------------------------------------------

const CHILD_URL: &str = "TREBUCHET_OUTCOME_URL";
const CHILD_TEST: &str = "outcome::child_process_counts";
const CHILD_INCREMENTS: u64 = 500;
const PROCESSES: u64 = 4;

#[test]
fn four_processes_count_exactly_across_a_fast_restart() {
    count_across_a_restart(StopMode::Fast);
}

#[test]
fn four_processes_count_exactly_across_a_crash() {
    count_across_a_restart(StopMode::Immediate);
}

/// Four processes increment one counter 500 times each through `transform`
/// while the server is shut down and started again: the counter ends at
/// exactly the number of increments whose callers got `Ok`, no caller is
/// left with an unknown outcome or another error, and the restart cut at
/// least one write (the test holds the counter's row lock as the server
/// stops, so that an increment waits in flight).
fn count_across_a_restart(mode: StopMode) {
    // One restart at a time: each runs 4 processes and a cluster of its own
    // on a machine that may have 2 cores.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cluster = TestCluster::start().expect("own cluster");
    let url = cluster.url();
    // The processes reach the server through a proxy, so that the test
    // decides when they may connect again after the restart.
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let child_url = url.replace(
        &format!(":{}/", cluster.port()),
        &format!(":{}/", proxy.port()),
    );
    let watcher = StateStore::builder()
        .url(&url)
        .table("restart_counter")
        .migrate(true)
        .build()
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_URL, &child_url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Restart once the processes are into their increments, while each of
    // them has most of its own still to make (however unevenly they started).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the processes made no progress");
        if watcher.load::<u64>("counter").ok().flatten().unwrap_or(0) >= CHILD_INCREMENTS / 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // An increment waits on the row lock the test holds: in flight.
    let locker = common::lock_rows(&url, &watcher.table(), &["counter".to_owned()]);
    common::wait_for_writes_on_locks(&url, 1);
    proxy.refuse(true);
    cluster.stop(mode).unwrap();
    // The locks died with the server. The processes meet refused
    // connections until the test holds the counter's lock again.
    drop(locker);
    cluster.restart().unwrap();
    // Until every process has found out what became of its cut increment,
    // no other increment lands: a cut write stays answerable only while it
    // is among the counter's 64 most recent write tags (see "Lost
    // connections" on `StateStore`), and a process that reconnects first
    // would otherwise race ahead of one still waiting to reconnect. Each
    // process, once it knows, makes its next increment, which waits here.
    let mut locker = common::lock_rows(&url, &watcher.table(), &["counter".to_owned()]);
    proxy.refuse(false);
    common::wait_for_writes_on_locks(&url, PROCESSES as i64);
    locker.batch_execute("ROLLBACK").unwrap();

    let (mut ok, mut not_applied, mut unknown, mut other, mut cut) = (0, 0, 0, 0, 0);
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("child done: ").map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("the child did not run {CHILD_TEST}:\n{stdout}\n{stderr}"));
        eprint!("{stderr}");
        let counts: Vec<u64> = line.split(' ').map(|n| n.parse().unwrap()).collect();
        assert_eq!(counts.len(), 5, "{line}");
        assert_eq!(counts[..4].iter().sum::<u64>(), CHILD_INCREMENTS, "{line}");
        ok += counts[0];
        not_applied += counts[1];
        unknown += counts[2];
        other += counts[3];
        cut += counts[4];
    }
    let counter = watcher
        .load::<u64>("counter")
        .unwrap()
        .expect("the counter exists");
    eprintln!(
        "{PROCESSES} x {CHILD_INCREMENTS} increments across a {mode:?} restart: {ok} acknowledged, \
         counter {counter}, errors: {not_applied} not applied, {unknown} unknown, {other} other; \
         {cut} writes cut"
    );
    assert_eq!(unknown, 0, "every outcome was found out");
    assert_eq!(
        other, 0,
        "no error but the restart's (see the processes' stderr above)"
    );
    assert!(cut >= 1, "the restart cut no write in flight");
    assert_eq!(
        counter, ok,
        "the counter is exactly the acknowledged increments"
    );
}

/// The body of each child process of
/// `count_across_a_restart`; does nothing in a normal test run.
#[test]
fn child_process_counts() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let store = StateStore::builder()
        .url(&url)
        .table("restart_counter")
        .pool_options(PoolOptions::default().max_size(2))
        .outcome_timeout(Duration::from_secs(60))
        // A slow child may start while the server restarts.
        .wait_for_server(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| panic!("child cannot connect: {e}"));
    let (mut ok, mut not_applied, mut unknown, mut other) = (0, 0, 0, 0);
    for _ in 0..CHILD_INCREMENTS {
        match store.transform("counter", |c: Option<u64>| c.unwrap_or(0) + 1) {
            Ok(_) => ok += 1,
            Err(e) if e.is_not_applied() => not_applied += 1,
            Err(e) if e.is_outcome_unknown() => unknown += 1,
            Err(e) => {
                eprintln!("increment failed: {e}");
                other += 1;
            }
        }
    }
    let lost = store.lost_writes();
    eprintln!(
        "writes whose connection broke: {} applied, {} not applied, {} unknown",
        lost.applied, lost.not_applied, lost.unknown
    );
    let cut = lost.applied + lost.not_applied + lost.unknown;
    println!("child done: {ok} {not_applied} {unknown} {other} {cut}");
}

/// A connection checked because another one broke can pass the check just
/// before the fault reaches it. A write found not applied on such a
/// connection is made again: the caller does not fail twice for one fault.
#[test]
fn a_write_not_applied_on_a_connection_just_checked_is_made_again() {
    let rig = Rig::with("cut_checked", |b| {
        b.group_commit(false)
            .pool_options(PoolOptions::default().max_size(4).min_idle(Some(0)))
    });
    // This thread's connection, with the save statement prepared.
    rig.store.save("a", &1u32).unwrap();
    // While it is in use (a walk holds its connection), another thread's
    // write is cut before it reaches the server: a connection seen broken,
    // so connections in use at the time are checked before their next use.
    let walked = rig
        .store
        .raw()
        .for_each("a", |_, _| {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        rig.store.save("b", &1u32).unwrap();
                        rig.proxy.cut_before(Statement);
                        assert_not_applied(rig.store.save("b", &2u32));
                    })
                    .join()
                    .unwrap();
            });
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(walked, 1);
    assert_eq!(rig.store.lost_writes().not_applied, 1);

    // This thread's connection is checked (the check, a simple query, goes
    // through) and its write is then cut before it reaches the server.
    let cuts = rig.proxy.cuts();
    rig.proxy.cut_before_nth(Statement, 2);
    assert_eq!(rig.store.save("a", &2u32).unwrap(), 2);
    assert_eq!(rig.proxy.cuts(), cuts + 1, "the cut happened");
    assert_eq!(rig.store.lost_writes().not_applied, 2);
    assert_eq!(rig.version("a"), Some((2, 2)));
}
