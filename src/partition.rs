//! Converting a table's layout: a plain table into hash partitions by
//! `actor_id`, or one partition count into another, in one transaction that
//! either copies every row or changes nothing.

use crate::error::{Error, Result};
use crate::ident::quote_identifier;
use crate::schema::{self, fit, Layout, Names};
use crate::store::{to_u64, Failure, StateStore};

/// What [`StateStore::partition_table`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Partitioning {
    /// Hash partitions the table has now.
    pub partitions: u32,
    /// Hash partitions it had before; `None` for a plain table.
    pub previous: Option<u32>,
    /// Rows copied into the new layout (0 when nothing changed).
    pub rows: u64,
    /// False when the table already had this layout: nothing was done.
    pub changed: bool,
}

/// An index's shape, whatever its name and table: unique or not, and its
/// definition from `USING` on (method, keys, predicate).
const INDEX_SHAPES: &str = "\
    SELECT c.relname::TEXT, i.indisunique, substring(pg_get_indexdef(i.indexrelid) FROM ' USING .*$') \
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
    WHERE i.indrelid = to_regclass($1) ORDER BY c.relname";

/// The old table's schema, row security, foreign keys, whether the
/// store's trigger is there, and its storage parameters (of the table, or
/// of its first partition).
const TABLE_FACTS: &str = "\
    SELECT n.nspname::TEXT, c.relrowsecurity, \
    ARRAY(SELECT k.conname::TEXT FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f' \
          ORDER BY 1), \
    EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = $2), \
    COALESCE((SELECT p.reloptions FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid \
              WHERE i.inhparent = c.oid ORDER BY p.relname LIMIT 1), c.reloptions, '{}') \
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)";

/// The old table's triggers, as the statements that make them (the
/// server's, on the table's name), with their names and whether each is
/// disabled.
const TRIGGERS: &str = "\
    SELECT pg_get_triggerdef(t.oid), t.tgname::TEXT, t.tgenabled = 'D' FROM pg_trigger t \
    WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal ORDER BY t.tgname";

/// The old table's grants: privilege, grantee (`NULL` for `PUBLIC`), and
/// whether it may be granted on.
const GRANTS: &str = "\
    SELECT a.privilege_type::TEXT, \
    CASE WHEN a.grantee <> 0 THEN pg_get_userbyid(a.grantee)::TEXT END, a.is_grantable \
    FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = to_regclass($1)";

impl StateStore {
    /// The table's layout now: `Some(n)` for `n` hash partitions by
    /// `actor_id`, `None` for a plain table.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// if store.partitions()?.is_none() {
    ///     store.partition_table(16)?; // a plain table so far
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::SchemaMissing`] when the table does not exist;
    /// [`Error::InvalidConfig`] when it is partitioned some other way;
    /// connection and database errors.
    pub fn partitions(&self) -> Result<Option<u32>> {
        let names = self.names().clone();
        match self.call(true, |_, c| Ok(schema::layout(&mut c.client, &names)?))? {
            Layout::Missing => Err(Error::SchemaMissing {
                table: names.table_sql(),
            }),
            Layout::Plain => Ok(None),
            Layout::Hash(n) => Ok(Some(n)),
            Layout::Other => Err(Error::invalid_config(format!(
                "table {} is partitioned, but not by a hash of actor_id",
                names.table_sql()
            ))),
        }
    }

    /// Converts the table into `partitions` hash partitions by `actor_id`
    /// (`{table}_p0` ... ), from a plain table or from another partition
    /// count, and loses nothing: one transaction copies every row with its
    /// sequence number and timestamps, or, on any error, changes nothing.
    ///
    /// What happens, in that transaction: the table is locked against
    /// writes (reads go on); a partitioned copy is created with the same
    /// columns, defaults, constraints and indexes (`LIKE ... INCLUDING
    /// ALL`), each partition with the old table's storage parameters
    /// (`fillfactor`, autovacuum settings); every row is copied; then, for
    /// a moment, reads wait too while the old table is dropped and the copy
    /// takes its name, its index names, its triggers (the store's and any
    /// others, disabled ones staying disabled) and its grants. The tombstone
    /// table and the notification function stay as they are, so sequence
    /// numbers go on where they were. Writers that waited carry on against
    /// the new table; nothing is announced for the copied rows (none
    /// changed). The table is analyzed afterwards.
    ///
    /// Writes wait for the whole copy: on a large table run it when writes
    /// can pause (`examples/README.md` gives measured times). It refuses a table with
    /// foreign keys or row-level security, which the copy would lose, and
    /// one whose trigger is missing (run [`migrate`](Self::migrate) first);
    /// a view on the table makes the drop fail and the conversion roll back.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let done = store.partition_table(16)?;
    /// println!("{} rows now in {} partitions", done.rows, done.partitions);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a count outside 1 to
    /// [`MAX_PARTITIONS`](crate::MAX_PARTITIONS) (nothing is sent);
    /// [`Error::SchemaMissing`] when the table does not exist;
    /// [`Error::InvalidConfig`] when migrations are pending, the trigger is
    /// missing, or the table has foreign keys or row-level security;
    /// connection and database errors. On every error the table is as it
    /// was.
    pub fn partition_table(&self, partitions: u32) -> Result<Partitioning> {
        schema::check_partitions(partitions)
            .map_err(|reason| Error::invalid_argument("partitions", reason))?;
        let names = self.names().clone();
        let done = self.call(false, |_, c| convert(&mut c.client, &names, partitions))?;
        if done.changed {
            let table = names.table_sql();
            self.call(false, |_, c| {
                c.client.batch_execute(&format!("ANALYZE {table}"))?;
                Ok(())
            })?;
        }
        Ok(done)
    }
}

fn convert(
    client: &mut postgres::Client,
    names: &Names,
    partitions: u32,
) -> Result<Partitioning, Failure> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&schema::MIGRATION_LOCK],
    )?;
    let previous = match schema::layout(&mut tx, names)? {
        Layout::Missing => {
            return Err(Error::SchemaMissing {
                table: names.table_sql(),
            }
            .into())
        }
        Layout::Hash(n) if n == partitions => {
            return Ok(Partitioning {
                partitions,
                previous: Some(n),
                rows: 0,
                changed: false,
            })
        }
        Layout::Hash(n) => Some(n),
        Layout::Plain | Layout::Other => None,
    };
    let table = names.table_sql();
    let pending = schema::pending(&mut tx, names)?;
    if !pending.is_empty() {
        return Err(Error::invalid_config(format!(
            "table {table} lacks migrations {pending:?}: run StateStore::migrate() \
             (or `trebuchet-postgres migrate`) first"
        ))
        .into());
    }
    let facts = tx.query_one(TABLE_FACTS, &[&table, &names.trigger])?;
    let names = names.in_schema(facts.get(0));
    let refuse = |what: String| -> Failure {
        Error::invalid_config(format!(
            "table {table} has {what}, which converting it would lose: \
             drop it first and create it again afterwards"
        ))
        .into()
    };
    if facts.get::<_, bool>(1) {
        return Err(refuse("row-level security".to_owned()));
    }
    let foreign_keys: Vec<String> = facts.get(2);
    if !foreign_keys.is_empty() {
        return Err(refuse(format!(
            "foreign keys ({})",
            foreign_keys.join(", ")
        )));
    }
    if !facts.get::<_, bool>(3) {
        return Err(Error::invalid_config(format!(
            "table {table} lacks its trigger {}: run StateStore::migrate() \
             (or `trebuchet-postgres migrate`) first",
            names.trigger
        ))
        .into());
    }
    let options: Vec<String> = facts.get(4);
    let with = storage_parameters(&options);
    let mut restore = Vec::new();
    for row in tx.query(TRIGGERS, &[&table])? {
        restore.push(row.get::<_, String>(0));
        if row.get::<_, bool>(2) {
            restore.push(format!(
                "ALTER TABLE {table} DISABLE TRIGGER {}",
                quote_identifier(row.get(1))
            ));
        }
    }
    for row in tx.query(GRANTS, &[&table])? {
        let grantee: Option<&str> = row.get(1);
        restore.push(format!(
            "GRANT {} ON {table} TO {}{}",
            row.get::<_, &str>(0),
            grantee.map_or_else(|| "PUBLIC".to_owned(), quote_identifier),
            if row.get::<_, bool>(2) {
                " WITH GRANT OPTION"
            } else {
                ""
            }
        ));
    }

    // The copy, while writers wait and readers go on.
    tx.batch_execute(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))?;
    let staging = fit(format!("{}_converting", names.table));
    let staging_sql = names.qualify(&staging);
    let staging_partition = |i: u32| fit(format!("{staging}_p{i}"));
    let mut ddl = format!(
        "CREATE TABLE {staging_sql} (LIKE {table} INCLUDING ALL) PARTITION BY HASH (actor_id);"
    );
    for i in 0..partitions {
        ddl.push_str(&format!(
            "\nCREATE TABLE {} PARTITION OF {staging_sql} \
             FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i}){with};",
            names.qualify(&staging_partition(i))
        ));
    }
    tx.batch_execute(&ddl)?;
    let rows = tx.execute(
        &format!("INSERT INTO {staging_sql} SELECT * FROM {table}"),
        &[],
    )?;

    // The swap, with readers waiting too.
    tx.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))?;
    let shapes = |tx: &mut postgres::Transaction<'_>, of: &str| {
        tx.query(INDEX_SHAPES, &[&of]).map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, bool>(1),
                        r.get::<_, String>(2),
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    let old_indexes = shapes(&mut tx, &table)?;
    let mut new_indexes = shapes(&mut tx, &staging_sql)?;
    let mut swap = format!(
        "DROP TABLE {table};\nALTER TABLE {staging_sql} RENAME TO {};",
        quote_identifier(&names.table)
    );
    for (old, unique, shape) in &old_indexes {
        if let Some(at) = new_indexes
            .iter()
            .position(|(_, u, s)| u == unique && s == shape)
        {
            let (new, _, _) = new_indexes.remove(at);
            swap.push_str(&format!(
                "\nALTER INDEX {} RENAME TO {};",
                names.qualify(&new),
                quote_identifier(old)
            ));
        }
    }
    tx.batch_execute(&swap)?;
    for i in 0..partitions {
        let from = staging_partition(i);
        let to = names.partition(i);
        let mut renames = format!(
            "ALTER TABLE {} RENAME TO {};",
            names.qualify(&from),
            quote_identifier(&to)
        );
        // The partition's own indexes were named after the staging name.
        for (index, _, _) in shapes(&mut tx, &names.qualify(&from))? {
            if let Some(rest) = index.strip_prefix(from.as_str()) {
                renames.push_str(&format!(
                    "\nALTER INDEX {} RENAME TO {};",
                    names.qualify(&index),
                    quote_identifier(&fit(format!("{to}{rest}")))
                ));
            }
        }
        tx.batch_execute(&renames)?;
    }
    // The triggers (the store's and any others, enabled or not) and the
    // grants, as they were, on the table that now has the name.
    for statement in &restore {
        tx.batch_execute(statement)?;
    }
    tx.commit()?;
    Ok(Partitioning {
        partitions,
        previous,
        rows: to_u64(i64::try_from(rows).unwrap_or(i64::MAX)),
        changed: true,
    })
}

/// ` WITH (key = 'value', ...)` from a table's `reloptions`, or nothing.
/// Keys come from the catalog; those that are not plain option names are
/// left out, and values are quoted.
fn storage_parameters(options: &[String]) -> String {
    let items: Vec<String> = options
        .iter()
        .filter_map(|option| option.split_once('='))
        .filter(|(key, _)| {
            !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
        })
        .map(|(key, value)| format!("{key} = '{}'", value.replace('\'', "''")))
        .collect();
    if items.is_empty() {
        String::new()
    } else {
        format!(" WITH ({})", items.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_parameters_are_quoted_and_filtered() {
        assert_eq!(storage_parameters(&[]), "");
        assert_eq!(
            storage_parameters(&[
                "fillfactor=80".into(),
                "autovacuum_vacuum_scale_factor=0.02".into(),
                "bad key=1".into(),
                "x=it's".into(),
            ]),
            " WITH (fillfactor = '80', autovacuum_vacuum_scale_factor = '0.02', x = 'it''s')"
        );
    }
}
