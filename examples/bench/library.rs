//! The library's side of each run: threads calling the store, timed.

use super::*;

// ----- the library side ----------------------------------------------------

#[derive(Debug, Clone, Default)]
pub(crate) struct LibRun {
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    /// This process's CPU time (user + system) during the run, seconds.
    pub(crate) cpu_secs: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
    pub(crate) avg_us: f64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    /// transform: attempts that lost a race (the closure ran again).
    pub(crate) retries: u64,
    /// delete: calls that found nothing to delete.
    pub(crate) misses: u64,
    pub(crate) exhausted: bool,
}

impl LibRun {
    pub(crate) fn ops_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// The `p` quantile of sorted nanoseconds, in microseconds.
pub(crate) fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1] as f64 / 1_000.0
}

#[derive(Default)]
pub(crate) struct ThreadRun {
    pub(crate) ops: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latencies: Vec<u64>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) retries: u64,
    pub(crate) misses: u64,
    pub(crate) exhausted: bool,
}

impl ThreadRun {
    /// Counts one call that took `took`.
    pub(crate) fn record(&mut self, took: Duration, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.ops += 1;
                self.latencies.push(took.as_nanos() as u64);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// The ids of thread `t` of `threads`: 1 + t, 1 + t + threads, ...
pub(crate) fn own_ids(t: usize, threads: usize) -> Vec<String> {
    let per = ACTORS / threads as u64;
    (0..per)
        .map(|k| (1 + t as u64 + threads as u64 * k).to_string())
        .collect()
}

pub(crate) fn next_state(current: Option<&[u8]>, state: &[u8]) -> Vec<u8> {
    let mut next = current.unwrap_or(state).to_vec();
    if let Some(b) = next.first_mut() {
        *b = b.wrapping_add(1);
    }
    next
}

/// CPU seconds (user + system) of this process, and of its children that
/// have been waited for, from /proc/self/stat (clock ticks of 10 ms).
pub(crate) fn cpu_times() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name: state is field 3, utime 14 ... cstime 17.
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let tick = |i: usize| fields.get(i - 3).copied().unwrap_or(0.0) / 100.0;
    (tick(14) + tick(15), tick(16) + tick(17))
}

pub(crate) fn run_library(
    store: &StateStore,
    op: Op,
    threads: usize,
    duration: Duration,
    state: &[u8],
    delete_block: Option<(u64, u64)>,
) -> LibRun {
    let barrier = Barrier::new(threads);
    // The process's CPU time once every thread is set up.
    let cpu_at_start = Mutex::new(0.0);
    let runs: Vec<ThreadRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = store.clone();
                let start = (&barrier, &cpu_at_start);
                scope.spawn(move || {
                    thread_run(&store, op, t, threads, duration, state, delete_block, start)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread panicked"))
            .collect()
    });
    let cpu_secs = cpu_times().0 - *cpu_at_start.lock().expect("not poisoned");
    summarize(runs, cpu_secs)
}

/// One connection of a bare client, ready to run `load`'s statement with
/// an actor id.
pub(crate) type BareLoad = Box<dyn FnMut(&str) -> Result<(), String>>;

/// A connection of `op`'s bare client (`load_driver`, `load_wire`) with
/// `load`'s statement prepared.
pub(crate) fn open_bare(op: Op, url: &str, sql: &str) -> Result<BareLoad, BoxError> {
    if op == Op::LoadWire {
        let mut conn = wire::Connection::open(url, sql)?;
        return Ok(Box::new(move |id| {
            conn.load(id).map(drop).map_err(|e| e.to_string())
        }));
    }
    let mut client = admin_client(url)?;
    let statement = client.prepare(sql)?;
    Ok(Box::new(move |id| {
        client
            .query_opt(&statement, &[&id])
            .map(drop)
            .map_err(|e| e.to_string())
    }))
}

/// `load`'s statement, prepared once per thread on a bare connection per
/// thread (`op`: the `postgres` driver or the minimal wire client), run like
/// the library's `load` case.
pub(crate) fn run_bare(op: Op, url: &str, sql: &str, threads: usize, duration: Duration) -> LibRun {
    let barrier = Barrier::new(threads);
    let cpu_at_start = Mutex::new(0.0);
    let runs: Vec<ThreadRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, cpu_at_start) = (&barrier, &cpu_at_start);
                scope.spawn(move || {
                    let opened = open_bare(op, url, sql);
                    // Every thread reaches the barrier, connected or not.
                    let leader = barrier.wait().is_leader();
                    if leader {
                        *cpu_at_start.lock().expect("not poisoned") = cpu_times().0;
                    }
                    // A server this client cannot talk to is a note in the
                    // row, not the end of the benchmark.
                    let mut load = match opened {
                        Ok(load) => load,
                        Err(e) => {
                            return ThreadRun {
                                errors: 1,
                                first_error: Some(format!("cannot connect: {e}")),
                                ..ThreadRun::default()
                            }
                        }
                    };
                    let mut rng = fastrand::Rng::with_seed(0x5eed_0000 + t as u64);
                    let ids: Vec<String> = (1..=ACTORS).map(|i| i.to_string()).collect();
                    let mut r = ThreadRun {
                        latencies: Vec::with_capacity(1 << 16),
                        ..ThreadRun::default()
                    };
                    let start = Instant::now();
                    let end = start + duration;
                    let mut last = start;
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let result = load(&ids[rng.usize(..ids.len())]);
                        last = Instant::now();
                        r.record(last - t0, result);
                    }
                    r.elapsed = last - start;
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread panicked"))
            .collect()
    });
    let cpu_secs = cpu_times().0 - *cpu_at_start.lock().expect("not poisoned");
    summarize(runs, cpu_secs)
}

/// One round's figures from its threads' runs.
pub(crate) fn summarize(runs: Vec<ThreadRun>, cpu_secs: f64) -> LibRun {
    let mut run = LibRun {
        cpu_secs,
        ..LibRun::default()
    };
    let mut latencies: Vec<u64> = Vec::new();
    for r in runs {
        run.ops += r.ops;
        run.secs = run.secs.max(r.elapsed.as_secs_f64());
        latencies.extend(r.latencies);
        run.errors += r.errors;
        run.retries += r.retries;
        run.misses += r.misses;
        run.exhausted |= r.exhausted;
        if run.first_error.is_none() {
            run.first_error = r.first_error;
        }
    }
    latencies.sort_unstable();
    run.p50_us = percentile_us(&latencies, 0.50);
    run.p99_us = percentile_us(&latencies, 0.99);
    run.max_us = percentile_us(&latencies, 1.0);
    if !latencies.is_empty() {
        run.avg_us = latencies.iter().sum::<u64>() as f64 / latencies.len() as f64 / 1_000.0;
    }
    run
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn thread_run(
    store: &StateStore,
    op: Op,
    t: usize,
    threads: usize,
    duration: Duration,
    state: &[u8],
    delete_block: Option<(u64, u64)>,
    (barrier, cpu_at_start): (&Barrier, &Mutex<f64>),
) -> ThreadRun {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0000 + t as u64);
    let mut r = ThreadRun {
        latencies: Vec::with_capacity(1 << 16),
        ..ThreadRun::default()
    };
    let random_ids: Vec<String> = (1..=ACTORS).map(|i| i.to_string()).collect();
    let own = own_ids(t, threads);
    // save_if: the current sequence of each own id, read once, untimed.
    let mut sequences: HashMap<String, u64> = HashMap::new();
    if op == Op::SaveIf {
        match store.raw().load_many_versioned(&own) {
            Ok(found) => {
                sequences = own
                    .iter()
                    .zip(found)
                    .filter_map(|(id, v)| Some((id.clone(), v?.sequence)))
                    .collect();
            }
            Err(e) => r.first_error = Some(format!("reading sequences: {e}")),
        }
    }
    let mut next_delete = 0u64;
    if barrier.wait().is_leader() {
        *cpu_at_start.lock().expect("not poisoned") = cpu_times().0;
    }
    let start = Instant::now();
    let end = start + duration;
    let mut last = start;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let result: Result<(), String> = match op {
            Op::Load | Op::LoadDriver | Op::LoadWire => store
                .raw()
                .load(&random_ids[rng.usize(..random_ids.len())])
                .map(drop)
                .map_err(|e| e.to_string()),
            Op::Save | Op::SaveGrouped => store
                .raw()
                .save(&random_ids[rng.usize(..random_ids.len())], state)
                .map(drop)
                .map_err(|e| e.to_string()),
            Op::SaveIf => {
                let id = &own[rng.usize(..own.len())];
                let expected = sequences.get(id).copied().unwrap_or(0);
                match store.raw().save_if(id, state, Expected::Sequence(expected)) {
                    Ok(seq) => {
                        sequences.insert(id.clone(), seq);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Op::Transform | Op::TransformContended => {
                let id = if op == Op::Transform {
                    own[rng.usize(..own.len())].as_str()
                } else {
                    CONTENDED_ID
                };
                let mut calls = 0u64;
                let result = store.raw().transform(id, |current| {
                    calls += 1;
                    next_state(current, state)
                });
                r.retries += calls.saturating_sub(1);
                result.map(drop).map_err(|e| e.to_string())
            }
            Op::Delete => {
                let (base, per) = delete_block.expect("a delete run has a block of ids");
                if next_delete >= per {
                    r.exhausted = true;
                    break;
                }
                let id = (base + t as u64 * per + next_delete).to_string();
                next_delete += 1;
                match store.delete(&id) {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        r.misses += 1;
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        last = Instant::now();
        r.record(last - t0, result);
    }
    r.elapsed = last - start;
    r
}
