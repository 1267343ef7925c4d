//! Hash-partitioned tables: created by `migrate`, converted from a plain
//! table without losing anything, every operation and the change feed
//! working as on a plain table, and every point statement touching exactly
//! one partition.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use trebuchet_postgres::testing::{point_statements, TestDatabase, TestSchema};
use trebuchet_postgres::{
    BatchResult, ChangeKind, Error, Event, Expected, Problem, RestoreOutcome, StateStore,
    Versioned, WriteOptions,
};

/// Partitions of `schema.actor_states` and the rows in each, by name.
fn rows_per_partition(schema: &TestSchema) -> BTreeMap<String, i64> {
    let mut client = schema.client().unwrap();
    let table = format!("\"{}\".actor_states", schema.name());
    let partitions: Vec<String> = client
        .query(
            "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass($1) ORDER BY 1",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    partitions
        .into_iter()
        .map(|p| {
            let n: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM \"{}\".\"{p}\"", schema.name()),
                    &[],
                )
                .unwrap()
                .get(0);
            (p, n)
        })
        .collect()
}

/// Every row as stored: id, sequence number, state, timestamps.
type Snapshot = BTreeMap<String, (i64, Vec<u8>, SystemTime, SystemTime)>;

fn snapshot(schema: &TestSchema) -> Snapshot {
    schema
        .client()
        .unwrap()
        .query(
            &format!(
                "SELECT actor_id::TEXT, sequence_number, state, updated_at, created_at \
                 FROM \"{}\".actor_states",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect()
}

fn partitioned(schema: &TestSchema, partitions: u32) -> StateStore {
    schema
        .store_builder()
        .partitions(partitions)
        .migrate(true)
        .build()
        .unwrap()
}

#[test]
fn migrate_creates_hash_partitions_that_verify_accepts() {
    let schema = TestDatabase::shared().schema();
    let store = partitioned(&schema, 4);
    assert_eq!(store.partitions().unwrap(), Some(4));
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(
        rows_per_partition(&schema)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        [
            "actor_states_p0",
            "actor_states_p1",
            "actor_states_p2",
            "actor_states_p3"
        ]
    );
    // Migrating again, with or without asking for the partitions, does nothing.
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    assert_eq!(schema.store().migrate().unwrap(), Vec::<i32>::new());

    // Another count is refused, touching nothing: converting is explicit.
    let err = schema
        .store_builder()
        .partitions(8)
        .migrate(true)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    assert!(err.to_string().contains("partition_table(8)"), "{err}");
    assert_eq!(rows_per_partition(&schema).len(), 4);

    // So is a plain table when partitions are asked for.
    let plain = TestDatabase::shared().schema();
    plain.store();
    let err = plain
        .store_builder()
        .partitions(4)
        .migrate(true)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("is not partitioned"), "{err}");
    assert_eq!(plain.store().partitions().unwrap(), None);
}

#[test]
fn bad_partition_counts_are_rejected_and_touch_nothing() {
    let schema = TestDatabase::shared().schema();
    for n in [0, trebuchet_postgres::MAX_PARTITIONS + 1, u32::MAX] {
        let err = schema.store_builder().partitions(n).build().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{n}: {err}");
        assert!(StateStore::builder().partitions(n).migration_sql().is_err());
    }
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    for n in [0, 1025] {
        let err = store.partition_table(n).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    what: "partitions",
                    ..
                }
            ),
            "{err}"
        );
    }
    assert_eq!(store.partitions().unwrap(), None);
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));
    let sql = StateStore::builder()
        .partitions(trebuchet_postgres::MAX_PARTITIONS)
        .migration_sql()
        .unwrap();
    assert!(sql.contains("MODULUS 1024, REMAINDER 1023"));
}

/// Saves, conditional saves, deletes and their announcements, tombstones,
/// bulk operations, batches, listing, export and import, expiry and the
/// sweeper: what every store does, checked on `store`.
fn exercise(schema: &TestSchema, store: &StateStore) {
    let listener = store.listener().unwrap();
    let events = listener.subscribe();
    let mut expected_events: Vec<(String, u64, ChangeKind)> = Vec::new();
    let mut saved = |id: &str, seq: u64| expected_events.push((id.into(), seq, ChangeKind::Saved));

    // Point operations.
    let ids: Vec<String> = (0..64).map(|i| format!("actor-{i:02}")).collect();
    for id in &ids {
        assert_eq!(store.save(id, &1u32).unwrap(), 1);
        saved(id, 1);
    }
    assert_eq!(store.load::<u32>("actor-00").unwrap(), Some(1));
    assert!(store.exists("actor-01").unwrap());
    assert_eq!(store.sequence("actor-02").unwrap(), Some(1));
    assert_eq!(
        store
            .save_if("actor-03", &2u32, Expected::Sequence(1))
            .unwrap(),
        2
    );
    saved("actor-03", 2);
    let err = store
        .save_if("actor-03", &3u32, Expected::Sequence(1))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                actual: Some(2),
                ..
            }
        ),
        "{err}"
    );
    assert!(store.save_if("actor-03", &3u32, Expected::Absent).is_err());
    assert_eq!(store.save_if("fresh", &1u32, Expected::Absent).unwrap(), 1);
    saved("fresh", 1);
    store
        .save_with("actor-04", &5u32, WriteOptions::new().sequence(10))
        .unwrap();
    saved("actor-04", 10);
    let t = store
        .transform("actor-05", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();
    assert_eq!((t.value, t.sequence), (2, 2));
    saved("actor-05", 2);
    let v = store.load_versioned::<u32>("actor-04").unwrap().unwrap();
    assert_eq!((v.value, v.sequence), (5, 10));

    // Deletes leave tombstones: the numbers go on above them.
    assert!(store.delete("actor-06").unwrap());
    expected_events.push(("actor-06".into(), 2, ChangeKind::Deleted));
    assert!(!store.delete("actor-06").unwrap());
    assert_eq!(store.save("actor-06", &1u32).unwrap(), 3);
    expected_events.push(("actor-06".into(), 3, ChangeKind::Saved));

    // Bulk operations and batches.
    let bulk: Vec<(String, u32)> = (0..40).map(|i| (format!("bulk-{i:02}"), i)).collect();
    assert_eq!(store.save_many(&bulk).unwrap(), vec![1; 40]);
    for (id, _) in &bulk {
        expected_events.push((id.clone(), 1, ChangeKind::Saved));
    }
    let loaded = store
        .load_many::<u32, _>(&["bulk-00", "nobody", "bulk-39"])
        .unwrap();
    assert_eq!(loaded, vec![Some(0), None, Some(39)]);
    let outcomes = store
        .save_many_if(&[
            ("bulk-00", 1u32, Expected::Sequence(1)),
            ("bulk-01", 1u32, Expected::Sequence(7)),
            ("bulk-new", 1u32, Expected::Absent),
        ])
        .unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap(), &2);
    assert!(outcomes[1].as_ref().unwrap_err().is_conflict());
    assert_eq!(outcomes[2].as_ref().unwrap(), &1);
    expected_events.push(("bulk-00".into(), 2, ChangeKind::Saved));
    expected_events.push(("bulk-new".into(), 1, ChangeKind::Saved));
    assert_eq!(
        store.delete_many(&["bulk-02", "nobody"]).unwrap(),
        vec![true, false]
    );
    expected_events.push(("bulk-02".into(), 2, ChangeKind::Deleted));
    let done = store
        .batch()
        .save_if("bulk-03", &9u32, Expected::Sequence(1))
        .save("bulk-04", &9u32)
        .delete("bulk-05")
        .commit()
        .unwrap();
    assert_eq!(
        done,
        vec![
            BatchResult::Saved(2),
            BatchResult::Saved(2),
            BatchResult::Deleted(true)
        ]
    );
    expected_events.push(("bulk-03".into(), 2, ChangeKind::Saved));
    expected_events.push(("bulk-04".into(), 2, ChangeKind::Saved));
    expected_events.push(("bulk-05".into(), 2, ChangeKind::Deleted));

    // The change feed saw every write, in order per actor, deletes included.
    let mut got: BTreeMap<String, Vec<(u64, ChangeKind)>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut count = 0;
    while count < expected_events.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Change(c)) => {
                got.entry(c.actor_id.clone())
                    .or_default()
                    .push((c.sequence, c.kind));
                count += 1;
            }
            other => panic!("expected a change, got {other:?} after {count} changes"),
        }
    }
    let mut want: BTreeMap<String, Vec<(u64, ChangeKind)>> = BTreeMap::new();
    for (id, seq, kind) in expected_events {
        want.entry(id).or_default().push((seq, kind));
    }
    assert_eq!(got, want);

    // Listing, counting, export and import.
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_actors("bulk-", after.as_deref(), 7).unwrap();
        listed.extend(page.actors.into_iter().map(|a| a.actor_id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut want_listed: Vec<String> = bulk.iter().map(|(id, _)| id.clone()).collect();
    want_listed.retain(|id| id != "bulk-02" && id != "bulk-05");
    want_listed.push("bulk-new".into());
    assert_eq!(listed, want_listed);
    assert_eq!(store.count_actors("bulk-").unwrap(), 39);
    let exported = common::export(store, "actor-");
    assert_eq!(exported.len(), 64);
    assert!(exported.windows(2).all(|w| w[0].0 < w[1].0));
    let now = SystemTime::now();
    let item = Versioned::new(vec![1u8], 5, now, now);
    assert_eq!(
        store
            .raw()
            .restore_many(&[("restored", item.clone())])
            .unwrap(),
        vec![RestoreOutcome::Written]
    );
    assert_eq!(
        store.raw().restore_many(&[("restored", item)]).unwrap(),
        vec![RestoreOutcome::Unchanged]
    );

    // Expiry and the sweeper.
    let mut client = schema.client().unwrap();
    store
        .save_with(
            "brief",
            &1u32,
            WriteOptions::new().ttl(Duration::from_millis(300)),
        )
        .unwrap();
    common::wait_expired(&mut client, &store.table(), &["brief"]);
    assert!(!store.exists("brief").unwrap());
    assert_eq!(store.save_if("brief", &2u32, Expected::Absent).unwrap(), 3);
    store
        .save_with(
            "brief",
            &3u32,
            WriteOptions::new().ttl(Duration::from_millis(300)),
        )
        .unwrap();
    common::wait_expired(&mut client, &store.table(), &["brief"]);
    assert_eq!(store.sweep_expired(100).unwrap().removed, 1);
    assert_eq!(store.save("brief", &1u32).unwrap(), 6);

    // Statistics cover every partition.
    let stats = store.stats().unwrap();
    assert_eq!(stats.actors, store.count_actors("").unwrap());
    assert!(stats.total_bytes > 0);
    assert!(store.verify().unwrap().is_ok());
    listener.shutdown();
    assert!(rows_per_partition(schema).len() <= 16);
}

#[test]
fn every_operation_works_on_a_partitioned_table() {
    let schema = TestDatabase::shared().schema();
    let store = partitioned(&schema, 4);
    exercise(&schema, &store);
    let rows = rows_per_partition(&schema);
    assert_eq!(rows.len(), 4);
    assert!(
        rows.values().all(|&n| n > 0),
        "rows spread over every partition: {rows:?}"
    );
}

#[test]
fn every_operation_works_on_a_plain_table_too() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    exercise(&schema, &store);
}

#[test]
fn verify_finds_a_partition_whose_trigger_is_disabled() {
    let schema = TestDatabase::shared().schema();
    let store = partitioned(&schema, 4);
    schema
        .client()
        .unwrap()
        .batch_execute(&format!(
            "ALTER TABLE \"{}\".actor_states_p2 DISABLE TRIGGER actor_state_change_trigger",
            schema.name()
        ))
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(
        report.problems,
        vec![Problem::PartitionTriggerDisabled {
            partition: format!("{}.actor_states_p2", schema.name()),
            trigger: "actor_state_change_trigger".into(),
        }]
    );
    assert!(report.to_string().contains("ENABLE TRIGGER"), "{report}");
}

/// A plain table with history (updates, deletes, expiring rows, storage
/// parameters, a grant) is converted while writers keep incrementing
/// counters: every row keeps its number, state and timestamps, no
/// increment is lost, and the trigger and tombstones work on the result.
#[test]
fn converting_a_plain_table_loses_nothing_under_concurrent_writes() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut admin = schema.client().unwrap();
    let table = format!("\"{}\".actor_states", schema.name());
    admin
        .batch_execute(&format!(
            "ALTER TABLE {table} SET (fillfactor = 85, autovacuum_vacuum_scale_factor = 0.02); \
             GRANT SELECT ON {table} TO pg_monitor"
        ))
        .unwrap();
    let items: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| (format!("actor-{i:05}"), vec![(i % 251) as u8; 1 + i % 300]))
        .collect();
    for chunk in items.chunks(1000) {
        store.raw().save_many(chunk).unwrap();
    }
    for i in 0..300 {
        store.save(&format!("actor-{i:05}"), &i).unwrap();
    }
    let gone: Vec<String> = (300..400).map(|i| format!("actor-{i:05}")).collect();
    store.delete_many(&gone).unwrap();
    store
        .save_with(
            "expiring",
            &1u32,
            WriteOptions::new().ttl(Duration::from_secs(3600)),
        )
        .unwrap();
    let before = snapshot(&schema);
    let tombstones_before = store.stats().unwrap().tombstones;

    // Writers that keep going through the conversion.
    let stop = Arc::new(AtomicBool::new(false));
    let increments = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let store = store.clone();
            let stop = Arc::clone(&stop);
            let increments = Arc::clone(&increments);
            std::thread::spawn(move || {
                let id = format!("counter-{t}");
                while !stop.load(Ordering::Relaxed) {
                    store
                        .transform(&id, |n: Option<u64>| n.unwrap_or(0) + 1)
                        .unwrap();
                    increments.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The writers are at work before the conversion and still after it.
    let progress = |what: &str, at_least: u64| {
        common::wait_until(what, Duration::from_secs(60), || {
            increments.load(Ordering::Relaxed) >= at_least
        })
    };
    progress("the writers start", 30);
    let done = store.partition_table(4).unwrap();
    progress(
        "the writers go on after the conversion",
        increments.load(Ordering::Relaxed) + 30,
    );
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    assert!(done.changed);
    assert_eq!((done.partitions, done.previous), (4, None));
    assert!(done.rows >= before.len() as u64, "{done:?}");

    // Nothing lost, nothing changed.
    let after = snapshot(&schema);
    for (id, row) in &before {
        assert_eq!(after.get(id), Some(row), "{id}");
    }
    let counted: u64 = (0..3)
        .map(|t| {
            store
                .load::<u64>(&format!("counter-{t}"))
                .unwrap()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(
        counted,
        increments.load(Ordering::Relaxed),
        "no increment lost"
    );
    assert!(counted > 0);
    assert_eq!(store.partitions().unwrap(), Some(4));
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(store.stats().unwrap().tombstones, tombstones_before);

    // Names, storage parameters and grants carried over.
    let indexes: BTreeSet<String> = admin
        .query(
            "SELECT c.relname::TEXT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = to_regclass($1)",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "actor_states_pkey",
            "idx_actor_states_expires",
            "idx_actor_states_sequence",
            "idx_actor_states_updated"
        ]
        .map(String::from)
        .into()
    );
    let options: Vec<String> = admin
        .query_one(
            &format!(
                "SELECT reloptions FROM pg_class WHERE oid = '\"{}\".actor_states_p3'::regclass",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(options.contains(&"fillfactor=85".to_owned()), "{options:?}");
    let granted: bool = admin
        .query_one(
            "SELECT has_table_privilege('pg_monitor', to_regclass($1), 'SELECT')",
            &[&table],
        )
        .unwrap()
        .get(0);
    assert!(granted);
    let leftovers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname LIKE '%converting%'",
            &[&schema.name()],
        )
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "every staging name was renamed");

    // The trigger and the tombstones work on the new table.
    admin
        .batch_execute(&format!("LISTEN \"{}\"", schema.channel()))
        .unwrap();
    assert_eq!(store.save("actor-00000", &7u32).unwrap(), 3);
    let (_, payload) = common::next_payload(&mut admin);
    assert_eq!(payload["actorID"], "actor-00000");
    assert_eq!(payload["sequenceNumber"], 3);
    assert!(store.delete("actor-00001").unwrap());
    let (_, payload) = common::next_payload(&mut admin);
    assert_eq!(
        (payload["op"].clone(), payload["sequenceNumber"].clone()),
        (Value::from("delete"), Value::from(3))
    );
    assert_eq!(
        store.save("actor-00300", &1u32).unwrap(),
        3,
        "above its tombstone"
    );

    // Again, into another count; the same count again changes nothing.
    let rows = store.count_actors("").unwrap();
    let again = store.partition_table(16).unwrap();
    assert_eq!((again.previous, again.partitions), (Some(4), 16));
    assert_eq!(store.count_actors("").unwrap(), rows);
    assert_eq!(rows_per_partition(&schema).len(), 16);
    assert!(store.verify().unwrap().is_ok());
    let same = store.partition_table(16).unwrap();
    assert!(!same.changed);
}

/// Triggers of the user's own come along (a disabled one stays disabled);
/// a foreign key, which the copy would lose, stops the conversion before it
/// changes anything.
#[test]
fn conversion_keeps_other_triggers_and_refuses_foreign_keys() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.save("a", &1u32).unwrap();
    let mut admin = schema.client().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE TABLE \"{s}\".audit (actor_id TEXT); \
             CREATE FUNCTION \"{s}\".audit() RETURNS TRIGGER AS $$ BEGIN \
             INSERT INTO \"{s}\".audit VALUES (NEW.actor_id); RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER audit AFTER INSERT ON \"{s}\".actor_states \
             FOR EACH ROW EXECUTE FUNCTION \"{s}\".audit(); \
             CREATE TRIGGER audit_off AFTER INSERT ON \"{s}\".actor_states \
             FOR EACH ROW EXECUTE FUNCTION \"{s}\".audit(); \
             ALTER TABLE \"{s}\".actor_states DISABLE TRIGGER audit_off",
            s = schema.name()
        ))
        .unwrap();
    assert!(store.partition_table(4).unwrap().changed);
    store.save("b", &1u32).unwrap();
    let audited: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".audit WHERE actor_id = 'b'",
                schema.name()
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(audited, 1, "audit fired once, audit_off stayed off");
    assert!(store.verify().unwrap().is_ok());

    let other = TestDatabase::shared().schema();
    let store = other.store();
    store.save("a", &1u32).unwrap();
    other
        .client()
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE \"{s}\".owners (id VARCHAR(255) PRIMARY KEY); \
             INSERT INTO \"{s}\".owners VALUES ('a'); \
             ALTER TABLE \"{s}\".actor_states ADD CONSTRAINT owned \
             FOREIGN KEY (actor_id) REFERENCES \"{s}\".owners (id)",
            s = other.name()
        ))
        .unwrap();
    let err = store.partition_table(4).unwrap_err();
    assert!(err.to_string().contains("foreign keys (owned)"), "{err}");
    assert_eq!(store.partitions().unwrap(), None);
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));

    let missing = TestDatabase::shared().schema();
    let err = missing
        .store_builder()
        .build()
        .unwrap()
        .partition_table(4)
        .unwrap_err();
    assert!(matches!(err, Error::SchemaMissing { .. }), "{err}");
}

/// Each statement a store runs for one actor, run for real (`EXPLAIN
/// ANALYZE` in a transaction rolled back afterwards) on a table of 16
/// partitions, locks and scans exactly one of them: the one that holds the
/// actor. So partition pruning works for every point operation, and the
/// same statements route to one shard on a distributed engine.
#[test]
fn every_point_statement_touches_exactly_one_partition() {
    let schema = TestDatabase::shared().schema();
    let store = partitioned(&schema, 16);
    let id = "explain-actor";
    store.save(id, &1u32).unwrap();
    let table = format!("\"{}\".actor_states", schema.name());
    let mut client = schema.client().unwrap();
    let partitions: BTreeSet<String> = rows_per_partition(&schema).into_keys().collect();
    let home: String = client
        .query_one(
            &format!("SELECT tableoid::regclass::TEXT FROM {table} WHERE actor_id = $1"),
            &[&id],
        )
        .unwrap()
        .get(0);
    let home = home
        .rsplit('.')
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned();
    assert!(partitions.contains(&home));

    let statements = point_statements(&store);
    assert_eq!(statements.len(), 9);
    for (name, sql) in statements {
        let prepared = client.prepare(&sql).unwrap();
        let text: String = id.to_owned();
        let state: Vec<u8> = vec![1];
        let number: Option<i64> = Some(1);
        let params = common::point_arguments(name, prepared.params(), &text, &state, &number);
        let mut tx = client.transaction().unwrap();
        let plan: Value = tx
            .query_one(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}"), &params)
            .unwrap()
            .get(0);
        let locked: BTreeSet<String> = tx
            .query(
                "SELECT c.relname::TEXT FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 JOIN pg_inherits i ON i.inhrelid = c.oid \
                 WHERE l.pid = pg_backend_pid() AND i.inhparent = to_regclass($1)",
                &[&table],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.rollback().unwrap();

        let mut scanned = BTreeSet::new();
        relations(&plan, &mut scanned);
        scanned.retain(|r| partitions.contains(r));
        assert_eq!(
            locked,
            BTreeSet::from([home.clone()]),
            "{name} touches exactly the actor's partition:\n{sql}\n{plan:#}"
        );
        assert!(
            scanned.is_subset(&locked),
            "{name} scans {scanned:?}, outside {locked:?}:\n{plan:#}"
        );
    }
}

/// Every "Relation Name" in an EXPLAIN (FORMAT JSON) plan.
fn relations(plan: &Value, found: &mut BTreeSet<String>) {
    match plan {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "Relation Name" {
                    if let Some(name) = value.as_str() {
                        found.insert(name.to_owned());
                    }
                } else {
                    relations(value, found);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| relations(item, found)),
        _ => {}
    }
}

/// On a partitioned table the figures come from the partitions (the parent
/// holds no rows): size, writes, dead rows, vacuum and HOT updates.
#[test]
fn stats_sum_the_figures_of_every_partition() {
    let schema = TestDatabase::shared().schema();
    let store = partitioned(&schema, 4);
    let items: Vec<(String, u32)> = (0..200).map(|i| (format!("s{i:03}"), i)).collect();
    store.save_many(&items).unwrap();
    store.save_many(&items).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        // Backends report their counts about once a second.
        let stats = store.stats().unwrap();
        if stats.writes.unwrap_or(0) >= 400 || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stats.partitions, Some(4));
    assert_eq!(stats.actors, 200);
    assert!(stats.total_bytes > 4 * 8192, "{}", stats.total_bytes);
    assert!(stats.writes.unwrap() >= 400, "{stats:?}");
    assert!(stats.dead_rows.unwrap() > 0, "{stats:?}");
    assert!(stats.hot_update_ratio.is_some(), "{stats:?}");
    schema
        .client()
        .unwrap()
        .batch_execute(&format!("VACUUM \"{}\".actor_states", schema.name()))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.stats().unwrap().last_vacuum.is_none() {
        assert!(Instant::now() < deadline, "no vacuum recorded");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(schema.store().stats().unwrap().partitions, Some(4));
}
