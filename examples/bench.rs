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

#[path = "bench/soak.rs"]
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

// ----- options -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Load,
    Save,
    SaveIf,
    Transform,
    TransformContended,
    Delete,
    /// `save` through a store with group commit on (the default); pgbench
    /// runs the plain one-row save, so the ratio is against its
    /// notifying-save rate. The other cases run with group commit off.
    SaveGrouped,
    /// `load`'s statement through a bare `postgres::Client` per thread (no
    /// pool, no library): the driver's own cost, beside the library's and
    /// libpq's.
    LoadDriver,
    /// `load`'s statement through a minimal client of the wire protocol
    /// per thread ([`wire`]): what a client with libpq's call pattern and
    /// nothing else costs.
    LoadWire,
}

impl Op {
    const ALL: [Op; 9] = [
        Op::Load,
        Op::LoadDriver,
        Op::LoadWire,
        Op::Save,
        Op::SaveGrouped,
        Op::SaveIf,
        Op::Transform,
        Op::TransformContended,
        Op::Delete,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Load => "load",
            Op::Save => "save",
            Op::SaveIf => "save_if",
            Op::Transform => "transform",
            Op::TransformContended => "transform_contended",
            Op::Delete => "delete",
            Op::SaveGrouped => "save_grouped",
            Op::LoadDriver => "load_driver",
            Op::LoadWire => "load_wire",
        }
    }

    /// Whether the library runs the statement pgbench runs, as checked in
    /// pg_stat_activity.
    fn library_statement(self) -> bool {
        !matches!(self, Op::SaveGrouped | Op::LoadDriver | Op::LoadWire)
    }

    fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == s)
    }
}

#[derive(Debug)]
struct Options {
    duration: Duration,
    threads: Vec<usize>,
    ops: Vec<Op>,
    rounds: usize,
    smoke: bool,
    delete_rate: f64,
    /// `--soak SECS`: the soak mode instead of the comparison.
    soak: Option<Duration>,
    /// `--every SECS`: the soak's reporting interval.
    every: Duration,
}

impl Options {
    fn parse() -> Result<Options, BoxError> {
        let mut values: HashMap<&str, String> = HashMap::new();
        for (key, var) in [
            ("duration", "BENCH_DURATION"),
            ("threads", "BENCH_THREADS"),
            ("ops", "BENCH_OPS"),
            ("rounds", "BENCH_ROUNDS"),
            ("delete_rate", "BENCH_DELETE_RATE"),
            ("soak", "BENCH_SOAK"),
            ("every", "BENCH_SOAK_EVERY"),
        ] {
            if let Ok(v) = std::env::var(var) {
                if !v.trim().is_empty() {
                    values.insert(key, v);
                }
            }
        }
        let mut smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| v == "1" || v == "true");
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let key = match flag.as_str() {
                "--smoke" => {
                    smoke = true;
                    continue;
                }
                "--duration" => "duration",
                "--threads" => "threads",
                "--ops" => "ops",
                "--rounds" => "rounds",
                "--soak" => "soak",
                "--every" => "every",
                "-h" | "--help" => {
                    println!(
                        "cargo run --release --example bench -- [--smoke] [--duration SECS] \
                         [--threads 1,8,16] [--ops load,load_driver,load_wire,save,save_grouped,save_if,transform,\
                         transform_contended,delete] [--rounds 2] [--soak SECS [--every SECS]]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)").into()),
            };
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
            };
            values.insert(key, value);
        }
        let duration: f64 = match values.get("duration") {
            Some(v) => v.parse().map_err(|_| format!("bad duration {v:?}"))?,
            None if smoke => 0.2,
            None => 3.0,
        };
        if !(duration > 0.0 && duration < 3600.0) {
            return Err("duration must be between 0 and 3600 seconds".into());
        }
        let threads: Vec<usize> = match values.get("threads") {
            Some(v) => v
                .split(',')
                .map(|t| t.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("bad thread list {v:?}"))?,
            None if smoke => vec![1],
            None => vec![1, 8, 16],
        };
        if threads.is_empty() || threads.iter().any(|&t| t == 0 || t > 64) {
            return Err("thread counts must be between 1 and 64".into());
        }
        let ops: Vec<Op> = match values.get("ops") {
            Some(v) => v
                .split(',')
                .map(|o| {
                    Op::parse(o.trim()).ok_or_else(|| format!("unknown operation {:?}", o.trim()))
                })
                .collect::<Result<_, _>>()?,
            None => Op::ALL.to_vec(),
        };
        let rounds: usize = match values.get("rounds") {
            Some(v) => v.parse().map_err(|_| format!("bad rounds {v:?}"))?,
            None => 2,
        };
        if rounds == 0 {
            return Err("rounds must be at least 1".into());
        }
        let delete_rate: f64 = match values.get("delete_rate") {
            Some(v) => v
                .parse()
                .map_err(|_| format!("bad BENCH_DELETE_RATE {v:?}"))?,
            None => 15_000.0,
        };
        let seconds = |key: &str| -> Result<Option<Duration>, BoxError> {
            values
                .get(key)
                .map(|v| match v.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
                    _ => Err(format!("bad --{key} {v:?}: whole seconds, at least 1").into()),
                })
                .transpose()
        };
        let soak = seconds("soak")?;
        let every = seconds("every")?.unwrap_or(Duration::from_secs(60));
        Ok(Options {
            soak,
            every,
            duration: Duration::from_secs_f64(duration),
            threads,
            ops,
            rounds,
            smoke,
            delete_rate,
        })
    }

    /// pgbench's `-T`: whole seconds, at least one.
    fn pgbench_seconds(&self) -> u64 {
        (self.duration.as_secs_f64().ceil() as u64).max(1)
    }
}

// ----- the library's SQL ---------------------------------------------------

/// The library's statements for one table.
///
/// MUST MATCH `Statements::new` in src/schema.rs, which is not public: the
/// text below is copied from it. After every library run the benchmark
/// compares the text its connections last ran (`pg_stat_activity.query`)
/// with these, and says so when they differ.
struct LibrarySql {
    save: String,
    save_if_sequence: String,
    load: String,
    load_versioned: String,
    load_many: String,
    /// `save_many` and `load_many_bytes`, which grouped saves and the bulk
    /// rates run: no pgbench twin, but texts the library's connections are
    /// left with.
    save_many: String,
    load_many_ordered: String,
    delete: String,
    sequence: String,
}

impl LibrarySql {
    /// `t`: the quoted table; `b`: the quoted tombstone table
    /// (`Names::tombstones`, `{table}_tombstones`).
    fn new(t: &str, b: &str) -> LibrarySql {
        let now = "(now() AT TIME ZONE 'UTC')";
        let live = |a: &str| format!("({a}expires_at IS NULL OR {a}expires_at > {now})");
        let expired = |a: &str| format!("{a}expires_at <= {now}");
        let bump = format!(
            "t.sequence_number + CASE WHEN {} THEN 2 ELSE 1 END",
            expired("t.")
        );
        let renew = format!(
            "created_at = CASE WHEN {} THEN EXCLUDED.created_at ELSE t.created_at END",
            expired("t.")
        );
        let ttl = |p: &str| format!("{now} + {p}::BIGINT * INTERVAL '1 microsecond'");
        let next = format!(
            "(SELECT COALESCE(b.sequence_number, 0) + 1 AS seq, b.recent_writes AS tags \
             FROM (SELECT 1) one LEFT JOIN {b} b ON b.actor_id = $1::VARCHAR) n"
        );
        let tag = |write_id: &str, sequence: &str, tags: &str| {
            format!("(ARRAY[{write_id} # ({sequence})] || {tags})[1:64]")
        };
        let set_write_id = "set_config('trebuchet.write_id', $2::BIGINT::TEXT, true) IS NOT NULL";
        let outcome = format!(
            "SELECT (SELECT sequence_number FROM written), (SELECT updated_at FROM written), \
             (SELECT created_at FROM written), \
             (SELECT c.sequence_number FROM {t} c WHERE c.actor_id = $1::VARCHAR AND {})",
            live("c.")
        );
        LibrarySql {
            save: format!(
                "INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, created_at, \
                 expires_at, recent_writes) \
                 SELECT $1::VARCHAR, $2::BYTEA, n.seq, {now}, {now}, {}, {} FROM {next} \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = {bump}, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = EXCLUDED.expires_at, recent_writes = {} \
                 RETURNING sequence_number",
                ttl("$4"),
                tag("$3::BIGINT", "n.seq", "n.tags"),
                tag("$3::BIGINT", &bump, "t.recent_writes"),
            ),
            save_if_sequence: format!(
                "WITH written AS (UPDATE {t} SET state = $2::BYTEA, sequence_number = sequence_number + 1, \
                 updated_at = {now}, expires_at = {}, recent_writes = {} \
                 WHERE actor_id = $1::VARCHAR AND sequence_number = $3::BIGINT AND {} \
                 RETURNING sequence_number, updated_at, created_at) {outcome}",
                ttl("$5"),
                tag("$4::BIGINT", "$3::BIGINT + 1", "recent_writes"),
                live("")
            ),
            load: format!(
                "SELECT state FROM {t} WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
            load_versioned: format!(
                "SELECT state, sequence_number, updated_at, created_at, expires_at FROM {t} \
                 WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
            load_many: format!(
                "SELECT actor_id, state, sequence_number, updated_at, created_at FROM {t} \
                 WHERE actor_id = ANY($1::VARCHAR[]) AND {}",
                live("")
            ),
            save_many: format!(
                "INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, created_at, \
                 recent_writes) \
                 SELECT i.id, i.st, COALESCE(b.sequence_number, 0) + 1, {now}, {now}, {} \
                 FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[]) AS i(id, st, w) \
                 LEFT JOIN {b} b ON b.actor_id = i.id ORDER BY i.id \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = {bump}, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = NULL, recent_writes = {} \
                 RETURNING actor_id::TEXT, sequence_number",
                tag("i.w", "COALESCE(b.sequence_number, 0) + 1", "b.recent_writes"),
                tag(
                    "EXCLUDED.recent_writes[1] # EXCLUDED.sequence_number",
                    &bump,
                    "t.recent_writes"
                ),
            ),
            load_many_ordered: format!(
                "SELECT i.n, t.state FROM unnest($1::VARCHAR[]) WITH ORDINALITY AS i(id, n) \
                 JOIN {t} t ON t.actor_id = i.id AND {}",
                live("t.")
            ),
            delete: format!(
                "DELETE FROM {t} WHERE actor_id = $1::VARCHAR AND {set_write_id} RETURNING {}",
                live("")
            ),
            sequence: format!(
                "SELECT sequence_number FROM {t} WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
        }
    }

    /// On Citus, the store's own texts of its point statements
    /// (`testing::point_statements`): the forms it chose there.
    fn citus(t: &str, store: &StateStore) -> LibrarySql {
        let mut sql = LibrarySql::new(t, "unused");
        for (name, text) in point_statements(store) {
            match name {
                "save" => sql.save = text,
                "save_if_sequence" => sql.save_if_sequence = text,
                "delete" => sql.delete = text,
                "load" => sql.load = text,
                "load_versioned" => sql.load_versioned = text,
                "sequence" => sql.sequence = text,
                _ => {}
            }
        }
        sql
    }

    fn all(&self) -> [&str; 9] {
        [
            &self.save,
            &self.save_if_sequence,
            &self.load,
            &self.load_versioned,
            &self.load_many,
            &self.save_many,
            &self.load_many_ordered,
            &self.delete,
            &self.sequence,
        ]
    }

    /// The statement a run of `op` must have executed.
    fn main_statement(&self, op: Op) -> &str {
        match op {
            Op::Load | Op::LoadDriver | Op::LoadWire => &self.load,
            Op::Save | Op::SaveGrouped => &self.save,
            Op::SaveIf | Op::Transform | Op::TransformContended => &self.save_if_sequence,
            Op::Delete => &self.delete,
        }
    }
}

// ----- pgbench ---------------------------------------------------------------

fn find_pgbench() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("pgbench");
            if path.is_file() {
                return Some(path);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin/pgbench")))
        })
        .filter(|(_, path)| path.is_file())
        .collect();
    versions.sort();
    if let Some((_, path)) = versions.pop() {
        return Some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("pgbench"))
        .find(|path| path.is_file())
}

struct Pgbench {
    path: PathBuf,
    /// Connection arguments: `-h 127.0.0.1 -p PORT -U postgres postgres`, or
    /// the URL as the database name (libpq expands it).
    conn_args: Vec<String>,
    dir: PathBuf,
}

#[derive(Debug, Clone)]
struct PgbenchRun {
    /// From the `tps = ...` line (without initial connection time).
    tps: f64,
    latency_avg_ms: f64,
    processed: u64,
    failed: u64,
    /// pgbench's own CPU time (user + system), seconds.
    cpu_secs: f64,
}

impl Pgbench {
    fn run(
        &self,
        name: &str,
        script: &str,
        clients: usize,
        seconds: u64,
        defines: &[(&str, String)],
    ) -> Result<PgbenchRun, String> {
        let file = self.dir.join(format!("{name}.sql"));
        std::fs::write(&file, script).map_err(|e| format!("cannot write {file:?}: {e}"))?;
        let mut cmd = Command::new(&self.path);
        cmd.args(["-n", "-M", "prepared"])
            .args(["-c", &clients.to_string()])
            .args(["-j", &clients.min(2).to_string()])
            .args(["-T", &seconds.to_string()])
            .arg("-f")
            .arg(&file);
        for (key, value) in defines {
            cmd.arg("-D").arg(format!("{key}={value}"));
        }
        cmd.args(&self.conn_args);
        let before = cpu_times().1;
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.path.display()))?;
        let cpu_secs = cpu_times().1 - before;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "pgbench failed ({}):\n{stdout}{stderr}",
                out.status
            ));
        }
        let field = |prefix: &str| -> Option<f64> {
            stdout.lines().find_map(|line| {
                let rest = line.trim().strip_prefix(prefix)?;
                rest.split_whitespace().next()?.parse().ok()
            })
        };
        // PostgreSQL 14+: "tps = N (without initial connection time)";
        // older: "tps = N (excluding connections establishing)".
        let tps = stdout
            .lines()
            .filter(|l| l.starts_with("tps = "))
            .find(|l| l.contains("without initial connection") || l.contains("excluding"))
            .and_then(|l| l["tps = ".len()..].split_whitespace().next()?.parse().ok());
        match (tps, field("latency average =")) {
            (Some(tps), Some(latency_avg_ms)) => Ok(PgbenchRun {
                tps,
                latency_avg_ms,
                processed: field("number of transactions actually processed:").unwrap_or(0.0)
                    as u64,
                failed: field("number of failed transactions:").unwrap_or(0.0) as u64,
                cpu_secs,
            }),
            _ => Err(format!("cannot parse pgbench's output:\n{stdout}{stderr}")),
        }
    }
}

/// The pgbench script of `op`: the library's statement with `:id` for the
/// actor id and a bytea literal for the state.
fn pgbench_script(op: Op, sql: &LibrarySql, bytea: &str, threads: usize) -> String {
    // A random write id, as the library draws one per write.
    let write_id = "\\set w random(1, 9223372036854775806)\n";
    let bind = |statement: &str| {
        statement
            .replace("$1", ":id")
            .replace("$2", bytea)
            .replace("$3", ":w")
            // No time to live.
            .replace("$4", "NULL")
    };
    // The ids of client c: 1 + c, 1 + c + T, ... (the library's threads use
    // the same sets).
    let own_id = format!(
        "\\set id 1 + :client_id + {threads} * random(0, {} - 1)\n",
        ACTORS / threads as u64
    );
    match op {
        Op::Load | Op::LoadDriver | Op::LoadWire => {
            format!("\\set id random(1, {ACTORS})\n{};\n", bind(&sql.load))
        }
        Op::Save | Op::SaveGrouped => {
            format!(
                "\\set id random(1, {ACTORS})\n{write_id}{};\n",
                bind(&sql.save)
            )
        }
        // No literal can carry the expected sequence: read it in a subselect
        // of the same statement (one more index lookup than the library).
        Op::SaveIf => format!(
            "{own_id}{write_id}{};\n",
            sql.save_if_sequence
                .replace("$1", ":id")
                .replace("$2", bytea)
                .replace("$4", ":w")
                .replace("$5", "NULL")
                .replace(
                    "$3",
                    &format!(
                        "(SELECT sequence_number FROM {} WHERE actor_id = :id::VARCHAR)",
                        quote_identifier(TABLE)
                    )
                )
        ),
        // The library's two round trips: read the version, write if unchanged.
        Op::Transform | Op::TransformContended => {
            let id = if op == Op::Transform {
                own_id
            } else {
                format!("\\set id {CONTENDED_ID}\n")
            };
            format!(
                "{id}{write_id}{} \\gset\n{};\n",
                sql.load_versioned.replace("$1", ":id"),
                sql.save_if_sequence
                    .replace("$1", ":id")
                    .replace("$2", bytea)
                    .replace("$4", ":w")
                    .replace("$5", "NULL")
                    .replace("$5", "NULL")
                    .replace("$3", ":sequence_number")
            )
        }
        // Client c deletes base + c * per + 0, 1, 2, ... (n counts per client).
        Op::Delete => format!(
            "\\set id :base + :client_id * :per + :n\n\\set n :n + 1\n{write_id}{};\n",
            sql.delete.replace("$1", ":id").replace("$2", ":w")
        ),
    }
}

// ----- the library side ----------------------------------------------------

#[derive(Debug, Clone, Default)]
struct LibRun {
    ops: u64,
    secs: f64,
    /// This process's CPU time (user + system) during the run, seconds.
    cpu_secs: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    avg_us: f64,
    errors: u64,
    first_error: Option<String>,
    /// transform: attempts that lost a race (the closure ran again).
    retries: u64,
    /// delete: calls that found nothing to delete.
    misses: u64,
    exhausted: bool,
}

impl LibRun {
    fn ops_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// The `p` quantile of sorted nanoseconds, in microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1] as f64 / 1_000.0
}

#[derive(Default)]
struct ThreadRun {
    ops: u64,
    elapsed: Duration,
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    retries: u64,
    misses: u64,
    exhausted: bool,
}

impl ThreadRun {
    /// Counts one call that took `took`.
    fn record(&mut self, took: Duration, result: Result<(), String>) {
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
fn own_ids(t: usize, threads: usize) -> Vec<String> {
    let per = ACTORS / threads as u64;
    (0..per)
        .map(|k| (1 + t as u64 + threads as u64 * k).to_string())
        .collect()
}

fn next_state(current: Option<&[u8]>, state: &[u8]) -> Vec<u8> {
    let mut next = current.unwrap_or(state).to_vec();
    if let Some(b) = next.first_mut() {
        *b = b.wrapping_add(1);
    }
    next
}

/// CPU seconds (user + system) of this process, and of its children that
/// have been waited for, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_times() -> (f64, f64) {
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

fn run_library(
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
type BareLoad = Box<dyn FnMut(&str) -> Result<(), String>>;

/// A connection of `op`'s bare client (`load_driver`, `load_wire`) with
/// `load`'s statement prepared.
fn open_bare(op: Op, url: &str, sql: &str) -> Result<BareLoad, BoxError> {
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
fn run_bare(op: Op, url: &str, sql: &str, threads: usize, duration: Duration) -> LibRun {
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
fn summarize(runs: Vec<ThreadRun>, cpu_secs: f64) -> LibRun {
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
fn thread_run(
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

// ----- helpers ---------------------------------------------------------------

/// A field of /proc/self/status in kB (`VmRSS`, `VmHWM`) or a count (`Threads`).
fn proc_status(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn kb(key: &str) -> i64 {
    proc_status(key).map_or(-1, |v| v as i64)
}

/// `1234567.8` as `1,234,568`.
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn admin_client(url: &str) -> Result<postgres::Client, BoxError> {
    let mut config: postgres::Config = url.parse()?;
    config.application_name("trebuchet-bench-admin");
    let client = if config.get_ssl_mode() == postgres::config::SslMode::Disable {
        config.connect(postgres::NoTls)?
    } else {
        let tls = native_tls::TlsConnector::new()?;
        config.connect(postgres_native_tls::MakeTlsConnector::new(tls))?
    };
    Ok(client)
}

fn wait_for_connections(store: &StateStore, n: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.pool().state().connections < n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// How many of the `count` delete ids from `base` on are still there. All
/// have seven digits, so text order is number order within them.
fn remaining(
    admin: &mut postgres::Client,
    table_sql: &str,
    base: u64,
    count: u64,
) -> Result<u64, BoxError> {
    let left: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {table_sql} WHERE length(actor_id) = 7 \
                 AND actor_id >= $1 AND actor_id <= $2"
            ),
            &[&base.to_string(), &(base + count - 1).to_string()],
        )?
        .get(0);
    Ok(left as u64)
}

fn checkpoint(admin: &mut postgres::Client) {
    // Needs superuser or pg_checkpoint; without it runs simply go on.
    let _ = admin.batch_execute("CHECKPOINT");
}

fn show(admin: &mut postgres::Client, setting: &str) -> String {
    admin
        .query_one(&format!("SHOW {setting}"), &[])
        .map(|row| row.get::<_, String>(0))
        .unwrap_or_else(|e| format!("? ({e})"))
}

// ----- the report ------------------------------------------------------------

struct Row {
    op: Op,
    threads: usize,
    lib: Vec<LibRun>,
    /// For transform_contended: successful writes/s (from the sequence).
    pg: Vec<Result<PgbenchRun, String>>,
    notes: Vec<String>,
    /// transform_contended: pgbench attempts that wrote nothing, of all.
    pg_conflicts: u64,
    pg_attempts: u64,
}

impl Row {
    fn best_lib(&self) -> Option<&LibRun> {
        self.lib
            .iter()
            .max_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()))
    }

    fn best_pg(&self) -> Option<&PgbenchRun> {
        self.pg
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max_by(|a, b| a.tps.total_cmp(&b.tps))
    }
}

const HEADER: [&str; 11] = [
    "op",
    "T",
    "lib ops/s (rounds)",
    "lib p50 µs",
    "lib p99 µs",
    "lib avg µs",
    "pgbench tps (rounds)",
    "pgbench lat avg µs",
    "client CPU µs/op lib / pgbench",
    "lib/pgbench",
    "notes",
];

fn row_cells(row: &Row) -> Vec<String> {
    let lib_rounds = row
        .lib
        .iter()
        .map(|r| thousands(r.ops_per_sec()))
        .collect::<Vec<_>>()
        .join(" / ");
    let pg_rounds = row
        .pg
        .iter()
        .map(|r| match r {
            Ok(r) => thousands(r.tps),
            Err(_) => "failed".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" / ");
    let best_lib = row.best_lib();
    let best_pg = row.best_pg();
    let f1 = |v: f64| format!("{v:.0}");
    vec![
        row.op.name().to_owned(),
        row.threads.to_string(),
        lib_rounds,
        best_lib.map_or("-".into(), |r| f1(r.p50_us)),
        best_lib.map_or("-".into(), |r| f1(r.p99_us)),
        best_lib.map_or("-".into(), |r| f1(r.avg_us)),
        if row.pg.is_empty() {
            "-".to_owned()
        } else {
            pg_rounds
        },
        best_pg.map_or("-".into(), |r| f1(r.latency_avg_ms * 1_000.0)),
        format!(
            "{} / {}",
            best_lib.map_or("-".into(), |r| format!(
                "{:.1}",
                r.cpu_secs * 1e6 / r.ops.max(1) as f64
            )),
            best_pg.map_or("-".into(), |r| format!(
                "{:.1}",
                r.cpu_secs * 1e6 / r.processed.max(1) as f64
            ))
        ),
        match (best_lib, best_pg) {
            (Some(l), Some(p)) if p.tps > 0.0 => format!("{:.2}x", l.ops_per_sec() / p.tps),
            _ => "-".to_owned(),
        },
        row.notes.join("; "),
    ]
}

fn print_table(rows: &[Row]) {
    let cells: Vec<Vec<String>> = rows.iter().map(row_cells).collect();
    let mut widths: Vec<usize> = HEADER.iter().map(|h| h.chars().count()).collect();
    for line in &cells {
        for (i, c) in line.iter().enumerate().take(HEADER.len() - 1) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let render = |line: &[String]| {
        let mut out = String::from("|");
        for (i, c) in line.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            if i == 0 || i == line.len() - 1 {
                let _ = write!(out, " {c}{} |", " ".repeat(pad));
            } else {
                let _ = write!(out, " {}{c} |", " ".repeat(pad));
            }
        }
        out
    };
    println!(
        "{}",
        render(&HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    );
    let mut sep = String::from("|");
    for (i, w) in widths.iter().enumerate() {
        let dashes = "-".repeat((*w).max(3));
        if i == 0 || i == widths.len() - 1 {
            let _ = write!(sep, " {dashes} |");
        } else {
            let _ = write!(sep, " {}: |", &dashes[1..]);
        }
    }
    println!("{sep}");
    for line in &cells {
        println!("{}", render(line));
    }
}

// ----- memory ----------------------------------------------------------------

struct Memory {
    first_store_kb: i64,
    store16_kb: i64,
    store16_threads: i64,
    store16_opened: bool,
    listener_kb: i64,
    subscribers_kb: i64,
    subscribers: usize,
}

/// VmRSS deltas, measured before the benchmark touches the heap. Every
/// measured object stays alive until the end, so no measurement reuses
/// memory another one freed.
fn measure_memory(connect: &ConnectOptions) -> Result<Memory, BoxError> {
    let builder = |max: u32| {
        StateStore::builder()
            .connect_options(connect.clone())
            .pool_options(PoolOptions::default().max_size(max).min_idle(None))
            .table(TABLE)
            .channel(CHANNEL)
    };
    // The first store pays for one-time initialisation (TLS library, ...).
    let rss0 = kb("VmRSS");
    let first = builder(1).build()?;
    wait_for_connections(&first, 1);
    let rss1 = kb("VmRSS");
    let threads1 = kb("Threads");
    let store16 = builder(16).build()?;
    let store16_opened = wait_for_connections(&store16, 16);
    let rss2 = kb("VmRSS");
    let threads2 = kb("Threads");
    let listener = ChangeListener::builder()
        .connect_options(connect.clone())
        .channel(CHANNEL)
        .build()?;
    let rss3 = kb("VmRSS");
    let subscriptions: Vec<Subscription> = (0..1_000).map(|_| listener.subscribe()).collect();
    let rss4 = kb("VmRSS");
    let subscribers = listener.health().subscribers;
    drop(subscriptions);
    listener.shutdown();
    drop((listener, store16, first));
    Ok(Memory {
        first_store_kb: rss1 - rss0,
        store16_kb: rss2 - rss1,
        store16_threads: threads2 - threads1,
        store16_opened,
        listener_kb: rss3 - rss2,
        subscribers_kb: rss4 - rss3,
        subscribers,
    })
}

// ----- the benchmark -----------------------------------------------------------

struct Bench {
    opts: Options,
    /// The server, for the bare driver's connections.
    url: String,
    admin: postgres::Client,
    store: StateStore,
    /// The same table and pool, with group commit on.
    grouped: StateStore,
    app_name: String,
    table_sql: String,
    sql: LibrarySql,
    pgbench: Option<Pgbench>,
    state: Vec<u8>,
    bytea_literal: String,
    next_delete_id: u64,
    /// Operations whose statement text was seen in pg_stat_activity.
    verified: Vec<Op>,
    /// Text the library ran that the benchmark does not know.
    sql_mismatch: Vec<String>,
}

impl Bench {
    /// Fills `"1".."10000"` with the library (eight threads).
    fn prefill(&mut self) -> Result<(), BoxError> {
        let tombstones = quote_identifier(&format!("{TABLE}_tombstones"));
        self.admin
            .batch_execute(&format!("TRUNCATE {}, {tombstones}", self.table_sql))?;
        let (store, state) = (&self.store, &self.state);
        std::thread::scope(|scope| -> Result<(), String> {
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    scope.spawn(move || -> Result<(), String> {
                        for id in (1 + t..=ACTORS).step_by(8) {
                            store
                                .raw()
                                .save(&id.to_string(), state)
                                .map_err(|e| format!("prefill: {e}"))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("prefill thread panicked"))
        })?;
        self.admin
            .batch_execute(&format!("VACUUM ANALYZE {}", self.table_sql))?;
        Ok(())
    }

    /// Inserts fresh ids for every delete run, in one statement (the trigger
    /// is skipped where allowed: it would only announce the inserts), and
    /// returns each run's `(first id, ids per thread)` in run order.
    fn provision_deletes(&mut self) -> Result<Vec<(u64, u64)>, BoxError> {
        let opts = &self.opts;
        let lib_block = (opts.duration.as_secs_f64() * opts.delete_rate).ceil() as u64;
        let pg_block = (opts.pgbench_seconds() as f64 * opts.delete_rate).ceil() as u64;
        let first = self.next_delete_id;
        let mut blocks = Vec::new();
        for &threads in &opts.threads {
            for _ in 0..opts.rounds {
                for block in [lib_block, pg_block] {
                    let per = block.div_ceil(threads as u64).max(1);
                    blocks.push((self.next_delete_id, per));
                    self.next_delete_id += per * threads as u64;
                }
            }
        }
        if self.next_delete_id - 1 > DELETE_LIMIT {
            return Err("too many ids to delete: lower BENCH_DELETE_RATE or the duration".into());
        }
        let started = Instant::now();
        let replica = self
            .admin
            .batch_execute("SET session_replication_role = replica")
            .is_ok();
        self.admin.execute(
            &format!(
                "INSERT INTO {} (actor_id, state, sequence_number) \
                 SELECT g::text, $1, 1 FROM generate_series($2::bigint, $3::bigint) g",
                self.table_sql
            ),
            &[
                &self.state,
                &(first as i64),
                &(self.next_delete_id as i64 - 1),
            ],
        )?;
        if replica {
            self.admin.batch_execute("RESET session_replication_role")?;
        }
        self.admin
            .batch_execute(&format!("VACUUM ANALYZE {}", self.table_sql))?;
        eprintln!(
            "delete: {} ids provisioned in {:.1} s{}",
            thousands((self.next_delete_id - first) as f64),
            started.elapsed().as_secs_f64(),
            if replica { "" } else { " (with the trigger)" }
        );
        Ok(blocks)
    }

    /// Checks the text the store's connections ran last against ours.
    fn check_statement_text(&mut self, op: Op) -> Result<(), BoxError> {
        let ran: Vec<String> = self
            .admin
            .query(
                "SELECT query FROM pg_stat_activity WHERE application_name = $1 AND query <> ''",
                &[&self.app_name],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // The server keeps `track_activity_query_size` bytes of each query
        // (1 kB by default; the throwaway cluster keeps 16 kB): a long
        // statement may be seen cut short.
        let same =
            |seen: &str, copy: &str| seen == copy || (seen.len() >= 1000 && copy.starts_with(seen));
        let known = self.sql.all();
        // Not statements of `Statements`: a connection's set-up query (its
        // server process and settings), the last text of a connection that
        // ran nothing else, and transaction control, the last text of one
        // whose last write ran in a transaction.
        let bookkeeping = |text: &str| {
            text.starts_with("SELECT pg_backend_pid()") || matches!(text, "BEGIN" | "COMMIT")
        };
        for text in &ran {
            if !known.iter().any(|k| same(text, k))
                && !bookkeeping(text)
                && !self.sql_mismatch.contains(text)
            {
                self.sql_mismatch.push(text.clone());
            }
        }
        if ran.iter().any(|t| same(t, self.sql.main_statement(op))) && !self.verified.contains(&op)
        {
            self.verified.push(op);
        }
        Ok(())
    }

    fn library_round(
        &mut self,
        row: &mut Row,
        round: usize,
        block: Option<(u64, u64)>,
    ) -> Result<(), BoxError> {
        let (op, threads) = (row.op, row.threads);
        checkpoint(&mut self.admin);
        let store = if op == Op::SaveGrouped {
            &self.grouped
        } else {
            &self.store
        };
        let lib = if matches!(op, Op::LoadDriver | Op::LoadWire) {
            run_bare(op, &self.url, &self.sql.load, threads, self.opts.duration)
        } else {
            run_library(store, op, threads, self.opts.duration, &self.state, block)
        };
        // Grouped saves run the bulk statement, which has no pgbench twin;
        // the bare driver is not the library.
        if op.library_statement() {
            self.check_statement_text(op)?;
        }
        if let Some((base, per)) = block {
            let count = per * threads as u64;
            let gone = count - remaining(&mut self.admin, &self.table_sql, base, count)?;
            if gone != lib.ops - lib.misses {
                row.notes.push(format!(
                    "lib round {round}: {gone} rows gone for {} deletes",
                    lib.ops - lib.misses
                ));
            }
        }
        if lib.exhausted {
            row.notes.push(format!(
                "lib round {round} EXHAUSTED its ids (raise BENCH_DELETE_RATE)"
            ));
        }
        if lib.misses > 0 {
            row.notes
                .push(format!("lib round {round}: {} misses", lib.misses));
        }
        if let (Some(e), true) = (&lib.first_error, lib.errors > 0 || lib.ops == 0) {
            row.notes.push(format!("lib round {round}: {e}"));
        }
        eprintln!(
            "{:<19} T={threads:<2} round {round} library: {:>9} ops/s  p50 {:.0} µs  p99 {:.0} µs  max {:.0} µs  CPU {:.1} µs/op",
            op.name(),
            thousands(lib.ops_per_sec()),
            lib.p50_us,
            lib.p99_us,
            lib.max_us,
            lib.cpu_secs * 1e6 / lib.ops.max(1) as f64
        );
        row.lib.push(lib);
        Ok(())
    }

    fn pgbench_round(
        &mut self,
        row: &mut Row,
        round: usize,
        block: Option<(u64, u64)>,
    ) -> Result<(), BoxError> {
        let Some(pgbench) = &self.pgbench else {
            return Ok(());
        };
        let (op, threads) = (row.op, row.threads);
        let script = pgbench_script(op, &self.sql, &self.bytea_literal, threads);
        let mut defines: Vec<(&str, String)> = Vec::new();
        if let Some((base, per)) = block {
            defines.push(("base", base.to_string()));
            defines.push(("per", per.to_string()));
            defines.push(("n", "0".to_owned()));
        }
        let contended_sequence = |admin: &mut postgres::Client| -> Result<i64, BoxError> {
            Ok(admin
                .query_opt(&self.sql.sequence, &[&CONTENDED_ID])?
                .map_or(0, |r| r.get(0)))
        };
        let before = contended_sequence(&mut self.admin)?;
        checkpoint(&mut self.admin);
        let name = format!("{}_{threads}_{round}", op.name());
        let mut result = pgbench.run(
            &name,
            &script,
            threads,
            self.opts.pgbench_seconds(),
            &defines,
        );
        match &mut result {
            Ok(run) => {
                if run.failed > 0 {
                    row.notes
                        .push(format!("pgbench round {round}: {} failed", run.failed));
                }
                if op == Op::TransformContended {
                    // Count successful writes only, like the library.
                    let written = (contended_sequence(&mut self.admin)? - before).max(0) as u64;
                    let attempts = run.processed.max(1);
                    row.pg_conflicts += attempts.saturating_sub(written);
                    row.pg_attempts += attempts;
                    run.tps *= written as f64 / attempts as f64;
                }
                if let Some((base, per)) = block {
                    let count = per * threads as u64;
                    let gone = count - remaining(&mut self.admin, &self.table_sql, base, count)?;
                    if gone < run.processed {
                        row.notes.push(format!(
                            "pgbench round {round} EXHAUSTED: {} deletes, {gone} rows gone \
                             (raise BENCH_DELETE_RATE)",
                            run.processed
                        ));
                    }
                }
                eprintln!(
                    "{:<19} T={threads:<2} round {round} pgbench: {:>9} tps    latency avg {:.0} µs  CPU {:.1} µs/tx",
                    op.name(),
                    thousands(run.tps),
                    run.latency_avg_ms * 1_000.0,
                    run.cpu_secs * 1e6 / run.processed.max(1) as f64
                );
            }
            Err(e) => {
                eprintln!("{} T={threads} round {round} pgbench: {e}", op.name());
                row.notes.push(format!("pgbench round {round} failed"));
            }
        }
        row.pg.push(result);
        Ok(())
    }

    fn run_all(&mut self) -> Result<Vec<Row>, BoxError> {
        let mut rows = Vec::new();
        for op in self.opts.ops.clone() {
            let mut blocks = if op == Op::Delete {
                self.provision_deletes()?
            } else {
                Vec::new()
            }
            .into_iter();
            for threads in self.opts.threads.clone() {
                let mut row = Row {
                    op,
                    threads,
                    lib: Vec::new(),
                    pg: Vec::new(),
                    notes: Vec::new(),
                    pg_conflicts: 0,
                    pg_attempts: 0,
                };
                for round in 1..=self.opts.rounds {
                    self.library_round(&mut row, round, blocks.next())?;
                    self.pgbench_round(&mut row, round, blocks.next())?;
                }
                if matches!(op, Op::Transform | Op::TransformContended) {
                    let retries: u64 = row.lib.iter().map(|r| r.retries).sum();
                    let ops: u64 = row.lib.iter().map(|r| r.ops).sum();
                    row.notes.push(format!(
                        "lib retries {retries} ({:.2}/op)",
                        retries as f64 / ops.max(1) as f64
                    ));
                }
                if row.pg_attempts > 0 {
                    row.notes.push(format!(
                        "pgbench: {} of {} attempts lost the race; tps = writes/s",
                        row.pg_conflicts, row.pg_attempts
                    ));
                }
                let errors: u64 = row.lib.iter().map(|r| r.errors).sum();
                if errors > 0 {
                    row.notes.push(format!("lib errors {errors}"));
                }
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

// ----- main ------------------------------------------------------------------

/// States per second through `save_many` and `load_many`, 1,000 actors per
/// call, at 1 and 2 threads.
fn bulk_rates(
    store: &StateStore,
    state: &[u8],
    duration: Duration,
) -> Vec<(&'static str, usize, f64)> {
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
            rates.push((what, threads, done as f64 / secs));
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
        bulk_rates(&bench.store, &bench.state, bench.opts.duration)
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
        for (what, threads, rate) in &bulk {
            println!("- {what}, {threads} thread(s): {rate:.0} states/s");
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
