//! `stats`: the seed's Monitoring section.

use std::io::{self, IsTerminal, Write};

use serde::Serialize;
use trebuchet_postgres::{ListenerSession, SlowStatements, StoreStats};

use crate::args::Stats;
use crate::fail::Failure;
use crate::output::{escape, size, timestamp};
use crate::settings::Settings;

pub fn stats(settings: &Settings, args: &Stats) -> Result<(), Failure> {
    let connected = settings.store()?;
    let store = &connected.store;
    if !args.window.is_zero() && io::stderr().is_terminal() {
        eprintln!(
            "measuring writes for {:.0} s (--window 0 skips it)...",
            args.window.as_secs_f64()
        );
    }
    let stats = store
        .stats_over(args.window)
        .map_err(|e| connected.fail(e))?;
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &as_json(&stats, store.pool().target()))
            .map_err(|e| Failure::from(std::io::Error::from(e)))?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &stats, store.pool().target())?;
    }
    out.flush()?;
    Ok(())
}

fn write_text(out: &mut impl Write, s: &StoreStats, target: &str) -> io::Result<()> {
    // Names of roles and applications, addresses and statements are the
    // database's text: escaped, as every value.
    let row =
        |out: &mut dyn Write, name: &str, value: &str| writeln!(out, "{name:<17}{}", escape(value));
    let layout = match s.partitions {
        Some(n) => format!(", {n} hash partitions"),
        None => String::new(),
    };
    row(out, "table", &format!("{} on {target}{layout}", s.table))?;
    row(
        out,
        "size",
        &format!("{} (with indexes and TOAST)", size(s.total_bytes)),
    )?;
    row(
        out,
        "actors",
        &format!("{} ({} deleted ids remembered)", s.actors, s.tombstones),
    )?;
    let since = s
        .writes_counted_since
        .map_or_else(|| "the statistics began".to_owned(), timestamp);
    let writes = match (s.writes_per_second, s.window, s.writes) {
        (Some(rate), Some(window), Some(total)) => format!(
            "{rate:.1}/s over {:.0} s ({total} since {since})",
            window.as_secs_f64()
        ),
        (_, _, Some(total)) => format!("{total} since {since}"),
        _ => "not counted: track_counts is off".to_owned(),
    };
    row(out, "writes", &writes)?;
    let vacuum = s.last_vacuum.map_or_else(
        || "never vacuumed".to_owned(),
        |t| format!("last vacuum {}", timestamp(t)),
    );
    match s.dead_rows {
        Some(dead) => row(out, "dead rows", &format!("{dead} ({vacuum})"))?,
        None => row(out, "dead rows", "not counted")?,
    }
    let autovacuum = s
        .last_autovacuum
        .map_or_else(|| "never".to_owned(), timestamp);
    let hot = s.hot_update_ratio.map_or_else(
        || "no updates yet".to_owned(),
        |r| format!("{:.0}% of updates HOT", r * 100.0),
    );
    row(out, "autovacuum", &format!("last {autovacuum}; {hot}"))?;
    let hidden = if s.hidden_sessions > 0 {
        format!(
            "; {} sessions of other roles are hidden (grant pg_read_all_stats)",
            s.hidden_sessions
        )
    } else {
        String::new()
    };
    row(
        out,
        "listeners",
        &format!("{} on {:?}{hidden}", s.listeners.len(), s.channel),
    )?;
    for l in &s.listeners {
        session(out, l)?;
    }
    for worker in &s.worker_listeners {
        let what = match &worker.error {
            Some(error) => format!("{}: not asked: {}", worker.node, escape(error)),
            None => format!("{}: {} listening", worker.node, worker.listeners.len()),
        };
        row(out, "on worker", &what)?;
        for l in &worker.listeners {
            session(out, l)?;
        }
    }
    row(
        out,
        "notify queue",
        &format!("{:.1}% full", s.notification_queue_usage * 100.0),
    )?;
    row(
        out,
        "connections",
        &format!(
            "{} of max_connections {}",
            s.server_connections, s.max_connections
        ),
    )?;
    match &s.slow_statements {
        SlowStatements::Found(found) if found.is_empty() => {
            row(out, "slow statements", "none recorded on this table")?
        }
        SlowStatements::Found(found) => {
            row(out, "slow statements", "mean ms   max ms    calls  query")?;
            for st in found {
                writeln!(
                    out,
                    "{:<17}{:>7.2} {:>8.2} {:>8}  {}",
                    "",
                    st.mean.as_secs_f64() * 1000.0,
                    st.max.as_secs_f64() * 1000.0,
                    st.calls,
                    escape(&one_line(&st.query, 100))
                )?;
            }
        }
        other => row(out, "slow statements", &other.to_string())?,
    }
    row(
        out,
        "pool",
        &format!(
            "{} open, {} idle, {} waits (this command's own pool)",
            s.pool.connections, s.pool.idle, s.pool.waits
        ),
    )
}

/// `stats --json`, in the order of the text output.
#[derive(Serialize)]
struct StatsJson<'a> {
    table: &'a str,
    server: &'a str,
    sampled_at: String,
    total_bytes: u64,
    actors: u64,
    tombstones: u64,
    writes: Option<u64>,
    writes_counted_since: Option<String>,
    writes_per_second: Option<f64>,
    window_seconds: Option<f64>,
    dead_rows: Option<u64>,
    last_vacuum: Option<String>,
    last_autovacuum: Option<String>,
    hot_update_ratio: Option<f64>,
    partitions: Option<u32>,
    channel: &'a str,
    listeners: Vec<ListenerJson<'a>>,
    /// On Citus, each worker's listeners; absent on one server.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    workers: Vec<WorkerJson<'a>>,
    hidden_sessions: u64,
    notification_queue_usage: f64,
    server_connections: u64,
    max_connections: u64,
    slow_statements: SlowJson<'a>,
    pool: PoolJson,
}

#[derive(Serialize)]
struct ListenerJson<'a> {
    pid: i32,
    user: Option<&'a str>,
    application_name: &'a str,
    client_addr: Option<&'a str>,
    since: Option<String>,
}

#[derive(Serialize)]
struct WorkerJson<'a> {
    node: &'a str,
    listeners: Vec<ListenerJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct SlowJson<'a> {
    available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    statements: Vec<StatementJson<'a>>,
}

#[derive(Serialize)]
struct StatementJson<'a> {
    query: &'a str,
    calls: u64,
    mean_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct PoolJson {
    connections: u32,
    idle: u32,
    max_size: u32,
    waits: u64,
    wait_seconds: f64,
    timeouts: u64,
}

fn as_json<'a>(s: &'a StoreStats, target: &'a str) -> StatsJson<'a> {
    let slow_statements = match &s.slow_statements {
        SlowStatements::Found(found) => SlowJson {
            available: true,
            reason: None,
            statements: found
                .iter()
                .map(|st| StatementJson {
                    query: &st.query,
                    calls: st.calls,
                    mean_ms: millis(st.mean),
                    max_ms: millis(st.max),
                })
                .collect(),
        },
        other => SlowJson {
            available: false,
            reason: Some(other.to_string()),
            statements: Vec::new(),
        },
    };
    StatsJson {
        table: &s.table,
        server: target,
        sampled_at: timestamp(s.sampled_at),
        total_bytes: s.total_bytes,
        actors: s.actors,
        tombstones: s.tombstones,
        writes: s.writes,
        writes_counted_since: s.writes_counted_since.map(timestamp),
        writes_per_second: s.writes_per_second,
        window_seconds: s.window.map(|w| w.as_secs_f64()),
        dead_rows: s.dead_rows,
        last_vacuum: s.last_vacuum.map(timestamp),
        last_autovacuum: s.last_autovacuum.map(timestamp),
        hot_update_ratio: s.hot_update_ratio,
        partitions: s.partitions,
        channel: &s.channel,
        listeners: s.listeners.iter().map(listener_json).collect(),
        workers: s
            .worker_listeners
            .iter()
            .map(|w| WorkerJson {
                node: &w.node,
                listeners: w.listeners.iter().map(listener_json).collect(),
                error: w.error.as_deref(),
            })
            .collect(),
        hidden_sessions: s.hidden_sessions,
        notification_queue_usage: s.notification_queue_usage,
        server_connections: s.server_connections,
        max_connections: s.max_connections,
        slow_statements,
        pool: PoolJson {
            connections: s.pool.connections,
            idle: s.pool.idle,
            max_size: s.pool.max_size,
            waits: s.pool.waits,
            wait_seconds: s.pool.wait_time.as_secs_f64(),
            timeouts: s.pool.timeouts,
        },
    }
}

/// One listening session, indented under its heading.
fn session(out: &mut impl Write, l: &ListenerSession) -> io::Result<()> {
    writeln!(
        out,
        "{:<17}pid {} {} {} from {} since {}",
        "",
        l.pid,
        escape(l.user.as_deref().unwrap_or("?")),
        if l.application_name.is_empty() {
            "-".into()
        } else {
            escape(&l.application_name)
        },
        escape(l.client_addr.as_deref().unwrap_or("local socket")),
        l.since.map_or_else(|| "?".to_owned(), timestamp)
    )
}

fn listener_json(l: &ListenerSession) -> ListenerJson<'_> {
    ListenerJson {
        pid: l.pid,
        user: l.user.as_deref(),
        application_name: &l.application_name,
        client_addr: l.client_addr.as_deref(),
        since: l.since.map(timestamp),
    }
}

/// Milliseconds to the microsecond, without binary fractions' noise.
fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A statement on one line, cut at `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max - 1).collect();
    format!("{cut}…")
}
