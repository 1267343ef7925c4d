//! Guarantees 3 and 4 under the faults production meets, each on a cluster
//! of the test's own (never the shared server) or through a TCP proxy that
//! stalls or severs connections:
//!
//! - the server restarts (fast and immediate shutdown) while eight threads
//!   save and a listener listens;
//! - every pooled backend is terminated (`pg_terminate_backend`) mid-load;
//! - a process is killed (SIGKILL) in the middle of transforms and batches
//!   (`killed_process`);
//! - the server starts after the program (refusing, then answering 57P03)
//!   (`unreachable_server`);
//! - the network stalls: the proxy forwards nothing and closes nothing
//!   (`unreachable_server`).
//!
//! (A full NOTIFY queue is in `tests/notify_queue.rs`.)
//!
//! The write checks hold whatever error a lost write reports: every save
//! that returned `Ok` is in the table with the bytes it saved, and an actor
//! written by a save that returned `Err` holds either that save's bytes or
//! an earlier save's, never anything else.

#[path = "faults/killed_process.rs"]
mod killed_process;
#[path = "faults/unreachable_server.rs"]
mod unreachable_server;

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::wait_until;
use trebuchet_postgres::postgres;
use trebuchet_postgres::testing::{StopMode, TestCluster};
use trebuchet_postgres::{
    ChangeListener, Event, PoolOptions, ResyncReason, StateStore, Subscription,
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
