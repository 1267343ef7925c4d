//! The table on Citus (distributed PostgreSQL): finding out whether the
//! server is a Citus coordinator and whether the table is distributed, and
//! distributing it with its tombstones by `actor_id`, co-located, with the
//! triggers on every shard.

use postgres::types::Type;
use postgres::GenericClient;

use super::{fit, Names, Problem};
use crate::error::{Error, Result};
use crate::ident::{fill_template, quote_identifier};

/// What a Citus coordinator needs beyond the migrations.
const CITUS_TEMPLATE: &str = include_str!("../../sql/citus.sql");

/// Where the table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// One PostgreSQL server (or a Citus coordinator holding the table as
    /// a local table).
    Postgres,
    /// A Citus coordinator, the table distributed by `actor_id`.
    Citus,
}

/// Whether `client` is connected to a Citus coordinator: the extension is
/// installed in its database and the node is the coordinator.
pub(crate) fn is_coordinator(client: &mut impl GenericClient) -> Result<bool> {
    let installed: bool = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .map_err(Error::Database)?
        .get(0);
    if !installed {
        return Ok(false);
    }
    Ok(client
        .query_typed_one("SELECT citus_is_coordinator()", &[])
        .map_err(Error::Database)?
        .get(0))
}

/// Where `names`' table lives: [`Engine::Citus`] when it is a distributed
/// table on a Citus coordinator.
pub(crate) fn engine(client: &mut impl GenericClient, names: &Names) -> Result<Engine> {
    // Without Citus its catalog does not exist, and a statement naming it
    // would not even parse.
    let citus: bool = client
        .query_typed_one(
            "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL",
            &[],
        )
        .map_err(Error::Database)?
        .get(0);
    if !citus {
        return Ok(Engine::Postgres);
    }
    let distributed: bool = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition \
             WHERE logicalrelid = to_regclass($1::TEXT) AND partmethod = 'h')",
            &[(&names.table_sql(), Type::TEXT)],
        )
        .map_err(Error::Database)?
        .get(0);
    Ok(if distributed {
        Engine::Citus
    } else {
        Engine::Postgres
    })
}

/// The Citus trigger's function and trigger names for `names`' table.
fn number_names(names: &Names) -> (String, String) {
    (
        fit(format!("number_{}_row", names.table)),
        fit(format!("{}_number_trigger", names.table)),
    )
}

/// The statements of `template` one by one: Citus passes a DDL statement
/// on to the shards as the text it came in, which must then hold that
/// statement alone. A statement ends with a line ending in `;` outside a
/// function body (`$$ ... $$`).
pub(crate) fn one_by_one(template: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut in_body = false;
    for line in template.lines() {
        if line.trim_start().starts_with("--") && current.trim().is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if line.matches("$$").count() % 2 == 1 {
            in_body = !in_body;
        }
        if !in_body && line.trim_end().ends_with(';') {
            statements.push(std::mem::take(&mut current));
        }
    }
    if !current.trim().is_empty() {
        statements.push(current);
    }
    statements
}

/// The statements that [`distribute`] applies once the tables are
/// distributed, for these names, one by one.
pub(crate) fn citus_sql(names: &Names) -> Vec<String> {
    let (function, trigger) = number_names(names);
    let values = [
        ("{{function}}", names.qualify(&names.function)),
        ("{{trigger}}", quote_identifier(&names.trigger)),
        ("{{number_function}}", names.qualify(&function)),
        ("{{number_trigger}}", quote_identifier(&trigger)),
        ("{{table}}", names.table_sql()),
        ("{{tombstones}}", names.qualify(&names.tombstones)),
    ];
    let values: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
    one_by_one(CITUS_TEMPLATE)
        .iter()
        .map(|statement| fill_template(statement, &values))
        .collect()
}

/// On a Citus coordinator, in the migration's transaction: distributes
/// the table and its tombstones by `actor_id` in one co-location group and
/// puts both triggers on every shard (`citus.enable_unsafe_triggers`: the
/// trigger writes the co-located tombstone shard and notifies on the node
/// where it fires). Tables distributed already stay as they are.
///
/// A table that already holds rows (one made on a single server) has its
/// triggers dropped while its rows are copied into the shards: the copy
/// commits in two phases, which a transaction that ran `NOTIFY` cannot.
/// Writers wait on the table's lock meanwhile, so no change goes
/// unannounced.
pub(crate) fn distribute(tx: &mut postgres::Transaction<'_>, names: &Names) -> Result<()> {
    if names.partitions.is_some() {
        return Err(Error::invalid_config(
            "a table on Citus is split into shards by actor_id already: build the store \
             without partitions()",
        ));
    }
    tx.batch_execute("SET LOCAL citus.enable_unsafe_triggers = on")
        .map_err(Error::Database)?;
    let table = names.table_sql();
    let tombstones = names.qualify(&names.tombstones);
    let (_, number_trigger) = number_names(names);
    for (relation, colocate_with) in [(&table, "default"), (&tombstones, table.as_str())] {
        let distributed: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition \
                 WHERE logicalrelid = to_regclass($1::TEXT))",
                &[relation],
            )
            .map_err(Error::Database)?
            .get(0);
        if distributed {
            continue;
        }
        if relation == &table {
            for trigger in [&names.trigger, &number_trigger] {
                tx.batch_execute(&format!(
                    "DROP TRIGGER IF EXISTS {} ON {table}",
                    quote_identifier(trigger)
                ))
                .map_err(Error::Database)?;
            }
        }
        tx.execute(
            "SELECT create_distributed_table($1::TEXT::regclass, 'actor_id', \
             colocate_with => $2::TEXT)",
            &[relation, &colocate_with],
        )
        .map_err(Error::Database)?;
    }
    for statement in citus_sql(names) {
        tx.batch_execute(&statement).map_err(Error::Database)?;
    }
    Ok(())
}

/// On a Citus coordinator: whether the table and its tombstones are
/// distributed by `actor_id` in one co-location group, and whether every
/// shard placement of the table has both triggers enabled.
pub(crate) fn verify(
    client: &mut impl GenericClient,
    names: &Names,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let table = names.table_sql();
    let tombstones = names.qualify(&names.tombstones);
    let mut groups = Vec::new();
    for relation in [&table, &tombstones] {
        let row = client
            .query_typed_opt(
                "SELECT colocationid, column_to_column_name(logicalrelid, partkey) = 'actor_id' \
                 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = to_regclass($1::TEXT) \
                 AND partmethod = 'h'",
                &[(relation, Type::TEXT)],
            )
            .map_err(Error::Database)?;
        match row {
            Some(row) if row.get::<_, Option<bool>>(1) == Some(true) => {
                groups.push(row.get::<_, i32>(0));
            }
            _ => problems.push(Problem::NotDistributed {
                table: relation.clone(),
            }),
        }
    }
    if groups.len() < 2 {
        return Ok(());
    }
    if groups[0] != groups[1] {
        problems.push(Problem::NotColocated {
            table: table.clone(),
            tombstones,
        });
    }
    // Each placement's enabled triggers, as `name=enabled,...`; a shard's
    // trigger is named after the table's, with the shard id appended.
    let rows = client
        .query_typed(
            "SELECT p.shardid, p.nodename::TEXT || ':' || p.nodeport::TEXT, p.success, p.result \
             FROM run_command_on_placements($1::TEXT::regclass, \
             'SELECT string_agg(tgname || ''='' || tgenabled::TEXT, '','') FROM pg_trigger \
             WHERE tgrelid = ''%s''::regclass AND NOT tgisinternal') p ORDER BY 1, 2",
            &[(&table, Type::TEXT)],
        )
        .map_err(Error::Database)?;
    let (_, number_trigger) = number_names(names);
    for row in rows {
        let shard: i64 = row.get(0);
        let node: String = row.get(1);
        let result: String = row.get::<_, Option<String>>(3).unwrap_or_default();
        for trigger in [&names.trigger, &number_trigger] {
            let shard_trigger = format!("{trigger}_{shard}");
            let enabled = row.get::<_, bool>(2)
                && result.split(',').any(|entry| {
                    entry
                        .rsplit_once('=')
                        .is_some_and(|(name, state)| name == shard_trigger && state != "D")
                });
            if !enabled {
                problems.push(Problem::ShardTriggerDisabled {
                    placement: format!("{shard} on {node}"),
                    trigger: trigger.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_applied_one_statement_at_a_time() {
        let names = Names::new("game.rooms", "room_changes").unwrap();
        let statements = citus_sql(&names);
        assert_eq!(statements.len(), 5, "{statements:#?}");
        assert!(statements[0].starts_with("CREATE OR REPLACE FUNCTION"));
        assert!(statements[0].trim_end().ends_with("LANGUAGE plpgsql;"));
        for statement in &statements[1..] {
            assert_eq!(statement.matches(';').count(), 1, "{statement}");
        }
    }
}
