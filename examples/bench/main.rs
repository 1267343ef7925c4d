//! The library against `pgbench -M prepared` running the identical statements
//! on the same server in the same run, alternating library and pgbench (two
//! rounds each) so that drift of the machine hits both sides alike.
//!
//! Run: `cargo run --release --example bench` (`-- --smoke` for a short check)
//!
//! Options, as arguments or environment variables:
//!
//! - `--duration SECS` / `BENCH_DURATION`: seconds per run (default 3;
//!   pgbench takes whole seconds, so its runs last `ceil(SECS)`, at least 1)
//! - `--threads 1,8,16` / `BENCH_THREADS`: library threads = pgbench clients
//! - `--ops LIST` / `BENCH_OPS`: any of `load,load_driver,load_wire,save,
//!   save_grouped,save_if,transform,transform_contended,delete` (default
//!   all). `load_driver` runs `load`'s statement through a bare `postgres`
//!   connection per thread, no pool and no library, to tell the library's
//!   own cost from the driver's; `load_wire` through a minimal client of
//!   the wire protocol (TCP, no TLS, a server that trusts it), to tell the
//!   driver's cost from the least any client needs.
//! - `--rounds N` / `BENCH_ROUNDS`: runs of each side per case (default 2)
//! - `--smoke` / `BENCH_SMOKE=1`: 0.2 s per library run, 1 thread
//! - `BENCH_DELETE_RATE`: deletes/s to provision ids for (default 15,000;
//!   a run that would delete more is flagged `EXHAUSTED`)
//! - `--soak SECS` / `BENCH_SOAK`: instead of the comparison, a soak:
//!   mixed loads, reads through a `StateCache`, saves, transforms and
//!   deletes from 16 threads with a listener attached, reporting ops/s, p99,
//!   RSS and open connections every `--every SECS` (`BENCH_SOAK_EVERY`,
//!   default 60), then the errors and whether the cache equals the table
//!   (`examples/bench/soak.rs`)
//! - `BENCH_CITUS=1`: against a throwaway Citus cluster (a coordinator and
//!   two workers on loopback, `testing::TestCitusCluster`; needs the
//!   extension installed), pgbench on the coordinator running the
//!   statements the store sends there (the Citus forms, a router query
//!   each, taken from `testing::point_statements`). Only the single-actor operations: `load`, `save`, `save_if`,
//!   `transform`, `transform_contended`.
//! - `BENCH_POOLER=transaction`: declare `PoolerMode::Transaction`, so the
//!   library sends every statement unnamed as it does through PgBouncer in
//!   transaction mode (here straight to the server: the cost of unnamed
//!   statements alone)
//!
//! Server: `DATABASE_URL` when set (the benchmark truncates and refills its
//! own table `bench_states` there), otherwise a throwaway cluster with
//! `max_connections=200` and `fsync`/`synchronous_commit` at their defaults,
//! so every write is a real, flushed commit. pgbench comes from
//! `pg_config --bindir`, `/usr/lib/postgresql/*/bin` or `PATH`; without it
//! only the library is measured.
//!
//! A run of every operation ends with the bulk rates: `save_many` and
//! `load_many` of 1,000 actors per call at 1 and 2 threads, `save_many`
//! beside pgbench's plain 1,000-row upsert into the same table.
//!
//! Both sides start with their connections open: the store's pool keeps
//! `max_size` connections (`min_idle(None)`), pgbench excludes its connection
//! time. Neither side gets a warm-up; each prepares its statements on first
//! use inside the measured window. A `CHECKPOINT` precedes every run.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use trebuchet_postgres::testing::{point_statements, TestCitusCluster, TestCluster};
use trebuchet_postgres::{
    quote_identifier, ChangeListener, ConnectOptions, Expected, PoolOptions, PoolerMode,
    StateStore, Subscription,
};

type BoxError = Box<dyn StdError + Send + Sync>;

mod soak;

const TABLE: &str = "bench_states";
const CHANNEL: &str = "bench_changes";
/// Actors "1".."10000", prefilled with `save_bytes`.
const ACTORS: u64 = 10_000;
const STATE_BYTES: usize = 256;
/// The actor every thread transforms in `transform_contended`.
const CONTENDED_ID: &str = "1";
/// Ids deleted by `delete` are numbers from here on, all with seven digits
/// so that text order is number order: distinct from "1".."10000" and
/// passable to pgbench as `:id` like the others.
const DELETE_BASE: u64 = 1_000_000;
const DELETE_LIMIT: u64 = 9_999_999;

mod library;
mod options;
mod pgbench;
mod report;
mod run;
mod sql;

use library::*;
use options::*;
use pgbench::*;
use report::*;
use run::*;
use sql::*;

// ----- main ------------------------------------------------------------------

/// pgbench's side of `save_many`: a plain 1,000-row upsert into the same
/// table, each client its own rows.
fn upsert_script(state: &[u8]) -> String {
    let hex: String = state.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "INSERT INTO {TABLE} AS t (actor_id, state, sequence_number, updated_at, created_at) \
         SELECT 'bulk-pg-' || :client_id || '-' || i, decode('{hex}', 'hex'), 1, \
         now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC' FROM generate_series(0, 999) i \
         ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
         sequence_number = t.sequence_number + 1, updated_at = EXCLUDED.updated_at;\n"
    )
}

/// One bulk case: the library's states per second, and pgbench's beside it
/// where it has one.
struct BulkRate {
    what: &'static str,
    threads: usize,
    library: f64,
    pgbench: Option<f64>,
}

/// States per second through `save_many` and `load_many`, 1,000 actors per
/// call, at 1 and 2 threads; `save_many` beside pgbench's plain 1,000-row
/// upsert with as many clients.
fn bulk_rates(
    store: &StateStore,
    state: &[u8],
    duration: Duration,
    pgbench: Option<&Pgbench>,
) -> Vec<BulkRate> {
    const PER_CALL: usize = 1_000;
    let mut rates = Vec::new();
    for (what, write) in [("save_many", true), ("load_many", false)] {
        for threads in [1usize, 2] {
            let start = Instant::now();
            let done: usize = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        scope.spawn(move || {
                            let ids: Vec<String> =
                                (0..PER_CALL).map(|i| format!("bulk-{t}-{i}")).collect();
                            let items: Vec<(&str, &[u8])> =
                                ids.iter().map(|id| (id.as_str(), state)).collect();
                            let mut n = 0;
                            // load_many reads what the save_many runs wrote.
                            let begin = Instant::now();
                            while begin.elapsed() < duration {
                                if write {
                                    store.raw().save_many(&items).expect("save_many");
                                } else {
                                    let got = store.raw().load_many(&ids).expect("load_many");
                                    assert!(got.iter().all(Option::is_some));
                                }
                                n += PER_CALL;
                            }
                            n
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("bulk thread"))
                    .sum()
            });
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "{what:<19} T={threads:<2} {:>10.0} states/s",
                done as f64 / secs
            );
            let beside = match pgbench.filter(|_| write) {
                Some(pgbench) => {
                    let seconds = (duration.as_secs_f64().ceil() as u64).max(1);
                    match pgbench.run("upsert_1000", &upsert_script(state), threads, seconds, &[]) {
                        Ok(run) => Some(run.tps * PER_CALL as f64),
                        Err(e) => {
                            eprintln!("{what} T={threads} pgbench: {e}");
                            None
                        }
                    }
                }
                None => None,
            };
            rates.push(BulkRate {
                what,
                threads,
                library: done as f64 / secs,
                pgbench: beside,
            });
        }
    }
    rates
}

fn main() -> Result<(), BoxError> {
    let mut opts = Options::parse()?;
    let app_name = format!("trebuchet-bench-{}", std::process::id());

    // The server: DATABASE_URL, or a cluster of our own with real commits.
    let env_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty());
    let citus_mode = std::env::var("BENCH_CITUS").is_ok_and(|v| !v.is_empty() && v != "0");
    if citus_mode {
        // Single-actor operations only; the grouped saves, the bulk rates
        // and the delete's provisioning write many shards at once.
        opts.ops.retain(|op| {
            matches!(
                op,
                Op::Load | Op::Save | Op::SaveIf | Op::Transform | Op::TransformContended
            )
        });
    }
    let mut _citus = None;
    let (_cluster, url, connect, conn_args) = match env_url {
        None if citus_mode => {
            eprintln!(
                "BENCH_CITUS=1: starting a throwaway Citus cluster (a coordinator, 2 workers)"
            );
            let citus = TestCitusCluster::start(2)?;
            let coordinator = citus.coordinator();
            let args = ["-h", "127.0.0.1", "-p", &coordinator.port().to_string()]
                .into_iter()
                .chain(["-U", "postgres", "postgres"])
                .map(str::to_owned)
                .collect();
            let (url, connect) = (coordinator.url(), coordinator.connect_options());
            _citus = Some(citus);
            (None, url, connect, args)
        }
        Some(url) => {
            let connect: ConnectOptions = url.parse()?;
            let args = vec![url.clone()];
            (None, url, connect, args)
        }
        None => {
            eprintln!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster");
            let cluster = TestCluster::start_with(&[
                ("max_connections", "200"),
                ("track_activity_query_size", "16384"),
            ])?;
            let args = ["-h", "127.0.0.1", "-p", &cluster.port().to_string()]
                .into_iter()
                .chain(["-U", "postgres", "postgres"])
                .map(str::to_owned)
                .collect();
            let (url, connect) = (cluster.url(), cluster.connect_options());
            (Some(cluster), url, connect, args)
        }
    };
    let mut admin = admin_client(&url)?;
    if let Some(soak) = opts.soak {
        return soak::run(&connect, soak, opts.every);
    }

    let work_dir = std::env::temp_dir().join(format!("trebuchet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let pgbench = find_pgbench().map(|path| Pgbench {
        path,
        conn_args,
        dir: work_dir.clone(),
    });
    let pool_size = *opts
        .threads
        .iter()
        .max()
        .expect("at least one thread count") as u32;

    println!("# trebuchet-postgres vs pgbench -M prepared");
    println!();
    let version: String = admin.query_one("SELECT version()", &[])?.get(0);
    println!("- server: {version}");
    println!(
        "- fsync = {}, synchronous_commit = {}, wal_sync_method = {}, shared_buffers = {}, max_connections = {}",
        show(&mut admin, "fsync"),
        show(&mut admin, "synchronous_commit"),
        show(&mut admin, "wal_sync_method"),
        show(&mut admin, "shared_buffers"),
        show(&mut admin, "max_connections"),
    );
    let pgbench_line = match &pgbench {
        Some(p) => {
            let version = Command::new(&p.path)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            format!("{} ({version})", p.path.display())
        }
        None => "NOT FOUND (looked at pg_config --bindir, /usr/lib/postgresql/*/bin, PATH): \
                 only the library is measured"
            .to_owned(),
    };
    println!(
        "- client: {} cores; pgbench: {pgbench_line}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "- {} s per library run, {} s per pgbench run (-T takes whole seconds), {} round(s) of each, alternating; threads {:?}{}",
        opts.duration.as_secs_f64(),
        opts.pgbench_seconds(),
        opts.rounds,
        opts.threads,
        if opts.smoke { " (smoke)" } else { "" }
    );
    println!(
        "- table \"{TABLE}\": {ACTORS} actors \"1\"..\"{ACTORS}\", {STATE_BYTES}-byte states; library pool max_size {pool_size}, all connections open"
    );
    println!();

    let mut mem_connect = connect.clone();
    mem_connect.application_name(&format!("{app_name}-mem"));
    let memory = measure_memory(&mem_connect)?;
    let hwm_before_runs = kb("VmHWM");

    let mut connect = connect;
    connect.application_name(&app_name);
    match std::env::var("BENCH_POOLER").as_deref() {
        Ok("transaction") => {
            connect.pooler(PoolerMode::Transaction);
            println!("- BENCH_POOLER=transaction: the library sends every statement unnamed");
            println!();
        }
        Ok("") | Ok("none") | Err(_) => {}
        Ok(other) => return Err(format!("BENCH_POOLER {other:?}: use transaction").into()),
    }
    let setup_start = Instant::now();
    let store = StateStore::builder()
        .connect_options(connect)
        .pool_options(
            PoolOptions::default()
                .max_size(pool_size)
                .min_idle(None)
                .connection_timeout(Duration::from_secs(60)),
        )
        .table(TABLE)
        .channel(CHANNEL)
        // One statement per call, like pgbench: the single-operation cases
        // measure the direct path; `save_grouped` measures the default.
        .group_commit(false)
        .migrate(true)
        .build()?;
    let state: Vec<u8> = (0..STATE_BYTES).map(|i| (i * 7 + 3) as u8).collect();
    let bytea_literal = format!(
        "'\\x{}'::bytea",
        state.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let table_sql = store.table();
    let grouped = StateStore::builder()
        .pool(store.pool().clone())
        .table(TABLE)
        .channel(CHANNEL)
        .group_commit(true)
        .build()?;
    let mut bench = Bench {
        url: url.clone(),
        sql: if citus_mode {
            LibrarySql::citus(&table_sql, &store)
        } else {
            LibrarySql::new(
                &table_sql,
                &quote_identifier(&format!("{TABLE}_tombstones")),
            )
        },
        table_sql,
        opts,
        admin,
        store,
        grouped,
        app_name,
        pgbench,
        state,
        bytea_literal,
        next_delete_id: DELETE_BASE,
        verified: Vec::new(),
        sql_mismatch: Vec::new(),
    };
    bench.prefill()?;
    if !wait_for_connections(&bench.store, pool_size) {
        eprintln!("warning: the pool did not open all {pool_size} connections");
    }
    eprintln!(
        "setup: {ACTORS} actors saved in {:.1} s",
        setup_start.elapsed().as_secs_f64()
    );

    let rows = bench.run_all()?;
    let bulk = if bench.opts.ops.len() == Op::ALL.len() {
        bulk_rates(
            &bench.store,
            &bench.state,
            bench.opts.duration,
            bench.pgbench.as_ref(),
        )
    } else {
        Vec::new()
    };

    let pool_state = bench.store.pool().state();
    let server_connections: i64 = bench
        .admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&bench.app_name],
        )?
        .get(0);
    let opts = &bench.opts;
    println!("## Results");
    println!();
    print_table(&rows);
    println!();
    println!("- lib ops/s: calls completed per second, all threads; p50/p99/avg: per call, all threads merged, of the best round.");
    println!("- pgbench tps: `tps = ...` without initial connection time; lat avg: pgbench's `latency average`, best round. Ratio: best library round / best pgbench round.");
    println!("- client CPU µs/op: user + system CPU of the benchmark process during the library's best round, per call / of pgbench during its best round, per transaction (/proc, 10 ms ticks). Both share 2 cores with the server.");
    if opts.ops.contains(&Op::LoadWire) {
        println!("- load_wire: not the library: `load`'s statement through a minimal client of the wire protocol in this benchmark (one `send` of Bind/Execute/Sync and blocking `recv`s per call; no runtime, no poll; TCP, no TLS, trust only), a connection per thread: the client CPU any client needs.");
    }
    if opts.ops.contains(&Op::LoadDriver) {
        println!("- load_driver: not the library: `load`'s statement on a bare `postgres::Client` per thread, each thread always on its own connection (the library's threads share its pool's connections). The gap between `load` and `load_driver` is the library and the pool; between `load_driver` and pgbench, the driver and libpq.");
    }
    if opts.ops.contains(&Op::SaveIf) {
        println!("- save_if: pgbench runs the library's CTE with the expected sequence replaced by `(SELECT sequence_number FROM \"{TABLE}\" WHERE actor_id = :id::VARCHAR)`: one more index lookup on pgbench's side. Ids are disjoint per thread/client.");
    }
    if opts.ops.contains(&Op::Transform) || opts.ops.contains(&Op::TransformContended) {
        println!("- transform: two round trips on both sides (load_versioned, then the save_if CTE with the sequence read, via \\gset). Uncontended: ids disjoint per thread/client. Contended: everyone on actor \"{CONTENDED_ID}\"; ops/s = successful writes/s on both sides; the library backs off (RetryPolicy) and retries, pgbench does neither.");
    }
    if opts.ops.contains(&Op::Delete) {
        println!("- delete: every run deletes its own distinct, prefilled ids (numeric ids from {DELETE_BASE}, so that pgbench passes them as :id like the library's).");
    }
    if opts.smoke {
        println!("- smoke run: too short for meaningful numbers.");
    }
    println!();
    if !bulk.is_empty() {
        println!("## Bulk operations (1,000 actors per call, trigger and notifications on)");
        println!();
        for b in &bulk {
            let beside = b.pgbench.map_or_else(String::new, |pg| {
                format!(
                    "; pgbench's plain 1,000-row upsert, {} client(s): {pg:.0} states/s; library / pgbench {:.2}x",
                    b.threads,
                    b.library / pg
                )
            });
            println!(
                "- {}, {} thread(s): {:.0} states/s{beside}",
                b.what, b.threads, b.library
            );
        }
        println!();
    }
    println!("## Statement text");
    println!();
    if bench.sql_mismatch.is_empty() {
        let names: Vec<&str> = bench.verified.iter().map(|op| op.name()).collect();
        println!(
            "- pg_stat_activity.query of the library's connections matched the benchmark's copy of `Statements` exactly after the runs of: {}",
            names.join(", ")
        );
    } else {
        println!("- WARNING: the library ran SQL that differs from the benchmark's copy of `Statements` (src/schema.rs changed?); the pgbench side is out of date:");
        for text in &bench.sql_mismatch {
            println!("  - {text}");
        }
    }
    for op in &opts.ops {
        if !bench.verified.contains(op) && op.library_statement() {
            println!(
                "- {}: its statement was not seen in pg_stat_activity after the library's runs",
                op.name()
            );
        }
    }
    println!();
    println!("## Connections and memory");
    println!();
    println!(
        "- library pool after the runs: {} connections ({} idle), max_size {}; pg_stat_activity rows with application_name {:?}: {server_connections}",
        pool_state.connections, pool_state.idle, pool_state.max_size, bench.app_name
    );
    println!(
        "- first store in the process (1 connection, includes one-time initialisation): VmRSS +{} kB",
        memory.first_store_kb
    );
    println!(
        "- a further store with a 16-connection pool, all open{}: VmRSS +{} kB ({:.0} kB per connection, pool threads included), threads +{}",
        if memory.store16_opened { "" } else { " (NOT all opened within 20 s)" },
        memory.store16_kb,
        memory.store16_kb as f64 / 16.0,
        memory.store16_threads
    );
    println!(
        "- a ChangeListener: VmRSS +{} kB; {} subscribers (subscribe(), default queue capacity 1,024, no events yet): +{} kB more ({:.1} kB per subscriber)",
        memory.listener_kb,
        memory.subscribers,
        memory.subscribers_kb,
        memory.subscribers_kb as f64 / memory.subscribers.max(1) as f64
    );
    println!(
        "- benchmark process: peak RSS (VmHWM) {} kB ({hwm_before_runs} kB before the runs, i.e. after the memory probes), VmRSS now {} kB",
        kb("VmHWM"),
        kb("VmRSS")
    );
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(())
}

// ----- a minimal wire-protocol client ------------------------------------------

/// The least a client can do for `load`: the statement parsed once, then per
/// call one `send` of Bind, Execute and Sync and blocking `recv`s until
/// ReadyForQuery; no runtime, no poll, no statement cache. Protocol 3 over
/// TCP only, without TLS, with servers that let it in without a password
/// (trust), as the throwaway cluster does. Not the library: it shows how
/// much of a load's client CPU any client needs, beside libpq (pgbench), the
/// `postgres` driver (`load_driver`) and the library (`load`).
mod wire {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::BoxError;

    /// A message of protocol 3: tag, length, body.
    fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
        out.push(tag);
        let len = i32::try_from(body.len() + 4).expect("a short message");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
    }

    fn be_i32(bytes: &[u8]) -> i32 {
        i32::from_be_bytes(bytes[..4].try_into().expect("four bytes"))
    }

    pub struct Connection {
        socket: TcpStream,
        input: Vec<u8>,
        output: Vec<u8>,
    }

    impl Connection {
        /// Connects to `url`'s first TCP host and prepares `sql`, whose one
        /// parameter is a VARCHAR, as statement `load`.
        pub fn open(url: &str, sql: &str) -> Result<Connection, BoxError> {
            let config: postgres::Config = url.parse()?;
            if config.get_ssl_mode() == postgres::config::SslMode::Require {
                return Err("load_wire speaks without TLS; sslmode=require asks for it".into());
            }
            let host = match config.get_hosts().first() {
                Some(postgres::config::Host::Tcp(host)) => host.clone(),
                _ => return Err("load_wire connects over TCP only".into()),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let socket = TcpStream::connect((host.as_str(), port))?;
            socket.set_nodelay(true)?;
            let mut conn = Connection {
                socket,
                input: Vec::with_capacity(8192),
                output: Vec::with_capacity(256),
            };
            let user = config.get_user().unwrap_or("postgres");
            let mut startup = 196_608_i32.to_be_bytes().to_vec();
            for (key, value) in [
                ("user", user),
                ("database", config.get_dbname().unwrap_or(user)),
            ] {
                startup.extend_from_slice(key.as_bytes());
                startup.push(0);
                startup.extend_from_slice(value.as_bytes());
                startup.push(0);
            }
            startup.push(0);
            let len = i32::try_from(startup.len() + 4)?;
            let mut first = len.to_be_bytes().to_vec();
            first.extend_from_slice(&startup);
            conn.socket.write_all(&first)?;
            conn.until_ready()?;
            let mut parse = b"load\0".to_vec();
            parse.extend_from_slice(sql.as_bytes());
            parse.push(0);
            parse.extend_from_slice(&1_i16.to_be_bytes());
            parse.extend_from_slice(&1043_i32.to_be_bytes()); // varchar
            let mut out = Vec::new();
            message(&mut out, b'P', &parse);
            message(&mut out, b'S', &[]);
            conn.socket.write_all(&out)?;
            conn.until_ready()?;
            Ok(conn)
        }

        /// Reads messages up to ReadyForQuery: the first column of the
        /// first row, if a row came.
        fn until_ready(&mut self) -> Result<Option<Vec<u8>>, BoxError> {
            let mut row = None;
            let mut at = 0;
            self.input.clear();
            loop {
                while self.input.len() - at >= 5 {
                    let tag = self.input[at];
                    let len = usize::try_from(be_i32(&self.input[at + 1..]))?;
                    if self.input.len() - at < 1 + len {
                        break;
                    }
                    let body = &self.input[at + 5..at + 1 + len];
                    match tag {
                        b'D' => {
                            if let Ok(n) = usize::try_from(be_i32(&body[2..])) {
                                row = Some(body[6..6 + n].to_vec());
                            }
                        }
                        b'E' => {
                            let text = String::from_utf8_lossy(body).replace('\0', " ");
                            return Err(format!("server error: {}", text.trim()).into());
                        }
                        b'R' if be_i32(body) != 0 => {
                            return Err("load_wire cannot authenticate: it needs a server that \
                                        trusts the connection (no password)"
                                .into());
                        }
                        b'Z' => return Ok(row),
                        _ => {}
                    }
                    at += 1 + len;
                }
                let filled = self.input.len();
                self.input.resize(filled + 8192, 0);
                let n = self.socket.read(&mut self.input[filled..])?;
                self.input.truncate(filled + n);
                if n == 0 {
                    return Err("the server closed the connection".into());
                }
            }
        }

        /// Runs the statement for `id` (text parameter, binary result).
        pub fn load(&mut self, id: &str) -> Result<Option<Vec<u8>>, BoxError> {
            let mut bind = Vec::with_capacity(32 + id.len());
            bind.extend_from_slice(b"\0load\0");
            bind.extend_from_slice(&0_i16.to_be_bytes()); // parameters as text
            bind.extend_from_slice(&1_i16.to_be_bytes());
            bind.extend_from_slice(&i32::try_from(id.len())?.to_be_bytes());
            bind.extend_from_slice(id.as_bytes());
            bind.extend_from_slice(&1_i16.to_be_bytes());
            bind.extend_from_slice(&1_i16.to_be_bytes()); // binary result
            self.output.clear();
            message(&mut self.output, b'B', &bind);
            message(&mut self.output, b'E', b"\0\0\0\0\0");
            message(&mut self.output, b'S', &[]);
            self.socket.write_all(&self.output)?;
            self.until_ready()
        }
    }
}
