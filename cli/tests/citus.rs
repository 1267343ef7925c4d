//! `doctor` and `stats` on a Citus cluster (a coordinator and two workers on
//! loopback): each worker sends the changes of its own shards, so each
//! needs a listener. Without the extension installed the test says it was
//! skipped and why (with `CI=true` it fails instead: `.ci/run` installs it).

#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::process::Output;
use std::time::Duration;

use trebuchet_postgres::quote_identifier;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};

/// `args`, then the coordinator's URL and the schema's table and channel.
fn run(db: &TestDatabase, schema: &TestSchema, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("a temporary directory");
    support::bare(dir.path())
        .args(args)
        .args([
            "--url",
            db.url(),
            "--table",
            &schema.table("actor_states"),
            "--channel",
            &schema.channel(),
        ])
        .output()
        .expect("the program runs")
}

/// `doctor`'s report, which must end in success.
fn doctor(db: &TestDatabase, schema: &TestSchema) -> String {
    let output = run(db, schema, &["doctor"]);
    let report = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{report}");
    report
}

#[test]
fn doctor_and_stats_check_that_every_worker_has_a_listener() {
    if !common::citus_found() {
        return;
    }
    let db = TestDatabase::citus_cluster(2).unwrap();
    let schema = db.schema();
    let store = schema.store();
    let report = doctor(&db, &schema);
    assert!(
        report.contains("ok    workers") && report.contains("no session listens"),
        "{report}"
    );

    // A session that listens on the coordinator alone misses the workers.
    let mut plain = db.connect_options().connect().unwrap();
    plain
        .batch_execute(&format!("LISTEN {}", quote_identifier(store.channel())))
        .unwrap();
    let report = doctor(&db, &schema);
    let warning = report
        .lines()
        .find(|l| l.starts_with("warn  workers"))
        .unwrap_or_else(|| panic!("no warning about the workers: {report}"));
    for worker in db.citus().unwrap().workers() {
        assert!(
            warning.contains(&format!("127.0.0.1:{}", worker.port())),
            "{warning}"
        );
    }
    drop(plain);

    // A listener built on the coordinator listens on every worker.
    let _listener = store.listener().unwrap();
    common::wait_until(
        "the listener listens on every worker",
        Duration::from_secs(60),
        || {
            let stats = store.stats().unwrap();
            stats
                .worker_listeners
                .iter()
                .all(|w| !w.listeners.is_empty())
        },
    );
    let report = doctor(&db, &schema);
    assert!(
        report.contains("ok    workers") && report.contains("every worker has a listener"),
        "{report}"
    );
    let stats = run(&db, &schema, &["stats", "--json"]);
    assert!(stats.status.success(), "{stats:?}");
    let json: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let workers = json["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{json}");
    for worker in workers {
        assert_eq!(worker["listeners"].as_array().unwrap().len(), 1, "{json}");
    }
}
