//! `verify`: what of the schema is missing or wrong, as data.

use std::fmt;

use postgres::types::Type;

use super::*;
use crate::pool::Sql;

/// One thing `verify` found missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The state table does not exist.
    TableMissing {
        /// The quoted table name.
        table: String,
    },
    /// A column the store needs is missing.
    ColumnMissing {
        /// The column.
        column: &'static str,
    },
    /// A column has a type the store cannot use.
    ColumnType {
        /// The column.
        column: &'static str,
        /// The type found.
        found: String,
        /// The type expected.
        expected: &'static str,
    },
    /// The tombstone table, which keeps sequence numbers from repeating after
    /// a delete, does not exist.
    TombstonesMissing {
        /// The quoted tombstone table name.
        table: String,
    },
    /// The notification function does not exist.
    FunctionMissing {
        /// The function's name.
        function: String,
    },
    /// The notification function exists but does not notify this store's channel.
    FunctionChannel {
        /// The function's name.
        function: String,
        /// The channel it should notify.
        channel: String,
    },
    /// No trigger of that name is on the table.
    TriggerMissing {
        /// The trigger's name.
        trigger: String,
    },
    /// The trigger is disabled.
    TriggerDisabled {
        /// The trigger's name.
        trigger: String,
    },
    /// The trigger does not fire for every row on insert, update and delete.
    TriggerEvents {
        /// The trigger's name.
        trigger: String,
        /// The events it lacks.
        missing: Vec<&'static str>,
    },
    /// On a partitioned table, the trigger is disabled (or missing) on one
    /// partition, so changes to the actors stored there are not announced.
    PartitionTriggerDisabled {
        /// The quoted, qualified partition.
        partition: String,
        /// The trigger's name.
        trigger: String,
    },
    /// On a Citus coordinator, the table (or its tombstones) is not
    /// distributed by `actor_id`.
    NotDistributed {
        /// The quoted table name.
        table: String,
    },
    /// On Citus, the tombstones are not co-located with the table, so the
    /// trigger on a shard cannot write its actor's tombstone beside it.
    NotColocated {
        /// The quoted table name.
        table: String,
        /// The quoted tombstone table name.
        tombstones: String,
    },
    /// On Citus, a shard of the table lacks an enabled trigger, so changes
    /// to its actors are not announced (or not numbered above their
    /// tombstones).
    ShardTriggerDisabled {
        /// The shard's placement: `shard id on host:port`.
        placement: String,
        /// The trigger's name.
        trigger: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const FIX: &str = "run StateStore::migrate() or apply sql/schema.sql";
        match self {
            Problem::TableMissing { table } => write!(f, "table {table} does not exist: {FIX}"),
            Problem::ColumnMissing { column } => {
                write!(f, "column {column} is missing: {FIX}")
            }
            Problem::ColumnType {
                column,
                found,
                expected,
            } => write!(
                f,
                "column {column} is {found}, expected {expected}: alter the column"
            ),
            Problem::TombstonesMissing { table } => {
                write!(f, "tombstone table {table} does not exist: {FIX}")
            }
            Problem::FunctionMissing { function } => {
                write!(f, "function {function}() does not exist: {FIX}")
            }
            Problem::FunctionChannel { function, channel } => write!(
                f,
                "function {function}() does not notify channel {channel:?}: build the \
                 store with the channel the function notifies, or re-create the function \
                 with StateStore::migration_sql() for this channel"
            ),
            Problem::TriggerMissing { trigger } => {
                write!(
                    f,
                    "trigger {trigger} is missing, so no change is announced: {FIX}"
                )
            }
            Problem::TriggerDisabled { trigger } => write!(
                f,
                "trigger {trigger} is disabled: ALTER TABLE ... ENABLE TRIGGER {trigger}"
            ),
            Problem::TriggerEvents { trigger, missing } => write!(
                f,
                "trigger {trigger} does not fire for each row on {}: {FIX}",
                missing.join(", ")
            ),
            Problem::PartitionTriggerDisabled { partition, trigger } => write!(
                f,
                "trigger {trigger} does not fire on partition {partition}, so changes to its \
                 actors are not announced: ALTER TABLE {partition} ENABLE TRIGGER {trigger}"
            ),
            Problem::NotDistributed { table } => write!(
                f,
                "table {table} is not distributed by actor_id on this Citus coordinator: \
                 run StateStore::migrate() (or `trebuchet-postgres migrate`), which distributes it"
            ),
            Problem::NotColocated { table, tombstones } => write!(
                f,
                "tombstone table {tombstones} is not co-located with {table}: \
                 SELECT update_distributed_table_colocation('{tombstones}', colocate_with => '{table}')"
            ),
            Problem::ShardTriggerDisabled { placement, trigger } => write!(
                f,
                "trigger {trigger} does not fire on shard {placement}: run StateStore::migrate() \
                 with citus.enable_unsafe_triggers, or enable it on the shard"
            ),
        }
    }
}

/// What [`StateStore::verify`](crate::StateStore::verify) found: the seed's
/// "Notifications Not Received" checklist, as data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Everything missing or wrong; empty when the schema is complete.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is missing or wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problems.is_empty() {
            return f.write_str("schema ok");
        }
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "- {problem}")?;
        }
        Ok(())
    }
}

const COLUMNS: [(&str, &[&str], &str); 6] = [
    (
        "actor_id",
        &["character varying(255)", "text"],
        "VARCHAR(255)",
    ),
    ("state", &["bytea"], "BYTEA"),
    ("sequence_number", &["bigint"], "BIGINT"),
    ("updated_at", &["timestamp without time zone"], "TIMESTAMP"),
    ("created_at", &["timestamp without time zone"], "TIMESTAMP"),
    ("expires_at", &["timestamp without time zone"], "TIMESTAMP"),
];

/// Checks table, columns, tombstones, function and trigger.
pub(crate) fn verify(conn: &mut Connection, names: &Names) -> Result<VerifyReport> {
    let mut problems = Vec::new();
    let table_sql = names.table_sql();
    let row = conn
        .prepare(&Sql::once(
            "SELECT c.oid, n.nspname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1::TEXT)",
            &[Type::TEXT],
        ))
        .and_then(|st| st.query_opt(&mut conn.client, &[&table_sql]))
        .map_err(Error::Database)?;
    let Some(row) = row else {
        problems.push(Problem::TableMissing { table: table_sql });
        return Ok(VerifyReport { problems });
    };
    let oid: u32 = row.get(0);
    let schema: String = row.get(1);

    let columns: Vec<(String, String)> = conn
        .prepare(&Sql::once(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1::OID AND attnum > 0 AND NOT attisdropped",
            &[Type::OID],
        ))
        .and_then(|st| st.query(&mut conn.client, &[&oid]))
        .map_err(Error::Database)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (column, accepted, expected) in COLUMNS {
        match columns.iter().find(|(name, _)| name == column) {
            None => problems.push(Problem::ColumnMissing { column }),
            Some((_, found)) if !accepted.contains(&found.as_str()) => {
                problems.push(Problem::ColumnType {
                    column,
                    found: found.clone(),
                    expected,
                })
            }
            Some(_) => {}
        }
    }

    // The schema is the catalog's: it may hold anything.
    let tombstones = names.in_schema(schema.clone()).qualify(&names.tombstones);
    let exists: bool = conn
        .prepare(&Sql::once(
            "SELECT to_regclass($1::TEXT) IS NOT NULL",
            &[Type::TEXT],
        ))
        .and_then(|st| st.query_one(&mut conn.client, &[&tombstones]))
        .map_err(Error::Database)?
        .get(0);
    if !exists {
        problems.push(Problem::TombstonesMissing { table: tombstones });
    }

    let source: Option<String> = conn
        .prepare(&Sql::once(
            "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.proname = $1::NAME AND n.nspname = $2::NAME",
            &[Type::NAME, Type::NAME],
        ))
        .and_then(|st| st.query_opt(&mut conn.client, &[&names.function, &schema]))
        .map_err(Error::Database)?
        .map(|r| r.get(0));
    match source {
        None => problems.push(Problem::FunctionMissing {
            function: names.function.clone(),
        }),
        Some(src) if !src.contains(&format!("pg_notify('{}'", names.channel)) => {
            problems.push(Problem::FunctionChannel {
                function: names.function.clone(),
                channel: names.channel.clone(),
            })
        }
        Some(_) => {}
    }

    let trigger = conn
        .prepare(&Sql::once(
            "SELECT t.tgenabled::text, t.tgtype::int4 FROM pg_trigger t \
             WHERE t.tgrelid = $1::OID AND t.tgname = $2::NAME AND NOT t.tgisinternal",
            &[Type::OID, Type::NAME],
        ))
        .and_then(|st| st.query_opt(&mut conn.client, &[&oid, &names.trigger]))
        .map_err(Error::Database)?;
    match trigger {
        None => problems.push(Problem::TriggerMissing {
            trigger: names.trigger.clone(),
        }),
        Some(row) => {
            let enabled: String = row.get(0);
            let tgtype: i32 = row.get(1);
            if enabled == "D" {
                problems.push(Problem::TriggerDisabled {
                    trigger: names.trigger.clone(),
                });
            }
            // pg_trigger.tgtype bits: ROW 1, INSERT 4, DELETE 8, UPDATE 16.
            let missing: Vec<&'static str> =
                [(1, "row"), (4, "insert"), (16, "update"), (8, "delete")]
                    .into_iter()
                    .filter(|(bit, _)| tgtype & bit == 0)
                    .map(|(_, name)| name)
                    .collect();
            if !missing.is_empty() {
                problems.push(Problem::TriggerEvents {
                    trigger: names.trigger.clone(),
                    missing,
                });
            }
            // A partitioned table's trigger fires through its clone on each
            // partition, which can be disabled on its own.
            let silent = conn
                .prepare(&Sql::once(
            "SELECT format('%I.%I', n.nspname, c.relname) \
                     FROM pg_partition_tree($1::OID::regclass) p \
                     JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE p.isleaf AND p.level > 0 AND NOT EXISTS (SELECT 1 FROM pg_trigger t \
                     WHERE t.tgrelid = c.oid AND t.tgname = $2::NAME AND t.tgenabled <> 'D') ORDER BY 1",
            &[Type::OID, Type::NAME],
        ))
                .and_then(|st| st.query(&mut conn.client, &[&oid, &names.trigger]))
                .map_err(Error::Database)?;
            for row in silent {
                problems.push(Problem::PartitionTriggerDisabled {
                    partition: row.get(0),
                    trigger: names.trigger.clone(),
                });
            }
        }
    }
    if citus::is_coordinator(&mut conn.client)? {
        citus::verify(&mut conn.client, &names.in_schema(schema), &mut problems)?;
    }
    Ok(VerifyReport { problems })
}
