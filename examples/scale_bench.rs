//! Point operations on a large table: fills a table with the bulk path
//! (`save_many`) to each actor count asked for, and at 10,000 actors and at
//! each count measures `load`, `save` and `save_if` (p50, p99, ops/s), the
//! table's and its indexes' sizes, the share of HOT updates, and how long
//! listing and counting the ids of a narrow prefix take; for a plain table
//! and for hash partitions.
//!
//! Run: `cargo run --release --example scale_bench -- --actors 1000000,10000000`
//!
//! Options:
//!
//! - `--actors N,M`: the counts to fill to and measure at, after the base
//!   count (default 100000)
//! - `--base N`: the small count everything is compared with (default 10000)
//! - `--partitions 0,4,16`: the layouts, 0 for a plain table (default 0,4,16)
//! - `--duration SECS`: measured seconds per operation (default 5)
//! - `--threads N`: threads measuring at once (default 1: latency alone)
//! - `--state-bytes N`: the size of each state (default 256)
//! - `--fillfactor N`: the table's (each partition's) fillfactor (default
//!   PostgreSQL's 100)
//! - `--without-seed-indexes`: drop the seed's indexes on `updated_at` and
//!   `sequence_number`, which every save changes, so that saves can be HOT
//!   updates (see the guide's "Large tables", `trebuchet_postgres::guide::large_tables`)
//! - `--async-commit`: measure with `synchronous_commit = off`, so that a
//!   write's latency is the server's work rather than the disk's flush
//! - `--server-setting KEY=VALUE`: a `postgresql.conf` setting for the
//!   throwaway cluster, such as `shared_buffers=4GB` (repeatable)
//! - `--convert-to N`: after measuring each layout, time
//!   `partition_table(N)` on the full table
//! - `--smoke`: 2,000 and 5,000 actors, 0.2 s per operation, layouts 0 and 4
//!
//! Server: `DATABASE_URL` when set (the benchmark works in a schema of its
//! own, `trebuchet_scale_bench`, and drops it afterwards), otherwise a
//! throwaway cluster with PostgreSQL's default settings, so every write is a
//! real, flushed commit. Mind the disk: 10 million actors of 256 bytes take
//! about 5 GB per layout while measured.
//!
//! Ids are spread over the key space (`actor-` and 16 hex digits of a
//! scrambled number), as generated ids are, rather than inserted in key
//! order. Each store runs with group commit off, so every call is one
//! statement and one commit. Before each measurement the table is vacuumed
//! and analyzed and a checkpoint is taken; each operation gets a half-second
//! warm-up.

use std::error::Error as StdError;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use trebuchet_postgres::testing::TestCluster;
use trebuchet_postgres::{ConnectOptions, Expected, PoolOptions, StateStore};

type BoxError = Box<dyn StdError + Send + Sync>;

const SCHEMA: &str = "trebuchet_scale_bench";
const FILL_BATCH: usize = 5_000;
const FILL_THREADS: usize = 2;

struct Options {
    base: u64,
    actors: Vec<u64>,
    partitions: Vec<u32>,
    duration: Duration,
    threads: usize,
    state_bytes: usize,
    async_commit: bool,
    fillfactor: Option<u32>,
    without_seed_indexes: bool,
    server_settings: Vec<(String, String)>,
    convert_to: Option<u32>,
}

impl Options {
    fn parse() -> Result<Options, BoxError> {
        let mut o = Options {
            base: 10_000,
            actors: vec![100_000],
            partitions: vec![0, 4, 16],
            duration: Duration::from_secs(5),
            threads: 1,
            state_bytes: 256,
            async_commit: false,
            fillfactor: None,
            without_seed_indexes: false,
            server_settings: vec![("max_connections".into(), "100".into())],
            convert_to: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            if flag == "--smoke" {
                o.base = 2_000;
                o.actors = vec![5_000];
                o.partitions = vec![0, 4];
                o.duration = Duration::from_millis(200);
                continue;
            }
            if flag == "--async-commit" {
                o.async_commit = true;
                continue;
            }
            if flag == "--without-seed-indexes" {
                o.without_seed_indexes = true;
                continue;
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let list = |v: &str| -> Result<Vec<u64>, BoxError> {
                v.split(',')
                    .map(|n| n.trim().replace('_', "").parse::<u64>().map_err(Into::into))
                    .collect()
            };
            match flag.as_str() {
                "--base" => o.base = value.replace('_', "").parse()?,
                "--actors" => o.actors = list(&value)?,
                "--partitions" => {
                    o.partitions = list(&value)?
                        .into_iter()
                        .map(u32::try_from)
                        .collect::<Result<_, _>>()?
                }
                "--duration" => o.duration = Duration::from_secs_f64(value.parse()?),
                "--threads" => o.threads = value.parse()?,
                "--state-bytes" => o.state_bytes = value.parse()?,
                "--fillfactor" => o.fillfactor = Some(value.parse()?),
                "--convert-to" => o.convert_to = Some(value.parse()?),
                "--server-setting" => {
                    let (key, value) = value
                        .split_once('=')
                        .ok_or("--server-setting takes KEY=VALUE")?;
                    o.server_settings.push((key.to_owned(), value.to_owned()));
                }
                other => {
                    return Err(format!(
                        "unknown option {other}; see the header of examples/scale_bench.rs"
                    )
                    .into())
                }
            }
        }
        o.actors.retain(|&n| n > o.base);
        o.actors.sort_unstable();
        if o.threads == 0 || o.partitions.is_empty() {
            return Err("--threads and --partitions need at least one".into());
        }
        Ok(o)
    }
}

/// The id of actor number `i`: spread over the key space, the same every run.
fn actor_id(i: u64) -> String {
    // splitmix64: a bijection, so ids never repeat.
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("actor-{:016x}", z ^ (z >> 31))
}

/// Fills actors `from..to` with `save_many`, on several threads.
fn fill(store: &StateStore, from: u64, to: u64, state: &[u8]) -> Result<f64, BoxError> {
    let started = Instant::now();
    let next = std::sync::atomic::AtomicU64::new(from);
    std::thread::scope(|scope| -> Result<(), BoxError> {
        let workers: Vec<_> = (0..FILL_THREADS)
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    loop {
                        let start =
                            next.fetch_add(FILL_BATCH as u64, std::sync::atomic::Ordering::Relaxed);
                        if start >= to {
                            return Ok(());
                        }
                        let end = (start + FILL_BATCH as u64).min(to);
                        let items: Vec<(String, &[u8])> =
                            (start..end).map(|i| (actor_id(i), state)).collect();
                        store.raw().save_many(&items).map_err(|e| e.to_string())?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| "a fill thread panicked")??;
        }
        Ok(())
    })?;
    Ok((to - from) as f64 / started.elapsed().as_secs_f64())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Load,
    Save,
    SaveIf,
}

impl Op {
    const ALL: [Op; 3] = [Op::Load, Op::Save, Op::SaveIf];

    fn name(self) -> &'static str {
        match self {
            Op::Load => "load",
            Op::Save => "save",
            Op::SaveIf => "save_if",
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Measured {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    conflicts: u64,
}

/// What one measuring thread saw: latencies in nanoseconds, conflicts, and
/// how long it measured.
type ThreadRun = (Vec<u64>, u64, Duration);

/// Runs `op` on random actors among the first `actors` for `duration` on
/// `threads` threads (after an unmeasured half second).
fn measure(
    store: &StateStore,
    op: Op,
    actors: u64,
    threads: usize,
    duration: Duration,
    state: &[u8],
) -> Result<Measured, BoxError> {
    let barrier = Barrier::new(threads);
    let runs: Vec<Result<ThreadRun, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut latencies = Vec::with_capacity(1 << 16);
                    let mut conflicts = 0;
                    barrier.wait();
                    let warm_until = Instant::now() + Duration::from_millis(500).min(duration);
                    let mut started = None;
                    loop {
                        let now = Instant::now();
                        let measuring = now >= warm_until;
                        if measuring && started.is_none() {
                            started = Some(now);
                        }
                        if started.is_some_and(|s| now - s >= duration) {
                            break;
                        }
                        let id = actor_id(fastrand::u64(0..actors));
                        let expected = match op {
                            Op::SaveIf => Some(
                                store
                                    .sequence(&id)
                                    .map_err(|e| e.to_string())?
                                    .map_or(Expected::Absent, Expected::Sequence),
                            ),
                            _ => None,
                        };
                        let t0 = Instant::now();
                        let result = match (op, expected) {
                            (Op::Load, _) => store.raw().load(&id).map(|_| 0),
                            (Op::Save, _) => store.raw().save(&id, state),
                            (_, expected) => store.raw().save_if(
                                &id,
                                state,
                                expected.unwrap_or(Expected::Absent),
                            ),
                        };
                        let took = t0.elapsed();
                        match result {
                            Ok(_) => {}
                            Err(e) if e.is_conflict() => conflicts += 1,
                            Err(e) => return Err(e.to_string()),
                        }
                        if measuring {
                            latencies.push(took.as_nanos() as u64);
                        }
                    }
                    Ok((
                        latencies,
                        conflicts,
                        started.map_or(Duration::ZERO, |s| s.elapsed()),
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    let mut all = Vec::new();
    let mut conflicts = 0;
    let mut secs: f64 = 0.0;
    for run in runs {
        let (latencies, c, elapsed) = run?;
        all.extend(latencies);
        conflicts += c;
        secs = secs.max(elapsed.as_secs_f64());
    }
    all.sort_unstable();
    let quantile = |p: f64| {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len());
        all[i - 1] as f64 / 1e6
    };
    Ok(Measured {
        ops_per_sec: all.len() as f64 / secs.max(1e-9),
        p50_ms: quantile(0.50),
        p99_ms: quantile(0.99),
        conflicts,
    })
}

/// The median time of `list_actors` (one page of up to 100) and of
/// `count_actors` for a prefix that about one id in 65,536 has: with fewer
/// ids than a page, the listing reads to where the prefix's ids end.
fn listing(store: &StateStore) -> Result<String, BoxError> {
    const ROUNDS: usize = 21;
    let prefix = "actor-0000";
    let median = |f: &dyn Fn() -> Result<usize, trebuchet_postgres::Error>| {
        let mut took = Vec::with_capacity(ROUNDS);
        let mut found = 0;
        for _ in 0..ROUNDS {
            let t0 = Instant::now();
            found = f()?;
            took.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        took.sort_by(f64::total_cmp);
        Ok::<_, trebuchet_postgres::Error>((took[ROUNDS / 2], found))
    };
    let (list_ms, listed) = median(&|| Ok(store.list_actors(prefix, None, 100)?.actors.len()))?;
    let (count_ms, counted) = median(&|| Ok(store.count_actors(prefix)? as usize))?;
    Ok(format!(
        "prefix `{prefix}`: list_actors (page of 100, {listed} found) {list_ms:.3} ms, \
         count_actors ({counted}) {count_ms:.3} ms (medians of {ROUNDS})"
    ))
}

/// Sizes in bytes over the table's leaves: heap (with TOAST and maps), all
/// indexes, and each index (partition indexes counted under their parent).
struct Sizes {
    heap: i64,
    indexes: i64,
    each: Vec<(String, i64)>,
}

const LEAVES: &str = "WITH leaves AS (SELECT relid FROM pg_partition_tree($1::TEXT::regclass) WHERE isleaf \
     UNION ALL SELECT $1::TEXT::regclass WHERE NOT EXISTS (SELECT 1 FROM pg_partition_tree($1::TEXT::regclass)))";

fn sizes(admin: &mut postgres::Client, table: &str) -> Result<Sizes, BoxError> {
    let row = admin.query_one(
        &format!(
            "{LEAVES} SELECT sum(pg_table_size(relid))::INT8, sum(pg_indexes_size(relid))::INT8 FROM leaves"
        ),
        &[&table],
    )?;
    let each = admin
        .query(
            &format!(
                "{LEAVES} SELECT COALESCE(pg_partition_root(i.indexrelid), i.indexrelid)::regclass::TEXT, \
                 sum(pg_relation_size(i.indexrelid))::INT8 FROM pg_index i \
                 WHERE i.indrelid IN (SELECT relid FROM leaves) GROUP BY 1 ORDER BY 1"
            ),
            &[&table],
        )?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get(1)))
        .collect();
    Ok(Sizes {
        heap: row.get(0),
        indexes: row.get(1),
        each,
    })
}

/// Updates and HOT updates so far, over the table's leaves.
fn updates(admin: &mut postgres::Client, table: &str) -> Result<(i64, i64), BoxError> {
    let row = admin.query_one(
        &format!(
            "{LEAVES} SELECT COALESCE(sum(n_tup_upd), 0)::INT8, COALESCE(sum(n_tup_hot_upd), 0)::INT8 \
             FROM pg_stat_user_tables WHERE relid IN (SELECT relid FROM leaves)"
        ),
        &[&table],
    )?;
    Ok((row.get(0), row.get(1)))
}

fn mb(bytes: i64) -> String {
    format!("{:.0} MB", bytes as f64 / (1024.0 * 1024.0))
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A plain connection for the catalog queries and maintenance commands.
fn admin_client(url: &str) -> Result<postgres::Client, BoxError> {
    let config: postgres::Config = url.parse()?;
    Ok(
        if config.get_ssl_mode() == postgres::config::SslMode::Disable {
            config.connect(postgres::NoTls)?
        } else {
            let tls = native_tls::TlsConnector::new()?;
            config.connect(postgres_native_tls::MakeTlsConnector::new(tls))?
        },
    )
}

fn show(admin: &mut postgres::Client, setting: &str) -> String {
    admin
        .query_one(&format!("SHOW {setting}"), &[])
        .map(|row| row.get::<_, String>(0))
        .unwrap_or_else(|e| format!("? ({e})"))
}

fn main() -> Result<(), BoxError> {
    let opts = Options::parse()?;
    let env_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty());
    let (_cluster, url) = match env_url {
        Some(url) => (None, url),
        None => {
            eprintln!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster");
            let settings: Vec<(&str, &str)> = opts
                .server_settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let cluster = TestCluster::start_with(&settings)?;
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    let connect: ConnectOptions = url.parse()?;
    let measure_connect: ConnectOptions = if opts.async_commit {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20synchronous_commit%3Doff").parse()?
    } else {
        connect.clone()
    };
    let mut admin = admin_client(&url)?;
    admin.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}"
    ))?;
    let state = vec![0xa5u8; opts.state_bytes];

    let version: String = admin.query_one("SELECT version()", &[])?.get(0);
    println!("# scale benchmark");
    println!();
    println!("- server: {version}");
    println!(
        "- fsync = {}, synchronous_commit = {}, shared_buffers = {}; client: {} cores",
        show(&mut admin, "fsync"),
        show(&mut admin, "synchronous_commit"),
        show(&mut admin, "shared_buffers"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "- {}-byte states; {} thread(s) measuring, {:.1} s per operation; group commit off{}{}{}",
        opts.state_bytes,
        opts.threads,
        opts.duration.as_secs_f64(),
        if opts.async_commit {
            "; measured with synchronous_commit = off"
        } else {
            ""
        },
        opts.fillfactor
            .map(|f| format!("; fillfactor {f}"))
            .unwrap_or_default(),
        if opts.without_seed_indexes {
            "; without the seed's updated_at and sequence_number indexes"
        } else {
            ""
        }
    );
    println!();

    let mut summary = Vec::new();
    for &partitions in &opts.partitions {
        let layout = if partitions == 0 {
            "plain".to_owned()
        } else {
            format!("{partitions} partitions")
        };
        let table_name = format!("{SCHEMA}.states_{partitions}");
        let mut builder = StateStore::builder()
            .connect_options(connect.clone())
            .pool_options(
                PoolOptions::default().max_size(opts.threads as u32 + FILL_THREADS as u32),
            )
            .table(table_name.clone())
            .channel(format!("scale_bench_{partitions}"))
            .group_commit(false)
            .migrate(true);
        if partitions > 0 {
            builder = builder.partitions(partitions);
        }
        let store = builder.build()?;
        let table = store.table();
        if let Some(fillfactor) = opts.fillfactor {
            // On each partition: a partitioned table takes no storage parameters.
            admin.batch_execute(&format!(
                "DO $$ DECLARE r regclass; BEGIN \
                 FOR r IN SELECT relid FROM pg_partition_tree('{table}') WHERE isleaf \
                 UNION ALL SELECT '{table}'::regclass WHERE {partitions} = 0 LOOP \
                 EXECUTE format('ALTER TABLE %s SET (fillfactor = {fillfactor})', r); END LOOP; END $$"
            ))?;
        }
        if opts.without_seed_indexes {
            admin.batch_execute(&format!(
                "DROP INDEX {SCHEMA}.idx_states_{partitions}_updated; \
                 DROP INDEX {SCHEMA}.idx_states_{partitions}_sequence"
            ))?;
        }
        println!("## {layout}");
        println!();
        println!(
            "| actors | op | ops/s | p50 ms | p99 ms | p50 vs {} | p99 vs {} |",
            thousands(opts.base),
            thousands(opts.base)
        );
        println!("|---:|---|---:|---:|---:|---:|---:|");
        let mut filled = 0;
        let mut base: Vec<Measured> = Vec::new();
        let mut notes = Vec::new();
        for &count in std::iter::once(&opts.base).chain(&opts.actors) {
            let rate = fill(&store, filled, count, &state)?;
            filled = count;
            admin.batch_execute(&format!("VACUUM (ANALYZE) {table}"))?;
            let _ = admin.batch_execute("CHECKPOINT");
            // A fresh pool per point: its backends report their statistics
            // when they exit.
            let measuring = StateStore::builder()
                .connect_options(measure_connect.clone())
                .pool_options(
                    PoolOptions::default()
                        .max_size(opts.threads as u32 + 1)
                        .min_idle(None),
                )
                .table(table_name.clone())
                .channel(format!("scale_bench_{partitions}"))
                .group_commit(false)
                .build()?;
            let (upd_before, hot_before) = updates(&mut admin, &table)?;
            let mut row = Vec::new();
            for op in Op::ALL {
                let m = measure(&measuring, op, count, opts.threads, opts.duration, &state)?;
                let (p50, p99) = match base.get(row.len()) {
                    Some(b) => (
                        format!("{:.2}x", m.p50_ms / b.p50_ms),
                        format!("{:.2}x", m.p99_ms / b.p99_ms),
                    ),
                    None => ("1.00x".into(), "1.00x".into()),
                };
                println!(
                    "| {} | {} | {:.0} | {:.3} | {:.3} | {p50} | {p99} |",
                    thousands(count),
                    op.name(),
                    m.ops_per_sec,
                    m.p50_ms,
                    m.p99_ms
                );
                if m.conflicts > 0 {
                    notes.push(format!(
                        "{} {}: {} conflicts (threads picked the same actor)",
                        thousands(count),
                        op.name(),
                        m.conflicts
                    ));
                }
                row.push(m);
            }
            let listed = listing(&measuring)?;
            drop(measuring);
            std::thread::sleep(Duration::from_millis(300));
            let (upd_after, hot_after) = updates(&mut admin, &table)?;
            let hot = if upd_after > upd_before {
                format!(
                    "{:.0}%",
                    100.0 * (hot_after - hot_before) as f64 / (upd_after - upd_before) as f64
                )
            } else {
                "n/a".into()
            };
            let s = sizes(&mut admin, &table)?;
            let each: Vec<String> = s
                .each
                .iter()
                .map(|(name, bytes)| {
                    format!(
                        "{} {}",
                        name.rsplit('.').next().unwrap_or(name).trim_matches('"'),
                        mb(*bytes)
                    )
                })
                .collect();
            notes.push(format!(
                "{} actors: filled at {} actors/s; table {} + indexes {} ({}); HOT updates while measuring: {hot}",
                thousands(count),
                thousands(rate as u64),
                mb(s.heap),
                mb(s.indexes),
                each.join(", ")
            ));
            notes.push(format!("{} actors: {listed}", thousands(count)));
            if base.is_empty() {
                base = row.clone();
            }
            summary.push((layout.clone(), count, row, s.heap + s.indexes));
        }
        if let Some(to) = opts.convert_to {
            let started = Instant::now();
            let done = store.partition_table(to)?;
            notes.push(format!(
                "partition_table({to}) on {} actors: {} rows copied in {:.1} s (with the ANALYZE after it)",
                thousands(filled),
                thousands(done.rows),
                started.elapsed().as_secs_f64()
            ));
        }
        println!();
        for note in notes {
            println!("- {note}");
        }
        println!();
        drop(store);
        admin.batch_execute(&format!(
            "DROP TABLE {table}; DROP TABLE IF EXISTS {SCHEMA}.states_{partitions}_tombstones"
        ))?;
    }

    println!("## Summary (p50 / p99 ms)");
    println!();
    println!("| layout | actors | load | save | save_if | size |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (layout, count, row, bytes) in &summary {
        let cell = |m: &Measured| format!("{:.3} / {:.3}", m.p50_ms, m.p99_ms);
        println!(
            "| {layout} | {} | {} | {} | {} | {} |",
            thousands(*count),
            cell(&row[0]),
            cell(&row[1]),
            cell(&row[2]),
            mb(*bytes)
        );
    }
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))?;
    Ok(())
}
