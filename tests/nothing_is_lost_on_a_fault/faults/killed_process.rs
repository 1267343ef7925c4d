//! A process is killed (SIGKILL) in the middle of transforms, batches and
//! bulk saves, again and again: whatever it was doing when it died, every
//! invariant its writes keep still holds in the table (nothing half applied),
//! and the next process carries on from there.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::TestCluster;
use trebuchet_postgres::{Expected, PoolOptions, StateStore};

use super::store_on;

/// Set only in the child processes: the cluster's URL.
const CHILD_URL: &str = "TREBUCHET_FAULTS_CHILD_URL";
/// The test the children run.
const CHILD_TEST: &str = "faults::killed_process::child_transforms_and_batches_until_killed";
/// Units moved between the two accounts, conserved by every batch.
const TOTAL: i64 = 1_000;
/// Actors written together by one `save_many`, always with equal values.
const GENERATION: [&str; 6] = ["g0", "g1", "g2", "g3", "g4", "g5"];

/// A state whose parts must agree: `items` is `len(n)` copies of `n`.
#[derive(Debug, Serialize, Deserialize)]
struct Doc {
    n: u64,
    items: Vec<u64>,
}

impl Doc {
    fn len(n: u64) -> usize {
        64 + (n % 200) as usize
    }

    fn next(previous: Option<Doc>) -> Doc {
        let n = previous.map_or(0, |d| d.n + 1);
        Doc {
            n,
            items: vec![n; Doc::len(n)],
        }
    }

    #[track_caller]
    fn check(&self) {
        assert_eq!(self.items.len(), Doc::len(self.n), "{self:?}");
        assert!(self.items.iter().all(|&i| i == self.n), "{self:?}");
    }
}

/// Checks every invariant the child keeps; returns the document's `n`.
fn check_invariants(store: &StateStore) -> u64 {
    let doc: Doc = store.load("doc").expect("load doc").expect("doc exists");
    doc.check();
    // One statement, one snapshot: the killed child's last transaction may
    // still commit (its server process outlives it for a moment), and it
    // must not fall between the two reads.
    let accounts: Vec<Option<i64>> = store.load_many(&["a", "b"]).expect("load a and b");
    let (a, b) = (
        accounts[0].expect("a exists"),
        accounts[1].expect("b exists"),
    );
    assert_eq!(a + b, TOTAL, "a batch was half applied: a = {a}, b = {b}");
    let generation: Vec<Option<u64>> = store.load_many(&GENERATION).expect("load generation");
    assert!(
        generation.windows(2).all(|p| p[0] == p[1]) && generation[0].is_some(),
        "a bulk save was half applied: {generation:?}"
    );
    doc.n
}

#[test]
fn a_process_killed_mid_transform_and_batch_leaves_no_partial_state() {
    const KILLS: usize = 8;
    let cluster = TestCluster::start().expect("cluster");
    let store = store_on(&cluster, true);
    store.save("a", &TOTAL).unwrap();
    store.save("b", &0i64).unwrap();
    store.save("doc", &Doc::next(None)).unwrap();
    let seed: Vec<(&str, u64)> = GENERATION.iter().map(|g| (*g, 0)).collect();
    store.save_many(&seed).unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut last_n = check_invariants(&store);
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
            .env(CHILD_URL, cluster.url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until it is busy, then kill it at a random point.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let read = stdout.read_line(&mut line).unwrap();
            if read == 0 {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "kill {kill}: the child ended before it was busy ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // After libtest's "test <name> ... " on the same line.
            if line.contains("child busy") {
                break;
            }
        }
        thread::sleep(Duration::from_millis(fastrand::u64(0..200)));
        child.kill().expect("SIGKILL the child");
        let status = child.wait().unwrap();
        assert!(!status.success(), "kill {kill}: the child was not killed");
        let n = check_invariants(&store);
        assert!(n > last_n, "kill {kill}: the child made no progress");
        last_n = n;
    }
    eprintln!("{KILLS} kills, the document at {last_n}");
}

/// The body of each child of
/// `a_process_killed_mid_transform_and_batch_leaves_no_partial_state`:
/// two threads transform, move units and bulk-save until killed. Does
/// nothing in a normal test run.
#[test]
fn child_transforms_and_batches_until_killed() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let store = StateStore::builder()
        .url(&url)
        .pool_options(PoolOptions::default().max_size(2))
        .build()
        .unwrap_or_else(|e| panic!("child cannot connect: {e}"));
    let transformed = Arc::new(AtomicBool::new(false));
    let transformer = {
        let store = store.clone();
        let transformed = Arc::clone(&transformed);
        thread::spawn(move || loop {
            store.transform("doc", Doc::next).expect("transform");
            transformed.store(true, Ordering::Relaxed);
        })
    };
    let mut announced = false;
    loop {
        let a = store.load_versioned::<i64>("a").unwrap().unwrap();
        let b = store.load_versioned::<i64>("b").unwrap().unwrap();
        let moved = fastrand::i64(-a.value.min(10)..=b.value.min(10));
        let committed = store
            .batch()
            .save_if("a", &(a.value + moved), Expected::Sequence(a.sequence))
            .save_if("b", &(b.value - moved), Expected::Sequence(b.sequence))
            .commit();
        match committed {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => panic!("batch: {e}"),
        }
        let generation = fastrand::u64(..);
        let items: Vec<(&str, u64)> = GENERATION.iter().map(|g| (*g, generation)).collect();
        store.save_many(&items).expect("save_many");
        // Busy once both threads have made progress of their own.
        if !announced && transformed.load(Ordering::Relaxed) {
            println!("child busy");
            announced = true;
        }
        assert!(!transformer.is_finished(), "the transform thread ended");
    }
}
