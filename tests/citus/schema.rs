//! The schema on Citus: `migrate` distributes both tables, co-located, and
//! converts a table made on one server; `verify` checks every shard
//! placement; `stats` sums the shards and names each worker's listeners.

use trebuchet_postgres::StateStore;

use super::{citus, shard_of, wait_for};

#[test]
fn migrate_distributes_both_tables_by_actor_id_in_one_colocation_group() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    // Migrating again changes nothing.
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    assert!(store.verify().unwrap().is_ok());
    let mut client = schema.client().unwrap();
    let rows = client
        .query(
            "SELECT logicalrelid::TEXT, column_to_column_name(logicalrelid, partkey), \
             colocationid FROM pg_dist_partition \
             WHERE logicalrelid::TEXT LIKE $1 || '.%' ORDER BY 1",
            &[&schema.name()],
        )
        .unwrap();
    let tables: Vec<(String, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(tables.len(), 2, "{tables:?}");
    for (table, column, _) in &tables {
        assert_eq!(column, "actor_id", "{table} is distributed by {column}");
    }
    assert_eq!(tables[0].2, tables[1].2, "not co-located: {tables:?}");
}

#[test]
fn verify_checks_the_distribution_and_the_triggers_on_every_shard() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");

    // Disable the change trigger on one shard, on the worker that holds it.
    let mut client = schema.client().unwrap();
    let (shard, worker) = shard_of(db, &mut client, &schema.table("actor_states"), "x");
    let port = worker.port();
    let mut on_worker = worker.connect_options().connect().unwrap();
    on_worker
        .batch_execute(&format!(
            "SET citus.enable_manual_changes_to_shards = on; \
             ALTER TABLE \"{}\".actor_states_{shard} \
             DISABLE TRIGGER actor_state_change_trigger_{shard}",
            schema.name()
        ))
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{report}");
    let text = report.to_string();
    assert!(
        text.contains(&format!("shard {shard} on 127.0.0.1:{port}"))
            && text.contains("actor_state_change_trigger"),
        "{text}"
    );
}

#[test]
fn migrating_a_table_made_before_distribution_distributes_it_and_loses_nothing() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    // A table as one server had it (say, restored from a dump onto the
    // coordinator): the migrations applied by hand, not distributed.
    let mut client = schema.client().unwrap();
    let sql = StateStore::builder()
        .table(schema.table("actor_states"))
        .channel(schema.channel())
        .migration_sql()
        .unwrap();
    client.batch_execute(&sql).unwrap();
    let table = schema.table("actor_states");
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (actor_id, state, sequence_number) \
             SELECT 'actor-' || i, '\\x01'::BYTEA, i FROM generate_series(1, 500) i; \
             DELETE FROM {table} WHERE actor_id IN ('actor-1', 'actor-2')"
        ))
        .unwrap();
    let numbers = |client: &mut postgres::Client| -> Vec<(String, i64)> {
        client
            .query(
                &format!("SELECT actor_id::TEXT, sequence_number FROM {table} ORDER BY 1"),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let before = numbers(&mut client);
    assert_eq!(before.len(), 498);

    let store = schema.store();
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(numbers(&mut client), before);
    let shards: i64 = client
        .query_one(
            "SELECT count(*) FROM citus_shards WHERE table_name = $1::TEXT::regclass",
            &[&table],
        )
        .unwrap()
        .get(0);
    assert!(shards > 1, "{shards} shards");
    // Numbers go on, above the tombstones the deletes left.
    assert_eq!(store.save("actor-2", &1u32).unwrap(), 4);
    assert_eq!(store.save("actor-7", &1u32).unwrap(), 8);
}

#[test]
fn stats_sum_the_figures_of_every_shard() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    for i in 0..100u32 {
        let id = format!("s{i:03}");
        store.save(&id, &i).unwrap();
        store.save(&id, &(i + 1)).unwrap();
    }
    let mut stats = store.stats().unwrap();
    // Backends report their counts about once a second.
    wait_for("the shards' writes are counted", || {
        stats = store.stats().unwrap();
        stats.writes.unwrap_or(0) >= 200
    });
    assert_eq!(stats.actors, 100);
    // The rows live on the workers: far more than the coordinator's empty
    // shell table (8 kB pages, 32 shards with their indexes).
    assert!(stats.total_bytes > 32 * 8192, "{}", stats.total_bytes);
    assert!(stats.dead_rows.unwrap() > 0, "{stats:?}");
    assert!(stats.hot_update_ratio.is_some(), "{stats:?}");
}

/// Each worker sends the changes of its own shards: `stats` names the
/// sessions listening on the channel on every worker, and a listener built
/// on the coordinator is one of them on each.
#[test]
fn stats_name_the_listeners_on_every_worker() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let workers = db.citus().unwrap().workers().len();
    let before = store.stats().unwrap();
    assert_eq!(before.worker_listeners.len(), workers, "{before:?}");
    for worker in &before.worker_listeners {
        assert_eq!(
            (worker.listeners.len(), &worker.error),
            (0, &None),
            "{worker:?}"
        );
    }

    let listener = store.listener().unwrap();
    let mut stats = before;
    wait_for("the listener listens on every worker", || {
        stats = store.stats().unwrap();
        stats
            .worker_listeners
            .iter()
            .all(|w| w.listeners.len() == 1)
    });
    assert_eq!(stats.listeners.len(), 1, "on the coordinator: {stats:?}");
    let mut ports: Vec<String> = db
        .citus()
        .unwrap()
        .workers()
        .iter()
        .map(|w| format!("127.0.0.1:{}", w.port()))
        .collect();
    let mut named: Vec<String> = stats
        .worker_listeners
        .iter()
        .map(|w| w.node.clone())
        .collect();
    ports.sort();
    named.sort();
    assert_eq!(named, ports);
    drop(listener);
    wait_for("the listener's sessions have ended", || {
        stats = store.stats().unwrap();
        stats
            .worker_listeners
            .iter()
            .all(|w| w.listeners.is_empty())
    });
}

/// The change trigger dropped from a distributed table (from every shard):
/// `migrate` puts it back, as on one server, and changes are heard again.
#[test]
fn migrate_puts_back_a_trigger_dropped_from_a_distributed_table() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    client
        .batch_execute("SET citus.enable_unsafe_triggers = on")
        .unwrap();
    client
        .batch_execute(&format!(
            "DROP TRIGGER actor_state_change_trigger ON {}",
            schema.table("actor_states")
        ))
        .unwrap();
    assert!(!store.verify().unwrap().is_ok());
    store.migrate().unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    store.save("x", &1u32).unwrap();
    crate::common::expect_change(&changes, "x", 1, trebuchet_postgres::ChangeKind::Saved);
}
