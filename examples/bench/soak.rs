//! The soak mode (`--soak SECS`): mixed loads, saves, transforms and
//! deletes from 16 threads for a given time, with a listener and a
//! `StateCache` attached, printing throughput, p99 latency, the process's
//! RSS and the open connections at each interval; at the end, the errors
//! and whether the cache equals the table. Flat lines and zero errors are
//! the pass.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trebuchet_postgres::{ConnectOptions, PoolOptions, StateCache, StateStore};

/// Writers and readers.
const THREADS: usize = 16;
/// Actors they share.
const ACTORS: u64 = 1_000;
const TABLE: &str = "soak_states";

/// Latency buckets: eight per power of two of µs, up to 2^24 µs (16 s).
const BUCKETS: usize = 8 * 25;

/// One thread's calls since the last report, by latency bucket: a fixed
/// size, so that the soak's own memory stays flat.
type Samples = Arc<Mutex<Vec<u64>>>;

fn bucket(micros: u64) -> usize {
    let micros = micros.max(1) as f64;
    ((micros.log2() * 8.0) as usize).min(BUCKETS - 1)
}

/// The upper bound of `bucket`, in µs.
fn bucket_top(bucket: usize) -> u64 {
    2f64.powf((bucket + 1) as f64 / 8.0).ceil() as u64
}

pub fn run(
    connect: &ConnectOptions,
    duration: Duration,
    every: Duration,
) -> Result<(), super::BoxError> {
    let store = StateStore::builder()
        .connect_options(connect.clone())
        .table(TABLE)
        .channel("soak_changes")
        .pool_options(PoolOptions::default().max_size(THREADS as u32))
        .migrate(true)
        .build()?;
    let mut admin = connect.connect()?;
    admin.batch_execute(&format!("TRUNCATE {TABLE}, {TABLE}_tombstones"))?;
    let listener = store.listener()?;
    let cache: StateCache<u64> = StateCache::new(&store, &listener)?;

    println!(
        "# soak: {THREADS} threads, {ACTORS} actors, {} s, a report every {} s",
        duration.as_secs(),
        every.as_secs()
    );
    println!();
    println!("| at s | ops/s | p99 µs (at most) | RSS kB | pool connections | server connections | cached actors |");
    println!("| ---: | ----: | ---------------: | -----: | ---------------: | -----------------: | ------------: |");

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let samples: Vec<Samples> = (0..THREADS)
        .map(|_| Arc::new(Mutex::new(vec![0; BUCKETS])))
        .collect();
    let workers: Vec<_> = samples
        .iter()
        .enumerate()
        .map(|(t, mine)| {
            let (store, cache, stop, errors, mine) = (
                store.clone(),
                cache.clone(),
                Arc::clone(&stop),
                Arc::clone(&errors),
                Arc::clone(mine),
            );
            std::thread::spawn(move || work(&store, &cache, t as u64, &stop, &errors, &mine))
        })
        .collect();

    let start = Instant::now();
    let mut next = every;
    while next <= duration {
        // Sleeps: the soak runs for a time by definition.
        std::thread::sleep(next.saturating_sub(start.elapsed()));
        let mut counts = vec![0u64; BUCKETS];
        for s in &samples {
            for (total, n) in counts
                .iter_mut()
                .zip(s.lock().expect("not poisoned").iter_mut())
            {
                *total += std::mem::take(n);
            }
        }
        let calls: u64 = counts.iter().sum();
        let mut seen = 0;
        let p99 = counts
            .iter()
            .position(|n| {
                seen += n;
                seen * 100 >= calls * 99
            })
            .map_or(0, bucket_top);
        let server: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                &[],
            )?
            .get(0);
        println!(
            "| {} | {} | {p99} | {} | {} | {server} | {} |",
            next.as_secs(),
            super::thousands(calls as f64 / every.as_secs_f64()),
            super::kb("VmRSS"),
            store.pool().state().connections,
            cache.len(),
        );
        next += every;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().map_err(|_| "a soak thread panicked")?;
    }

    // The listener may still be delivering the last changes: wait until the
    // cache agrees with the table (or say where it does not).
    let deadline = Instant::now() + Duration::from_secs(60);
    let differ = loop {
        let differ: Vec<String> = (0..ACTORS)
            .map(|n| n.to_string())
            .filter(|id| {
                cache.get(id).ok().map(|v| v.as_deref().copied()) != store.load::<u64>(id).ok()
            })
            .collect();
        if differ.is_empty() || Instant::now() >= deadline {
            break differ;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!();
    println!("- errors: {}", errors.load(Ordering::SeqCst));
    println!(
        "- the cache equals the table: {}",
        if differ.is_empty() {
            "yes".to_owned()
        } else {
            format!(
                "no, {} actors differ (first {:?})",
                differ.len(),
                &differ[0]
            )
        }
    );
    Ok(())
}

/// One thread's loop: of every 20 calls, 5 reads through the cache, 5
/// loads, 5 saves, 3 transforms and 2 deletes, on actors picked by a small
/// generator of its own.
fn work(
    store: &StateStore,
    cache: &StateCache<u64>,
    t: u64,
    stop: &AtomicBool,
    errors: &AtomicU64,
    mine: &Mutex<Vec<u64>>,
) {
    let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = (x % ACTORS).to_string();
        let began = Instant::now();
        let failed = match n % 20 {
            0..=4 => cache.get(&id).err(),
            5..=9 => store.load::<u64>(&id).err(),
            10..=14 => store.save(&id, &n).err(),
            15..=17 => store
                .transform(&id, |v: Option<u64>| v.unwrap_or(0) + 1)
                .err(),
            _ => store.delete(&id).err(),
        };
        let micros = began.elapsed().as_micros() as u64;
        if let Some(e) = failed {
            if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("soak: {e}");
            }
        }
        mine.lock().expect("not poisoned")[bucket(micros)] += 1;
        n += 1;
    }
}
