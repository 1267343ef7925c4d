//! The schema and the deployment: `migrate`, `verify` and `doctor`.

use std::io::{self, Write};
use std::time::Duration;

use trebuchet_postgres::postgres::config::Host;
use trebuchet_postgres::{
    quote_identifier, ConnectFailure, Error, SslMode, StateStore, StoreStats, VerifyReport,
};

use crate::args::{Doctor, Migrate, Partition, Verify};
use crate::fail::Failure;
use crate::output::escape;
use crate::settings::{describe, ssl_mode_name, Settings};

pub fn migrate(settings: &Settings, args: &Migrate) -> Result<(), Failure> {
    if args.print {
        let mut builder = StateStore::builder()
            .table(settings.table.clone())
            .channel(settings.channel.clone());
        if let Some(partitions) = args.partitions {
            builder = builder.partitions(partitions);
        }
        let sql = builder.migration_sql()?;
        let mut out = io::stdout().lock();
        out.write_all(sql.as_bytes())?;
        out.flush()?;
        return Ok(());
    }
    let connected = match args.partitions {
        Some(partitions) => settings.store_with(|b| b.partitions(partitions))?,
        None => settings.store()?,
    };
    let store = &connected.store;
    let fail = |e| connected.fail(e);
    let before = store.verify().map_err(fail)?;
    let applied = store.migrate().map_err(fail)?;
    let after = store.verify().map_err(fail)?;
    let mut out = io::stdout().lock();
    let table = store.table();
    if !applied.is_empty() {
        let versions: Vec<String> = applied.iter().map(i32::to_string).collect();
        writeln!(
            out,
            "applied migration{} {} to {table} (channel {:?})",
            if versions.len() == 1 { "" } else { "s" },
            versions.join(", "),
            store.channel()
        )?;
    } else if !before.is_ok() && after.is_ok() {
        writeln!(out, "repaired {table}:")?;
        for problem in &before.problems {
            // What was wrong, without the fix that was just applied.
            let text = problem.to_string();
            let what = text
                .split_once(": ")
                .map_or(text.as_str(), |(what, _)| what);
            writeln!(out, "- {}", escape(what))?;
        }
    } else {
        writeln!(out, "{table} is up to date")?;
    }
    if !after.is_ok() {
        for problem in &after.problems {
            writeln!(out, "- {}", escape(&problem_text(problem)))?;
        }
        return Err(Failure::error(format!(
            "{table} still has {} after migrating",
            count(after.problems.len(), "problem")
        )));
    }
    Ok(())
}

pub fn partition(settings: &Settings, args: &Partition) -> Result<(), Failure> {
    let connected = settings.store()?;
    let store = &connected.store;
    let done = store
        .partition_table(args.partitions)
        .map_err(|e| connected.fail(e))?;
    let table = store.table();
    let mut out = io::stdout().lock();
    if !done.changed {
        writeln!(
            out,
            "{table} already has {} hash partitions: nothing to do",
            done.partitions
        )?;
        return Ok(());
    }
    let from = match done.previous {
        Some(n) => format!("{n} hash partitions"),
        None => "a plain table".to_owned(),
    };
    writeln!(
        out,
        "converted {table} from {from} into {} hash partitions by actor_id: {} rows copied",
        done.partitions, done.rows
    )?;
    Ok(())
}

pub fn verify(settings: &Settings, args: &Verify) -> Result<(), Failure> {
    let connected = settings.store()?;
    let store = &connected.store;
    let mut list = Checklist::new();
    let report = store.verify().map_err(|e| connected.fail(e))?;
    schema_checks(&mut list, store, &report)?;
    if report.is_ok() {
        round_trip(&mut list, store, args.timeout)?;
    } else {
        list.skip("notify", "needs the schema")?;
    }
    list.finish()
}

pub fn doctor(settings: &Settings, args: &Doctor) -> Result<(), Failure> {
    let mut list = Checklist::new();
    let (builder, source) = match settings.builder() {
        Ok(found) => found,
        Err(failure) => {
            list.fail("settings", &failure.to_string())?;
            return list.finish();
        }
    };
    let (options, _) = settings.connect_options()?;
    list.ok(
        "settings",
        &format!(
            "{} from {source}; table {:?}, channel {:?}",
            describe(&options),
            settings.table,
            settings.channel
        ),
    )?;
    let store = match builder.build() {
        Ok(store) => store,
        Err(error) => {
            let (check, reached) = match &error {
                Error::Connect { failure, .. } => match failure {
                    ConnectFailure::AuthenticationFailed => ("auth", true),
                    ConnectFailure::DatabaseMissing => ("database", true),
                    ConnectFailure::Tls => ("tls", true),
                    _ => ("connect", false),
                },
                Error::Tls(_) => ("tls", false),
                e if e.is_invalid_input() => ("settings", false),
                _ => ("connect", false),
            };
            if reached {
                list.ok("connect", &format!("{} answers", options.target()))?;
            }
            list.fail(check, &Failure::from_store(error, &source).to_string())?;
            list.skip("the rest", "needs a connection")?;
            return list.finish();
        }
    };
    let info = store
        .connection_info()
        .map_err(|e| Failure::from_store(e, &source))?;
    list.ok(
        "connect",
        &format!("{}, PostgreSQL {}", options.target(), info.server_version),
    )?;
    list.ok(
        "auth",
        &format!("as {:?}, database {:?}", info.user, info.database),
    )?;
    match (&info.tls, options.get_ssl_mode()) {
        (Some(tls), _) => list.ok("tls", tls)?,
        (None, _) if is_local(&options) => list.ok("tls", "not encrypted (a local connection)")?,
        (None, SslMode::Disable) => list.warn(
            "tls",
            "not encrypted (sslmode=disable): use sslmode=verify-full across a network",
        )?,
        (None, SslMode::Allow) => list.warn(
            "tls",
            "not encrypted: sslmode=allow uses TLS only when the server refuses plain text; \
             use sslmode=verify-full across a network",
        )?,
        (None, mode) => list.warn(
            "tls",
            &format!(
                "not encrypted: the server offers no TLS and sslmode={} allows that; enable ssl \
                 on the server and use sslmode=verify-full",
                ssl_mode_name(mode)
            ),
        )?,
    }
    let report = store
        .verify()
        .map_err(|e| Failure::from_store(e, &source))?;
    schema_checks(&mut list, &store, &report)?;
    let lacking: Vec<(&[&str], String)> = [
        (&info.missing_privileges[..], store.table()),
        (
            &info.missing_tombstone_privileges[..],
            info.tombstone_table.clone(),
        ),
    ]
    .into_iter()
    .filter(|(missing, _)| !missing.is_empty())
    .collect();
    if !lacking.is_empty() {
        let what: Vec<String> = lacking
            .iter()
            .map(|(missing, table)| format!("{} on {table}", missing.join(", ")))
            .collect();
        let grants: Vec<String> = lacking
            .iter()
            .map(|(missing, table)| {
                format!(
                    "GRANT {} ON {table} TO {}",
                    missing.join(", "),
                    quote_identifier(&info.user)
                )
            })
            .collect();
        list.fail(
            "privileges",
            &format!(
                "{:?} lacks {}: {}",
                info.user,
                what.join(" and "),
                grants.join("; ")
            ),
        )?;
    } else if info.table_exists {
        list.ok(
            "privileges",
            "SELECT, INSERT, UPDATE and DELETE on the table; SELECT, INSERT and UPDATE on its tombstones",
        )?;
    }
    if report.is_ok() {
        round_trip(&mut list, &store, args.timeout)?;
        let stats = store.stats().map_err(|e| Failure::from_store(e, &source))?;
        let queue = stats.notification_queue_usage * 100.0;
        if queue >= 50.0 {
            list.warn(
                "queue",
                &format!(
                    "the notification queue is {queue:.0}% full: a listening session stopped \
                     reading (`trebuchet-postgres stats` lists the listeners); at 100% every \
                     write fails"
                ),
            )?;
        } else {
            list.ok(
                "queue",
                &format!(
                    "notification queue {queue:.1}% full; {} listening on {:?}",
                    count(stats.listeners.len(), "session"),
                    store.channel()
                ),
            )?;
        }
        let used = stats.server_connections as f64 / stats.max_connections.max(1) as f64;
        let detail = format!(
            "{} of max_connections {} in use",
            stats.server_connections, stats.max_connections
        );
        if used >= 0.8 {
            list.warn(
                "connections",
                &format!(
                    "{detail}: share one pool per process, lower pool sizes, raise \
                     max_connections, or put PgBouncer in front"
                ),
            )?;
        } else {
            list.ok("connections", &detail)?;
        }
        worker_listeners(&mut list, &stats)?;
    }
    list.finish()
}

/// On Citus, whether every worker has a listener: each worker sends the
/// changes of its own shards. Nothing on one server.
fn worker_listeners(list: &mut Checklist, stats: &StoreStats) -> Result<(), Failure> {
    let workers = &stats.worker_listeners;
    if workers.is_empty() {
        return Ok(());
    }
    for worker in workers {
        if let Some(error) = &worker.error {
            list.warn(
                "workers",
                &format!("the coordinator could not ask {}: {error}", worker.node),
            )?;
        }
    }
    let asked: Vec<_> = workers.iter().filter(|w| w.error.is_none()).collect();
    let deaf: Vec<&str> = asked
        .iter()
        .filter(|w| w.listeners.is_empty())
        .map(|w| w.node.as_str())
        .collect();
    let anywhere = !stats.listeners.is_empty() || asked.iter().any(|w| !w.listeners.is_empty());
    if deaf.is_empty() {
        let each: Vec<String> = asked
            .iter()
            .map(|w| format!("{} on {}", count(w.listeners.len(), "session"), w.node))
            .collect();
        list.ok(
            "workers",
            &format!("every worker has a listener: {}", each.join(", ")),
        )
    } else if !anywhere {
        list.ok(
            "workers",
            &format!(
                "{}; no session listens on {:?} yet",
                count(workers.len(), "worker"),
                stats.channel
            ),
        )
    } else {
        list.warn(
            "workers",
            &format!(
                "no session listens on {:?} on {}: the changes of the actors whose shards are \
                 there reach no listener. A ChangeListener built on the coordinator listens on \
                 every worker; a session that runs LISTEN on the coordinator alone hears only \
                 the changes announced there",
                stats.channel,
                deaf.join(", ")
            ),
        )
    }
}

/// One line per schema problem, or one `ok` line.
fn schema_checks(
    list: &mut Checklist,
    store: &StateStore,
    report: &VerifyReport,
) -> Result<(), Failure> {
    if report.is_ok() {
        return list.ok(
            "schema",
            &format!(
                "table {}, its columns, tombstones, notification function and trigger \
                 (insert, update, delete) on channel {:?}",
                store.table(),
                store.channel()
            ),
        );
    }
    for problem in &report.problems {
        list.fail("schema", &problem_text(problem))?;
    }
    Ok(())
}

fn round_trip(list: &mut Checklist, store: &StateStore, timeout: Duration) -> Result<(), Failure> {
    match store.notify_round_trip(timeout) {
        Ok(Some(rtt)) => list.ok(
            "notify",
            &format!(
                "a probe on {:?} came back in {:.1} ms",
                store.channel(),
                rtt.as_secs_f64() * 1000.0
            ),
        ),
        Ok(None) => list.fail(
            "notify",
            &format!(
                "no probe came back on {:?} within {:.0} s: LISTEN needs a session-level \
                 connection (not PgBouncer in transaction mode), and a full notification queue \
                 blocks NOTIFY (`trebuchet-postgres stats`)",
                store.channel(),
                timeout.as_secs_f64()
            ),
        ),
        Err(e) => list.fail("notify", &Failure::from(e).to_string()),
    }
}

/// A problem's message with this program's fixes in place of the library's.
fn problem_text(problem: &impl std::fmt::Display) -> String {
    problem
        .to_string()
        .replace(
            "run StateStore::migrate() or apply sql/schema.sql",
            "run `trebuchet-postgres migrate`",
        )
        .replace(
            "StateStore::migration_sql()",
            "`trebuchet-postgres migrate --print`",
        )
}

fn is_local(options: &trebuchet_postgres::ConnectOptions) -> bool {
    options.get_hosts().iter().all(|host| match host {
        Host::Tcp(name) => matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1"),
        Host::Unix(_) => true,
    })
}

fn count(n: usize, what: &str) -> String {
    crate::output::count(n as u64, what)
}

/// `ok`, `warn`, `FAIL` and `skip` lines on standard output, flushed as they
/// come; a failure at the end when any check failed.
struct Checklist {
    failed: usize,
}

impl Checklist {
    fn new() -> Self {
        Checklist { failed: 0 }
    }

    fn line(&mut self, status: &str, check: &str, detail: &str) -> Result<(), Failure> {
        let mut out = io::stdout().lock();
        writeln!(out, "{status:<4}  {check:<11}  {}", escape(detail))?;
        out.flush()?;
        Ok(())
    }

    fn ok(&mut self, check: &str, detail: &str) -> Result<(), Failure> {
        self.line("ok", check, detail)
    }

    fn warn(&mut self, check: &str, detail: &str) -> Result<(), Failure> {
        self.line("warn", check, detail)
    }

    fn fail(&mut self, check: &str, detail: &str) -> Result<(), Failure> {
        self.failed += 1;
        self.line("FAIL", check, detail)
    }

    fn skip(&mut self, check: &str, detail: &str) -> Result<(), Failure> {
        self.line("skip", check, detail)
    }

    fn finish(self) -> Result<(), Failure> {
        if self.failed == 0 {
            return Ok(());
        }
        Err(Failure::error(format!(
            "{} failed; each FAIL line above says what to do",
            count(self.failed, "check")
        )))
    }
}
