//! The forms some statements take on Citus, where the table is
//! distributed by `actor_id` (see the guide's chapter "Past one server").

use postgres::types::Type;

use super::statements::{live, ttl, NOW};
use super::{Engine, Names, Statements};
use crate::pool::Sql;

impl Statements {
    /// The forms of the single-actor writes that are router queries on a
    /// distributed table (one shard, one node, one-phase commit): they read
    /// no tombstone (the numbering trigger of `sql/citus.sql` does, on the
    /// shard's node); an INSERT stands at the top (Citus plans an INSERT in
    /// a CTE apart) and answers nothing when it was blocked; nothing in
    /// `ON CONFLICT ... DO UPDATE` calls `now()` (a row is expired if it is
    /// by the time the insert branch stamped); an array slice in a `SET`
    /// list is wrapped in `COALESCE` (a bare one ends a Citus 13.2
    /// coordinator's server process); the delete calls `set_config` after
    /// the row is gone, before its AFTER trigger runs at the statement's
    /// end.
    pub(super) fn citus(&mut self, names: &Names) {
        let t = names.table_sql();
        let now = NOW;
        // Expired by the time the insert branch stamped the row.
        let expired = "t.expires_at <= EXCLUDED.updated_at";
        let bump = format!("t.sequence_number + CASE WHEN {expired} THEN 2 ELSE 1 END");
        let renew = format!(
            "created_at = CASE WHEN {expired} THEN EXCLUDED.created_at ELSE t.created_at END"
        );
        let tag = |write_id: &str, sequence: &str, tags: &str| {
            format!("COALESCE((ARRAY[{write_id} # ({sequence})] || {tags})[1:64])")
        };
        // `number`: NULL for the one after the tombstone's, `-1 - n` for n
        // unless the tombstone is at n or above (see sql/citus.sql).
        let upsert = |number: &str, write_id: &str, ttl_param: &str, update: &str| {
            format!(
                "INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, created_at, \
                 expires_at, recent_writes) \
                 VALUES ($1::VARCHAR, $2::BYTEA, {number}, {now}, {now}, {}, ARRAY[{write_id}]) \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, {update}, \
                 updated_at = EXCLUDED.updated_at, {renew}, expires_at = EXCLUDED.expires_at",
                ttl(ttl_param)
            )
        };
        let next = |write_id: &str| {
            format!(
                "sequence_number = {bump}, recent_writes = {}",
                tag(write_id, &bump, "t.recent_writes")
            )
        };
        self.engine = Engine::Citus;
        self.save = Sql::new(
            format!(
                "{} RETURNING sequence_number",
                upsert("NULL", "$3::BIGINT", "$4", &next("$3::BIGINT"))
            ),
            &[Type::VARCHAR, Type::BYTEA, Type::INT8, Type::INT8],
        );
        self.save_if_absent = Sql::new(
            format!(
                "{} WHERE {expired} RETURNING sequence_number, updated_at, created_at",
                upsert("NULL", "$3::BIGINT", "$4", &next("$3::BIGINT"))
            ),
            &[Type::VARCHAR, Type::BYTEA, Type::INT8, Type::INT8],
        );
        self.save_if_sequence = Sql::new(
            format!(
                "WITH written AS (UPDATE {t} SET state = $2::BYTEA, \
                 sequence_number = sequence_number + 1, updated_at = {now}, expires_at = {}, \
                 recent_writes = {} \
                 WHERE actor_id = $1::VARCHAR AND sequence_number = $3::BIGINT AND {} \
                 RETURNING sequence_number, updated_at, created_at) \
                 SELECT (SELECT sequence_number FROM written), (SELECT updated_at FROM written), \
                 (SELECT created_at FROM written), \
                 (SELECT c.sequence_number FROM {t} c WHERE c.actor_id = $1::VARCHAR AND {})",
                ttl("$5"),
                tag("$4::BIGINT", "$3::BIGINT + 1", "recent_writes"),
                live(""),
                live("c.")
            ),
            &[
                Type::VARCHAR,
                Type::BYTEA,
                Type::INT8,
                Type::INT8,
                Type::INT8,
            ],
        );
        self.save_with_sequence = Sql::new(
            format!(
                "{} WHERE t.sequence_number + CASE WHEN {expired} THEN 1 ELSE 0 END \
                 < EXCLUDED.sequence_number RETURNING sequence_number, updated_at, created_at",
                upsert(
                    "-1 - $3::BIGINT",
                    "$4::BIGINT",
                    "$5",
                    &format!(
                        "sequence_number = EXCLUDED.sequence_number, recent_writes = {}",
                        tag("$4::BIGINT", "EXCLUDED.sequence_number", "t.recent_writes")
                    )
                )
            ),
            &[
                Type::VARCHAR,
                Type::BYTEA,
                Type::INT8,
                Type::INT8,
                Type::INT8,
            ],
        );
        // Writes of several actors span shards, which Citus commits in two
        // phases: the trigger must not notify on the workers (its
        // transaction runs with `trebuchet.announce` off, see
        // `citus_bulk_settings`), and the statement announces each row from
        // the coordinator with the trigger's payload.
        let channel = &names.channel;
        let payload = |id: &str, sequence: &str, timestamp: &str, op: &str| {
            format!(
                "pg_notify('{channel}', json_build_object('actorID', {id}, 'sequenceNumber', \
                 {sequence}, 'timestamp', {timestamp}, 'op', '{op}', 'table', \
                 (SELECT n.nspname || '.{table}' FROM pg_class c JOIN pg_namespace n \
                 ON n.oid = c.relnamespace WHERE c.oid = '{t}'::regclass))::TEXT)",
                table = names.table
            )
        };
        // The update branch of a create of several actors (numbered by the
        // trigger), and the announce of the rows a statement wrote (`w`).
        let upsert_many = format!(
            "ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
             sequence_number = {bump}, updated_at = EXCLUDED.updated_at, {renew}, \
             expires_at = NULL, recent_writes = {}",
            tag(
                "EXCLUDED.recent_writes[1] # EXCLUDED.sequence_number",
                &bump,
                "t.recent_writes"
            )
        );
        let announce_written = format!(
            "n AS (SELECT count({}) FROM w)",
            payload(
                "w.actor_id",
                "w.sequence_number",
                "EXTRACT(EPOCH FROM w.updated_at)",
                "save"
            )
        );
        self.save_many = Sql::new(
            format!(
                "WITH w AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, \
                 created_at, recent_writes) \
                 SELECT i.id, i.st, NULL, {now}, {now}, ARRAY[i.w] \
                 FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[]) AS i(id, st, w) ORDER BY i.id \
                 {upsert_many} RETURNING actor_id, sequence_number, updated_at), \
                 {announce_written} \
                 SELECT w.actor_id::TEXT, w.sequence_number FROM w, n"
            ),
            &[Type::VARCHAR_ARRAY, Type::BYTEA_ARRAY, Type::INT8_ARRAY],
        );
        // The write id ($2) reaches the trigger through the transaction's
        // settings; here it only keeps the parameters alike.
        self.delete_many = Sql::new(
            format!(
                "WITH gone AS (DELETE FROM {t} WHERE actor_id = ANY($1::VARCHAR[]) \
                 AND $2::BIGINT IS NOT NULL RETURNING actor_id, sequence_number, expires_at), \
                 n AS (SELECT count({}) FROM gone) \
                 SELECT gone.actor_id::TEXT, {} FROM gone, n",
                payload(
                    "gone.actor_id",
                    "gone.sequence_number + 1",
                    "EXTRACT(EPOCH FROM now())",
                    "delete"
                ),
                live("gone.")
            ),
            &[Type::VARCHAR_ARRAY, Type::INT8],
        );
        // Expired rows across the shards: picked first (a lock with a
        // LIMIT is not allowed across shards), then deleted where they are
        // still expired (a save may have renewed one meanwhile), and
        // announced from the coordinator. Sweepers of one table take turns
        // on an advisory lock on the coordinator.
        let expired_now = super::statements::expired("");
        self.sweep = Sql::new(
            format!(
                "WITH doomed AS (SELECT e.actor_id FROM {t} e WHERE e.{expired_now} \
                 ORDER BY e.expires_at LIMIT $1::BIGINT), \
                 gone AS (DELETE FROM {t} WHERE actor_id IN (SELECT actor_id FROM doomed) \
                 AND {expired_now} RETURNING actor_id, sequence_number), \
                 n AS (SELECT count({}) FROM gone) \
                 SELECT count(*) FROM gone, n",
                payload(
                    "gone.actor_id",
                    "gone.sequence_number + 1",
                    "EXTRACT(EPOCH FROM now())",
                    "delete"
                )
            ),
            &[Type::INT8],
        );
        // Old tombstones in key order, without `FOR UPDATE SKIP LOCKED`
        // (not allowed across shards): the age is checked again on the row
        // deleted, which may wait for a writer that holds it.
        let b = names.qualify(&names.tombstones);
        let old_enough = format!("deleted_at < {now} - $2::INT8 * INTERVAL '1 microsecond'");
        self.purge_tombstones = Sql::new(
            format!(
                "WITH doomed AS (SELECT actor_id FROM {b} WHERE actor_id > $1::VARCHAR \
                 AND {old_enough} ORDER BY actor_id LIMIT $3::INT8), \
                 gone AS (DELETE FROM {b} WHERE actor_id IN (SELECT actor_id FROM doomed) \
                 AND {old_enough} RETURNING actor_id) \
                 SELECT count(*), max(actor_id)::TEXT FROM gone"
            ),
            &[Type::VARCHAR, Type::INT8, Type::INT8],
        );
        // Conditional saves of several actors: the updates of the rows
        // expected at a number, and the creates of those expected absent
        // (numbered by the trigger), each a statement Citus runs apart and
        // first; the rows written are announced from the coordinator; the
        // stored version is read by id, after the writes, for those that
        // were blocked (a version the actor was in while the write ran).
        // No rows are locked first (a lock is not allowed across shards):
        // two such writes that meet may deadlock, and the server then
        // rolls one back, which runs again.
        self.save_many_if = Sql::new(
            format!(
                "WITH input AS (SELECT * FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[], \
                 $4::BIGINT[]) AS i(id, st, expected, w)), \
                 updated AS (UPDATE {t} AS t SET state = input.st, \
                 sequence_number = t.sequence_number + 1, updated_at = {now}, expires_at = NULL, \
                 recent_writes = {} FROM input \
                 WHERE t.actor_id = input.id AND input.expected IS NOT NULL \
                 AND t.sequence_number = input.expected AND {} \
                 RETURNING t.actor_id, t.sequence_number, t.updated_at), \
                 inserted AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, \
                 created_at, recent_writes) \
                 SELECT input.id, input.st, NULL, {now}, {now}, ARRAY[input.w] FROM input \
                 WHERE input.expected IS NULL ORDER BY input.id \
                 {upsert_many} WHERE {expired} \
                 RETURNING actor_id, sequence_number, updated_at), \
                 w AS (SELECT * FROM updated UNION ALL SELECT * FROM inserted), \
                 {announce_written} \
                 SELECT input.id::TEXT, w.sequence_number, c.sequence_number \
                 FROM input LEFT JOIN w ON w.actor_id = input.id \
                 LEFT JOIN (SELECT * FROM {t} WHERE actor_id = ANY($1::VARCHAR[]) AND {}) c \
                 ON c.actor_id = input.id CROSS JOIN n",
                tag("input.w", "t.sequence_number + 1", "t.recent_writes"),
                live("t."),
                live("")
            ),
            &[
                Type::VARCHAR_ARRAY,
                Type::BYTEA_ARRAY,
                Type::INT8_ARRAY,
                Type::INT8_ARRAY,
            ],
        );
        // A restore: the numbering trigger skips a row at or below its
        // tombstone (`-1 - n`) and keeps the empty tag list that marks a
        // restored row; the rows written are announced from the
        // coordinator. The stored versions are read by id (a join with the
        // whole table would bring every shard's rows to the coordinator).
        let b = names.qualify(&names.tombstones);
        self.restore_many = Sql::new(
            format!(
                "WITH input AS (SELECT * FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[], \
                 $4::TIMESTAMP[], $5::TIMESTAMP[], $6::TIMESTAMP[]) AS i(id, st, seq, upd, crt, exp)), \
                 w AS (INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, \
                 created_at, expires_at, recent_writes) \
                 SELECT i.id, i.st, -1 - i.seq, COALESCE(i.upd, {now}), COALESCE(i.crt, i.upd, {now}), \
                 i.exp, '{{}}'::BIGINT[] FROM input i ORDER BY i.id \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = EXCLUDED.sequence_number, updated_at = EXCLUDED.updated_at, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE t.sequence_number < EXCLUDED.sequence_number \
                 RETURNING actor_id, sequence_number, updated_at), \
                 {announce_written} \
                 SELECT i.id::TEXT, w.actor_id IS NOT NULL, c.sequence_number, c.state = i.st, \
                 b.sequence_number FROM input i LEFT JOIN w ON w.actor_id = i.id \
                 LEFT JOIN (SELECT * FROM {t} WHERE actor_id = ANY($1::VARCHAR[])) c \
                 ON c.actor_id = i.id \
                 LEFT JOIN (SELECT * FROM {b} WHERE actor_id = ANY($1::VARCHAR[])) b \
                 ON b.actor_id = i.id CROSS JOIN n",
            ),
            &[
                Type::VARCHAR_ARRAY,
                Type::BYTEA_ARRAY,
                Type::INT8_ARRAY,
                Type::TIMESTAMP_ARRAY,
                Type::TIMESTAMP_ARRAY,
                Type::TIMESTAMP_ARRAY,
            ],
        );
        // A batch locks its existing rows in actor id order first, so that
        // batches over the same actors cannot deadlock; a lock is not
        // allowed across shards, so on Citus it takes them one id at a
        // time (a router query each), in that order.
        self.lock_many = Sql::new(
            format!("SELECT actor_id FROM {t} WHERE actor_id = $1::VARCHAR FOR UPDATE"),
            &[Type::VARCHAR],
        );
        // `now()` may not stand in a RETURNING list either.
        self.delete = Sql::new(
            format!(
                "WITH gone AS (DELETE FROM {t} WHERE actor_id = $1::VARCHAR RETURNING expires_at) \
                 SELECT set_config('trebuchet.write_id', $2::BIGINT::TEXT, true) IS NOT NULL \
                 AND {} FROM gone",
                live("")
            ),
            &[Type::VARCHAR, Type::INT8],
        );
    }
}

/// What a write of several actors runs first in its transaction on Citus:
/// the trigger on the workers keeps tombstones and checks but does not
/// notify (the statement announces from the coordinator), and a delete's
/// write id reaches it there. `SET LOCAL` is passed on to the nodes of the
/// transaction when `citus.propagate_set_commands` is `local`. The shards
/// are written one after another, in shard order, so that two such writes
/// lock their rows in one order instead of waiting on each other until
/// the distributed deadlock detection (seconds) breaks the tie.
fn citus_bulk_settings(write_id: Option<i64>) -> String {
    let mut settings = "SET LOCAL citus.propagate_set_commands = 'local'; \
         SET LOCAL trebuchet.announce = 'off'; \
         SET LOCAL citus.multi_shard_modify_mode = 'sequential'"
        .to_owned();
    if let Some(write_id) = write_id {
        settings += &format!("; SET LOCAL trebuchet.write_id = '{write_id}'");
    }
    settings
}

impl Statements {
    /// What a write of several actors runs first in its transaction: on
    /// Citus, [`citus_bulk_settings`]; nothing on one server.
    pub(crate) fn bulk_settings(&self, write_id: Option<i64>) -> Option<String> {
        (self.engine == Engine::Citus).then(|| citus_bulk_settings(write_id))
    }
}
