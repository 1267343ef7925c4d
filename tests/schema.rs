//! Migrations, `verify`, compatibility with the seed's schema, and the
//! notifications the trigger sends.

mod common;

use common::{client_in, quoted_table, ALL_VERSIONS};

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{
    Error, ErrorKind, Expected, Problem, StateStore, WriteOptions, DEFAULT_CHANNEL,
};

/// The seed's schema script, verbatim but for its comments, split so that
/// rows can be inserted before the trigger exists: the seed's function
/// notifies the shared default channel, which this test must not write to.
const SEED_TABLE: &str = "
CREATE TABLE actor_states (
    actor_id VARCHAR(255) PRIMARY KEY,
    state BYTEA NOT NULL,
    sequence_number BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMP NOT NULL DEFAULT NOW(),
    created_at TIMESTAMP NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_actor_states_updated ON actor_states(updated_at);
CREATE INDEX idx_actor_states_sequence ON actor_states(sequence_number);
";

const SEED_TRIGGER: &str = "
CREATE OR REPLACE FUNCTION notify_actor_state_change()
RETURNS TRIGGER AS $$
BEGIN
    PERFORM pg_notify('actor_state_changes',
        json_build_object(
            'actorID', NEW.actor_id,
            'sequenceNumber', NEW.sequence_number,
            'timestamp', EXTRACT(EPOCH FROM NEW.updated_at)
        )::text
    );
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER actor_state_change_trigger
AFTER INSERT OR UPDATE ON actor_states
FOR EACH ROW
EXECUTE FUNCTION notify_actor_state_change();
";

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

// ----- other tables, other scripts -------------------------------------------

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

/// `sql/schema.sql`, run by hand in a schema, is what `verify` expects of a
/// store with the default names.
#[test]
fn schema_sql_applied_by_hand_passes_verify() {
    let schema = TestDatabase::shared().schema();
    let store = schema
        .store_builder()
        .channel(DEFAULT_CHANNEL)
        .build()
        .unwrap();
    assert!(!store.verify().unwrap().is_ok());
    client_in(&schema)
        .batch_execute(include_str!("../sql/schema.sql"))
        .unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    // Nothing is written here: the default channel is shared with other tests.
}

/// A table made by the seed's own script (local-time defaults, a trigger on
/// insert and update only, notifying the default channel) is upgraded in
/// place by `migrate`: rows, sequence numbers and timestamps survive, and the
/// result passes `verify`.
#[test]
fn seed_table_is_upgraded_by_migrate_without_losing_rows() {
    let schema = TestDatabase::shared().schema();
    let mut client = client_in(&schema);
    client.batch_execute(SEED_TABLE).unwrap();
    client
        .batch_execute(
            "INSERT INTO actor_states (actor_id, state, sequence_number) \
             VALUES ('test-actor', '\\x00', 0), ('room-1', '\\x0102ff00', 7)",
        )
        .unwrap();
    client.batch_execute(SEED_TRIGGER).unwrap();
    let snapshot = |client: &mut postgres::Client| -> Vec<(String, Vec<u8>, i64, SystemTime)> {
        client
            .query(
                "SELECT actor_id::text, state, sequence_number, created_at \
                 FROM actor_states ORDER BY actor_id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    };
    let before = snapshot(&mut client);
    assert_eq!(before.len(), 2);

    let store = schema.store_builder().build().unwrap();
    assert_eq!(
        store.verify().unwrap().problems,
        vec![
            Problem::ColumnMissing {
                column: "expires_at"
            },
            Problem::TombstonesMissing {
                table: quoted_table(&schema, "actor_states_tombstones")
            },
            Problem::FunctionChannel {
                function: "notify_actor_state_change".into(),
                channel: schema.channel(),
            },
            Problem::TriggerEvents {
                trigger: "actor_state_change_trigger".into(),
                missing: vec!["delete"],
            },
        ]
    );
    assert_eq!(store.migrate().unwrap(), ALL_VERSIONS);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(
        snapshot(&mut client),
        before,
        "migrate changed the seed's rows"
    );

    // The store carries on from the seed's sequence numbers and timestamps.
    assert_eq!(
        store.raw().load("room-1").unwrap(),
        Some(vec![0x01, 0x02, 0xff, 0x00])
    );
    assert_eq!(store.raw().save("room-1", &[9]).unwrap(), 8);
    let v = store.raw().load_versioned("room-1").unwrap().unwrap();
    assert_eq!(v.created_at, before[0].3, "created_at kept");
    assert_eq!(store.sequence("test-actor").unwrap(), Some(0));
    assert!(store.delete("test-actor").unwrap());
    assert_eq!(store.raw().save("test-actor", &[1]).unwrap(), 2);

    // A seed-style writer that leaves the timestamps to the column defaults
    // in a New York session now stores UTC.
    client
        .batch_execute(&format!(
            "SET TimeZone = '{}'; \
             INSERT INTO actor_states (actor_id, state, sequence_number) VALUES ('swift', '\\x00', 1)",
            common::NEW_YORK
        ))
        .unwrap();
    let v = store.raw().load_versioned("swift").unwrap().unwrap();
    common::assert_recent("default updated_at", v.updated_at);
    common::assert_recent("default created_at", v.created_at);
}

// ----- notifications ---------------------------------------------------------

/// Each save and delete through the store is announced on its channel with
/// the seed's keys plus `op`; timestamps are Unix seconds of now even though
/// the writer's session is in New York; the delete's number is above the
/// last save's, and a re-create's above the delete's.
#[test]
fn notifications_carry_the_seed_keys_and_op() {
    let schema = TestDatabase::shared().schema();
    schema.store(); // migrate with the default URL
    let store = StateStore::builder()
        .url(&common::new_york_url())
        .table(schema.table("actor_states"))
        .channel(schema.channel())
        .build()
        .unwrap();
    let mut listener = schema.client().unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", schema.channel()))
        .unwrap();

    let keys: BTreeSet<&str> = ["actorID", "sequenceNumber", "timestamp", "op", "table"].into();
    let table = schema.table("actor_states");
    let mut expect = |op: &str, sequence: u64| {
        let (channel, payload) = common::next_payload(&mut listener);
        assert_eq!(channel, schema.channel());
        let object = payload.as_object().expect("a JSON object");
        assert_eq!(
            object.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            keys
        );
        assert_eq!(payload["actorID"], "room-1", "{payload}");
        assert_eq!(payload["op"], op, "{payload}");
        assert_eq!(payload["table"], table.as_str(), "{payload}");
        assert_eq!(
            payload["sequenceNumber"].as_u64(),
            Some(sequence),
            "{payload}"
        );
        let timestamp = payload["timestamp"].as_f64().expect("a number");
        common::assert_recent_epoch(&format!("{op} timestamp"), timestamp);
        sequence
    };

    let mut seen = Vec::new();
    assert_eq!(store.save("room-1", &1u32).unwrap(), 1);
    seen.push(expect("save", 1));
    assert_eq!(store.save("room-1", &2u32).unwrap(), 2);
    seen.push(expect("save", 2));
    assert_eq!(
        store
            .save_if("room-1", &3u32, Expected::Sequence(2))
            .unwrap(),
        3
    );
    seen.push(expect("save", 3));
    // A write that conflicts announces nothing.
    assert!(store
        .save_if("room-1", &0u32, Expected::Sequence(1))
        .is_err());
    assert!(store.delete("room-1").unwrap());
    seen.push(expect("delete", 4));
    // Deleting what is not there announces nothing.
    assert!(!store.delete("room-1").unwrap());
    assert_eq!(store.save("room-1", &5u32).unwrap(), 5);
    seen.push(expect("save", 5));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    common::assert_no_notification(&mut listener);
}

/// The channel itself: a seed-style payload sent by another client arrives
/// unchanged.
#[test]
fn a_notify_from_another_client_is_received() {
    let schema = TestDatabase::shared().schema();
    let mut listener = schema.client().unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", schema.channel()))
        .unwrap();
    let mut sender = schema.client().unwrap();
    let pid: i32 = sender
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let payload =
        r#"{"actorID" : "actor-123", "sequenceNumber" : 42, "timestamp" : 1732412345.123456}"#;
    sender
        .execute("SELECT pg_notify($1, $2)", &[&schema.channel(), &payload])
        .unwrap();
    let n = common::next_notification(&mut listener, Duration::from_secs(30))
        .expect("no notification within 30 s");
    assert_eq!(n.channel(), schema.channel());
    assert_eq!(n.payload(), payload);
    assert_eq!(n.process_id(), pid);
    common::assert_no_notification(&mut listener);
}
