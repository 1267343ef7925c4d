//! Guarantee 9 of the design, **Wire compatible with the seed**:
//!
//! > Same default table, columns, channel name and JSON payload keys
//! > (`actorID`, `sequenceNumber`, `timestamp`), so Rust and Swift instances
//! > can share one database. Extensions (delete events, an `op` key) only add
//! > keys.
//!
//! The tests of this file, against a real PostgreSQL: `sql/schema.sql` run by
//! hand is what `verify` expects (`schema_sql_applied_by_hand_passes_verify`);
//! a table made by the seed's own script is upgraded in place by `migrate`
//! without losing rows (`seed_table_is_upgraded_by_migrate_without_losing_rows`);
//! the trigger's payloads carry the seed's keys plus `op` and `table`
//! (`notifications_carry_the_seed_keys_and_op`); a seed-style payload sent by
//! another client arrives unchanged (`a_notify_from_another_client_is_received`),
//! and the listener takes the seed's payload, which has no `op`, as a save
//! (`receives_the_seeds_payload_without_op_as_a_save`).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{ChangeKind, Expected, Problem, StateStore, DEFAULT_CHANNEL};

use common::feed::{expect_change, Order};
use common::{client_in, quoted_table, ALL_VERSIONS};

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

// ----- the seed's schema -----------------------------------------------------

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

// ----- the seed's payload through the listener -------------------------------

#[test]
fn receives_the_seeds_payload_without_op_as_a_save() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let sub = listener.subscribe();
    let mut order = Order::new("subscriber");

    schema
        .client()
        .unwrap()
        .execute(
            "SELECT pg_notify($1, $2)",
            &[
                &schema.channel(),
                &r#"{"actorID":"x","sequenceNumber":7,"timestamp":1764000000.5}"#,
            ],
        )
        .unwrap();

    let c = expect_change(&sub, &mut order, "x", 7, ChangeKind::Saved);
    assert_eq!(
        c.timestamp,
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_764_000_000.5)
    );
    assert_eq!(listener.health().malformed, 0);
}
