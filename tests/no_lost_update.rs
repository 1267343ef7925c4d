//! Guarantee 1 of the design, **No lost update**:
//!
//! > `transform` is atomic: N threads or N processes each doing M increments
//! > through it leave exactly N·M. Conflicts are retried with bounded,
//! > jittered back-off and then surface as a typed conflict error, never
//! > silently.
//!
//! Many threads, then many processes, increment one counter through
//! `transform` with the default retry policy, and every increment counts.
//! (The back-off's bound is a unit test: `backoff_grows_and_is_capped` in
//! src/store/mod.rs.)
//!
//! The randomised history suite (`tests/history/`, the `history` test
//! target) checks this guarantee too.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{PoolOptions, StateStore};

const COUNTER: &str = "counter";

/// Set only in the child processes: the table to increment in.
const CHILD_TABLE: &str = "TREBUCHET_LOST_UPDATE_TABLE";
/// The child's connection string (may hold a password: never printed).
const CHILD_URL: &str = "TREBUCHET_LOST_UPDATE_URL";
/// The channel of the parent's store, so the child's store names the same.
const CHILD_CHANNEL: &str = "TREBUCHET_LOST_UPDATE_CHANNEL";
/// The name of the test the children run.
const CHILD_TEST: &str = "child_process_increments";
const CHILD_INCREMENTS: u64 = 250;

/// Increments the counter `n` times, returning how many extra times the
/// closure ran (lost races that were retried).
fn increment(store: &StateStore, n: u64) -> u64 {
    let mut calls = 0;
    for _ in 0..n {
        let v = store
            .transform(COUNTER, |c: Option<u64>| {
                calls += 1;
                c.unwrap_or(0) + 1
            })
            .unwrap_or_else(|e| panic!("transform failed: {e}"));
        assert!(v.value >= 1 && v.value == v.sequence, "{v:?}");
    }
    calls - n
}

#[test]
fn eight_threads_lose_no_increment() {
    const THREADS: u64 = 8;
    const EACH: u64 = 500;
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let retries = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (store, barrier, retries) = (store.clone(), barrier.clone(), retries.clone());
            std::thread::spawn(move || {
                barrier.wait();
                retries.fetch_add(increment(&store, EACH), Ordering::Relaxed);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a writer thread panicked");
    }
    let v = store.load_versioned::<u64>(COUNTER).unwrap().unwrap();
    assert_eq!(v.value, THREADS * EACH);
    assert_eq!(v.sequence, THREADS * EACH);
    let retries = retries.load(Ordering::Relaxed);
    eprintln!("{} increments, {retries} retried attempts", THREADS * EACH);
    assert!(retries > 0, "no race was lost: the test did not contend");
}

#[test]
fn four_processes_lose_no_increment() {
    const PROCESSES: u64 = 4;
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
                .env(CHILD_TABLE, schema.table("actor_states"))
                .env(CHILD_CHANNEL, schema.channel())
                .env(CHILD_URL, TestDatabase::shared().url())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Each child connects, says it is ready and waits for a line on its
    // stdin: they start together, however late each one started.
    let mut stdouts: Vec<_> = children
        .iter_mut()
        .map(|child| BufReader::new(child.stdout.take().unwrap()))
        .collect();
    for (child, stdout) in children.iter_mut().zip(&mut stdouts) {
        let mut line = String::new();
        while !line.contains("child ready") {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let mut stderr = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!("a child ended before it was ready:\n{stderr}");
            }
        }
    }
    for child in &mut children {
        writeln!(child.stdin.take().unwrap(), "go").unwrap();
    }
    let mut retries = 0;
    for (child, mut stdout_pipe) in children.into_iter().zip(stdouts) {
        let mut stdout = String::new();
        stdout_pipe.read_to_string(&mut stdout).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "child failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        // Proves the child test ran rather than being filtered out.
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("child done: ").map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("the child did not run {CHILD_TEST}:\n{stdout}\n{stderr}"));
        let (done, lost): (u64, u64) = {
            let mut parts = line.split(' ').map(|n| n.parse().unwrap());
            (parts.next().unwrap(), parts.next().unwrap())
        };
        assert_eq!(done, CHILD_INCREMENTS);
        retries += lost;
    }
    let v = store.load_versioned::<u64>(COUNTER).unwrap().unwrap();
    assert_eq!(v.value, PROCESSES * CHILD_INCREMENTS);
    assert_eq!(v.sequence, PROCESSES * CHILD_INCREMENTS);
    eprintln!(
        "{} increments from {PROCESSES} processes, {retries} retried attempts",
        PROCESSES * CHILD_INCREMENTS
    );
    assert!(
        retries > 0,
        "no race was lost: the processes did not overlap"
    );
}

/// The body of each child process of `four_processes_lose_no_increment`;
/// does nothing in a normal test run.
#[test]
fn child_process_increments() {
    let Ok(table) = std::env::var(CHILD_TABLE) else {
        return;
    };
    let url = std::env::var(CHILD_URL).expect("the parent sets the URL");
    let channel = std::env::var(CHILD_CHANNEL).expect("the parent sets the channel");
    let store = StateStore::builder()
        .url(&url)
        .table(table)
        .channel(channel)
        .pool_options(PoolOptions::default().max_size(2))
        .build()
        .unwrap_or_else(|e| panic!("child cannot connect: {e}"));
    // Connected: wait for the parent's word, which all children get at once.
    println!("child ready");
    std::io::stdout().flush().unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let lost = increment(&store, CHILD_INCREMENTS);
    println!("child done: {CHILD_INCREMENTS} {lost}");
}
