//! Randomised concurrent histories, checked against a sequential model.
//!
//! Threads of this process and of child processes run every kind of write
//! on a handful of actors, through a proxy that cuts connections at random
//! points, while another table announces on the same channel and each
//! process keeps a listener and a cache. The recorded history is then
//! checked (see `checker.rs`).
//!
//! - `TREBUCHET_HISTORY_SEED=<n>` repeats a run's choices (the seed is
//!   printed; the interleaving itself is up to the machine).
//! - `TREBUCHET_HISTORY_SECONDS=<n>` runs longer than the default 8 s; from
//!   30 s on, with three child processes and one server restart halfway.
//! - `TREBUCHET_HISTORY_REPLAY=<file>` checks a history a failed run saved.
//! - `TREBUCHET_HISTORY_CITUS=1` runs it on a throwaway Citus cluster (a
//!   coordinator and two workers; the proxy in front of the coordinator).

mod checker;
mod checker_tests;
mod feed;
mod record;
mod workload;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::{
    ProxyRequest, StopMode, TcpProxy, TestCitusCluster, TestCluster,
};
use trebuchet_postgres::{PoolOptions, StateCache, StateStore, StateStoreBuilder};

use feed::Recorder;
use record::{now, Call, History, Op, Outcome, Value};
use workload::Workload;

const SEED: &str = "TREBUCHET_HISTORY_SEED";
const SECONDS: &str = "TREBUCHET_HISTORY_SECONDS";
const REPLAY: &str = "TREBUCHET_HISTORY_REPLAY";
const CHILD: &str = "TREBUCHET_HISTORY_CHILD";
const CITUS: &str = "TREBUCHET_HISTORY_CITUS";
const CHILD_TEST: &str = "child_history";
const SHORT_SECONDS: u64 = 8;
/// From this many seconds on, a run has three child processes and a
/// server restart.
const LONG_SECONDS: u64 = 30;

/// The table the history is about, as payloads name it.
const TABLE: &str = "public.history_a";
/// Another table on the same channel, written to on the same actor ids.
const OTHER_TABLE: &str = "public.history_b";
const CHANNEL: &str = "history_changes";
/// A bound on waits for processes, not a measured time.
const PATIENCE: Duration = Duration::from_secs(300);

/// What a child process is to do.
#[derive(Serialize, Deserialize)]
struct Plan {
    url: String,
    process: u32,
    seed: u64,
    threads: u32,
    group_commit: bool,
    out: PathBuf,
}

fn store_builder(url: &str, table: &str, group_commit: bool) -> StateStoreBuilder {
    StateStore::builder()
        .url(url)
        .table(table)
        .channel(CHANNEL)
        .group_commit(group_commit)
        // Processes that group their writes coalesce their reads too, so
        // that both paths of each meet in one history.
        .coalesce_reads(group_commit)
        .pool_options(PoolOptions::default().max_size(4))
        .outcome_timeout(Duration::from_secs(60))
        .wait_for_server(Duration::from_secs(60))
}

/// A seed of its own for each thread of each process.
fn seed_of(seed: u64, process: u32, thread: u32) -> u64 {
    let mut x = seed ^ (u64::from(process) << 32 | u64::from(thread));
    // splitmix64's finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

#[test]
fn random_histories_are_linearizable() {
    if let Ok(path) = std::env::var(REPLAY) {
        let text = std::fs::read_to_string(&path).expect("read the history to replay");
        let history: History = serde_json::from_str(&text).expect("a saved history");
        let violations = checker::check(&history, TABLE);
        report(&history, &violations, None);
        return;
    }
    let seed = env_u64(SEED).unwrap_or_else(|| fastrand::u64(..));
    let seconds = env_u64(SECONDS).unwrap_or(SHORT_SECONDS);
    eprintln!("history: seed {seed} ({SEED}={seed} repeats its choices), {seconds} s");
    let (history, summary) = run(seed, seconds);
    let violations = checker::check(&history, TABLE);
    eprintln!("history: {summary}");
    report(&history, &violations, Some(seed));
}

/// Prints the outcome; on violations saves the history and fails.
fn report(history: &History, violations: &[String], seed: Option<u64>) {
    let (batches, repeated, committed) = history.batch_counts();
    eprintln!(
        "history: {} operations {:?}, {batches} batches ({repeated} naming an actor more than \
         once, {committed} of those committed), {} subscriber events, errors of unknown outcome \
         {:?}, {} violations",
        history.ops.len(),
        history.counts(),
        history.feeds.iter().map(|f| f.events.len()).sum::<usize>(),
        history.errors,
        violations.len()
    );
    if violations.is_empty() {
        return;
    }
    let mut message = String::new();
    if let Some(seed) = seed {
        let path = std::env::temp_dir().join(format!("trebuchet-history-{seed}.json"));
        let saved = std::fs::write(&path, serde_json::to_vec(history).unwrap());
        message += &format!(
            "seed {seed}: {} violations; the history is in {} ({REPLAY}=<file> checks it again){}\n",
            violations.len(),
            path.display(),
            saved.err().map(|e| format!(" (not saved: {e})")).unwrap_or_default()
        );
    }
    for v in violations.iter().take(20) {
        message += &format!("- {v}\n");
    }
    panic!("{message}");
}

/// Runs one history and returns it with a line of what happened.
fn run(seed: u64, seconds: u64) -> (History, String) {
    let long = seconds >= LONG_SECONDS;
    let children = if long { 3 } else { 2 };
    let citus = std::env::var(CITUS).is_ok_and(|v| !v.is_empty() && v != "0");
    let (own, citus_cluster);
    let cluster: &TestCluster = if citus {
        citus_cluster = TestCitusCluster::start(2).expect("a throwaway Citus cluster");
        citus_cluster.coordinator()
    } else {
        own = TestCluster::start().expect("a throwaway cluster");
        &own
    };
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let direct_url = cluster.url();
    let proxied_url = direct_url.replace(
        &format!(":{}/", cluster.port()),
        &format!(":{}/", proxy.port()),
    );
    let direct = store_builder(&direct_url, TABLE, false)
        .migrate(true)
        .build()
        .unwrap();
    store_builder(&direct_url, OTHER_TABLE, false)
        .migrate(true)
        .build()
        .unwrap();
    let store = store_builder(&proxied_url, TABLE, true).build().unwrap();
    let other = store_builder(&proxied_url, OTHER_TABLE, false)
        .build()
        .unwrap();
    let listener = store.listener().unwrap();
    let cache: StateCache<Value> = StateCache::new(&store, &listener).unwrap();
    // A second listener straight to the server, which the proxy's cuts
    // do not reach.
    let direct_listener = direct.listener().unwrap();
    let recorders = vec![
        Recorder::start("process 0 through the proxy".into(), listener.subscribe()),
        Recorder::start("process 0 direct".into(), direct_listener.subscribe()),
    ];
    let actors = workload::actors();
    let dir = tempfile::tempdir().unwrap();
    let mut processes: Vec<Process> = (1..=children)
        .map(|process| {
            Process::spawn(Plan {
                url: proxied_url.clone(),
                process,
                seed: seed_of(seed, process, 0),
                threads: 2,
                group_commit: process % 2 == 1,
                out: dir.path().join(format!("history-{process}.json")),
            })
        })
        .collect();
    // Every process has connected, subscribed and built its cache before
    // the first fault; then all start together.
    for process in &mut processes {
        process.wait_for("history: ready");
    }
    let until = now() + seconds * 1_000_000_000;
    for process in &mut processes {
        process.tell(&format!("go {until}"));
    }

    let other_writes = AtomicU64::new(0);
    let (mut history, faults) = std::thread::scope(|s| {
        s.spawn(|| write_other_table(&other, &actors, seed_of(seed, 0, 100), until, &other_writes));
        let faults = s.spawn(|| Faults::run(&proxy, cluster, seed_of(seed, 0, 101), until, long));
        let history = run_writers(&store, &cache, &actors, 0, 3, seed, until);
        (history, faults.join().expect("the fault thread panicked"))
    });

    // Quiescence: every writer of every process has stopped.
    for process in &mut processes {
        process.wait_for("history: writes done");
    }
    history
        .problems
        .extend(feed::compare_cache("process 0", &cache, &direct, &actors));
    for process in &mut processes {
        process.tell("quiet");
    }
    for process in processes {
        history.merge(process.finish());
    }
    for recorder in recorders {
        history.feeds.push(recorder.finish());
    }
    // The table's final state, as a load after everything.
    for id in &actors {
        let invoked = now();
        let found = direct.load_versioned::<Value>(id).unwrap();
        history.ops.push(Op {
            process: 0,
            thread: u32::MAX,
            via: "final load".into(),
            actor: id.clone(),
            call: Call::Load,
            outcome: Outcome::Read(found.map(|v| (v.value, v.sequence))),
            invoked,
            returned: now(),
            batch: None,
        });
    }
    // The run did what it is meant to.
    let vias: std::collections::BTreeSet<&str> =
        history.ops.iter().map(|op| op.via.as_str()).collect();
    for via in workload::CALLS {
        assert!(vias.contains(via), "no {via} ran: {vias:?}");
    }
    // On Citus a write of several actors takes tens of milliseconds (a
    // two-phase commit), so a short run holds few batches, and those that
    // name an actor twice may all meet a cut or a conflict.
    let (_, _, repeated_committed) = history.batch_counts();
    assert!(
        citus || repeated_committed > 0,
        "no batch that named an actor more than once committed"
    );
    for feed in &history.feeds {
        assert!(
            !feed.events.is_empty(),
            "subscriber {} received nothing",
            feed.name
        );
    }
    assert!(proxy.cuts() > 0, "no armed cut happened");
    assert_eq!(faults.restarts, u64::from(long), "the restart happened");
    let lost = store.lost_writes();
    let summary = format!(
        "{} processes, {} writes to the other table, {faults}, proxy cuts {}; process 0's cut \
         writes: {} applied, {} not applied, {} unknown",
        children + 1,
        other_writes.load(Ordering::Relaxed),
        proxy.cuts(),
        lost.applied,
        lost.not_applied,
        lost.unknown
    );
    (history, summary)
}

/// Runs `threads` writers of `process` until `until`; their history.
fn run_writers(
    store: &StateStore,
    cache: &StateCache<Value>,
    actors: &[String],
    process: u32,
    threads: u32,
    seed: u64,
    until: u64,
) -> History {
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..threads)
            .map(|thread| {
                s.spawn(move || {
                    let seed = seed_of(seed, process, thread);
                    let mut w = Workload::new(store, cache, actors, process, thread, seed);
                    w.run(until);
                    (w.ops, w.errors)
                })
            })
            .collect();
        let mut history = History::default();
        for writer in writers {
            let (ops, errors) = writer.join().expect("a writer panicked");
            history.merge(History {
                ops,
                errors,
                ..History::default()
            });
        }
        history
    })
}

/// Saves and deletes on the other table, same actor ids, as fast as it goes.
fn write_other_table(
    store: &StateStore,
    actors: &[String],
    seed: u64,
    until: u64,
    count: &AtomicU64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut value = 1u64 << 63;
    while now() < until {
        let id = &actors[rng.usize(..actors.len())];
        value += 1;
        let result = if rng.u8(..4) == 0 {
            store.delete(id).map(drop)
        } else {
            store.save(id, &(value, None::<u64>)).map(drop)
        };
        match result {
            Ok(()) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(rng.u64(1..10))),
        }
    }
}

/// The faults a run injected.
struct Faults {
    severs: u64,
    cuts: u64,
    restarts: u64,
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} severs, {} cuts armed, {} restarts",
            self.severs, self.cuts, self.restarts
        )
    }
}

impl Faults {
    /// Severs connections and arms cuts at random moments until `until`;
    /// in a long run, restarts the server once halfway.
    fn run(
        proxy: &TcpProxy,
        cluster: &TestCluster,
        seed: u64,
        until: u64,
        restart: bool,
    ) -> Faults {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut faults = Faults {
            severs: 0,
            cuts: 0,
            restarts: 0,
        };
        let start = now();
        let halfway = start + (until - start) / 2;
        while now() < until {
            std::thread::sleep(Duration::from_millis(rng.u64(20..250)));
            if restart && faults.restarts == 0 && now() >= halfway {
                let mode = if rng.bool() {
                    StopMode::Fast
                } else {
                    StopMode::Immediate
                };
                eprintln!("history: restarting the server ({mode:?})");
                cluster.stop(mode).expect("stop the server");
                cluster.restart().expect("start the server again");
                faults.restarts += 1;
                continue;
            }
            match rng.u8(..6) {
                0 => {
                    proxy.sever_all();
                    faults.severs += 1;
                    continue;
                }
                1 => proxy.cut_before(ProxyRequest::Statement),
                2 | 3 => proxy.cut_after(ProxyRequest::Statement),
                4 => proxy.cut_before(ProxyRequest::Commit),
                _ => proxy.cut_after(ProxyRequest::Commit),
            }
            faults.cuts += 1;
        }
        proxy.disarm();
        faults
    }
}

/// A child process running a share of the history.
struct Process {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// What it printed, for a failure message.
    output: Vec<String>,
    out: PathBuf,
}

impl Process {
    fn spawn(plan: Plan) -> Process {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, serde_json::to_string(&plan).unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a child process");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            stdin,
            lines,
            output: Vec::new(),
            out: plan.out,
        }
    }

    /// Waits until the process prints `marker`.
    fn wait_for(&mut self, marker: &str) {
        loop {
            match self.lines.recv_timeout(PATIENCE) {
                Ok(line) => {
                    let done = line.contains(marker);
                    self.output.push(line);
                    if done {
                        return;
                    }
                }
                Err(_) => panic!(
                    "a child process ended or hung before printing {marker:?}:\n{}",
                    self.output.join("\n")
                ),
            }
        }
    }

    fn tell(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to a child process");
        self.stdin.flush().unwrap();
    }

    /// Waits for the process to write its history, and reads it.
    fn finish(mut self) -> History {
        self.wait_for("history: written");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}", self.output.join("\n"));
        let text = std::fs::read_to_string(&self.out).expect("the child's history");
        serde_json::from_str(&text).expect("a child's history")
    }
}

/// The body of each child process; does nothing in a normal test run.
#[test]
fn child_history() {
    let Ok(plan) = std::env::var(CHILD) else {
        return;
    };
    let plan: Plan = serde_json::from_str(&plan).unwrap();
    let store = store_builder(&plan.url, TABLE, plan.group_commit)
        .build()
        .unwrap_or_else(|e| panic!("child cannot connect: {e}"));
    let listener = store.listener().unwrap();
    let cache: StateCache<Value> = StateCache::new(&store, &listener).unwrap();
    let name = format!("process {}", plan.process);
    let recorder = Recorder::start(name.clone(), listener.subscribe());
    let actors = workload::actors();
    println!("history: ready");
    std::io::stdout().flush().unwrap();
    let until: u64 = read_line()
        .strip_prefix("go ")
        .and_then(|n| n.trim().parse().ok())
        .expect("the parent's go");
    let mut history = run_writers(
        &store,
        &cache,
        &actors,
        plan.process,
        plan.threads,
        plan.seed,
        until,
    );
    println!("history: writes done");
    std::io::stdout().flush().unwrap();
    read_line();
    history.problems = feed::compare_cache(&name, &cache, &store, &actors);
    history.feeds.push(recorder.finish());
    std::fs::write(&plan.out, serde_json::to_vec(&history).unwrap()).unwrap();
    println!("history: written");
}

/// A line from the parent.
fn read_line() -> String {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    line
}
