//! The SQL of every operation on one table, built once per store from its
//! validated, quoted names: each statement with its declared parameter
//! types ([`Sql`]).

use postgres::types::Type;

use super::{Engine, Names};
use crate::pool::Sql;

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
    /// Where the table lives; on Citus some statements take another form.
    pub engine: Engine,
    pub save: Sql,
    pub save_if_absent: Sql,
    pub save_if_sequence: Sql,
    pub save_with_sequence: Sql,
    pub load: Sql,
    pub load_versioned: Sql,
    pub load_many: Sql,
    pub load_cached: Sql,
    pub load_many_ordered: Sql,
    /// Coalesced point reads: per id, its position, its state when asked
    /// for, and its version.
    pub read_many: Sql,
    pub save_many: Sql,
    pub save_many_if: Sql,
    pub delete_many: Sql,
    pub lock_many: Sql,
    pub catch_up: Sql,
    pub delete: Sql,
    pub exists: Sql,
    pub sequence: Sql,
    pub list_page: Sql,
    pub list_page_range: Sql,
    pub count_prefix: Sql,
    pub count_prefix_range: Sql,
    pub count_tombstones: Sql,
    pub scan_prefix: Sql,
    pub scan_prefix_range: Sql,
    pub key_order: Sql,
    pub restore_many: Sql,
    pub sweep: Sql,
    pub purge_tombstones: Sql,
    pub outcomes: Sql,
}

/// The time the statements stamp rows with: UTC, as the columns hold it.
pub(super) const NOW: &str = "(now() AT TIME ZONE 'UTC')";

/// Expiry: a row past its expires_at reads as absent. A write treats it as
/// an actor deleted at the next number: it takes the number after that and
/// starts a new created_at. `live` and `expired` take the row's alias with
/// its dot ("" for none).
pub(super) fn live(alias: &str) -> String {
    format!("({alias}expires_at IS NULL OR {alias}expires_at > {NOW})")
}

/// See [`live`].
pub(super) fn expired(alias: &str) -> String {
    format!("{alias}expires_at <= {NOW}")
}

/// The expiry time of a time to live given as microseconds in parameter
/// `param`; NULL for none.
pub(super) fn ttl(param: &str) -> String {
    format!("{NOW} + {param}::BIGINT * INTERVAL '1 microsecond'")
}

impl Statements {
    pub fn new(names: &Names, engine: Engine) -> Self {
        let mut sql = Self::postgres(names);
        if engine == Engine::Citus {
            sql.citus(names);
        }
        sql
    }

    fn postgres(names: &Names) -> Self {
        let t = names.table_sql();
        let b = names.qualify(&names.tombstones);
        let now = NOW;
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
            engine: Engine::Postgres,
            save: Sql::new(format!(
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
            ), &[Type::VARCHAR, Type::BYTEA, Type::INT8, Type::INT8]),
            // An expired row is absent: replacing it is a create.
            save_if_absent: Sql::new(format!(
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
            ), &[Type::VARCHAR, Type::BYTEA, Type::INT8, Type::INT8]),
            save_if_sequence: Sql::new(format!(
                "WITH written AS (UPDATE {t} SET state = $2::BYTEA, sequence_number = sequence_number + 1, \
                 updated_at = {now}, expires_at = {}, recent_writes = {} \
                 WHERE actor_id = $1::VARCHAR AND sequence_number = $3::BIGINT AND {} \
                 RETURNING sequence_number, updated_at, created_at) {outcome}",
                ttl("$5"),
                tag("$4::BIGINT", "$3::BIGINT + 1", "recent_writes"),
                live("")
            ), &[Type::VARCHAR, Type::BYTEA, Type::INT8, Type::INT8, Type::INT8]),
            save_with_sequence: Sql::new(format!(
                "WITH written AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, \
                 created_at, expires_at, recent_writes) \
                 SELECT $1::VARCHAR, $2::BYTEA, $3::BIGINT, {now}, {now}, {}, {} FROM {next} \
                 WHERE n.seq - 1 < $3::BIGINT \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = EXCLUDED.sequence_number, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = EXCLUDED.expires_at, recent_writes = {} \
                 WHERE t.sequence_number + CASE WHEN {} THEN 1 ELSE 0 END < EXCLUDED.sequence_number \
                 RETURNING sequence_number, updated_at, created_at) {outcome}",
                ttl("$5"),
                tag("$4::BIGINT", "$3::BIGINT", "n.tags"),
                tag("$4::BIGINT", "EXCLUDED.sequence_number", "t.recent_writes"),
                expired("t.")
            ), &[Type::VARCHAR, Type::BYTEA, Type::INT8, Type::INT8, Type::INT8]),
            load: Sql::new(format!("SELECT state FROM {t} WHERE actor_id = $1::VARCHAR AND {}", live("")), &[Type::VARCHAR]),
            load_versioned: Sql::new(format!(
                "SELECT state, sequence_number, updated_at, created_at, expires_at FROM {t} \
                 WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ), &[Type::VARCHAR]),
            // What a `StateCache` holds of each actor: it also keeps when
            // the state expires.
            load_cached: Sql::new(format!(
                "SELECT actor_id::TEXT, state, sequence_number, expires_at FROM {t} \
                 WHERE actor_id = ANY($1::VARCHAR[]) AND {}",
                live("")
            ), &[Type::VARCHAR_ARRAY]),
            load_many: Sql::new(format!(
                "SELECT actor_id, state, sequence_number, updated_at, created_at FROM {t} \
                 WHERE actor_id = ANY($1::VARCHAR[]) AND {}",
                live("")
            ), &[Type::VARCHAR_ARRAY]),
            load_many_ordered: Sql::new(format!(
                "SELECT i.n, t.state, t.sequence_number, t.updated_at, t.created_at, t.expires_at \
                 FROM unnest($1::VARCHAR[]) WITH ORDINALITY AS i(id, n) \
                 JOIN {t} t ON t.actor_id = i.id AND {}",
                live("t.")
            ), &[Type::VARCHAR_ARRAY]),
            read_many: Sql::new(format!(
                "SELECT i.n, CASE WHEN i.whole THEN t.state END, t.sequence_number, t.updated_at, \
                 t.created_at, t.expires_at \
                 FROM unnest($1::VARCHAR[], $2::BOOL[]) WITH ORDINALITY AS i(id, whole, n) \
                 JOIN {t} t ON t.actor_id = i.id AND {}",
                live("t.")
            ), &[Type::VARCHAR_ARRAY, Type::BOOL_ARRAY]),
            // Rows are written in actor id order so that concurrent batches
            // lock them in one order and cannot deadlock.
            save_many: Sql::new(format!(
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
            ), &[Type::VARCHAR_ARRAY, Type::BYTEA_ARRAY, Type::INT8_ARRAY]),
            // Per item: the new sequence number, or NULL and the sequence
            // number that blocked it. `expected` NULL means "absent".
            save_many_if: Sql::new(format!(
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
            ), &[Type::VARCHAR_ARRAY, Type::BYTEA_ARRAY, Type::INT8_ARRAY, Type::INT8_ARRAY]),
            // A batch locks its existing rows in actor id order first, so
            // that batches over the same actors cannot deadlock.
            lock_many: Sql::new(format!(
                "SELECT actor_id FROM {t} WHERE actor_id = ANY($1::VARCHAR[]) \
                 ORDER BY actor_id FOR UPDATE"
            ), &[Type::VARCHAR_ARRAY]),
            // Each deleted id, and whether it was live: an expired row is
            // removed (and announced) too, but it did not exist any more.
            delete_many: Sql::new(format!(
                "DELETE FROM {t} WHERE actor_id IN (SELECT l.actor_id FROM {t} l \
                 WHERE l.actor_id = ANY($1::VARCHAR[]) ORDER BY l.actor_id FOR UPDATE) \
                 AND {set_write_id} RETURNING actor_id::TEXT, {}",
                live("")
            ), &[Type::VARCHAR_ARRAY, Type::INT8]),
            // The current version of each actor, or its tombstone when deleted:
            // what a listener announces after a gap instead of a resync.
            // An expired row is reported as deleted at the next number, as
            // the sweeper will announce it.
            catch_up: Sql::new(format!(
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
            ), &[Type::VARCHAR_ARRAY]),
            delete: Sql::new(format!(
                "DELETE FROM {t} WHERE actor_id = $1::VARCHAR AND {set_write_id} RETURNING {}",
                live("")
            ), &[Type::VARCHAR, Type::INT8]),
            exists: Sql::new(format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE actor_id = $1::VARCHAR AND {})",
                live("")
            ), &[Type::VARCHAR]),
            sequence: Sql::new(format!(
                "SELECT sequence_number FROM {t} WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ), &[Type::VARCHAR]),
            // Keyset pages in the primary key's order: each page is one index
            // range scan, whatever the page. The first page starts after ''
            // (actor ids are never empty).
            list_page: Sql::new(list_page(""), &[Type::TEXT, Type::VARCHAR, Type::INT8]),
            list_page_range: Sql::new(list_page(&range(4)), &[Type::TEXT, Type::VARCHAR, Type::INT8, Type::VARCHAR, Type::VARCHAR]),
            count_prefix: Sql::new(count_prefix(""), &[Type::TEXT]),
            count_prefix_range: Sql::new(count_prefix(&range(2)), &[Type::TEXT, Type::VARCHAR, Type::VARCHAR]),
            count_tombstones: Sql::new(format!("SELECT count(*) FROM {b}"), &[]),
            scan_prefix: Sql::new(scan_prefix(""), &[Type::TEXT]),
            scan_prefix_range: Sql::new(scan_prefix(&range(2)), &[Type::TEXT, Type::VARCHAR, Type::VARCHAR]),
            key_order: Sql::new(KEY_ORDER.to_owned(), &[Type::TEXT]),
            // Per item: whether it was written, else the stored version (and
            // whether its bytes are the ones given) or the tombstone that
            // blocked it. Timestamps given as NULL become now. A created row
            // carries an empty tag list, which marks it as the library's:
            // the trigger then refuses it if a delete committed meanwhile
            // left a tombstone at or above its number.
            restore_many: Sql::new(format!(
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
            ), &[Type::VARCHAR_ARRAY, Type::BYTEA_ARRAY, Type::INT8_ARRAY, Type::TIMESTAMP_ARRAY, Type::TIMESTAMP_ARRAY, Type::TIMESTAMP_ARRAY]),
            // Up to $1 expired rows, oldest first, skipping rows another
            // transaction holds; deleted through the trigger, so each is
            // announced and leaves a tombstone. The condition is checked
            // again on the row deleted, which a save may have renewed.
            // One batch of old tombstones in key order, after the last id
            // of the batch before ($1); a batch shorter than the limit has
            // reached the end.
            purge_tombstones: Sql::new(format!(
                "WITH doomed AS (SELECT actor_id FROM {b} WHERE actor_id > $1::VARCHAR \
                 AND deleted_at < {now} - $2::INT8 * INTERVAL '1 microsecond' \
                 ORDER BY actor_id LIMIT $3::INT8 FOR UPDATE SKIP LOCKED), \
                 gone AS (DELETE FROM {b} g USING doomed d WHERE g.actor_id = d.actor_id \
                 RETURNING g.actor_id) \
                 SELECT count(*), max(actor_id)::TEXT FROM gone"
            ), &[Type::VARCHAR, Type::INT8, Type::INT8]),
            sweep: Sql::new(format!(
                "WITH gone AS (DELETE FROM {t} WHERE actor_id IN (SELECT e.actor_id FROM {t} e \
                 WHERE {} ORDER BY e.expires_at LIMIT $1::BIGINT FOR UPDATE SKIP LOCKED) AND {} \
                 RETURNING 1) SELECT count(*) FROM gone",
                expired("e."),
                expired("")
            ), &[Type::INT8]),
            // What a writer whose connection dropped reads back to learn
            // whether its write landed.
            outcomes: Sql::new(format!(
                "SELECT i.id::TEXT, c.sequence_number, c.recent_writes, b.sequence_number, \
                 b.recent_writes, c.updated_at, c.created_at FROM unnest($1::VARCHAR[]) AS i(id) \
                 LEFT JOIN {t} c ON c.actor_id = i.id LEFT JOIN {b} b ON b.actor_id = i.id"
            ), &[Type::VARCHAR_ARRAY]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_declares_the_types_its_casts_name() {
        // Unnamed statements (through a transaction-mode pooler) are sent
        // with their declared types, which must be the ones their casts
        // name. Destructured in full, so that a new statement cannot be
        // left out of this test.
        let names = Names::new("game.rooms", "room_changes").unwrap();
        for engine in [Engine::Postgres, Engine::Citus] {
            let Statements {
                engine: _,
                save,
                save_if_absent,
                save_if_sequence,
                save_with_sequence,
                load,
                load_versioned,
                load_many,
                load_cached,
                load_many_ordered,
                read_many,
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
            } = Statements::new(&names, engine);
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
                ("read_many", read_many),
                ("save_many", save_many),
                ("save_many_if", save_many_if),
                ("delete_many", delete_many),
                ("lock_many", lock_many),
                ("catch_up", catch_up),
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
                assert_eq!(
                    crate::pool::param_types(sql.text()).as_deref(),
                    Some(sql.types()),
                    "{name} ({engine:?}): the declared parameter types are not the casts: {sql:?}"
                );
            }
        }
    }
}
