//! The `trebuchet-postgres` program, run as a new user would run it: the
//! built binary in an empty directory against a real server, checking
//! standard output, standard error and the exit code.

#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::Codec;

/// A password that must never be printed.
const SECRET: &str = "s3cret-Pw-4711";

/// What one run printed and how it ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code().expect("exited, not killed"),
            stdout: output.stdout,
            stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }

    /// Exits with `code` and one line on standard error, starting `error:`.
    #[track_caller]
    fn fails(self, code: i32) -> Run {
        assert_eq!(self.code, code, "{self:?}");
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "expected one line on stderr: {:?}",
            self.stderr
        );
        assert!(self.stderr.starts_with("error: "), "{:?}", self.stderr);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }
}

/// The program pointed at one test schema's table and channel, run in an
/// empty directory with no connection variables set.
struct Cli {
    dir: tempfile::TempDir,
    url: String,
    table: String,
    channel: String,
}

impl Cli {
    fn new(schema: &TestSchema) -> Cli {
        Cli::with_table(schema, &schema.table("actor_states"))
    }

    fn with_table(schema: &TestSchema, table: &str) -> Cli {
        Cli {
            dir: tempfile::tempdir().expect("a temporary directory"),
            url: TestDatabase::shared().url().to_owned(),
            table: table.to_owned(),
            channel: schema.channel(),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The bare program, in the empty directory, without connection settings.
    fn bare(&self) -> Command {
        support::bare(self.dir())
    }

    /// The program with `args`, then the URL, table and channel.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = self.bare();
        command.args(args).args([
            "--url",
            &self.url,
            "--table",
            &self.table,
            "--channel",
            &self.channel,
        ]);
        command
    }

    fn run(&self, args: &[&str]) -> Run {
        run(self.command(args), None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        run(self.command(args), Some(stdin))
    }
}

fn run(mut command: Command, stdin: Option<&[u8]>) -> Run {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start the program");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input).expect("write stdin");
    }
    Run::from(child.wait_with_output().expect("wait for the program"))
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// The test server's URL with [`SECRET`] as the password (a trust server
/// accepts and ignores it).
fn url_with_password() -> String {
    TestDatabase::shared()
        .url()
        .replacen("://postgres@", &format!("://postgres:{SECRET}@"), 1)
}

/// A running program whose standard output and error arrive line by line.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Running {
    fn start(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the program");
        let lines = |pipe: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().expect("stdout")));
        let stderr = lines(Box::new(child.stderr.take().expect("stderr")));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    #[track_caller]
    fn stderr_line(&self) -> String {
        self.stderr
            .recv_timeout(Duration::from_secs(60))
            .expect("a line on stderr within 60 s")
    }

    #[track_caller]
    fn stdout_json(&self) -> Value {
        let line = self
            .stdout
            .recv_timeout(Duration::from_secs(60))
            .expect("a line on stdout within 60 s");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Waits up to 60 s for the program to exit by itself.
    #[track_caller]
    fn wait(mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the program") {
                return status.code().expect("exited, not killed");
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the program did not exit within 60 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GameState {
    scores: std::collections::BTreeMap<String, i64>,
    round: u32,
    name: String,
}

fn game() -> GameState {
    GameState {
        scores: [("alice".to_owned(), 10), ("bob".to_owned(), -3)].into(),
        round: 7,
        name: "lobby".into(),
    }
}

// ----- actors ---------------------------------------------------------------

#[test]
fn put_then_get_round_trips_json_and_raw_bytes() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    let state = serde_json::to_string(&game()).unwrap();

    // From an argument, then from standard input; each prints the new sequence number.
    assert_eq!(cli.run(&["put", "room-1", &state]).ok().stdout(), "1\n");
    assert_eq!(
        cli.run_with_stdin(&["put", "room-1"], state.as_bytes())
            .ok()
            .stdout(),
        "2\n"
    );
    assert_eq!(
        cli.run_with_stdin(&["put", "room-1", "-"], state.as_bytes())
            .ok()
            .stdout(),
        "3\n"
    );
    // A program using the library reads what the command wrote...
    assert_eq!(store.load::<GameState>("room-1").unwrap(), Some(game()));
    // ...and the command reads what the library wrote.
    let mut other = game();
    other.round = 8;
    store.save("room-2", &other).unwrap();
    let got = cli.run(&["get", "room-2"]).ok();
    assert_eq!(got.json(), serde_json::to_value(&other).unwrap());
    assert!(
        got.stdout().contains("\n  \"round\": 8"),
        "indented: {got:?}"
    );
    let compact = cli.run(&["get", "room-2", "--compact"]).ok().stdout();
    assert_eq!(compact.lines().count(), 1);
    let meta = cli.run(&["get", "room-1", "--meta"]).ok().json();
    assert_eq!(meta["actor_id"], "room-1");
    assert_eq!(meta["sequence"], 3);
    assert_eq!(meta["state"], serde_json::to_value(game()).unwrap());
    assert!(meta["updated_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(cli.run(&["seq", "room-1"]).ok().stdout(), "3\n");

    // Raw bytes in and out, untouched.
    let bytes = b"\x00\x01binary\xff\n\x00";
    cli.run_with_stdin(&["put", "raw", "--raw"], bytes).ok();
    assert_eq!(
        store.raw().load("raw").unwrap().as_deref(),
        Some(&bytes[..])
    );
    assert_eq!(cli.run(&["get", "raw", "--raw"]).ok().stdout, bytes);
    // Bytes that are not CBOR say how to read them.
    let err = cli.run(&["get", "raw"]).fails(1);
    assert!(err.stderr.contains("--raw"), "{err:?}");
}

#[test]
fn the_json_codec_reads_and_writes_what_swift_would() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .codec(Codec::Json)
        .migrate(true)
        .build()
        .unwrap();
    let cli = Cli::new(&schema);
    let state = serde_json::to_string(&game()).unwrap();
    cli.run(&["put", "room", &state, "--codec", "json"]).ok();
    assert_eq!(store.load::<GameState>("room").unwrap(), Some(game()));
    let raw = store.raw().load("room").unwrap().unwrap();
    assert!(raw.starts_with(b"{"), "stored as JSON text");
    let got = cli.run(&["get", "room", "--codec", "json"]).ok();
    assert_eq!(got.json(), serde_json::to_value(game()).unwrap());
    // Read with the wrong codec: a one-line error that names the other one.
    let err = cli.run(&["get", "room"]).fails(1);
    assert!(err.stderr.contains("--codec json"), "{err:?}");
}

#[test]
fn conditional_puts_exit_3_on_a_conflict() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    assert_eq!(
        cli.run(&["put", "a", "1", "--if-absent"]).ok().stdout(),
        "1\n"
    );

    let err = cli.run(&["put", "a", "2", "--if-absent"]).fails(3);
    assert!(
        err.stderr.contains("expected absent, found sequence 1"),
        "{err:?}"
    );
    let err = cli.run(&["put", "a", "2", "--if-sequence", "5"]).fails(3);
    assert!(
        err.stderr.contains(
            "expected sequence 5, found sequence 1: read it again and retry with --if-sequence 1"
        ),
        "{err:?}"
    );
    let err = cli
        .run(&["put", "nobody", "2", "--if-sequence", "1"])
        .fails(3);
    assert!(err.stderr.contains("--if-absent"), "{err:?}");
    assert!(err.stdout.is_empty());
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));

    assert_eq!(
        cli.run(&["put", "a", "2", "--if-sequence", "1"])
            .ok()
            .stdout(),
        "2\n"
    );
    assert_eq!(store.load::<u32>("a").unwrap(), Some(2));
}

#[test]
fn missing_actors_exit_4() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    for args in [
        &["get", "ghost"][..],
        &["get", "ghost", "--raw"],
        &["seq", "ghost"],
        &["delete", "ghost"],
    ] {
        let err = cli.run(args).fails(4);
        assert!(err.stderr.contains("actor \"ghost\" not found"), "{err:?}");
        assert!(err.stdout.is_empty());
    }
    cli.run(&["delete", "ghost", "--missing-ok"]).ok();

    store.save("real", &1u8).unwrap();
    let deleted = cli.run(&["delete", "real"]).ok();
    assert!(deleted.stderr.contains("deleted actor \"real\""));
    assert!(!store.exists("real").unwrap());
    cli.run(&["get", "real"]).fails(4);
}

#[test]
fn ls_pages_in_a_stable_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    for id in ["room-3", "room-1", "player-1", "room-5", "room-2", "room-4"] {
        store.save(id, &1u8).unwrap();
    }
    assert_eq!(
        cli.run(&["ls"]).ok().stdout(),
        "player-1\nroom-1\nroom-2\nroom-3\nroom-4\nroom-5\n"
    );
    // One id per round trip gives the same list.
    assert_eq!(
        cli.run(&["ls", "--page-size", "1"]).ok().stdout(),
        "player-1\nroom-1\nroom-2\nroom-3\nroom-4\nroom-5\n"
    );
    assert_eq!(
        cli.run(&["ls", "--prefix", "room-"]).ok().stdout(),
        "room-1\nroom-2\nroom-3\nroom-4\nroom-5\n"
    );
    // A limited listing says where to go on, and going on continues it.
    let first = cli.run(&["ls", "--prefix", "room-", "--limit", "2"]).ok();
    assert_eq!(first.stdout(), "room-1\nroom-2\n");
    assert!(
        first.stderr.contains("continue with --after \"room-2\""),
        "{first:?}"
    );
    let rest = cli
        .run(&["ls", "--prefix", "room-", "--after", "room-2"])
        .ok();
    assert_eq!(rest.stdout(), "room-3\nroom-4\nroom-5\n");
    assert!(rest.stderr.is_empty(), "{rest:?}");

    let long = cli.run(&["ls", "-l", "--prefix", "player"]).ok().stdout();
    let lines: Vec<&str> = long.lines().collect();
    assert!(
        lines[0].contains("SEQUENCE") && lines[0].ends_with("ACTOR"),
        "{long}"
    );
    assert!(lines[1].ends_with("  player-1"), "{long}");
    let json = cli.run(&["ls", "--json", "--limit", "1"]).ok().json_lines();
    assert_eq!(json.len(), 1);
    assert_eq!(json[0]["actor_id"], "player-1");
    assert_eq!(json[0]["sequence"], 1);
    assert!(json[0]["size"].as_u64().unwrap() > 0);
}

// ----- watch ----------------------------------------------------------------

#[test]
fn watch_sees_a_put_from_another_process() {
    let schema = TestDatabase::shared().schema();
    let _store = schema.store();
    let cli = Cli::new(&schema);
    let watch = Running::start(cli.command(&["watch", "--count", "2"]));
    let ready = watch.stderr_line();
    assert!(ready.starts_with("watching"), "{ready}");

    cli.run(&["put", "room-1", "{\"round\":1}"]).ok();
    cli.run(&["delete", "room-1"]).ok();
    let saved = watch.stdout_json();
    assert_eq!(saved["type"], "change");
    assert_eq!(saved["actor_id"], "room-1");
    assert_eq!(saved["sequence"], 1);
    assert_eq!(saved["op"], "save");
    assert!(saved["timestamp"].as_str().unwrap().ends_with('Z'));
    let deleted = watch.stdout_json();
    assert_eq!(deleted["op"], "delete");
    assert_eq!(deleted["sequence"], 2);
    assert_eq!(watch.wait(), 0);
}

/// When its connection is cut, `watch` reconnects, prints a resync line, and
/// goes on; a watch of named actors prints their current versions instead.
#[test]
fn watch_reconnects_and_prints_resync() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    store.save("named", &1u8).unwrap();
    let all = Running::start(cli.command(&["watch"]));
    assert!(all.stderr_line().starts_with("watching"));
    let named = Running::start(cli.command(&["watch", "--actor", "named"]));
    assert!(named.stderr_line().starts_with("watching"));

    let listeners = store.stats().unwrap().listeners;
    assert_eq!(listeners.len(), 2, "{listeners:?}");
    let mut admin = schema.client().unwrap();
    for listener in &listeners {
        admin
            .execute(
                "SELECT pg_terminate_backend($1::INT4, 5000)",
                &[&listener.pid],
            )
            .unwrap();
    }
    // Written while both are disconnected or reconnecting.
    store.save("named", &2u8).unwrap();

    let mut line = all.stdout_json();
    while line["type"] == "change" {
        // A change that slipped in before the connection was cut.
        line = all.stdout_json();
    }
    assert_eq!(
        line,
        serde_json::json!({"type": "resync", "reason": "reconnected"})
    );
    let caught_up = loop {
        let line = named.stdout_json();
        if line["sequence"] == 2 {
            break line;
        }
    };
    assert_eq!(caught_up["actor_id"], "named");
    assert_eq!(caught_up["type"], "change");

    cli.run(&["put", "after", "1"]).ok();
    // "named" at 2 may come first, when it was written after the reconnect.
    let after = loop {
        let line = all.stdout_json();
        if line["actor_id"] != "named" {
            break line;
        }
    };
    assert_eq!(after["actor_id"], "after");
}

// ----- schema and deployment -------------------------------------------------

#[test]
fn migrate_print_needs_no_server() {
    let schema = TestDatabase::shared().schema();
    let cli = Cli::new(&schema);
    let mut command = cli.bare();
    command.args([
        "migrate",
        "--print",
        "--url",
        &format!("postgresql://127.0.0.1:{}/x", closed_port()),
        "--table",
        "game.rooms",
        "--channel",
        "room_changes",
    ]);
    let sql = run(command, None).ok().stdout();
    assert!(
        sql.contains("CREATE TABLE IF NOT EXISTS \"game\".\"rooms\""),
        "{sql}"
    );
    assert!(sql.contains("pg_notify('room_changes'"), "{sql}");
}

#[test]
fn migrate_partitions_and_partition_converts_a_table() {
    let schema = TestDatabase::shared().schema();
    let fresh = Cli::with_table(&schema, &schema.table("fresh"));
    let printed = fresh
        .run(&["migrate", "--print", "--partitions", "2"])
        .ok()
        .stdout();
    assert!(
        printed.contains("PARTITION BY HASH (actor_id)"),
        "{printed}"
    );
    assert!(
        printed.contains("FOR VALUES WITH (MODULUS 2, REMAINDER 1)"),
        "{printed}"
    );
    fresh.run(&["migrate", "--partitions", "4"]).ok();
    fresh.run(&["verify"]).ok();
    let refused = fresh.run(&["migrate", "--partitions", "8"]).fails(1);
    assert!(
        refused
            .stderr
            .contains("has 4 hash partitions, not the 8 asked for")
            && refused
                .stderr
                .contains("trebuchet-postgres partition --partitions 8"),
        "{refused:?}"
    );

    let store = schema.store();
    let cli = Cli::new(&schema);
    for n in 1..=3 {
        cli.run(&["put", &format!("room-{n}"), "{\"round\":1}"])
            .ok();
    }
    cli.run(&["put", "room-1", "{\"round\":2}"]).ok();
    let converted = cli.run(&["partition", "--partitions", "4"]).ok().stdout();
    assert_eq!(
        converted.trim(),
        format!(
            "converted {} from a plain table into 4 hash partitions by actor_id: 3 rows copied",
            store.table()
        )
    );
    assert_eq!(store.partitions().unwrap(), Some(4));
    assert_eq!(cli.run(&["seq", "room-1"]).ok().stdout().trim(), "2");
    cli.run(&["verify"]).ok();
    let again = cli.run(&["partition", "--partitions", "4"]).ok().stdout();
    assert!(again.contains("already has 4 hash partitions"), "{again}");
    for bad in ["0", "1025", "many"] {
        cli.run(&["partition", "--partitions", bad]).fails(2);
    }
}

#[test]
fn sweep_removes_expired_actors_for_cron() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    cli.run(&["put", "brief-1", "1", "--ttl", "0.3"]).ok();
    cli.run(&["put", "brief-2", "2", "--ttl", "0.3", "--if-absent"])
        .ok();
    cli.run(&["put", "kept", "3"]).ok();
    let mut client = schema.client().unwrap();
    common::wait_expired(&mut client, &store.table(), &["brief-1", "brief-2"]);
    cli.run(&["get", "brief-1"]).fails(4);
    let swept = cli.run(&["sweep", "--batch", "1"]).ok().stdout();
    assert_eq!(
        swept.trim(),
        format!(
            "removed 2 expired actors from {} in 3 batches",
            store.table()
        )
    );
    let none = cli.run(&["sweep"]).ok().stdout();
    assert!(none.starts_with("removed 0 expired actors"), "{none}");
    assert_eq!(store.count_actors("").unwrap(), 1);
    assert_eq!(cli.run(&["seq", "kept"]).ok().stdout().trim(), "1");
    let bad = cli.run(&["put", "x", "1", "--ttl", "0"]).fails(2);
    assert!(bad.stderr.contains("invalid ttl"), "{bad:?}");
    cli.run(&["sweep", "--batch", "0"]).fails(2);
    assert!(!store.exists("x").unwrap());
}

#[test]
fn purge_tombstones_forgets_actors_deleted_long_enough_ago() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    for id in ["old", "young"] {
        store.save(id, &1u32).unwrap();
        store.delete(id).unwrap();
    }
    schema
        .client()
        .unwrap()
        .batch_execute(&format!(
            "UPDATE {} SET deleted_at = deleted_at - INTERVAL '2 days' WHERE actor_id = 'old'",
            schema.table("actor_states_tombstones")
        ))
        .unwrap();
    let purged = cli
        .run(&["purge-tombstones", "--older-than", "1d"])
        .ok()
        .stdout();
    assert_eq!(
        purged.trim(),
        format!("purged 1 tombstone from {}", store.table())
    );
    assert_eq!(store.stats().unwrap().tombstones, 1);
    let again = cli
        .run(&["purge-tombstones", "--older-than", "86400"])
        .ok()
        .stdout();
    assert!(again.starts_with("purged 0 tombstones"), "{again}");
    for bad in ["soon", "-1d", "1w", "", "NaNs", "inf"] {
        let arg = format!("--older-than={bad}");
        let failed = cli.run(&["purge-tombstones", &arg]).fails(2);
        assert!(failed.stderr.contains("30d"), "{bad}: {failed:?}");
    }
    cli.run(&["purge-tombstones"]).fails(2);
    assert_eq!(store.stats().unwrap().tombstones, 1);
}

#[test]
fn verify_fails_on_a_table_whose_trigger_was_dropped() {
    let schema = TestDatabase::shared().schema();
    let cli = Cli::new(&schema);
    let migrated = cli.run(&["migrate"]).ok().stdout();
    assert!(
        migrated.starts_with("applied migrations 1, 2, 3, 4, 5 to"),
        "{migrated}"
    );
    assert!(cli
        .run(&["migrate"])
        .ok()
        .stdout()
        .ends_with("is up to date\n"));

    let good = cli.run(&["verify"]).ok().stdout();
    assert!(good.contains("ok    schema"), "{good}");
    assert!(good.contains("ok    notify"), "{good}");

    let mut admin = schema.client().unwrap();
    admin
        .batch_execute(&format!(
            "DROP TRIGGER actor_state_change_trigger ON \"{}\".actor_states",
            schema.name()
        ))
        .unwrap();
    let bad = cli.run(&["verify"]).fails(1);
    let report = bad.stdout();
    assert!(report.contains("FAIL  schema"), "{report}");
    assert!(
        report.contains("trigger actor_state_change_trigger is missing"),
        "{report}"
    );
    assert!(
        report.contains("run `trebuchet-postgres migrate`"),
        "{report}"
    );
    assert!(bad.stderr.contains("1 check failed"), "{bad:?}");

    let repaired = cli.run(&["migrate"]).ok().stdout();
    assert!(repaired.starts_with("repaired"), "{repaired}");
    cli.run(&["verify"]).ok();
}

#[test]
fn doctor_checks_a_deployment_and_says_what_to_fix() {
    let schema = TestDatabase::shared().schema();
    let cli = Cli::new(&schema);
    // Before migration: everything up to the schema is fine.
    let before = cli.run(&["doctor"]).fails(1);
    let report = before.stdout();
    for check in ["settings", "connect", "auth", "tls"] {
        assert!(report.contains(&format!("ok    {check}")), "{report}");
    }
    assert!(report.contains("FAIL  schema"), "{report}");
    assert!(report.contains("trebuchet-postgres migrate"), "{report}");

    cli.run(&["migrate"]).ok();
    let after = cli.run(&["doctor"]).ok().stdout();
    for check in [
        "settings",
        "connect",
        "auth",
        "tls",
        "schema",
        "privileges",
        "notify",
        "queue",
        "connections",
    ] {
        assert!(
            after.contains(&format!("ok    {check}")),
            "{check}: {after}"
        );
    }
    assert!(after.contains("from --url"), "{after}");

    // A server that is not there: the connect check fails with its fix.
    let mut command = cli.bare();
    command.args([
        "doctor",
        "--url",
        &format!("postgresql://postgres@127.0.0.1:{}/postgres", closed_port()),
    ]);
    let down = run(command, None).fails(1);
    assert!(down.stdout().contains("FAIL  connect"), "{down:?}");
    assert!(down.stdout().contains("pg_isready"), "{down:?}");
}

#[test]
fn stats_reports_the_seeds_monitoring_figures() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    for id in ["a", "b", "c"] {
        store.save(id, &id).unwrap();
    }
    store.delete("c").unwrap();
    let watch = Running::start(cli.command(&["watch"]));
    assert!(watch.stderr_line().starts_with("watching"));

    let text = cli.run(&["stats", "--window", "0"]).ok().stdout();
    for needle in [
        "table ",
        "size ",
        "actors           2 (1 deleted ids remembered)",
        "writes ",
        "listeners        1 on",
        "notify queue     0.0% full",
        "connections ",
        "pg_stat_statements is not installed",
        "pool ",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    let json = cli.run(&["stats", "--json", "--window", "0.2"]).ok().json();
    assert_eq!(json["actors"], 2);
    assert_eq!(json["tombstones"], 1);
    assert!(json["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(json["listeners"].as_array().unwrap().len(), 1);
    assert_eq!(json["window_seconds"], 0.2);
    assert!(json["writes_per_second"].is_number(), "{json}");
    assert_eq!(json["slow_statements"]["available"], false);
    assert!(json["slow_statements"]["reason"]
        .as_str()
        .unwrap()
        .contains("CREATE EXTENSION pg_stat_statements"));
    assert_eq!(json["max_connections"], 200);
}

// ----- export and import -----------------------------------------------------

#[test]
fn an_export_carries_times_to_live_and_an_import_restores_them() {
    let source_schema = TestDatabase::shared().schema();
    let cli = Cli::new(&source_schema);
    cli.run(&["migrate"]).ok();
    cli.run(&["put", "session", "1", "--ttl", "3600"]).ok();
    cli.run(&["put", "kept", "2"]).ok();
    let exported = cli.run(&["export"]).ok();
    let lines = exported.json_lines();
    let line = |id: &str| lines.iter().find(|l| l["actor_id"] == id).unwrap().clone();
    let expires = line("session")["expires_at"].as_str().unwrap().to_owned();
    assert!(
        line("kept").get("expires_at").is_none(),
        "an actor kept for good has no expires_at: {lines:?}"
    );

    let target_schema = TestDatabase::shared().schema();
    let target = Cli::new(&target_schema);
    target.run(&["migrate"]).ok();
    target.run_with_stdin(&["import"], &exported.stdout).ok();
    let again = target.run(&["export"]).ok().json_lines();
    let copied = again.iter().find(|l| l["actor_id"] == "session").unwrap();
    assert_eq!(copied["expires_at"], expires.as_str());
    assert_eq!(again, lines, "the copy exports as the original did");
}

#[test]
fn export_then_import_into_a_fresh_table_reproduces_every_row() {
    let source_schema = TestDatabase::shared().schema();
    let source = source_schema.store();
    for n in 0..5u32 {
        source.save("counter", &n).unwrap();
    }
    source.save("gone-and-back", &"first").unwrap();
    source.delete("gone-and-back").unwrap();
    source.save("gone-and-back", &"second").unwrap();
    source.raw().save("raw", b"\x00\xff\x00").unwrap();
    source.raw().save("empty", b"").unwrap();
    for n in 0..40 {
        source.save(&format!("bulk-{n:02}"), &n).unwrap();
    }
    let cli = Cli::new(&source_schema);

    let exported = cli.run(&["export"]).ok();
    assert_eq!(
        exported.stderr,
        "exported 44 actors from ".to_owned() + &source.table() + "\n"
    );
    assert!(!exported.stderr.contains('\u{1b}') && !exported.stderr.contains('\r'));
    let lines = exported.json_lines();
    assert_eq!(lines.len(), 44);
    assert_eq!(lines[0]["actor_id"], "bulk-00");
    let counter = lines.iter().find(|l| l["actor_id"] == "counter").unwrap();
    assert_eq!(counter["sequence"], 5);
    // Also to a file.
    cli.run(&["export", "-o", "actors.jsonl"]).ok();
    let file = cli.dir().join("actors.jsonl");
    assert_eq!(std::fs::read(&file).unwrap(), exported.stdout);

    // Into a fresh table, migrated first as a user would.
    let target_schema = TestDatabase::shared().schema();
    let target_table = target_schema.table("copy");
    let target = Cli::with_table(&target_schema, &target_table);
    target.run(&["migrate"]).ok();
    let imported = target
        .run(&["import", file.to_str().unwrap(), "--batch", "7"])
        .ok();
    assert!(
        imported.stderr.starts_with("imported 44 actors into"),
        "{imported:?}"
    );
    assert!(!imported.stderr.contains('\u{1b}'));
    let target_store = target_schema
        .store_builder()
        .table(target_table.clone())
        .build()
        .unwrap();
    let mut compared = 0;
    source
        .raw()
        .for_each("", |id, original| {
            let copy = target_store.raw().load_versioned(&id).unwrap().unwrap();
            assert_eq!(copy, original, "{id}");
            compared += 1;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(compared, 44);
    assert_eq!(target_store.count_actors("").unwrap(), 44);
    // The next write continues above the imported number.
    assert_eq!(target_store.save("counter", &99u32).unwrap(), 6);

    // Again from standard input: nothing to do but the one actor changed since.
    let again = target.run_with_stdin(&["import"], &exported.stdout);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(
        again
            .stderr
            .lines()
            .last()
            .unwrap()
            .starts_with("error: 1 actor was not imported"),
        "{again:?}"
    );
    assert!(
        again
            .stderr
            .contains("skipped \"counter\": the table holds sequence 6, line"),
        "{again:?}"
    );
    let summary = again.stderr.lines().nth(1).unwrap_or_default().to_owned();
    assert!(
        summary.contains("imported 0 actors") && summary.contains("skipped 43 already there"),
        "{again:?}"
    );
    // Without that actor, a rerun is a clean no-op.
    let without: Vec<u8> = exported
        .stdout()
        .lines()
        .filter(|l| !l.contains("\"counter\""))
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    let rerun = target.run_with_stdin(&["import"], &without).ok();
    assert!(
        rerun.stderr.contains("skipped 43 already there, 0 kept"),
        "{rerun:?}"
    );

    // A bad line stops the import and names the line.
    let bad = target
        .run_with_stdin(
            &["import"],
            b"{\"actor_id\":\"x\",\"sequence\":1,\"state\":\"AA==\"}\nnot json\n",
        )
        .fails(1);
    assert!(bad.stderr.contains("line 2: not an export line"), "{bad:?}");
    assert!(
        target_store.exists("x").unwrap(),
        "lines before the bad one go in"
    );
}

/// Piped, `export` and `import` print only their summaries (see above); on
/// a terminal they draw a progress bar. script(1) gives them one.
#[test]
fn progress_bars_are_drawn_on_a_terminal() {
    if !common::program_found("script", &["--version"], "bsdutils") {
        return;
    }
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    for n in 0..50 {
        store.save(&format!("actor-{n:02}"), &n).unwrap();
    }
    let cli = Cli::new(&schema);
    let on_a_terminal = |args: &str| {
        let line = format!(
            "'{}' {args} --url '{}' --table '{}' --channel '{}'",
            support::BIN,
            cli.url,
            cli.table,
            cli.channel
        );
        let mut command = Command::new("script");
        command
            .args(["-qec", &line, "/dev/null"])
            .current_dir(cli.dir());
        for key in support::CONNECTION_VARIABLES {
            command.env_remove(key);
        }
        let output = command
            .stdin(Stdio::null())
            .output()
            .expect("run script(1)");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let exported = on_a_terminal("export -o actors.jsonl");
    assert!(exported.contains("\u{1b}[2K"), "no bar drawn: {exported:?}");
    assert!(exported.contains("exported 50 actors"), "{exported:?}");
    let file = std::fs::read_to_string(cli.dir().join("actors.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 50);
    let imported = on_a_terminal("import actors.jsonl");
    assert!(imported.contains("\u{1b}[2K"), "no bar drawn: {imported:?}");
    assert!(
        imported.contains("skipped 50 already there"),
        "{imported:?}"
    );
}

// ----- usage, connection and configuration errors ----------------------------

#[test]
fn bad_arguments_exit_2_with_one_line() {
    let schema = TestDatabase::shared().schema();
    let cli = Cli::new(&schema);
    for args in [
        &["bogus"][..],
        &["get"],
        &["get", "a", "--bogus"],
        &["put", "a", "1", "--if-absent", "--if-sequence", "3"],
        &["put", "a", "1", "--if-sequence", "three"],
        &["get", "a", "--codec", "xml"],
        &["stats", "--window", "-1"],
        &["ls", "--page-size", "0"],
        &["ls", "--limit", "0"],
    ] {
        let err = run(
            {
                let mut c = cli.bare();
                c.args(args);
                c
            },
            None,
        )
        .fails(2);
        assert!(err.stderr.contains("--help`"), "{args:?}: {err:?}");
        assert!(err.stdout.is_empty(), "{args:?}");
    }
    // No subcommand: the help, on standard error.
    let bare = run(cli.bare(), None);
    assert_eq!(bare.code, 2);
    assert!(
        bare.stderr.contains("Usage: trebuchet-postgres"),
        "{bare:?}"
    );

    // Input rejected before anything is sent: exit 2 even with no server.
    let nowhere = format!("postgresql://postgres@127.0.0.1:{}/postgres", closed_port());
    for (args, needle) in [
        (&["put", "a", "{not json"][..], "not JSON"),
        (&["get", ""], "actor id is empty"),
        (&["get", "a", "--table", "bad-name"], "invalid table name"),
        (&["get", "a", "--channel", "no way"], "invalid channel name"),
    ] {
        let mut command = cli.bare();
        command.args(args).args(["--url", &nowhere]);
        let err = run(command, None).fails(2);
        assert!(err.stderr.contains(needle), "{args:?}: {err:?}");
    }
    let mut command = cli.bare();
    command.args(["get", "a", "--url", "postgresql://u@h:notaport/db"]);
    let err = run(command, None).fails(2);
    assert!(err.stderr.contains("invalid connection string"), "{err:?}");
}

#[test]
fn a_missing_server_exits_1_with_one_line_and_a_hint() {
    let schema = TestDatabase::shared().schema();
    let cli = Cli::new(&schema);
    let url = format!("postgresql://postgres@127.0.0.1:{}/postgres", closed_port());
    for args in [
        &["get", "a"][..],
        &["ls"],
        &["stats"],
        &["watch"],
        &["export"],
    ] {
        let mut command = cli.bare();
        command.args(args).args(["--url", &url]);
        let err = run(command, None).fails(1);
        assert!(
            err.stderr.contains("connection refused at 127.0.0.1:"),
            "{err:?}"
        );
        assert!(err.stderr.contains("pg_isready"), "{err:?}");
        assert!(err.stderr.contains("(settings from --url)"), "{err:?}");
        assert!(err.stdout.is_empty());
    }
    // The environment is used when nothing else says where to connect.
    let mut command = cli.bare();
    command.args(["get", "a"]).env("DATABASE_URL", &url);
    let err = run(command, None).fails(1);
    assert!(
        err.stderr.contains("(settings from DATABASE_URL)"),
        "{err:?}"
    );
    let mut command = cli.bare();
    command
        .args(["get", "a"])
        .env("POSTGRES_HOST", "127.0.0.1")
        .env("POSTGRES_PORT", closed_port().to_string());
    let err = run(command, None).fails(1);
    assert!(err.stderr.contains("POSTGRES_*"), "{err:?}");
}

#[test]
fn the_config_file_says_where_to_connect() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cli = Cli::new(&schema);
    // The seed's Fly.io file: other tools' keys are ignored.
    std::fs::write(
        cli.dir().join("trebuchet.yaml"),
        format!(
            "# trebuchet.yaml\nname: my-game-server\nversion: \"1\"\n\nstate:\n  type: postgresql\n  \
             connectionString: ${{DATABASE_URL}}\n  table: {}\n  channel: {}\n\nactors:\n  GameRoom:\n    \
             stateful: true\n    memory: 512\n",
            schema.table("actor_states"),
            schema.channel()
        ),
    )
    .unwrap();
    let mut command = cli.bare();
    command
        .args(["put", "from-config", "42"])
        .env("DATABASE_URL", TestDatabase::shared().url());
    run(command, None).ok();
    assert_eq!(store.load::<u32>("from-config").unwrap(), Some(42));
    let mut command = cli.bare();
    command
        .args(["doctor"])
        .env("DATABASE_URL", TestDatabase::shared().url());
    let doctor = run(command, None).ok().stdout();
    assert!(
        doctor.contains("from trebuchet.yaml, its connectionString"),
        "{doctor}"
    );

    // --config names another file.
    let other = cli.dir().join("other.yaml");
    std::fs::write(&other, "state:\n  connectionString: ${NOT_SET_ANYWHERE}\n").unwrap();
    let mut command = cli.bare();
    command.args(["ls", "--config", other.to_str().unwrap()]);
    let err = run(command, None).fails(1);
    assert!(
        err.stderr.contains(
            "line 2, state.connectionString: environment variable NOT_SET_ANYWHERE is not set"
        ),
        "{err:?}"
    );
}

#[test]
fn a_bad_config_file_names_the_key_and_the_line() {
    let schema = TestDatabase::shared().schema();
    let _store = schema.store();
    let cli = Cli::new(&schema);
    let path = cli.dir().join("trebuchet.yaml");
    for (yaml, needle) in [
        (
            "name: game\nstate:\n  type: postgresql\n  host: 127.0.0.1\n  prot: 5432\n",
            "trebuchet.yaml, line 5, state.prot: unknown key; did you mean `port`?",
        ),
        (
            "state:\n  type: postgresql\n  port: fivefourthree\n",
            "trebuchet.yaml, line 3, state.port: expected an integer",
        ),
        (
            "state:\n  type: postgresql\n  poolSize: [1, 2]\n",
            "trebuchet.yaml, line 3, state.poolSize: expected a single value, found a list",
        ),
        (
            "state:\n  host: [\n",
            "trebuchet.yaml, line 3: not valid YAML",
        ),
        ("name: game\n", "trebuchet.yaml: it has no `state:` section"),
    ] {
        std::fs::write(&path, yaml).unwrap();
        let err = run(
            {
                let mut c = cli.bare();
                c.args(["ls"]);
                c
            },
            None,
        )
        .fails(1);
        assert!(err.stderr.contains(needle), "{yaml:?}: {err:?}");
    }
    // --no-config skips it.
    let mut command = cli.command(&["ls", "--no-config"]);
    command.current_dir(cli.dir());
    run(command, None).ok();
}

/// Whatever the command and however it fails, the password is never
/// printed: not from --url, the config file or the environment.
#[test]
fn no_password_ever_appears_in_any_output() {
    let schema = TestDatabase::shared().schema();
    let mut cli = Cli::new(&schema);
    cli.url = url_with_password();
    assert!(
        cli.url.contains(SECRET),
        "the test server's URL takes a password"
    );
    let mut runs = vec![
        cli.run(&["migrate"]),
        cli.run(&["put", "a", "{\"x\":1}"]),
        cli.run(&["get", "a", "--meta"]),
        cli.run(&["put", "a", "2", "--if-absent"]),
        cli.run(&["get", "ghost"]),
        cli.run(&["ls", "-l"]),
        cli.run(&["seq", "a"]),
        cli.run(&["stats", "--window", "0"]),
        cli.run(&["stats", "--json", "--window", "0"]),
        cli.run(&["verify"]),
        cli.run(&["doctor"]),
        cli.run(&["export"]),
        cli.run_with_stdin(&["import"], b"{bad"),
        cli.run(&["watch", "--count", "0"]),
        cli.run(&["get", "a", "--table", "bad-name"]),
        cli.run(&["bogus-command"]),
    ];
    // Failing connections with the password in the URL.
    let port = closed_port();
    for url in [
        format!("postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres"),
        format!("postgresql://postgres:{SECRET}@127.0.0.1:notaport/postgres"),
        format!("postgresql://postgres:{SECRET}@127.0.0.1/postgres?sslmode=bogus"),
        format!("https://postgres:{SECRET}@127.0.0.1/postgres"),
        url_with_password().replacen("postgres:", "nobody:", 1),
        url_with_password().replacen("/postgres?", "/no_such_db?", 1),
    ] {
        for args in [&["get", "a"][..], &["doctor"]] {
            let mut command = cli.bare();
            command.args(args).args(["--url", &url]);
            runs.push(run(command, None));
        }
    }
    // From the environment and from a config file.
    let mut command = cli.bare();
    command
        .args(["doctor"])
        .env("POSTGRES_HOST", "127.0.0.1")
        .env("POSTGRES_PORT", port.to_string())
        .env("POSTGRES_PASSWORD", SECRET);
    runs.push(run(command, None));
    for yaml in [
        format!("state:\n  host: 127.0.0.1\n  port: {port}\n  password: {SECRET}\n"),
        format!("state:\n  password: {SECRET}\n  prot: 1\n"),
        format!("state:\n  password: [{SECRET}]\n"),
        format!("state:\n  connectionString: \"postgresql://u:{SECRET}@h:99999/db\"\n"),
        format!("state:\n  connectionString: \"hxxp://u:{SECRET}@h/db\"\n"),
    ] {
        std::fs::write(cli.dir().join("trebuchet.yaml"), yaml).unwrap();
        for args in [&["ls"][..], &["doctor"]] {
            let mut command = cli.bare();
            command.args(args);
            runs.push(run(command, None));
        }
    }
    let _ = std::fs::remove_file(cli.dir().join("trebuchet.yaml"));
    assert!(runs.iter().any(|r| r.code == 0));
    assert!(runs.iter().any(|r| r.code == 1));
    for r in &runs {
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(
            !out.contains(SECRET) && !r.stderr.contains(SECRET),
            "password printed: {r:?}"
        );
    }
}

#[test]
fn every_subcommand_has_help_that_names_the_exit_codes() {
    let top = run(
        {
            let mut c = Command::new(support::BIN);
            c.arg("--help");
            c
        },
        None,
    )
    .ok()
    .stdout();
    for needle in ["Exit codes:", "3  conflict", "4  not found", "DATABASE_URL"] {
        assert!(top.contains(needle), "{needle}: {top}");
    }
    for sub in [
        "migrate",
        "partition",
        "sweep",
        "verify",
        "doctor",
        "get",
        "put",
        "delete",
        "ls",
        "seq",
        "watch",
        "stats",
        "export",
        "import",
    ] {
        let help = run(
            {
                let mut c = Command::new(support::BIN);
                c.args([sub, "--help"]);
                c
            },
            None,
        )
        .ok()
        .stdout();
        assert!(
            help.contains(&format!("Usage: trebuchet-postgres {sub}")),
            "{sub}: {help}"
        );
        assert!(help.contains("Exit codes: 0 success"), "{sub}: {help}");
        assert!(help.contains("--url <URL>"), "{sub}: {help}");
    }
}
