//! What the `trebuchet-postgres` program prints for a person when ids and
//! other text hold control characters: each id on one line, escaped, and no
//! terminal sequence reaching the terminal; and `put` refusing endless
//! standard input without reading it all.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::DEFAULT_MAX_STATE_SIZE;

/// Ids with a newline, a carriage return, a colour sequence, a bell and the
/// one-character CSI, each with how `ls` prints it; and printable Unicode,
/// printed as it is.
const IDS: [(&str, &str); 6] = [
    ("line\nbreak", "line\\nbreak"),
    ("carriage\rreturn", "carriage\\rreturn"),
    ("red\x1b[31mtext", "red\\u{1b}[31mtext"),
    ("bell\u{7}", "bell\\u{7}"),
    ("csi\u{9b}31m", "csi\\u{9b}31m"),
    ("café ☕ 部屋", "café ☕ 部屋"),
];

/// The program with `args`, then the URL, table and channel of `schema`,
/// in an empty directory with no connection variables set.
fn command(dir: &tempfile::TempDir, schema: &TestSchema, url: &str, args: &[&str]) -> Command {
    let mut command = support::bare(dir.path());
    command.args(args).args([
        "--url",
        url,
        "--table",
        &schema.table("actor_states"),
        "--channel",
        &schema.channel(),
    ]);
    command
}

/// Runs the program against the shared test server to its end, without
/// standard input.
fn run(dir: &tempfile::TempDir, schema: &TestSchema, args: &[&str]) -> Output {
    command(dir, schema, TestDatabase::shared().url(), args)
        .stdin(Stdio::null())
        .output()
        .expect("run the program")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("output is UTF-8")
}

/// Asserts that `output` holds no control character but the newlines that
/// end its lines, and no character that reorders text on screen.
#[track_caller]
fn assert_printable(what: &str, output: &str) {
    for line in output.lines() {
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{what} prints a control character: {line:?}"
        );
    }
}

#[test]
fn ls_prints_each_id_escaped_on_one_line() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let dir = tempfile::tempdir().unwrap();
    for (id, _) in IDS {
        store.save(id, &1u8).unwrap();
    }
    let mut expected: Vec<&str> = IDS.iter().map(|(_, shown)| *shown).collect();
    expected.sort_unstable();

    let listed = run(&dir, &schema, &["ls"]);
    assert!(listed.status.success(), "{listed:?}");
    let stdout = text(&listed.stdout);
    assert_printable("ls", &stdout);
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, expected, "{stdout:?}");

    let long = run(&dir, &schema, &["ls", "-l"]);
    assert!(long.status.success(), "{long:?}");
    let stdout = text(&long.stdout);
    assert_printable("ls -l", &stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1 + IDS.len(),
        "a header and a line per id: {stdout:?}"
    );
    for (_, shown) in IDS {
        assert!(
            lines
                .iter()
                .any(|line| line.ends_with(&format!("  {shown}"))),
            "{shown:?} in {stdout:?}"
        );
    }

    // A limited listing says where to go on, on one line.
    let limited = run(&dir, &schema, &["ls", "--limit", "1"]);
    assert!(limited.status.success(), "{limited:?}");
    let stderr = text(&limited.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert_printable("ls --limit", &stderr);

    // JSON is unchanged: each id exactly as stored.
    let json = run(&dir, &schema, &["ls", "--json"]);
    assert!(json.status.success(), "{json:?}");
    let stdout = text(&json.stdout);
    let mut ids: Vec<String> = stdout
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap();
            value["actor_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort_unstable();
    let mut stored: Vec<&str> = IDS.iter().map(|(id, _)| *id).collect();
    stored.sort_unstable();
    assert_eq!(ids, stored);
}

#[test]
fn get_and_delete_name_an_id_on_one_escaped_line() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let dir = tempfile::tempdir().unwrap();
    for (id, _) in IDS {
        let missing = run(&dir, &schema, &["get", id]);
        assert_eq!(missing.status.code(), Some(4), "{missing:?}");
        let stderr = text(&missing.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        assert_printable("get", &stderr);

        store.save(id, &serde_json::json!({"round": 1})).unwrap();
        let meta = run(&dir, &schema, &["get", id, "--meta", "--compact"]);
        assert!(meta.status.success(), "{meta:?}");
        let stdout = text(&meta.stdout);
        assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
        let value: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(value["actor_id"], id);

        let deleted = run(&dir, &schema, &["delete", id]);
        assert!(deleted.status.success(), "{deleted:?}");
        let stderr = text(&deleted.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        assert_printable("delete", &stderr);
    }
}

#[test]
fn watch_prints_each_change_on_one_json_line() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let dir = tempfile::tempdir().unwrap();
    // Every save, then one announce.
    let count = (IDS.len() + 1).to_string();
    let mut watch = command(
        &dir,
        &schema,
        TestDatabase::shared().url(),
        &["watch", "--count", &count],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start watch");
    let (tx, stderr_lines) = mpsc::channel();
    let stderr = watch.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = stderr_lines
        .recv_timeout(Duration::from_secs(20))
        .expect("watch says it is watching within 20 s");
    assert!(ready.starts_with("watching"), "{ready:?}");

    for (id, _) in IDS {
        store.save(id, &1u8).unwrap();
    }
    let (announced, _) = IDS[0];
    store.listener().unwrap().announce(announced).unwrap();
    let status = wait_for_exit(&mut watch, Duration::from_secs(30));
    assert!(status.success(), "watch ended with {status}");
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut watch.stdout.take().unwrap(), &mut stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        IDS.len() + 1,
        "one line per change: {stdout:?}"
    );
    for (line, (id, _)) in lines.iter().zip(IDS) {
        let value: Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["actor_id"], id);
        assert_eq!(value["op"], "save");
    }
    let value: Value = serde_json::from_str(lines[IDS.len()]).unwrap();
    assert_eq!(value["actor_id"], announced);
    assert_eq!(value["op"], "announce");
    assert_eq!(value["sequence"], 1);
}

/// Waits up to `bound` for `child` to exit; kills it and fails after that.
#[track_caller]
fn wait_for_exit(child: &mut Child, bound: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().expect("poll the program") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the program did not exit within {bound:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `text` with every byte but ASCII letters and digits percent-encoded, for
/// a URL.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A role's name is the database's text: `stats`, listing the sessions
/// listening on the channel, and `doctor`, connected as that role, print
/// it escaped.
#[test]
fn stats_and_doctor_escape_a_role_name() {
    let schema = TestDatabase::shared().schema();
    let _store = schema.store();
    let dir = tempfile::tempdir().unwrap();
    // Role names are per cluster: the schema's unique name keeps this one apart.
    let role = format!("{}\n\r\x1b[31m\u{7}\u{9b}", schema.name());
    let shown = format!("{}\\n\\r\\u{{1b}}[31m\\u{{7}}\\u{{9b}}", schema.name());
    let quoted = role.replace('"', "\"\"");
    let mut admin = schema.client().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{quoted}\" LOGIN; GRANT USAGE ON SCHEMA \"{s}\" TO \"{quoted}\"",
            s = schema.name()
        ))
        .unwrap();
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut options = schema.connect_options();
        options.user(&role);
        let listening = schema
            .store_builder()
            .connect_options(options)
            .build()
            .unwrap();
        let listener = listening.listener().unwrap();

        let stats = run(&dir, &schema, &["stats", "--window", "0"]);
        assert!(stats.status.success(), "{stats:?}");
        let stdout = text(&stats.stdout);
        assert_printable("stats", &stdout);
        assert!(stdout.contains(&shown), "{shown:?} in\n{stdout}");

        let url = TestDatabase::shared().url().replacen(
            "://postgres@",
            &format!("://{}@", percent_encoded(&role)),
            1,
        );
        let doctor = command(&dir, &schema, &url, &["doctor"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = text(&doctor.stdout);
        assert_printable("doctor", &stdout);
        assert!(stdout.contains(&shown), "{shown:?} in\n{stdout}");
        let stderr = text(&doctor.stderr);
        assert_printable("doctor", &stderr);
        listener.shutdown();
    }));
    admin
        .batch_execute(&format!(
            "DROP OWNED BY \"{quoted}\"; DROP ROLE \"{quoted}\""
        ))
        .unwrap();
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}

/// An error the server words, quoting what it was given, is escaped too.
#[test]
fn an_error_quoting_the_servers_text_is_one_escaped_line() {
    let schema = TestDatabase::shared().schema();
    let dir = tempfile::tempdir().unwrap();
    let url = TestDatabase::shared().url();
    let sep = if url.contains('?') { '&' } else { '?' };
    // The server refuses the session: invalid value for parameter "work_mem".
    let url = format!(
        "{url}{sep}options=-c%20work_mem%3D{}",
        percent_encoded("no\x1b[31mnumber\u{7}\u{9b}")
    );
    let refused = command(&dir, &schema, &url, &["ls"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = text(&refused.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert_printable("ls", &stderr);
    assert!(
        stderr.contains("no\\u{1b}[31mnumber\\u{7}\\u{9b}"),
        "{stderr:?}"
    );
}

/// `put` reads standard input up to the store's maximum and one byte more,
/// then refuses: input that never ends is cut off, not read to its end.
#[test]
fn put_refuses_endless_input_without_reading_it_all() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let dir = tempfile::tempdir().unwrap();
    for args in [&["put", "endless", "--raw"][..], &["put", "endless"][..]] {
        let mut put = command(&dir, &schema, TestDatabase::shared().url(), args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start put");
        // Writes until the program stops reading (the pipe breaks), or four
        // times the maximum: an unbounded read would take all of that.
        let cap = 4 * DEFAULT_MAX_STATE_SIZE;
        let mut stdin = put.stdin.take().unwrap();
        let writer = thread::spawn(move || {
            let chunk = vec![b' '; 64 * 1024];
            let mut written = 0;
            while written < cap {
                if stdin.write_all(&chunk).is_err() {
                    break;
                }
                written += chunk.len();
            }
            written
        });
        let status = wait_for_exit(&mut put, Duration::from_secs(120));
        let written = writer.join().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut put.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(
            written < cap,
            "{args:?} read all {written} bytes; it ended with {status}: {stderr}"
        );
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        assert!(
            stderr.contains(&format!(
                "over the store's maximum of {DEFAULT_MAX_STATE_SIZE} bytes"
            )),
            "{stderr:?}"
        );
        assert!(!store.exists("endless").unwrap());
    }
}
