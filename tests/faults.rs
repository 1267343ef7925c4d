//! Guarantees 3 and 4 under the faults production meets, each on a cluster
//! of the test's own (never the shared server) or through a TCP proxy that
//! stalls or severs connections:
//!
//! - the server restarts (fast and immediate shutdown) while eight threads
//!   save and a listener listens;
//! - every pooled backend is terminated (`pg_terminate_backend`) mid-load;
//! - a process is killed (SIGKILL) in the middle of transforms and batches;
//! - the server starts after the program (refusing, then answering 57P03);
//! - the network stalls: the proxy forwards nothing and closes nothing.
//!
//! (A full NOTIFY queue is in `tests/notify_queue.rs`.)
//!
//! The write checks hold whatever error a lost write reports: every save
//! that returned `Ok` is in the table with the bytes it saved, and an actor
//! written by a save that returned `Err` holds either that save's bytes or
//! an earlier save's, never anything else.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{returns_within, wait_until};
use serde::{Deserialize, Serialize};
use trebuchet_postgres::postgres;
use trebuchet_postgres::testing::{StopMode, TcpProxy, TestCluster};
use trebuchet_postgres::{
    ChangeListener, ConnectFailure, ConnectOptions, Error, Event, Expected, PoolOptions,
    ResyncReason, StateStore, Subscription,
};

/// Threads saving at once.
const WRITERS: usize = 8;
/// Actors each writer cycles through.
const ACTORS_PER_WRITER: usize = 4;
/// How long a test waits for the store or listener to come back.
const RECOVERY: Duration = Duration::from_secs(60);

fn store_on(cluster: &TestCluster, group_commit: bool) -> StateStore {
    StateStore::builder()
        .connect_options(cluster.connect_options())
        .pool_options(PoolOptions::default().max_size(WRITERS as u32))
        .group_commit(group_commit)
        .migrate(true)
        .build()
        .expect("store on the test's cluster")
}

// ----- a write load and its audit ---------------------------------------------

/// One save and what it returned.
struct Write {
    actor: String,
    bytes: Vec<u8>,
    outcome: Result<u64, String>,
}

/// The bytes of a writer's `n`th save: unique, and long enough that a
/// partly applied write could not pass for a whole one.
fn payload(writer: usize, n: u64) -> Vec<u8> {
    let mut bytes = format!("writer {writer} save {n}:").into_bytes();
    bytes.extend(std::iter::repeat_n((n % 251) as u8, 512));
    bytes
}

/// Eight threads saving as fast as they can, each to actors of its own.
struct Load {
    stop: Arc<AtomicBool>,
    oks: Arc<Vec<AtomicU64>>,
    threads: Vec<JoinHandle<Vec<Write>>>,
}

impl Load {
    fn start(store: &StateStore) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let oks: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
        let threads = (0..WRITERS)
            .map(|w| {
                let (store, stop, oks) = (store.clone(), Arc::clone(&stop), Arc::clone(&oks));
                thread::spawn(move || {
                    let mut writes = Vec::new();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let actor = format!("w{w}-{}", n as usize % ACTORS_PER_WRITER);
                        let bytes = payload(w, n);
                        let outcome = store.raw().save(&actor, &bytes).map_err(|e| {
                            // Whatever the error's kind, it must say the
                            // server could not be reached or the write's
                            // fate is unknown, not something else.
                            assert!(
                                e.is_connection(),
                                "writer {w}: a fault gave a non-connection error: {e} ({e:?})"
                            );
                            e.to_string()
                        });
                        if outcome.is_ok() {
                            oks[w].fetch_add(1, Ordering::Relaxed);
                        }
                        writes.push(Write {
                            actor,
                            bytes,
                            outcome,
                        });
                        n += 1;
                    }
                    writes
                })
            })
            .collect();
        Load { stop, oks, threads }
    }

    fn oks(&self) -> Vec<u64> {
        self.oks.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

    /// Waits until every writer has had `more` saves acknowledged since
    /// `since`.
    #[track_caller]
    fn wait_for_progress(&self, since: &[u64], more: u64, what: &str) {
        wait_until(what, RECOVERY, || {
            self.oks()
                .iter()
                .zip(since)
                .all(|(now, then)| *now >= then + more)
        });
    }

    fn finish(self) -> Vec<Vec<Write>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a writer panicked"))
            .collect()
    }
}

/// Checks the table against what every save returned, and returns each
/// writer's error count.
fn audit(store: &StateStore, writers: &[Vec<Write>]) -> Vec<usize> {
    let mut errors = Vec::new();
    for (w, writes) in writers.iter().enumerate() {
        errors.push(writes.iter().filter(|x| x.outcome.is_err()).count());
        let mut by_actor: HashMap<&str, Vec<&Write>> = HashMap::new();
        for write in writes {
            by_actor.entry(&write.actor).or_default().push(write);
        }
        for (actor, writes) in by_actor {
            let stored = store
                .raw()
                .load_versioned(actor)
                .expect("load after the fault")
                .unwrap_or_else(|| panic!("writer {w}: actor {actor} is missing"));
            // Acknowledged sequence numbers only grow.
            let acked: Vec<u64> = writes
                .iter()
                .filter_map(|x| x.outcome.clone().ok())
                .collect();
            assert!(
                acked.windows(2).all(|p| p[0] < p[1]),
                "writer {w}: {actor}: acknowledged sequences {acked:?}"
            );
            let last_ok = writes.iter().rposition(|x| x.outcome.is_ok());
            let landed = writes
                .iter()
                .rposition(|x| x.bytes == stored.value)
                .unwrap_or_else(|| {
                    panic!(
                        "writer {w}: {actor} holds bytes no save wrote ({} bytes): half applied?",
                        stored.value.len()
                    )
                });
            // The last acknowledged save or a later failed one.
            if let Some(last_ok) = last_ok {
                assert!(
                    landed >= last_ok,
                    "writer {w}: {actor} lost acknowledged save {last_ok} (holds save {landed})"
                );
                if landed == last_ok {
                    assert_eq!(
                        Ok(stored.sequence),
                        writes[last_ok].outcome,
                        "writer {w}: {actor}"
                    );
                }
            }
            assert!(
                writes[landed..].iter().skip(1).all(|x| x.outcome.is_err()),
                "writer {w}: {actor}: a later acknowledged save is missing"
            );
            // Every acknowledged save took a number; a failed one may have.
            let oks = acked.len() as u64;
            let errs = writes.len() as u64 - oks;
            assert!(
                (oks..=oks + errs).contains(&stored.sequence),
                "writer {w}: {actor}: sequence {} after {oks} acknowledged and {errs} failed saves",
                stored.sequence
            );
        }
    }
    errors
}

// ----- a listener and its audit -------------------------------------------------

/// The actor of the last save of a test, once everything has settled.
const AFTER: &str = "after";

/// Drains a subscription to every change on a thread of its own (so that
/// it never lags), keeping the events.
struct Drain {
    stop: Arc<AtomicBool>,
    resyncs: Arc<AtomicU64>,
    saw_after: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Event>>,
}

impl Drain {
    fn start(subscription: Subscription) -> Drain {
        let stop = Arc::new(AtomicBool::new(false));
        let resyncs = Arc::new(AtomicU64::new(0));
        let saw_after = Arc::new(AtomicBool::new(false));
        let (stop2, resyncs2, saw_after2) = (
            Arc::clone(&stop),
            Arc::clone(&resyncs),
            Arc::clone(&saw_after),
        );
        let thread = thread::spawn(move || {
            let mut events = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(event) = subscription.recv_timeout(Duration::from_millis(50)) {
                    match &event {
                        Event::Resync(_) => {
                            resyncs2.fetch_add(1, Ordering::Relaxed);
                        }
                        Event::Change(c) if c.actor_id == AFTER => {
                            saw_after2.store(true, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    events.push(event);
                }
            }
            events
        });
        Drain {
            stop,
            resyncs,
            saw_after,
            thread,
        }
    }

    fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Saves [`AFTER`] and waits until its change arrives.
    #[track_caller]
    fn save_after_and_wait(&self, store: &StateStore) {
        store.raw().save(AFTER, b"x").expect("save after the fault");
        wait_until("the last save is announced", RECOVERY, || {
            self.saw_after.load(Ordering::Relaxed)
        });
    }

    fn finish(self) -> Vec<Event> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the drain panicked")
    }
}

/// Checks the events: only reconnect resyncs (never a lag, the drain keeps
/// up), at least `gaps` of them, per actor sequence numbers that only grow,
/// and changes after the last resync.
fn audit_events(events: &[Event], gaps: usize) {
    let resyncs: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Resync(_)))
        .map(|(i, _)| i)
        .collect();
    for &i in &resyncs {
        assert_eq!(events[i], Event::Resync(ResyncReason::Reconnected));
    }
    assert!(
        resyncs.len() >= gaps,
        "{} resyncs for {gaps} lost connections",
        resyncs.len()
    );
    let last = *resyncs.last().expect("at least one resync");
    assert!(
        events[last..].iter().any(|e| matches!(e, Event::Change(_))),
        "no change arrived after the last resync"
    );
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for event in events {
        if let Event::Change(c) = event {
            if let Some(prev) = seen.insert(&c.actor_id, c.sequence) {
                assert!(
                    c.sequence > prev,
                    "{} went from {prev} to {}",
                    c.actor_id,
                    c.sequence
                );
            }
        }
    }
}

fn listener_on(store: &StateStore) -> ChangeListener {
    store
        .listener_builder()
        .queue_capacity(1 << 20)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .expect("listener")
}

// ----- a write in flight at the fault ------------------------------------------

/// Locks writer 0's actors and waits until one of the store's saves waits
/// on them: that save is in flight, so a fault now cuts at least one write
/// for sure. Returns the connection holding the locks (see
/// `common::lock_rows`).
fn hold_a_save_in_flight(cluster: &TestCluster, store: &StateStore) -> postgres::Client {
    let actors: Vec<String> = (0..ACTORS_PER_WRITER).map(|a| format!("w0-{a}")).collect();
    let locker = common::lock_rows(&cluster.url(), &store.table(), &actors);
    common::wait_for_writes_on_locks(&cluster.url(), 1);
    locker
}

/// Writes whose connection broke, as the store counted them.
fn cut_writes(store: &StateStore) -> u64 {
    let lost = store.lost_writes();
    lost.applied + lost.not_applied + lost.unknown
}

// ----- 1. the server restarts under load ---------------------------------------

/// With group commit on, one lost connection fails a whole group of
/// writers; off, each writer holds a connection of its own. The other
/// writers save freely as the server stops; writer 0's save is held in
/// flight, so that the restart cuts at least one write.
fn restart_under_load(mode: StopMode, group_commit: bool) {
    let cluster = TestCluster::start().expect("cluster");
    let store = store_on(&cluster, group_commit);
    let listener = listener_on(&store);
    let drain = Drain::start(listener.subscribe());
    let load = Load::start(&store);
    load.wait_for_progress(&[0; WRITERS], 50, "every writer saves");

    let locker = hold_a_save_in_flight(&cluster, &store);
    cluster.stop(mode).expect("stop");
    drop(locker); // died with the server
    cluster.restart().expect("restart");

    // The same store and listener, without restarting anything of ours.
    let after = load.oks();
    load.wait_for_progress(&after, 20, "every writer saves again after the restart");
    wait_until("the listener resyncs", RECOVERY, || drain.resyncs() >= 1);
    let writes = load.finish();
    // A last save after everything settled is announced.
    drain.save_after_and_wait(&store);
    let events = drain.finish();

    // Errors other than connection errors failed their writer (see `Load`).
    let errors = audit(&store, &writes);
    let cut = cut_writes(&store);
    eprintln!(
        "{mode:?}, group commit {group_commit}: {} saves, errors per writer {errors:?}, \
         {cut} writes cut ({:?}), {} events",
        writes.iter().map(Vec::len).sum::<usize>(),
        store.lost_writes(),
        events.len()
    );
    for (w, n) in errors.iter().enumerate() {
        assert!(
            *n <= 1,
            "{mode:?}, group commit {group_commit}: writer {w} saw {n} errors for one restart"
        );
    }
    assert!(
        cut >= 1,
        "{mode:?}, group commit {group_commit}: the restart cut no write in flight"
    );
    audit_events(&events, 1);
    assert!(listener.health().connected);
    assert!(store.pool().state().connections <= WRITERS as u32);
}

#[test]
fn a_fast_restart_under_load_loses_nothing_acknowledged() {
    restart_under_load(StopMode::Fast, true);
    restart_under_load(StopMode::Fast, false);
}

#[test]
fn an_immediate_restart_under_load_loses_nothing_acknowledged() {
    restart_under_load(StopMode::Immediate, true);
    restart_under_load(StopMode::Immediate, false);
}

// ----- 2. every pooled backend is terminated under load -----------------------

#[test]
fn terminating_every_backend_under_load_loses_nothing_acknowledged() {
    terminate_under_load(true);
    terminate_under_load(false);
}

fn terminate_under_load(group_commit: bool) {
    const ROUNDS: usize = 3;
    let cluster = TestCluster::start().expect("cluster");
    let store = store_on(&cluster, group_commit);
    let listener = listener_on(&store);
    let drain = Drain::start(listener.subscribe());
    let load = Load::start(&store);
    load.wait_for_progress(&[0; WRITERS], 50, "every writer saves");

    let mut admin = trebuchet_postgres::postgres::Client::connect(
        &cluster.url(),
        trebuchet_postgres::postgres::NoTls,
    )
    .expect("admin connection");
    let mut terminated = 0;
    for round in 0..ROUNDS {
        // Writer 0's save waits on row locks of the test's (a connection
        // with another application name, which survives), so that it is cut.
        let mut locker = hold_a_save_in_flight(&cluster, &store);
        // All at once, in one statement: the store's pool and the listener
        // (both connect as application `trebuchet-postgres`).
        let killed: i64 = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'trebuchet-postgres' AND pid <> pg_backend_pid()",
                &[],
            )
            .expect("terminate")
            .get(0);
        assert!(
            killed >= 2,
            "round {round}: only {killed} backends to terminate"
        );
        terminated += killed;
        locker.batch_execute("ROLLBACK").expect("release the locks");
        let before = load.oks();
        load.wait_for_progress(&before, 20, "every writer saves again");
        let resynced = round as u64 + 1;
        wait_until("the listener resyncs", RECOVERY, || {
            drain.resyncs() >= resynced
        });
    }
    let writes = load.finish();
    drain.save_after_and_wait(&store);
    let events = drain.finish();

    let errors = audit(&store, &writes);
    let cut = cut_writes(&store);
    assert!(
        cut >= ROUNDS as u64,
        "group commit {group_commit}: {cut} writes cut in {ROUNDS} rounds ({:?})",
        store.lost_writes()
    );
    for (w, n) in errors.iter().enumerate() {
        assert!(
            *n <= ROUNDS,
            "group commit {group_commit}: writer {w} saw {n} errors for {ROUNDS} rounds"
        );
    }
    audit_events(&events, ROUNDS);
    assert!(listener.health().connected);
    eprintln!(
        "group commit {group_commit}: {terminated} backends terminated in {ROUNDS} rounds; \
         {} saves, errors per writer {errors:?}, {cut} writes cut",
        writes.iter().map(Vec::len).sum::<usize>()
    );
}

// ----- 3. a process is killed mid-transform and mid-batch ---------------------

/// Set only in the child processes: the cluster's URL.
const CHILD_URL: &str = "TREBUCHET_FAULTS_CHILD_URL";
/// The test the children run.
const CHILD_TEST: &str = "child_transforms_and_batches_until_killed";
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
    let a: i64 = store.load("a").expect("load a").expect("a exists");
    let b: i64 = store.load("b").expect("load b").expect("b exists");
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

// ----- 4. the server starts after the program ---------------------------------

/// A store builder for `cluster` that may wait `wait` for its server.
fn late_store(cluster: &TestCluster, wait: Option<Duration>) -> Result<StateStore, Error> {
    let mut builder = StateStore::builder()
        .connect_options(cluster.connect_options())
        .migrate(true);
    if let Some(wait) = wait {
        builder = builder.wait_for_server(wait);
    }
    builder.build()
}

#[track_caller]
fn assert_connect_failure(result: Result<StateStore, Error>, expected: ConnectFailure) -> Error {
    match result {
        Err(e @ Error::Connect { failure, .. }) if failure == expected => e,
        Err(e) => panic!("expected {expected:?}, got {e} ({e:?})"),
        Ok(_) => panic!("expected {expected:?}, got a store"),
    }
}

#[test]
fn a_program_started_before_the_server_waits_or_fails_clearly() {
    let cluster = TestCluster::start().expect("cluster");
    cluster.stop(StopMode::Fast).expect("stop");

    // Without waiting: an error saying what is wrong.
    let (result, took) = {
        let cluster_options = cluster.connect_options();
        returns_within("a build without waiting", RECOVERY, move || {
            StateStore::builder()
                .connect_options(cluster_options)
                .migrate(true)
                .build()
        })
    };
    let e = assert_connect_failure(result, ConnectFailure::Refused);
    assert!(e.to_string().contains("is PostgreSQL running?"), "{e}");
    eprintln!("refused without waiting after {took:?}");

    // Waiting too briefly: the same error once the wait is over (and not
    // before: the wait is a lower bound).
    let wait = Duration::from_millis(700);
    let (result, took) = {
        let cluster_options = cluster.connect_options();
        returns_within("a build waiting 700 ms", RECOVERY, move || {
            StateStore::builder()
                .connect_options(cluster_options)
                .wait_for_server(wait)
                .migrate(true)
                .build()
        })
    };
    assert_connect_failure(result, ConnectFailure::Refused);
    assert!(
        took >= wait,
        "gave up after {took:?}, before the wait of {wait:?}"
    );
    eprintln!("refused after waiting {took:?} for {wait:?}");

    // Waiting long enough: the program starts first and gets its store
    // once the server is up.
    let program = {
        let options = cluster.connect_options();
        thread::spawn(move || {
            StateStore::builder()
                .connect_options(options)
                .wait_for_server(RECOVERY)
                .migrate(true)
                .build()
        })
    };
    thread::sleep(Duration::from_millis(800));
    assert!(!program.is_finished(), "the program did not wait");
    cluster.restart().expect("start the server late");
    let store = program.join().unwrap().expect("the program's store");
    assert_eq!(store.save("late", &1u32).unwrap(), 1);
}

#[test]
fn a_server_still_starting_up_is_waited_for() {
    let cluster = TestCluster::start().expect("cluster");
    cluster.stop(StopMode::Fast).expect("stop");
    cluster
        .restart_in_recovery()
        .expect("start the server, still in recovery");
    // The server answers, but refuses connections while it starts up.
    let refused = trebuchet_postgres::postgres::Client::connect(
        &cluster.url(),
        trebuchet_postgres::postgres::NoTls,
    )
    .map(drop)
    .expect_err("a server in recovery refuses connections");
    assert_eq!(
        refused.code(),
        Some(&trebuchet_postgres::postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{refused}"
    );

    // Without waiting: a clear error saying the server is not ready.
    let e = assert_connect_failure(late_store(&cluster, None), ConnectFailure::NotReady);
    assert!(e.to_string().contains("starting up"), "{e}");

    // Waiting: through 57P03 until the server is ready.
    let program = {
        let options = cluster.connect_options();
        thread::spawn(move || {
            StateStore::builder()
                .connect_options(options)
                .wait_for_server(RECOVERY)
                .migrate(true)
                .build()
        })
    };
    thread::sleep(Duration::from_millis(800));
    assert!(!program.is_finished(), "the program did not wait");
    cluster.promote().expect("end recovery");
    let store = program.join().unwrap().expect("the program's store");
    assert_eq!(store.save("late", &1u32).unwrap(), 1);
}

// ----- 5. the network stalls ------------------------------------------------------

/// Connection options through `proxy` to `cluster`.
fn through(proxy: &TcpProxy, cluster: &TestCluster) -> ConnectOptions {
    let mut options = cluster.connect_options();
    options.port(proxy.port());
    options
}

#[test]
fn a_listener_notices_a_stalled_network_and_resyncs_once_it_flows() {
    let interval = Duration::from_millis(300);
    let timeout = Duration::from_millis(700);
    let cluster = TestCluster::start().expect("cluster");
    let direct = store_on(&cluster, true);
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let listener = ChangeListener::builder()
        .connect_options(through(&proxy, &cluster))
        .channel(direct.channel())
        .heartbeat(interval, timeout)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .expect("listener through the proxy");
    let changes = listener.subscribe();
    direct.save("a", &1u32).unwrap();
    match changes.recv_timeout(RECOVERY) {
        Ok(Event::Change(c)) => assert_eq!((c.actor_id.as_str(), c.sequence), ("a", 1)),
        other => panic!("expected the first change, got {other:?}"),
    }

    // The proxy keeps the connection open and forwards nothing: no error,
    // no close, no keepalive failure (the proxy's kernel acknowledges).
    // Nothing but the heartbeat can notice it: TCP keepalives are answered.
    proxy.stall();
    let stalled = Instant::now();
    wait_until("the listener notices the stall", RECOVERY, || {
        !listener.health().connected
    });
    eprintln!(
        "stall noticed after {:?} (heartbeat {interval:?} + {timeout:?})",
        stalled.elapsed()
    );
    let health = listener.health();
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("heartbeat")),
        "{health:?}"
    );
    direct.save("a", &2u32).unwrap(); // missed: the resync covers it

    // A listener built meanwhile fails by its connect timeout instead of
    // waiting for the network, which stays stalled until it has returned.
    let connect_timeout = Duration::from_millis(800);
    let mut options = through(&proxy, &cluster);
    options.connect_timeout(connect_timeout);
    let channel = direct.channel().to_owned();
    let (built, took) = returns_within("a listener's build", RECOVERY, move || {
        ChangeListener::builder()
            .connect_options(options)
            .channel(channel)
            .build()
    });
    match built {
        Err(Error::Connect {
            failure: ConnectFailure::Timeout,
            ..
        }) => {}
        other => panic!("expected a connect timeout, got {other:?}"),
    }
    eprintln!("listener build timed out after {took:?} (connect timeout {connect_timeout:?})");

    proxy.resume();
    match changes.recv_timeout(RECOVERY) {
        Ok(Event::Resync(ResyncReason::Reconnected)) => {}
        other => panic!("expected a resync once the network flows, got {other:?}"),
    }
    wait_until("the listener reconnects", RECOVERY, || {
        listener.health().connected
    });
    direct.save("a", &3u32).unwrap();
    match changes.recv_timeout(RECOVERY) {
        Ok(Event::Change(c)) => assert_eq!((c.actor_id.as_str(), c.sequence), ("a", 3)),
        other => panic!("expected the change after the resync, got {other:?}"),
    }
    // Shutdown still returns after all that.
    let ((), took) = returns_within("shutdown()", RECOVERY, move || listener.shutdown());
    eprintln!("shutdown returned after {took:?}");
}

#[test]
fn calls_through_a_stalled_network_fail_within_the_call_timeout() {
    let call_timeout = Duration::from_millis(800);
    let connect_timeout = Duration::from_millis(800);
    let connection_timeout = Duration::from_millis(1500);
    let outcome_timeout = Duration::from_millis(1500);
    // The most any one call should take while the network stalls (printed
    // beside what each took; the test waits longer before it fails): a call in
    // flight is cut after the call timeout; a later one may first check an
    // idle connection (up to the call timeout) and then wait for a new
    // connection (up to the connection timeout). A write whose connection
    // was cut then tries to find out whether it landed, on new connections
    // (each up to the connect timeout), for up to the outcome timeout.
    let read_bound = call_timeout * 2 + connection_timeout;
    let write_bound = read_bound + outcome_timeout + connect_timeout;
    let cluster = TestCluster::start().expect("cluster");
    let direct = store_on(&cluster, true);
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let mut options = through(&proxy, &cluster);
    options.connect_timeout(connect_timeout);
    let store = StateStore::builder()
        .connect_options(options)
        .pool_options(
            PoolOptions::default()
                .max_size(2)
                .call_timeout(Some(call_timeout))
                .connection_timeout(connection_timeout),
        )
        .outcome_timeout(outcome_timeout)
        .build()
        .expect("store through the proxy");
    store.save("a", &1u32).unwrap();
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));

    // The network stays stalled until every call below has returned: only
    // the timeouts end them.
    proxy.stall();
    let mut outcomes = Vec::new();
    for n in 2..8u32 {
        let caller = store.clone();
        let write = n % 2 == 0;
        let (result, took) = returns_within(&format!("call {n}"), RECOVERY, move || {
            if write {
                caller.save("a", &n).map(drop)
            } else {
                caller.load::<u32>("a").map(drop)
            }
        });
        let bound = if write { write_bound } else { read_bound };
        let e = result.expect_err("a call through a stalled network");
        assert!(e.is_connection(), "{e} ({e:?})");
        outcomes.push((took, bound, e.to_string()));
    }
    eprintln!("calls while stalled (took, bound, error): {outcomes:#?}");

    // A store built meanwhile fails by its connect timeout too.
    let mut options = through(&proxy, &cluster);
    options.connect_timeout(connect_timeout);
    let (built, took) = returns_within("a store's build", RECOVERY, move || {
        StateStore::builder().connect_options(options).build()
    });
    assert_connect_failure(built, ConnectFailure::Timeout);
    eprintln!("store build timed out after {took:?}");

    proxy.resume();
    // The same store recovers by itself.
    wait_until("calls succeed again", RECOVERY, || {
        store.save("a", &100u32).is_ok()
    });
    assert_eq!(store.load::<u32>("a").unwrap(), Some(100));
    // A save cut by the timeout may have been applied, but only whole.
    let stored: u32 = direct.load("a").unwrap().unwrap();
    assert_eq!(stored, 100);
}
