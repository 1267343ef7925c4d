//! The benchmark's options: flags and `BENCH_*` variables.

use super::*;

// ----- options -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
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
    pub(crate) const ALL: [Op; 9] = [
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

    pub(crate) fn name(self) -> &'static str {
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
    pub(crate) fn library_statement(self) -> bool {
        !matches!(self, Op::SaveGrouped | Op::LoadDriver | Op::LoadWire)
    }

    pub(crate) fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == s)
    }
}

#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) duration: Duration,
    pub(crate) threads: Vec<usize>,
    pub(crate) ops: Vec<Op>,
    pub(crate) rounds: usize,
    pub(crate) smoke: bool,
    pub(crate) delete_rate: f64,
    /// `--soak SECS`: the soak mode instead of the comparison.
    pub(crate) soak: Option<Duration>,
    /// `--every SECS`: the soak's reporting interval.
    pub(crate) every: Duration,
}

impl Options {
    pub(crate) fn parse() -> Result<Options, BoxError> {
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
    pub(crate) fn pgbench_seconds(&self) -> u64 {
        (self.duration.as_secs_f64().ceil() as u64).max(1)
    }
}
