//! Migrations, `verify`, and custom tables with objects and a channel of
//! their own.
//!
//! Compatibility with the seed's schema and the notifications the trigger
//! sends are in tests/wire_compatible_with_the_seed.rs.

mod common;

use common::{client_in, quoted_table, ALL_VERSIONS};

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};

use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{Error, ErrorKind, Expected, Problem, StateStore, WriteOptions};

fn trigger_missing() -> Problem {
    Problem::TriggerMissing {
        trigger: "actor_state_change_trigger".into(),
    }
}

fn function_missing() -> Problem {
    Problem::FunctionMissing {
        function: "notify_actor_state_change".into(),
    }
}

/// Drops a schema the test created itself (not a `TestSchema`).
struct DropSchema<'a>(&'a TestSchema, String);

impl Drop for DropSchema<'_> {
    fn drop(&mut self) {
        if let Ok(mut client) = self.0.client() {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.1));
        }
    }
}

// ----- migrate ---------------------------------------------------------------

#[test]
fn migrate_is_idempotent_and_records_its_version() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store_builder().build().unwrap();
    assert_eq!(store.migrate().unwrap(), ALL_VERSIONS);
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    // Another store on the same table finds nothing to do either.
    schema.store_builder().migrate(true).build().unwrap();
    assert_eq!(schema.store().migrate().unwrap(), Vec::<i32>::new());

    let rows = schema
        .client()
        .unwrap()
        .query(
            &format!(
                "SELECT table_name, version, description FROM \"{}\".trebuchet_schema_migrations ORDER BY version",
                schema.name()
            ),
            &[],
        )
        .unwrap();
    let rows: Vec<(String, i32, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows.len(), ALL_VERSIONS.len(), "{rows:?}");
    for (row, version) in rows.iter().zip(ALL_VERSIONS) {
        assert_eq!(row.0, store.table());
        assert_eq!(row.1, *version);
        assert!(!row.2.is_empty());
    }

    // The data survives a repeated migrate.
    store.save("a", &1u32).unwrap();
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));
    assert!(store.verify().unwrap().is_ok());
}

/// Eight stores (eight pools, as eight processes would have) migrate a
/// schema that does not exist yet at the same moment: all succeed, exactly
/// one applies the migrations.
#[test]
fn concurrent_migrations_on_a_fresh_schema_all_succeed() {
    const THREADS: usize = 8;
    let schema = TestDatabase::shared().schema();
    let fresh = format!("{}_fresh", schema.name());
    let _drop = DropSchema(&schema, fresh.clone());
    let table = format!("{fresh}.actor_states");
    let stores: Vec<StateStore> = (0..THREADS)
        .map(|_| schema.store_builder().table(table.clone()).build().unwrap())
        .collect();
    assert_eq!(
        stores[0].verify().unwrap().problems,
        vec![Problem::TableMissing {
            table: format!("\"{fresh}\".\"actor_states\"")
        }]
    );
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = stores
        .iter()
        .cloned()
        .map(|store| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                store.migrate()
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut applied = Vec::new();
    for result in results {
        applied.push(result.unwrap_or_else(|e| panic!("a concurrent migrate failed: {e}")));
    }
    assert_eq!(
        applied.iter().filter(|a| *a == ALL_VERSIONS).count(),
        1,
        "exactly one migrate applies the versions: {applied:?}"
    );
    assert_eq!(applied.iter().filter(|a| a.is_empty()).count(), THREADS - 1);
    for store in &stores {
        assert!(store.verify().unwrap().is_ok());
    }
    let count: i64 = schema
        .client()
        .unwrap()
        .query_one(
            &format!("SELECT count(*) FROM \"{fresh}\".trebuchet_schema_migrations"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(count, ALL_VERSIONS.len() as i64);
    assert_eq!(stores[3].save("a", &1u32).unwrap(), 1);
}

#[test]
fn operations_before_migrate_fail_with_schema_missing() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store_builder().build().unwrap();
    let table = store.table();
    type Op<'a> = (&'a str, Box<dyn Fn() -> Result<(), Error> + 'a>);
    let s = &store;
    let ops: Vec<Op<'_>> = vec![
        ("save", Box::new(|| s.save("a", &1u32).map(drop))),
        ("load", Box::new(|| s.load::<u32>("a").map(drop))),
        (
            "load_versioned",
            Box::new(|| s.load_versioned::<u32>("a").map(drop)),
        ),
        (
            "save_if absent",
            Box::new(|| s.save_if("a", &1u32, Expected::Absent).map(drop)),
        ),
        (
            "save_if sequence",
            Box::new(|| s.save_if("a", &1u32, Expected::Sequence(1)).map(drop)),
        ),
        (
            "save_with_sequence",
            Box::new(|| {
                s.save_with("a", &1u32, WriteOptions::new().sequence(5))
                    .map(drop)
            }),
        ),
        (
            "transform",
            Box::new(|| {
                s.transform("a", |c: Option<u32>| c.unwrap_or(0) + 1)
                    .map(drop)
            }),
        ),
        ("delete", Box::new(|| s.delete("a").map(drop))),
        ("exists", Box::new(|| s.exists("a").map(drop))),
        ("sequence", Box::new(|| s.sequence("a").map(drop))),
        ("save_bytes", Box::new(|| s.raw().save("a", &[0]).map(drop))),
        ("load_bytes", Box::new(|| s.raw().load("a").map(drop))),
        (
            "transform_bytes",
            Box::new(|| s.raw().transform("a", |_| vec![0]).map(drop)),
        ),
    ];
    for (name, op) in &ops {
        let err = op().unwrap_err();
        assert!(
            matches!(&err, Error::SchemaMissing { table: t } if *t == table),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("migrate"), "{name}: {err}");
    }
    // Once migrated, the same store works (the conditional writes on "a"
    // may now meet the state the others left: a conflict is an answer too).
    store.migrate().unwrap();
    for (name, op) in &ops {
        if let Err(e) = op() {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::Conflict | ErrorKind::StaleSequence | ErrorKind::TooManyConflicts
                ),
                "{name} after migrate: {e:?}"
            );
        }
    }
    assert!(store.exists("a").unwrap());
}

// ----- verify ----------------------------------------------------------------

#[test]
fn verify_reports_a_missing_table_then_is_ok_after_migrate() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store_builder().build().unwrap();
    let report = store.verify().unwrap();
    assert_eq!(
        report.problems,
        vec![Problem::TableMissing {
            table: quoted_table(&schema, "actor_states")
        }]
    );
    assert!(!report.is_ok());
    store.migrate().unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.to_string(), "schema ok");
}

#[test]
fn verify_reports_a_dropped_trigger() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    client_in(&schema)
        .batch_execute("DROP TRIGGER actor_state_change_trigger ON actor_states")
        .unwrap();
    assert_eq!(store.verify().unwrap().problems, vec![trigger_missing()]);
}

#[test]
fn verify_reports_a_dropped_function() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    client_in(&schema)
        .batch_execute("DROP FUNCTION notify_actor_state_change() CASCADE")
        .unwrap();
    // CASCADE takes the trigger with it.
    assert_eq!(
        store.verify().unwrap().problems,
        vec![function_missing(), trigger_missing()]
    );
}

#[test]
fn verify_reports_a_disabled_trigger() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    client_in(&schema)
        .batch_execute("ALTER TABLE actor_states DISABLE TRIGGER actor_state_change_trigger")
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(
        report.problems,
        vec![Problem::TriggerDisabled {
            trigger: "actor_state_change_trigger".into()
        }]
    );
    assert!(report.to_string().contains("ENABLE TRIGGER"), "{report}");
}

#[test]
fn verify_reports_a_function_notifying_another_channel() {
    let schema = TestDatabase::shared().schema();
    let _migrated = schema.store();
    let other = schema
        .store_builder()
        .channel(format!("{}_other", schema.name()))
        .build()
        .unwrap();
    assert_eq!(
        other.verify().unwrap().problems,
        vec![Problem::FunctionChannel {
            function: "notify_actor_state_change".into(),
            channel: format!("{}_other", schema.name()),
        }]
    );
}

#[test]
fn verify_reports_missing_tombstones() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    client_in(&schema)
        .batch_execute("DROP TABLE actor_states_tombstones")
        .unwrap();
    assert_eq!(
        store.verify().unwrap().problems,
        vec![Problem::TombstonesMissing {
            table: quoted_table(&schema, "actor_states_tombstones")
        }]
    );
    // Writes that need the tombstones say the schema is incomplete.
    let err = store.save("new", &1u32).unwrap_err();
    assert!(matches!(err, Error::SchemaMissing { .. }), "{err:?}");
}

/// `verify` tells the user to "run StateStore::migrate()" for a missing
/// trigger or function; doing so must repair them.
#[test]
fn migrate_repairs_what_verify_reports() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    client_in(&schema)
        .batch_execute("DROP FUNCTION notify_actor_state_change() CASCADE")
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.problems, vec![function_missing(), trigger_missing()]);
    assert!(
        report.to_string().contains("StateStore::migrate()"),
        "{report}"
    );

    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    let report = store.verify().unwrap();
    assert!(
        report.is_ok(),
        "migrate() did not repair what verify() told the user to fix with it:\n{report}"
    );
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));

    // The repaired trigger announces again.
    let mut listener = schema.client().unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", schema.channel()))
        .unwrap();
    assert_eq!(store.save("a", &2u32).unwrap(), 2);
    let (_, payload) = common::next_payload(&mut listener);
    assert_eq!(payload["sequenceNumber"], 2);

    // Likewise a dropped tombstone table.
    client_in(&schema)
        .batch_execute("DROP TABLE actor_states_tombstones")
        .unwrap();
    assert!(!store.verify().unwrap().is_ok());
    store.migrate().unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    assert!(store.delete("a").unwrap());
    assert_eq!(store.save("a", &3u32).unwrap(), 4);
}

// ----- other tables ----------------------------------------------------------

/// A custom table gets its own tombstones, function and trigger names, and
/// announces on its own channel only, beside the default table in the same
/// schema.
#[test]
fn custom_table_in_custom_schema_gets_its_own_objects_and_channel() {
    let schema = TestDatabase::shared().schema();
    let default = schema.store();
    let rooms_channel = format!("{}_rooms", schema.name());
    let rooms = schema
        .store_builder()
        .table(schema.table("rooms"))
        .channel(&rooms_channel)
        .build()
        .unwrap();
    assert_eq!(rooms.table(), quoted_table(&schema, "rooms"));
    assert_eq!(
        rooms.migrate().unwrap(),
        ALL_VERSIONS,
        "versions are per table"
    );
    assert!(rooms.verify().unwrap().is_ok());
    assert!(default.verify().unwrap().is_ok());

    let mut client = schema.client().unwrap();
    let functions: BTreeSet<String> = client
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1",
            &[&schema.name()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        functions,
        BTreeSet::from([
            "notify_actor_state_change".into(),
            "notify_rooms_change".into()
        ])
    );
    let triggers: BTreeSet<(String, String)> = client
        .query(
            "SELECT c.relname::text, t.tgname::text FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND NOT t.tgisinternal",
            &[&schema.name()],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        triggers,
        BTreeSet::from([
            ("actor_states".into(), "actor_state_change_trigger".into()),
            ("rooms".into(), "rooms_change_trigger".into()),
        ])
    );
    let tombstones: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&quoted_table(&schema, "rooms_tombstones")],
        )
        .unwrap()
        .get(0);
    assert!(tombstones);
    let migrated: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".trebuchet_schema_migrations",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        migrated,
        2 * ALL_VERSIONS.len() as i64,
        "one row per table and version"
    );

    client
        .batch_execute(&format!(
            "LISTEN \"{rooms_channel}\"; LISTEN \"{}\"",
            schema.channel()
        ))
        .unwrap();
    rooms.save("r1", &1u32).unwrap();
    let (channel, payload) = common::next_payload(&mut client);
    assert_eq!(channel, rooms_channel);
    assert_eq!(payload["actorID"], "r1");
    assert_eq!(payload["op"], "save");
    common::assert_no_notification(&mut client);

    default.save("a1", &1u32).unwrap();
    let (channel, payload) = common::next_payload(&mut client);
    assert_eq!(channel, schema.channel());
    assert_eq!(payload["actorID"], "a1");
    common::assert_no_notification(&mut client);

    // The tables are separate, and so are their sequence numbers.
    assert!(rooms.delete("r1").unwrap());
    let (channel, payload) = common::next_payload(&mut client);
    assert_eq!(
        (channel.as_str(), &payload["op"]),
        (rooms_channel.as_str(), &"delete".into())
    );
    assert_eq!(rooms.save("r1", &2u32).unwrap(), 3);
    assert_eq!(default.load::<u32>("r1").unwrap(), None);
    assert_eq!(default.sequence("a1").unwrap(), Some(1));
}
