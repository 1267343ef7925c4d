//! Helpers shared by the integration tests.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::{TestCluster, TestDatabase, TestSchema};
use trebuchet_postgres::{Change, ChangeKind, Event, Subscription};

pub mod cut;
pub mod feed;
pub mod hold;
pub mod tls;

/// The time zone the "wrong time zone" tests put their sessions in: far
/// enough from UTC (4 or 5 hours) that a local-time bug cannot hide in the
/// tolerance below.
pub const NEW_YORK: &str = "America/New_York";

/// How far a server timestamp may be from the test's clock: far below the
/// hours a time zone mistake is off by, and far above how long a busy
/// machine may take between a save and the check of its timestamp.
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(600);

/// The shared test server's URL with the session `TimeZone` set to
/// `America/New_York` through libpq's `options` parameter.
pub fn new_york_url() -> String {
    let url = TestDatabase::shared().url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20TimeZone%3DAmerica%2FNew_York")
}

/// Asserts that `t` is within [`CLOCK_TOLERANCE`] of now.
#[track_caller]
pub fn assert_recent(what: &str, t: SystemTime) {
    let now = SystemTime::now();
    let off = now.duration_since(t).unwrap_or_else(|e| e.duration());
    assert!(
        off <= CLOCK_TOLERANCE,
        "{what} is {off:?} away from now ({t:?} vs {now:?}): stored in local time?"
    );
}

/// Asserts that `seconds` since the Unix epoch is within
/// [`CLOCK_TOLERANCE`] of now.
#[track_caller]
pub fn assert_recent_epoch(what: &str, seconds: f64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - seconds).abs() <= CLOCK_TOLERANCE.as_secs_f64(),
        "{what} is {seconds}, now is {now}: {} s off (local time?)",
        now - seconds
    );
}

/// The next notification on `client`, waiting up to `wait`. A fresh
/// `TimeoutIter` per call: one returns `None` for good after its first
/// timeout.
pub fn next_notification(
    client: &mut postgres::Client,
    wait: Duration,
) -> Option<postgres::Notification> {
    client
        .notifications()
        .timeout_iter(wait)
        .next()
        .expect("notification stream failed")
}

/// The next notification's channel and JSON payload, failing after 30 s.
#[track_caller]
pub fn next_payload(client: &mut postgres::Client) -> (String, serde_json::Value) {
    let n =
        next_notification(client, Duration::from_secs(30)).expect("no notification within 30 s");
    let payload = serde_json::from_str(n.payload())
        .unwrap_or_else(|e| panic!("payload {:?} is not JSON: {e}", n.payload()));
    (n.channel().to_owned(), payload)
}

/// Asserts that nothing more arrives within a short wait.
#[track_caller]
pub fn assert_no_notification(client: &mut postgres::Client) {
    if let Some(n) = next_notification(client, Duration::from_millis(300)) {
        panic!(
            "unexpected notification on {}: {}",
            n.channel(),
            n.payload()
        );
    }
}

/// Every embedded migration, in order: what a fresh table gets.
pub const ALL_VERSIONS: &[i32] = &[1, 2, 3, 4, 5];

/// A plain client whose `search_path` is the test schema only.
pub fn client_in(schema: &TestSchema) -> postgres::Client {
    let mut client = schema.client().unwrap();
    client
        .batch_execute(&format!("SET search_path TO \"{}\"", schema.name()))
        .unwrap();
    client
}

pub fn quoted_table(schema: &TestSchema, table: &str) -> String {
    format!("\"{}\".\"{table}\"", schema.name())
}

/// A game room's state: a map and a number, for the store's tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GameState {
    pub scores: std::collections::BTreeMap<String, i64>,
    pub round: u32,
}

/// A trust-authentication cluster for roles without passwords, shared by the
/// tests of a binary: the shared test cluster when there is one, otherwise a
/// cluster of the binary's own.
pub fn trust_cluster() -> &'static TestCluster {
    static OWN: OnceLock<TestCluster> = OnceLock::new();
    if let Some(cluster) = TestDatabase::shared().cluster() {
        return cluster;
    }
    OWN.get_or_init(|| TestCluster::start().expect("start a test cluster"))
}

/// A superuser connection to a cluster, for checks on the server side.
pub fn admin(cluster: &TestCluster) -> Client {
    let config: postgres::Config = cluster.url().parse().expect("cluster URL");
    config.connect(NoTls).expect("connect as postgres")
}

/// Replaces a cluster's `pg_hba.conf` (owned by the server's user, mode 0600)
/// and reloads the configuration.
pub fn rewrite_hba(cluster: &TestCluster, admin: &mut Client, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    let data = cluster.data_dir();
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&data).unwrap());
    let group = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&data).unwrap());
    let path = data.join("pg_hba.conf");
    std::fs::write(&path, contents).unwrap();
    std::os::unix::fs::chown(&path, Some(owner), Some(group)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let reloaded: bool = admin
        .query_one("SELECT pg_reload_conf()", &[])
        .unwrap()
        .get(0);
    assert!(reloaded);
}

/// Whether the environment variable `CI` is `true`. There a test that needs
/// a missing tool fails rather than skips: `.ci/run` installs every tool.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// What a test does about a tool it needs (a program, or a server feature
/// such as ICU collations): `found` says whether the tool is there. When it
/// is not, the test fails under `CI=true`; elsewhere this prints `skipped:
/// <tool> not found (install <package>)` to stderr and returns false, and
/// the test returns.
#[track_caller]
pub fn tool_found(found: bool, tool: &str, package: &str) -> bool {
    if found {
        return true;
    }
    let missing = format!("{tool} not found (install {package})");
    assert!(
        !in_ci(),
        "{missing}: with CI=true a missing tool fails the test (.ci/run installs it)"
    );
    eprintln!("skipped: {missing}");
    false
}

/// [`tool_found`] for the Citus extension, saying why when it is missing.
#[track_caller]
pub fn citus_found() -> bool {
    let installed = trebuchet_postgres::testing::citus_installed();
    let found = tool_found(
        installed.is_ok(),
        "the Citus extension",
        "../shared/citus/build.sh",
    );
    if let (false, Err(why)) = (found, &installed) {
        eprintln!("{why}");
    }
    found
}

/// [`tool_found`] for a program: whether `program args` runs and succeeds
/// (`args` asks for its version, say).
#[track_caller]
pub fn program_found(program: &str, args: &[&str], package: &str) -> bool {
    let runs = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    tool_found(runs, program, package)
}

/// Polls `done` every 20 ms until it holds, failing after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the server's clock has passed the expiry of each of `ids` in
/// `table` (a quoted, qualified name), failing after 30 s: a state saved
/// with a time to live reads as absent from then on.
#[track_caller]
pub fn wait_expired(client: &mut Client, table: &str, ids: &[&str]) {
    let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    let sql = format!(
        "SELECT count(*) FROM {table} \
         WHERE actor_id = ANY($1) AND (expires_at IS NULL OR expires_at > (now() AT TIME ZONE 'UTC'))"
    );
    wait_until(
        &format!("{ids:?} in {table} expire"),
        Duration::from_secs(30),
        || {
            let live: i64 = client
                .query_one(&sql, &[&ids])
                .expect("read expires_at")
                .get(0);
            live == 0
        },
    );
}

/// Runs `f` on a thread of its own and returns what it returned and how long
/// it took, failing when it has not returned after `bound`.
#[track_caller]
pub fn returns_within<T: Send + 'static>(
    what: &str,
    bound: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let value = f();
        let _ = tx.send((value, started.elapsed()));
    });
    let got = rx
        .recv_timeout(bound)
        .unwrap_or_else(|_| panic!("{what} did not return within {bound:?}"));
    worker.join().expect("the call's thread");
    got
}

/// Locks the rows of `ids` in `table` (a quoted, qualified name) in a
/// transaction on a connection of its own, and returns that connection,
/// still in its transaction: `ROLLBACK` on it (when a fault left it alive)
/// lets writes to those rows go on. It has another application name than
/// the store's, so a test that terminates the store's backends spares it.
#[track_caller]
pub fn lock_rows(url: &str, table: &str, ids: &[String]) -> Client {
    let mut locker = Client::connect(url, NoTls).expect("a connection to hold row locks");
    locker.batch_execute("BEGIN").expect("begin");
    locker
        .execute(
            &format!("SELECT 1 FROM {table} WHERE actor_id = ANY($1) FOR UPDATE"),
            &[&ids],
        )
        .expect("lock the rows");
    locker
}

/// Waits (up to 60 s) until at least `waiting` backends of a store
/// (application `trebuchet-postgres`) wait on a lock: their writes are in
/// flight, so that a fault now cuts them for sure.
#[track_caller]
pub fn wait_for_writes_on_locks(url: &str, waiting: i64) {
    let mut watcher = Client::connect(url, NoTls).expect("a connection to watch the locks");
    wait_until(
        &format!("{waiting} writes wait on a lock"),
        Duration::from_secs(60),
        || {
            let n: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND application_name = 'trebuchet-postgres'",
                    &[],
                )
                .expect("read pg_stat_activity")
                .get(0);
            n >= waiting
        },
    );
}

/// Waits (up to 60 s) until some server process waits for a lock that the
/// process `pid` holds, or until `done` holds (the operation under test
/// returned without waiting).
#[track_caller]
pub fn wait_for_a_waiter(observer: &mut Client, pid: i32, done: impl Fn() -> bool) {
    wait_until(
        &format!("something waits for the lock of process {pid}"),
        Duration::from_secs(60),
        || {
            let waiting: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    &[&pid],
                )
                .expect("read pg_stat_activity")
                .get(0);
            waiting > 0 || done()
        },
    );
}

/// A name unique to this process and call (and, by a random part, to this
/// process among others on a shared server), for tables, channels and
/// application names.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// Asserts that the next event, within 60 s, is a change of `actor` to
/// `sequence` of `kind`, and returns it.
#[track_caller]
pub fn expect_change(
    sub: &Subscription,
    actor: &str,
    sequence: u64,
    kind: ChangeKind,
) -> Arc<Change> {
    match sub.recv_timeout(Duration::from_secs(60)) {
        Ok(Event::Change(c)) => {
            assert_eq!(
                (c.actor_id.as_str(), c.sequence, c.kind),
                (actor, sequence, kind),
                "{c:?}"
            );
            c
        }
        other => panic!("expected a change of {actor:?}, got {other:?}"),
    }
}

/// Arguments for the parameters of one of the store's point statements
/// (`testing::point_statements`), by their types: `id` for text, `state`
/// for bytea, `number` for int8. For `EXPLAIN` of the statements.
pub fn point_arguments<'a>(
    name: &str,
    types: &[postgres::types::Type],
    id: &'a String,
    state: &'a Vec<u8>,
    number: &'a Option<i64>,
) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    types
        .iter()
        .map(|ty| -> &(dyn postgres::types::ToSql + Sync) {
            match ty.name() {
                "varchar" | "text" => id,
                "bytea" => state,
                "int8" => number,
                other => panic!("{name}: unexpected parameter type {other}"),
            }
        })
        .collect()
}

/// Every actor whose id starts with `prefix`, as `raw().for_each` walks
/// them: in key order, with their versions.
pub fn export(
    store: &trebuchet_postgres::StateStore,
    prefix: &str,
) -> Vec<(String, trebuchet_postgres::Versioned<Vec<u8>>)> {
    let mut exported = Vec::new();
    store
        .raw()
        .for_each(prefix, |id, v| {
            exported.push((id, v));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    exported
}
