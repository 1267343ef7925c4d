//! Helpers, the results table, and the memory probes.

use super::*;

// ----- helpers ---------------------------------------------------------------

/// A field of /proc/self/status in kB (`VmRSS`, `VmHWM`) or a count (`Threads`).
pub(crate) fn proc_status(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub(crate) fn kb(key: &str) -> i64 {
    proc_status(key).map_or(-1, |v| v as i64)
}

/// `1234567.8` as `1,234,568`.
pub(crate) fn thousands(n: f64) -> String {
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

pub(crate) fn admin_client(url: &str) -> Result<postgres::Client, BoxError> {
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

pub(crate) fn wait_for_connections(store: &StateStore, n: u32) -> bool {
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
pub(crate) fn remaining(
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

pub(crate) fn checkpoint(admin: &mut postgres::Client) {
    // Needs superuser or pg_checkpoint; without it runs simply go on.
    let _ = admin.batch_execute("CHECKPOINT");
}

pub(crate) fn show(admin: &mut postgres::Client, setting: &str) -> String {
    admin
        .query_one(&format!("SHOW {setting}"), &[])
        .map(|row| row.get::<_, String>(0))
        .unwrap_or_else(|e| format!("? ({e})"))
}

// ----- the report ------------------------------------------------------------

pub(crate) struct Row {
    pub(crate) op: Op,
    pub(crate) threads: usize,
    pub(crate) lib: Vec<LibRun>,
    /// For transform_contended: successful writes/s (from the sequence).
    pub(crate) pg: Vec<Result<PgbenchRun, String>>,
    pub(crate) notes: Vec<String>,
    /// transform_contended: pgbench attempts that wrote nothing, of all.
    pub(crate) pg_conflicts: u64,
    pub(crate) pg_attempts: u64,
}

impl Row {
    pub(crate) fn best_lib(&self) -> Option<&LibRun> {
        self.lib
            .iter()
            .max_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()))
    }

    pub(crate) fn best_pg(&self) -> Option<&PgbenchRun> {
        self.pg
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max_by(|a, b| a.tps.total_cmp(&b.tps))
    }
}

pub(crate) const HEADER: [&str; 11] = [
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

pub(crate) fn row_cells(row: &Row) -> Vec<String> {
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

pub(crate) fn print_table(rows: &[Row]) {
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

pub(crate) struct Memory {
    pub(crate) first_store_kb: i64,
    pub(crate) store16_kb: i64,
    pub(crate) store16_threads: i64,
    pub(crate) store16_opened: bool,
    pub(crate) listener_kb: i64,
    pub(crate) subscribers_kb: i64,
    pub(crate) subscribers: usize,
}

/// VmRSS deltas, measured before the benchmark touches the heap. Every
/// measured object stays alive until the end, so no measurement reuses
/// memory another one freed.
pub(crate) fn measure_memory(connect: &ConnectOptions) -> Result<Memory, BoxError> {
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
