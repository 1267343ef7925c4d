//! How a table is laid out (plain or hash-partitioned, and how), and the
//! check that a migration finds the layout the store was built for.

use super::Names;
use crate::error::{Error, Result};

/// How a table is laid out: plain, or partitioned (and how).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    Missing,
    Plain,
    /// Hash-partitioned by `actor_id` with this many partitions.
    Hash(u32),
    /// Partitioned some other way (by range or list, or by another key).
    Other,
}

/// How the table is laid out now. One round trip with the parameter's type
/// given (parse, bind and execute together): a statement prepared in one
/// round trip and run in the next may reach two server connections through
/// a transaction-mode pooler.
pub(crate) fn layout(client: &mut impl postgres::GenericClient, names: &Names) -> Result<Layout> {
    let row = client
        .query_typed_opt(
            "SELECT c.relkind::TEXT, p.partstrat::TEXT, \
             (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid), \
             p.partnatts = 1 AND (SELECT a.attname = 'actor_id' FROM pg_attribute a \
             WHERE a.attrelid = c.oid AND a.attnum = p.partattrs[0]) \
             FROM pg_class c LEFT JOIN pg_partitioned_table p ON p.partrelid = c.oid \
             WHERE c.oid = to_regclass($1::TEXT)",
            &[(&names.table_sql(), postgres::types::Type::TEXT)],
        )
        .map_err(Error::Database)?;
    let Some(row) = row else {
        return Ok(Layout::Missing);
    };
    let kind: String = row.get(0);
    if kind != "p" {
        return Ok(Layout::Plain);
    }
    let strategy: Option<String> = row.get(1);
    let by_actor: Option<bool> = row.get(3);
    Ok(match (strategy.as_deref(), by_actor) {
        (Some("h"), Some(true)) => {
            Layout::Hash(u32::try_from(row.get::<_, i64>(2)).unwrap_or(u32::MAX))
        }
        _ => Layout::Other,
    })
}

/// Refuses to migrate a table that exists with another layout than the
/// store was built for: converting it is a separate, explicit step.
pub(super) fn check_layout(
    tx: &mut postgres::Transaction<'_>,
    names: &Names,
    wanted: u32,
) -> Result<()> {
    let table = names.table_sql();
    let convert = format!(
        "convert it with StateStore::partition_table({wanted}) or \
         `trebuchet-postgres partition --partitions {wanted}`, or build the store without \
         partitions()"
    );
    match layout(tx, names)? {
        Layout::Missing => Ok(()),
        Layout::Hash(n) if n == wanted => Ok(()),
        Layout::Hash(n) => Err(Error::invalid_config(format!(
            "table {table} has {n} hash partitions, not the {wanted} asked for: {convert}"
        ))),
        Layout::Plain => Err(Error::invalid_config(format!(
            "table {table} exists and is not partitioned: {convert}"
        ))),
        Layout::Other => Err(Error::invalid_config(format!(
            "table {table} is partitioned, but not by a hash of actor_id: {convert}"
        ))),
    }
}
