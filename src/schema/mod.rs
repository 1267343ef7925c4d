//! Names, embedded migrations, the SQL of every operation, and `verify`.
//!
//! All SQL text is built here once per store from validated, quoted
//! identifiers; no statement is ever assembled from user input per call.

use postgres::error::SqlState;

use crate::config::{validate_identifier, MAX_IDENTIFIER_BYTES};
pub use crate::config::{DEFAULT_CHANNEL, DEFAULT_TABLE};
use crate::error::{Error, Result};
use crate::ident::{fill_template, quote_identifier};
use crate::pool::Connection;

mod catch_up;
mod verify;

pub(crate) use catch_up::{ActorVersion, CatchUpQuery};
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

/// Whether the table's actor ids sort in code point order, so that the ids
/// starting with a prefix are exactly those from the prefix up to (not
/// including) its successor: the column's collation (or the database's,
/// for the default) is `C`, `POSIX` or a `C.UTF-8`, and the encoding is
/// UTF-8. Other collations order by language rules, where no bounds are
/// certain to hold every match, so prefixes are found by a filtered scan.
/// Collation 100 is the database's default; catalog columns that not every
/// server version has are read through `to_jsonb`, so the query runs on
/// all of them.
const KEY_ORDER: &str = "SELECT current_setting('server_encoding') = 'UTF8' AND COALESCE(( \
     SELECT CASE WHEN a.attcollation = 100 \
     THEN (SELECT CASE COALESCE(to_jsonb(d) ->> 'datlocprovider', 'c') \
         WHEN 'c' THEN d.datcollate::TEXT IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8') \
         WHEN 'b' THEN to_jsonb(d) ->> 'datlocale' IN ('C', 'C.UTF-8') ELSE false END \
         FROM pg_database d WHERE d.datname = current_database()) \
     ELSE (SELECT CASE c.collprovider::TEXT \
         WHEN 'c' THEN to_jsonb(c) ->> 'collcollate' IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8') \
         WHEN 'b' THEN to_jsonb(c) ->> 'colllocale' IN ('C', 'C.UTF-8') ELSE false END \
         FROM pg_collation c WHERE c.oid = a.attcollation) END \
     FROM pg_attribute a WHERE a.attrelid = $1::TEXT::regclass AND a.attname = 'actor_id'), false)";

/// The SQL text of every operation for one table, built once per store.
#[derive(Debug)]
pub(crate) struct Statements {
    pub save: String,
    pub save_if_absent: String,
    pub save_if_sequence: String,
    pub save_with_sequence: String,
    pub load: String,
    pub load_versioned: String,
    pub load_many: String,
    pub load_cached: String,
    pub load_many_ordered: String,
    pub save_many: String,
    pub save_many_if: String,
    pub delete_many: String,
    pub lock_many: String,
    pub catch_up: CatchUpQuery,
    pub delete: String,
    pub exists: String,
    pub sequence: String,
    pub list_page: String,
    pub list_page_range: String,
    pub count_prefix: String,
    pub count_prefix_range: String,
    pub count_tombstones: String,
    pub scan_prefix: String,
    pub scan_prefix_range: String,
    pub key_order: String,
    pub restore_many: String,
    pub sweep: String,
    pub purge_tombstones: String,
    pub outcomes: String,
}

impl Statements {
    pub fn new(names: &Names) -> Self {
        let t = names.table_sql();
        let b = names.qualify(&names.tombstones);
        let now = "(now() AT TIME ZONE 'UTC')";
        // Expiry: a row past its expires_at reads as absent. A write treats
        // it as an actor deleted at the next number: it takes the number
        // after that and starts a new created_at. `live`/`expired` take the
        // row's alias with its dot ("" for none).
        let live = |a: &str| format!("({a}expires_at IS NULL OR {a}expires_at > {now})");
        let expired = |a: &str| format!("{a}expires_at <= {now}");
        // The ids that start with a prefix, as the bounds of an index range
        // ($n and $n+1) for where the key order allows them (`KEY_ORDER`);
        // `starts_with` stays the test, the bounds only narrow the scan.
        let range = |n: usize| {
            format!(
                "actor_id >= ${n}::VARCHAR AND actor_id < ${}::VARCHAR AND ",
                n + 1
            )
        };
        let list_page = |range: &str| {
            format!(
                "SELECT actor_id::TEXT, sequence_number, updated_at, octet_length(state)::INT8 \
                 FROM {t} WHERE actor_id > $2::VARCHAR AND {range}starts_with(actor_id, $1::TEXT) \
                 AND {} ORDER BY actor_id LIMIT $3::INT8",
                live("")
            )
        };
        let count_prefix = |range: &str| {
            format!(
                "SELECT count(*) FROM {t} WHERE {range}starts_with(actor_id, $1::TEXT) AND {}",
                live("")
            )
        };
        let scan_prefix = |range: &str| {
            format!(
                "SELECT actor_id::TEXT, state, sequence_number, updated_at, created_at, \
                 expires_at FROM {t} \
                 WHERE {range}starts_with(actor_id, $1::TEXT) AND {} ORDER BY actor_id",
                live("")
            )
        };
        let bump = format!(
            "t.sequence_number + CASE WHEN {} THEN 2 ELSE 1 END",
            expired("t.")
        );
        let renew = format!(
            "created_at = CASE WHEN {} THEN EXCLUDED.created_at ELSE t.created_at END",
            expired("t.")
        );
        // The time to live as microseconds, NULL for none.
        let ttl = |p: &str| format!("{now} + {p}::BIGINT * INTERVAL '1 microsecond'");
        // The sequence number a new actor starts at, above its tombstone if
        // it had one, and the write tags the tombstone carried.
        let next = format!(
            "(SELECT COALESCE(b.sequence_number, 0) + 1 AS seq, b.recent_writes AS tags \
             FROM (SELECT 1) one LEFT JOIN {b} b ON b.actor_id = $1::VARCHAR) n"
        );
        // Write tags (see the `outcome` module): `write id XOR the sequence
        // number written`, the newest first, 64 kept.
        let tag = |write_id: &str, sequence: &str, tags: &str| {
            format!("(ARRAY[{write_id} # ({sequence})] || {tags})[1:64]")
        };
        // The update branch of an upsert recovers each row's write id from
        // the tag its insert branch computed (`EXCLUDED` is all it can see).
        let tag_upsert = tag(
            "EXCLUDED.recent_writes[1] # EXCLUDED.sequence_number",
            &bump,
            "t.recent_writes",
        );
        // Deletes hand their write id to the trigger, which tags the
        // tombstone with it.
        let set_write_id = "set_config('trebuchet.write_id', $2::BIGINT::TEXT, true) IS NOT NULL";
        // Both conditional writes answer in one round trip: the new row, or
        // the sequence number that blocked the write.
        let outcome = format!(
            "SELECT (SELECT sequence_number FROM written), (SELECT updated_at FROM written), \
             (SELECT created_at FROM written), \
             (SELECT c.sequence_number FROM {t} c WHERE c.actor_id = $1::VARCHAR AND {})",
            live("c.")
        );
        Statements {
            save: format!(
                "INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, created_at, \
                 expires_at, recent_writes) \
                 SELECT $1::VARCHAR, $2::BYTEA, n.seq, {now}, {now}, {}, {} FROM {next} \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = {bump}, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = EXCLUDED.expires_at, recent_writes = {} \
                 RETURNING sequence_number",
                ttl("$4"),
                tag("$3::BIGINT", "n.seq", "n.tags"),
                tag("$3::BIGINT", &bump, "t.recent_writes"),
            ),
            // An expired row is absent: replacing it is a create.
            save_if_absent: format!(
                "WITH written AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, \
                 created_at, expires_at, recent_writes) \
                 SELECT $1::VARCHAR, $2::BYTEA, n.seq, {now}, {now}, {}, {} FROM {next} \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = {bump}, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = EXCLUDED.expires_at, recent_writes = {} WHERE {} \
                 RETURNING sequence_number, updated_at, created_at) {outcome}",
                ttl("$4"),
                tag("$3::BIGINT", "n.seq", "n.tags"),
                tag("$3::BIGINT", &bump, "t.recent_writes"),
                expired("t.")
            ),
            save_if_sequence: format!(
                "WITH written AS (UPDATE {t} SET state = $2::BYTEA, sequence_number = sequence_number + 1, \
                 updated_at = {now}, expires_at = {}, recent_writes = {} \
                 WHERE actor_id = $1::VARCHAR AND sequence_number = $3::BIGINT AND {} \
                 RETURNING sequence_number, updated_at, created_at) {outcome}",
                ttl("$5"),
                tag("$4::BIGINT", "$3::BIGINT + 1", "recent_writes"),
                live("")
            ),
            save_with_sequence: format!(
                "WITH written AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, \
                 created_at, recent_writes) \
                 SELECT $1::VARCHAR, $2::BYTEA, $3::BIGINT, {now}, {now}, {} FROM {next} \
                 WHERE n.seq - 1 < $3::BIGINT \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = EXCLUDED.sequence_number, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = NULL, recent_writes = {} \
                 WHERE t.sequence_number + CASE WHEN {} THEN 1 ELSE 0 END < EXCLUDED.sequence_number \
                 RETURNING sequence_number, updated_at, created_at) {outcome}",
                tag("$4::BIGINT", "$3::BIGINT", "n.tags"),
                tag("$4::BIGINT", "EXCLUDED.sequence_number", "t.recent_writes"),
                expired("t.")
            ),
            load: format!("SELECT state FROM {t} WHERE actor_id = $1::VARCHAR AND {}", live("")),
            load_versioned: format!(
                "SELECT state, sequence_number, updated_at, created_at FROM {t} WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
            // What a `StateCache` holds of each actor: it also keeps when
            // the state expires.
            load_cached: format!(
                "SELECT actor_id::TEXT, state, sequence_number, expires_at FROM {t} \
                 WHERE actor_id = ANY($1::VARCHAR[]) AND {}",
                live("")
            ),
            load_many: format!(
                "SELECT actor_id, state, sequence_number, updated_at, created_at FROM {t} \
                 WHERE actor_id = ANY($1::VARCHAR[]) AND {}",
                live("")
            ),
            load_many_ordered: format!(
                "SELECT i.n, t.state, t.sequence_number, t.updated_at, t.created_at \
                 FROM unnest($1::VARCHAR[]) WITH ORDINALITY AS i(id, n) \
                 JOIN {t} t ON t.actor_id = i.id AND {}",
                live("t.")
            ),
            // Rows are written in actor id order so that concurrent batches
            // lock them in one order and cannot deadlock.
            save_many: format!(
                "INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, created_at, \
                 recent_writes) \
                 SELECT i.id, i.st, COALESCE(b.sequence_number, 0) + 1, {now}, {now}, {} \
                 FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[]) AS i(id, st, w) \
                 LEFT JOIN {b} b ON b.actor_id = i.id ORDER BY i.id \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = {bump}, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = NULL, recent_writes = {tag_upsert} \
                 RETURNING actor_id::TEXT, sequence_number",
                tag("i.w", "COALESCE(b.sequence_number, 0) + 1", "b.recent_writes")
            ),
            // Per item: the new sequence number, or NULL and the sequence
            // number that blocked it. `expected` NULL means "absent".
            save_many_if: format!(
                "WITH input AS (SELECT * FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[], \
                 $4::BIGINT[]) AS i(id, st, expected, w)), \
                 locked AS (SELECT l.actor_id FROM {t} l JOIN input ON input.id = l.actor_id \
                 WHERE input.expected IS NOT NULL ORDER BY l.actor_id FOR UPDATE OF l), \
                 updated AS (UPDATE {t} AS t SET state = input.st, \
                 sequence_number = t.sequence_number + 1, updated_at = {now}, expires_at = NULL, \
                 recent_writes = {} FROM input \
                 WHERE t.actor_id = input.id AND t.actor_id IN (SELECT actor_id FROM locked) \
                 AND t.sequence_number = input.expected AND {} RETURNING t.actor_id, t.sequence_number), \
                 inserted AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, \
                 created_at, recent_writes) \
                 SELECT input.id, input.st, COALESCE(b.sequence_number, 0) + 1, {now}, {now}, {} \
                 FROM input LEFT JOIN {b} b ON b.actor_id = input.id \
                 WHERE input.expected IS NULL ORDER BY input.id \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = {bump}, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = NULL, recent_writes = {tag_upsert} WHERE {} \
                 RETURNING actor_id, sequence_number) \
                 SELECT input.id::TEXT, COALESCE(u.sequence_number, n.sequence_number), c.sequence_number \
                 FROM input LEFT JOIN updated u ON u.actor_id = input.id \
                 LEFT JOIN inserted n ON n.actor_id = input.id \
                 LEFT JOIN {t} c ON c.actor_id = input.id AND {}",
                tag("input.w", "t.sequence_number + 1", "t.recent_writes"),
                live("t."),
                tag(
                    "input.w",
                    "COALESCE(b.sequence_number, 0) + 1",
                    "b.recent_writes"
                ),
                expired("t."),
                live("c.")
            ),
            // A batch locks its existing rows in actor id order first, so
            // that batches over the same actors cannot deadlock.
            lock_many: format!(
                "SELECT actor_id FROM {t} WHERE actor_id = ANY($1::VARCHAR[]) \
                 ORDER BY actor_id FOR UPDATE"
            ),
            // Each deleted id, and whether it was live: an expired row is
            // removed (and announced) too, but it did not exist any more.
            delete_many: format!(
                "DELETE FROM {t} WHERE actor_id IN (SELECT l.actor_id FROM {t} l \
                 WHERE l.actor_id = ANY($1::VARCHAR[]) ORDER BY l.actor_id FOR UPDATE) \
                 AND {set_write_id} RETURNING actor_id::TEXT, {}",
                live("")
            ),
            // The current version of each actor, or its tombstone when deleted:
            // what a listener announces after a gap instead of a resync.
            // An expired row is reported as deleted at the next number, as
            // the sweeper will announce it.
            catch_up: CatchUpQuery::new(format!(
                "SELECT actor_id::TEXT AS actor_id, \
                 sequence_number + CASE WHEN {e} THEN 1 ELSE 0 END AS sequence_number, \
                 COALESCE({e}, false) AS deleted, \
                 EXTRACT(EPOCH FROM CASE WHEN {e} THEN expires_at ELSE updated_at END)::FLOAT8 \
                 AS at_epoch \
                 FROM {t} WHERE actor_id = ANY($1::VARCHAR[]) \
                 UNION ALL \
                 SELECT b.actor_id::TEXT, b.sequence_number, true, \
                 EXTRACT(EPOCH FROM b.deleted_at)::FLOAT8 FROM {b} b \
                 WHERE b.actor_id = ANY($1::VARCHAR[]) \
                 AND NOT EXISTS (SELECT 1 FROM {t} c WHERE c.actor_id = b.actor_id)",
                e = expired("")
            )),
            delete: format!(
                "DELETE FROM {t} WHERE actor_id = $1::VARCHAR AND {set_write_id} RETURNING {}",
                live("")
            ),
            exists: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE actor_id = $1::VARCHAR AND {})",
                live("")
            ),
            sequence: format!(
                "SELECT sequence_number FROM {t} WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
            // Keyset pages in the primary key's order: each page is one index
            // range scan, whatever the page. The first page starts after ''
            // (actor ids are never empty).
            list_page: list_page(""),
            list_page_range: list_page(&range(4)),
            count_prefix: count_prefix(""),
            count_prefix_range: count_prefix(&range(2)),
            count_tombstones: format!("SELECT count(*) FROM {b}"),
            scan_prefix: scan_prefix(""),
            scan_prefix_range: scan_prefix(&range(2)),
            key_order: KEY_ORDER.to_owned(),
            // Per item: whether it was written, else the stored version (and
            // whether its bytes are the ones given) or the tombstone that
            // blocked it. Timestamps given as NULL become now. A created row
            // carries an empty tag list, which marks it as the library's:
            // the trigger then refuses it if a delete committed meanwhile
            // left a tombstone at or above its number.
            restore_many: format!(
                "WITH input AS (SELECT * FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[], \
                 $4::TIMESTAMP[], $5::TIMESTAMP[], $6::TIMESTAMP[]) AS i(id, st, seq, upd, crt, exp)), \
                 written AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, created_at, \
                 expires_at, recent_writes) \
                 SELECT i.id, i.st, i.seq, COALESCE(i.upd, {now}), COALESCE(i.crt, i.upd, {now}), i.exp, \
                 '{{}}'::BIGINT[] \
                 FROM input i LEFT JOIN {b} b ON b.actor_id = i.id \
                 WHERE COALESCE(b.sequence_number, 0) < i.seq ORDER BY i.id \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = EXCLUDED.sequence_number, updated_at = EXCLUDED.updated_at, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE t.sequence_number < EXCLUDED.sequence_number RETURNING actor_id) \
                 SELECT i.id::TEXT, w.actor_id IS NOT NULL, c.sequence_number, c.state = i.st, \
                 b.sequence_number FROM input i LEFT JOIN written w ON w.actor_id = i.id \
                 LEFT JOIN {t} c ON c.actor_id = i.id LEFT JOIN {b} b ON b.actor_id = i.id"
            ),
            // Up to $1 expired rows, oldest first, skipping rows another
            // transaction holds; deleted through the trigger, so each is
            // announced and leaves a tombstone. The condition is checked
            // again on the row deleted, which a save may have renewed.
            // One batch of old tombstones in key order, after the last id
            // of the batch before ($1); a batch shorter than the limit has
            // reached the end.
            purge_tombstones: format!(
                "WITH doomed AS (SELECT actor_id FROM {b} WHERE actor_id > $1::VARCHAR \
                 AND deleted_at < {now} - $2::INT8 * INTERVAL '1 microsecond' \
                 ORDER BY actor_id LIMIT $3::INT8 FOR UPDATE SKIP LOCKED), \
                 gone AS (DELETE FROM {b} g USING doomed d WHERE g.actor_id = d.actor_id \
                 RETURNING g.actor_id) \
                 SELECT count(*), max(actor_id)::TEXT FROM gone"
            ),
            sweep: format!(
                "WITH gone AS (DELETE FROM {t} WHERE actor_id IN (SELECT e.actor_id FROM {t} e \
                 WHERE {} ORDER BY e.expires_at LIMIT $1::BIGINT FOR UPDATE SKIP LOCKED) AND {} \
                 RETURNING 1) SELECT count(*) FROM gone",
                expired("e."),
                expired("")
            ),
            // What a writer whose connection dropped reads back to learn
            // whether its write landed.
            outcomes: format!(
                "SELECT i.id::TEXT, c.sequence_number, c.recent_writes, b.sequence_number, \
                 b.recent_writes, c.updated_at, c.created_at FROM unnest($1::VARCHAR[]) AS i(id) \
                 LEFT JOIN {t} c ON c.actor_id = i.id LEFT JOIN {b} b ON b.actor_id = i.id"
            ),
        }
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
        Error::Database(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
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
    if done.is_empty() && !companions_present(&mut tx, names)? {
        for (_, _, template) in MIGRATIONS {
            tx.batch_execute(&rendered.render(template))
                .map_err(Error::Database)?;
        }
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
fn check_layout(tx: &mut postgres::Transaction<'_>, names: &Names, wanted: u32) -> Result<()> {
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
    fn every_statement_casts_each_parameter() {
        // Unnamed statements (through a transaction-mode pooler) take their
        // parameter types from these casts. Destructured in full, so that a
        // new statement cannot be left out of this test.
        let names = Names::new("game.rooms", "room_changes").unwrap();
        let Statements {
            save,
            save_if_absent,
            save_if_sequence,
            save_with_sequence,
            load,
            load_versioned,
            load_many,
            load_cached,
            load_many_ordered,
            save_many,
            save_many_if,
            delete_many,
            lock_many,
            catch_up,
            delete,
            exists,
            sequence,
            list_page,
            list_page_range,
            count_prefix,
            count_prefix_range,
            count_tombstones,
            scan_prefix,
            scan_prefix_range,
            key_order,
            restore_many,
            outcomes,
            sweep,
            purge_tombstones,
        } = Statements::new(&names);
        for (name, sql) in [
            ("save", save),
            ("save_if_absent", save_if_absent),
            ("save_if_sequence", save_if_sequence),
            ("save_with_sequence", save_with_sequence),
            ("load", load),
            ("load_versioned", load_versioned),
            ("load_many", load_many),
            ("load_cached", load_cached),
            ("load_many_ordered", load_many_ordered),
            ("save_many", save_many),
            ("save_many_if", save_many_if),
            ("delete_many", delete_many),
            ("lock_many", lock_many),
            ("catch_up", catch_up.sql().to_owned()),
            ("delete", delete),
            ("exists", exists),
            ("sequence", sequence),
            ("list_page", list_page),
            ("list_page_range", list_page_range),
            ("count_prefix", count_prefix),
            ("count_prefix_range", count_prefix_range),
            ("count_tombstones", count_tombstones),
            ("scan_prefix", scan_prefix),
            ("scan_prefix_range", scan_prefix_range),
            ("key_order", key_order),
            ("restore_many", restore_many),
            ("outcomes", outcomes),
            ("sweep", sweep),
            ("purge_tombstones", purge_tombstones),
        ] {
            assert!(
                crate::pool::param_types(&sql).is_some(),
                "{name} has a parameter without a cast: {sql}"
            );
        }
    }

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
