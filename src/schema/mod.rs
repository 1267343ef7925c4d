//! Names, embedded migrations, the SQL of every operation, and `verify`.
//!
//! All SQL text is built here once per store from validated, quoted
//! identifiers; no statement is ever assembled from user input per call.

use crate::config::{validate_identifier, MAX_IDENTIFIER_BYTES};
pub use crate::config::{DEFAULT_CHANNEL, DEFAULT_TABLE};
use crate::error::{server, Error, Result};
use crate::ident::{fill_template, quote_identifier};
use crate::pool::Connection;

mod citus;
mod citus_statements;
mod layout;
mod statements;
mod verify;

pub(crate) use citus::{engine, Engine};
use layout::check_layout;
pub(crate) use layout::{layout, Layout};
pub(crate) use statements::Statements;
pub(crate) use verify::verify;
pub use verify::{Problem, VerifyReport};

/// The embedded migrations: version, description, template. Versions need
/// not be contiguous; each is applied once, in this order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "actor state table, tombstones and change trigger",
        include_str!("../../sql/migrations/0001_actor_states.sql"),
    ),
    (
        2,
        "write tags for finding out whether a write landed",
        include_str!("../../sql/migrations/0002_write_tags.sql"),
    ),
    (
        3,
        "expiry: expires_at column and its index",
        include_str!("../../sql/migrations/0003_expiry.sql"),
    ),
    (
        4,
        "numbers above a concurrent delete; the table in every payload",
        include_str!("../../sql/migrations/0004_interleavings.sql"),
    ),
    (
        5,
        "a writer may announce its changes itself (trebuchet.announce = off)",
        include_str!("../../sql/migrations/0005_announce_switch.sql"),
    ),
];

/// How many write tags each row keeps (`recent_writes`); the SQL says
/// `[1:64]`.
pub(crate) const WRITE_TAGS: usize = 64;

/// The most hash partitions a table may be created with.
pub const MAX_PARTITIONS: u32 = 1024;

/// Checks a partition count: 1 to [`MAX_PARTITIONS`].
pub(crate) fn check_partitions(partitions: u32) -> std::result::Result<(), String> {
    if (1..=MAX_PARTITIONS).contains(&partitions) {
        Ok(())
    } else {
        Err(format!(
            "{partitions} partitions: a table has 1 to {MAX_PARTITIONS} hash partitions \
             (a few per CPU core of the server is plenty)"
        ))
    }
}

/// Shortens a derived name to fit 63 bytes, keeping it unique with a hash.
/// Names built from the catalog's may hold characters of several bytes:
/// the cut falls between characters.
pub(crate) fn fit(name: String) -> String {
    if name.len() <= MAX_IDENTIFIER_BYTES {
        return name;
    }
    // FNV-1a: stable across releases and platforms.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut end = MAX_IDENTIFIER_BYTES - 9;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}_{:08x}", &name[..end], hash as u32)
}

/// A validated table name, optionally schema-qualified, and the names of the
/// objects that belong to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    pub schema: Option<String>,
    pub table: String,
    pub channel: String,
    pub tombstones: String,
    pub function: String,
    pub trigger: String,
    idx_updated: String,
    idx_sequence: String,
    idx_expires: String,
    /// Hash partitions to create the table with; `None` for a plain table.
    pub partitions: Option<u32>,
}

impl Names {
    /// Validates `table` (`name` or `schema.name`) and `channel`.
    pub fn new(table: &str, channel: &str) -> Result<Self> {
        let (schema, table) = match table.split_once('.') {
            Some((schema, name)) => {
                validate_identifier("schema", schema)?;
                (Some(schema.to_owned()), name)
            }
            None => (None, table),
        };
        validate_identifier("table", table)?;
        validate_identifier("channel", channel)?;
        let (function, trigger) = if table == DEFAULT_TABLE {
            (
                "notify_actor_state_change".to_owned(),
                "actor_state_change_trigger".to_owned(),
            )
        } else {
            (
                fit(format!("notify_{table}_change")),
                fit(format!("{table}_change_trigger")),
            )
        };
        Ok(Names {
            schema,
            tombstones: fit(format!("{table}_tombstones")),
            idx_updated: fit(format!("idx_{table}_updated")),
            idx_sequence: fit(format!("idx_{table}_sequence")),
            idx_expires: fit(format!("idx_{table}_expires")),
            partitions: None,
            table: table.to_owned(),
            channel: channel.to_owned(),
            function,
            trigger,
        })
    }

    /// `"schema"."name"` or `"name"`, each part through
    /// [`quote_identifier`].
    pub fn qualify(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_identifier(schema), quote_identifier(name)),
            None => quote_identifier(name),
        }
    }

    /// The same names in `schema` (where the table was found).
    pub fn in_schema(&self, schema: String) -> Names {
        Names {
            schema: Some(schema),
            ..self.clone()
        }
    }

    /// The quoted, qualified table name.
    pub fn table_sql(&self) -> String {
        self.qualify(&self.table)
    }

    fn migrations_table_sql(&self) -> String {
        self.qualify("trebuchet_schema_migrations")
    }

    /// The name of hash partition `index` (`{table}_p0`, `{table}_p1`, ...).
    pub fn partition(&self, index: u32) -> String {
        fit(format!("{}_p{index}", self.table))
    }

    /// The clauses that make a new table hash-partitioned, when asked for.
    fn partitioning(&self) -> (String, String) {
        let Some(n) = self.partitions else {
            return (String::new(), String::new());
        };
        let mut partitions = String::from(
            "\n\n-- Hash partitions by actor_id: every statement keyed by actor_id touches one.",
        );
        for i in 0..n {
            partitions.push_str(&format!(
                "\nCREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES WITH (MODULUS {n}, REMAINDER {i});",
                self.qualify(&self.partition(i)),
                self.table_sql()
            ));
        }
        (" PARTITION BY HASH (actor_id)".to_owned(), partitions)
    }

    /// A migration template for these names. The schema may come from
    /// the catalog (see `qualified`), so it may hold anything: names are
    /// quoted and put in as `fill_template` does.
    fn render(&self, template: &str) -> String {
        let (partition_by, partitions) = self.partitioning();
        let table = self.table_sql();
        let tombstones = self.qualify(&self.tombstones);
        let function = self.qualify(&self.function);
        let trigger = quote_identifier(&self.trigger);
        let idx_updated = quote_identifier(&self.idx_updated);
        let idx_sequence = quote_identifier(&self.idx_sequence);
        let idx_expires = quote_identifier(&self.idx_expires);
        let values = [
            ("{{partition_by}}", partition_by.as_str()),
            ("{{partitions}}", &partitions),
            ("{{table}}", &table),
            ("{{table_name}}", &self.table),
            ("{{tombstones}}", &tombstones),
            ("{{function}}", &function),
            ("{{trigger}}", &trigger),
            ("{{idx_updated}}", &idx_updated),
            ("{{idx_sequence}}", &idx_sequence),
            ("{{idx_expires}}", &idx_expires),
            ("{{channel}}", &self.channel),
        ];
        fill_template(template, &values)
    }

    /// Every migration rendered for these names, in order.
    pub fn migration_sql(&self) -> String {
        MIGRATIONS
            .iter()
            .map(|(_, _, template)| self.render(template))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Applies the embedded migrations that `client`'s database lacks for these
/// names. Safe when several processes migrate at once: they serialise on an
/// advisory lock and each version is applied once. Returns the versions
/// applied by this call.
pub(crate) fn migrate(client: &mut postgres::Client, names: &Names) -> Result<Vec<i32>> {
    apply_migrations(client, names).map_err(|e| privilege_error(e, names, true))
}

/// Turns a server's "insufficient privilege" (42501) into
/// [`Error::InsufficientPrivilege`], which says what to grant or run;
/// other errors pass through.
pub(crate) fn privilege_error(error: Error, names: &Names, migrating: bool) -> Error {
    match error {
        Error::Database(e) if server::is_insufficient_privilege(&e) => {
            Error::InsufficientPrivilege {
                migrating,
                table: names.table_sql(),
                tombstones: names.qualify(&names.tombstones),
                source: e,
            }
        }
        other => other,
    }
}

fn apply_migrations(client: &mut postgres::Client, names: &Names) -> Result<Vec<i32>> {
    let migrations = names.migrations_table_sql();
    let table_key = names.table_sql();
    let mut tx = client.transaction().map_err(Error::Database)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(Error::Database)?;
    if let Some(wanted) = names.partitions {
        check_layout(&mut tx, names, wanted)?;
    }
    let rendered = qualified(&mut tx, names)?;
    if let Some(schema) = &names.schema {
        // CREATE SCHEMA checks CREATE on the database even when the schema
        // exists, so a role that owns its schema but may not create schemas
        // would fail here: create the schema only when it is missing.
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[schema],
            )
            .map_err(Error::Database)?
            .get(0);
        if !exists {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_identifier(schema)
            ))
            .map_err(Error::Database)?;
        }
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {migrations} (\
             table_name TEXT NOT NULL, \
             version INTEGER NOT NULL, \
             description TEXT NOT NULL, \
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), \
             PRIMARY KEY (table_name, version))"
    ))
    .map_err(Error::Database)?;
    let applied: Vec<i32> = tx
        .query(
            &format!("SELECT version FROM {migrations} WHERE table_name = $1"),
            &[&table_key],
        )
        .map_err(Error::Database)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut done = Vec::new();
    for (version, description, template) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(&rendered.render(template))
            .map_err(Error::Database)?;
        tx.execute(
            &format!(
                "INSERT INTO {migrations} (table_name, version, description) VALUES ($1, $2, $3)"
            ),
            &[&table_key, version, description],
        )
        .map_err(Error::Database)?;
        done.push(*version);
    }
    // Up to date, but verify() sends users here when the trigger, its
    // function or the tombstone table went missing: the migrations are
    // idempotent, so apply them again to put those back.
    let coordinator = citus::is_coordinator(&mut tx)?;
    if done.is_empty() && !companions_present(&mut tx, names)? {
        // On Citus the tables may be distributed by now: a DDL statement on
        // them must come alone, and the functions it makes again go to
        // every node over one connection each.
        if coordinator {
            tx.batch_execute(
                "SET LOCAL citus.enable_unsafe_triggers = on; \
                 SET LOCAL citus.multi_shard_modify_mode = 'sequential'",
            )
            .map_err(Error::Database)?;
        }
        for (_, _, template) in MIGRATIONS {
            let sql = rendered.render(template);
            let statements = match coordinator {
                true => citus::one_by_one(&sql),
                false => vec![sql],
            };
            for statement in statements {
                tx.batch_execute(&statement).map_err(Error::Database)?;
            }
        }
    }
    if coordinator {
        citus::distribute(&mut tx, &rendered)?;
    }
    tx.commit().map_err(Error::Database)?;
    Ok(done)
}

/// The advisory lock that migrations (and layout conversions) take:
/// "trebuchet" in ASCII, one lock for every table's.
pub(crate) const MIGRATION_LOCK: i64 = 0x7472_6562_7563_6874;

/// `names` with the schema the table lands in. The trigger function names
/// the tombstone table; qualifying it means writers with another
/// search_path still find it.
fn qualified(tx: &mut postgres::Transaction<'_>, names: &Names) -> Result<Names> {
    if names.schema.is_some() {
        return Ok(names.clone());
    }
    let schema: Option<String> = tx
        .query_one("SELECT current_schema()::text", &[])
        .map_err(Error::Database)?
        .get(0);
    let schema = schema.ok_or_else(|| {
        Error::invalid_config(
            "the connection's search_path names no existing schema: \
             qualify the table as schema.table",
        )
    })?;
    Ok(Names {
        schema: Some(schema),
        ..names.clone()
    })
}

/// The migration versions not yet applied to the table (all of them when
/// the bookkeeping table does not exist).
pub(crate) fn pending(tx: &mut postgres::Transaction<'_>, names: &Names) -> Result<Vec<i32>> {
    let migrations = names.migrations_table_sql();
    let exists: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&migrations])
        .map_err(Error::Database)?
        .get(0);
    let applied: Vec<i32> = if exists {
        tx.query(
            &format!("SELECT version FROM {migrations} WHERE table_name = $1"),
            &[&names.table_sql()],
        )
        .map_err(Error::Database)?
        .iter()
        .map(|row| row.get(0))
        .collect()
    } else {
        Vec::new()
    };
    Ok(MIGRATIONS
        .iter()
        .map(|(version, _, _)| *version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Whether the tombstone table exists and the trigger calls this store's
/// function on insert, update and delete of each row.
fn companions_present(tx: &mut postgres::Transaction<'_>, names: &Names) -> Result<bool> {
    let row = tx
        .query_one(
            "SELECT to_regclass($2) IS NOT NULL AND EXISTS (\
                 SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
                 WHERE t.tgrelid = to_regclass($1) AND t.tgname = $3 \
                 AND NOT t.tgisinternal AND p.proname = $4 AND t.tgtype & 29 = 29)",
            &[
                &names.table_sql(),
                &names.qualify(&names.tombstones),
                &names.trigger,
                &names.function,
            ],
        )
        .map_err(Error::Database)?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        for bad in [
            "actor'; DROP TABLE actor_states; --",
            "123abc",
            &"a".repeat(64),
            "a;b",
            "a b",
            "a\"b",
            "a'b",
            "a$b",
            "",
            "tä",
        ] {
            let err = Names::new(bad, DEFAULT_CHANNEL).unwrap_err();
            assert!(
                matches!(err, Error::InvalidIdentifier { what: "table", .. }),
                "{bad}: {err}"
            );
            let err = Names::new(DEFAULT_TABLE, bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidIdentifier {
                        what: "channel",
                        ..
                    }
                ),
                "{bad}"
            );
        }
        assert!(Names::new(&"a".repeat(63), DEFAULT_CHANNEL).is_ok());
        assert!(Names::new("_x1", "Chan_2").is_ok());
        let err = Names::new("bad-schema.t", DEFAULT_CHANNEL).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidIdentifier { what: "schema", .. }
        ));
        assert!(Names::new("s.t.u", DEFAULT_CHANNEL).is_err());
    }

    #[test]
    fn default_names_are_the_seeds() {
        let n = Names::new(DEFAULT_TABLE, DEFAULT_CHANNEL).unwrap();
        assert_eq!(n.function, "notify_actor_state_change");
        assert_eq!(n.trigger, "actor_state_change_trigger");
        assert_eq!(n.table_sql(), "\"actor_states\"");
        let n = Names::new("game.rooms", "room_changes").unwrap();
        assert_eq!(n.table_sql(), "\"game\".\"rooms\"");
        assert_eq!(n.qualify(&n.function), "\"game\".\"notify_rooms_change\"");
    }

    #[test]
    fn derived_names_fit_and_stay_distinct() {
        let a = Names::new(&format!("{}a", "x".repeat(62)), DEFAULT_CHANNEL).unwrap();
        let b = Names::new(&format!("{}b", "x".repeat(62)), DEFAULT_CHANNEL).unwrap();
        for n in [&a, &b] {
            for derived in [&n.function, &n.trigger, &n.tombstones, &n.idx_updated] {
                assert!(derived.len() <= 63, "{derived}");
            }
        }
        assert_ne!(a.function, b.function);
        assert_ne!(a.tombstones, b.tombstones);
    }

    #[test]
    fn names_from_the_catalog_are_cut_between_characters() {
        // Index names read back from the catalog may hold any characters.
        // An odd first byte puts byte 54, where the cut goes, inside a `ü`.
        let a = fit(format!("x{}", "ü".repeat(40)));
        let b = fit(format!("x{}y", "ü".repeat(40)));
        for fitted in [&a, &b] {
            assert!(fitted.len() <= MAX_IDENTIFIER_BYTES, "{fitted}");
            assert!(
                fitted.starts_with(&format!("x{}_", "ü".repeat(26))),
                "{fitted}"
            );
        }
        assert_ne!(a, b);
    }

    #[test]
    fn migrations_quote_a_schema_read_from_the_catalog() {
        let names = Names::new("rooms", "room_changes").unwrap();
        let evil = names.in_schema("evil\"; CREATE TABLE pwned(x int); --".to_owned());
        let sql = evil.migration_sql();
        assert!(sql.contains(
            "CREATE TABLE IF NOT EXISTS \"evil\"\"; CREATE TABLE pwned(x int); --\".\"rooms\" ("
        ));
        assert!(!sql.contains("\"evil\";"), "{sql}");
        // A schema holding `$$` would end the function body early.
        let dollars = names.in_schema("a$$b".to_owned());
        let sql = dollars.migration_sql();
        assert!(sql.contains("AS $fn1$\n"), "{sql}");
        assert_eq!(sql.matches("$$").count(), sql.matches("\"a$$b\"").count());
        let sql = names.in_schema("it's".to_owned()).migration_sql();
        assert!(
            sql.contains("INSERT INTO \"it's\".\"rooms_tombstones\" AS t"),
            "{sql}"
        );
    }

    #[test]
    fn schema_sql_is_the_rendered_default_migration() {
        let names = Names::new(DEFAULT_TABLE, DEFAULT_CHANNEL).unwrap();
        let expected = format!("{}{}", SCHEMA_HEADER, names.migration_sql());
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/schema.sql");
        if std::env::var_os("TREBUCHET_BLESS").is_some() {
            std::fs::write(path, &expected).unwrap();
        }
        let actual = std::fs::read_to_string(path).unwrap();
        assert!(
            actual == expected,
            "sql/schema.sql is out of date: run `TREBUCHET_BLESS=1 cargo test --lib schema`"
        );
    }

    const SCHEMA_HEADER: &str = "\
-- trebuchet-postgres schema for the default table and channel.
--
-- Generated from sql/migrations/ (do not edit by hand). Usable as a
-- docker-entrypoint-initdb.d script; StateStore::migrate() applies the same
-- statements, for any table and channel name, and records the version.
-- Compatible with the seed's schema: same table, columns, channel and
-- payload keys; deletes are announced too.

";
}
