//! The library's statements as the benchmark runs them through pgbench.

use super::*;

// ----- the library's SQL ---------------------------------------------------

/// The library's statements for one table.
///
/// MUST MATCH `Statements::new` in src/schema.rs, which is not public: the
/// text below is copied from it. After every library run the benchmark
/// compares the text its connections last ran (`pg_stat_activity.query`)
/// with these, and says so when they differ.
pub(crate) struct LibrarySql {
    pub(crate) save: String,
    pub(crate) save_if_sequence: String,
    pub(crate) load: String,
    pub(crate) load_versioned: String,
    pub(crate) load_many: String,
    /// `save_many` and `load_many_bytes`, which grouped saves and the bulk
    /// rates run: no pgbench twin, but texts the library's connections are
    /// left with.
    pub(crate) save_many: String,
    pub(crate) load_many_ordered: String,
    pub(crate) delete: String,
    pub(crate) sequence: String,
}

impl LibrarySql {
    /// `t`: the quoted table; `b`: the quoted tombstone table
    /// (`Names::tombstones`, `{table}_tombstones`).
    pub(crate) fn new(t: &str, b: &str) -> LibrarySql {
        let now = "(now() AT TIME ZONE 'UTC')";
        let live = |a: &str| format!("({a}expires_at IS NULL OR {a}expires_at > {now})");
        let expired = |a: &str| format!("{a}expires_at <= {now}");
        let bump = format!(
            "t.sequence_number + CASE WHEN {} THEN 2 ELSE 1 END",
            expired("t.")
        );
        let renew = format!(
            "created_at = CASE WHEN {} THEN EXCLUDED.created_at ELSE t.created_at END",
            expired("t.")
        );
        let ttl = |p: &str| format!("{now} + {p}::BIGINT * INTERVAL '1 microsecond'");
        let next = format!(
            "(SELECT COALESCE(b.sequence_number, 0) + 1 AS seq, b.recent_writes AS tags \
             FROM (SELECT 1) one LEFT JOIN {b} b ON b.actor_id = $1::VARCHAR) n"
        );
        let tag = |write_id: &str, sequence: &str, tags: &str| {
            format!("(ARRAY[{write_id} # ({sequence})] || {tags})[1:64]")
        };
        let set_write_id = "set_config('trebuchet.write_id', $2::BIGINT::TEXT, true) IS NOT NULL";
        let outcome = format!(
            "SELECT (SELECT sequence_number FROM written), (SELECT updated_at FROM written), \
             (SELECT created_at FROM written), \
             (SELECT c.sequence_number FROM {t} c WHERE c.actor_id = $1::VARCHAR AND {})",
            live("c.")
        );
        LibrarySql {
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
            save_if_sequence: format!(
                "WITH written AS (UPDATE {t} SET state = $2::BYTEA, sequence_number = sequence_number + 1, \
                 updated_at = {now}, expires_at = {}, recent_writes = {} \
                 WHERE actor_id = $1::VARCHAR AND sequence_number = $3::BIGINT AND {} \
                 RETURNING sequence_number, updated_at, created_at) {outcome}",
                ttl("$5"),
                tag("$4::BIGINT", "$3::BIGINT + 1", "recent_writes"),
                live("")
            ),
            load: format!(
                "SELECT state FROM {t} WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
            load_versioned: format!(
                "SELECT state, sequence_number, updated_at, created_at, expires_at FROM {t} \
                 WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
            load_many: format!(
                "SELECT actor_id, state, sequence_number, updated_at, created_at FROM {t} \
                 WHERE actor_id = ANY($1::VARCHAR[]) AND {}",
                live("")
            ),
            save_many: format!(
                "INSERT INTO {t} AS t (actor_id, state, sequence_number, updated_at, created_at, \
                 recent_writes) \
                 SELECT i.id, i.st, COALESCE(b.sequence_number, 0) + 1, {now}, {now}, {} \
                 FROM unnest($1::VARCHAR[], $2::BYTEA[], $3::BIGINT[]) AS i(id, st, w) \
                 LEFT JOIN {b} b ON b.actor_id = i.id ORDER BY i.id \
                 ON CONFLICT (actor_id) DO UPDATE SET state = EXCLUDED.state, \
                 sequence_number = {bump}, updated_at = EXCLUDED.updated_at, \
                 {renew}, expires_at = NULL, recent_writes = {} \
                 RETURNING actor_id::TEXT, sequence_number",
                tag("i.w", "COALESCE(b.sequence_number, 0) + 1", "b.recent_writes"),
                tag(
                    "EXCLUDED.recent_writes[1] # EXCLUDED.sequence_number",
                    &bump,
                    "t.recent_writes"
                ),
            ),
            load_many_ordered: format!(
                "SELECT i.n, t.state FROM unnest($1::VARCHAR[]) WITH ORDINALITY AS i(id, n) \
                 JOIN {t} t ON t.actor_id = i.id AND {}",
                live("t.")
            ),
            delete: format!(
                "DELETE FROM {t} WHERE actor_id = $1::VARCHAR AND {set_write_id} RETURNING {}",
                live("")
            ),
            sequence: format!(
                "SELECT sequence_number FROM {t} WHERE actor_id = $1::VARCHAR AND {}",
                live("")
            ),
        }
    }

    /// On Citus, the store's own texts of its point statements
    /// (`testing::point_statements`): the forms it chose there.
    pub(crate) fn citus(t: &str, store: &StateStore) -> LibrarySql {
        let mut sql = LibrarySql::new(t, "unused");
        for (name, text) in point_statements(store) {
            match name {
                "save" => sql.save = text,
                "save_if_sequence" => sql.save_if_sequence = text,
                "delete" => sql.delete = text,
                "load" => sql.load = text,
                "load_versioned" => sql.load_versioned = text,
                "sequence" => sql.sequence = text,
                _ => {}
            }
        }
        sql
    }

    pub(crate) fn all(&self) -> [&str; 9] {
        [
            &self.save,
            &self.save_if_sequence,
            &self.load,
            &self.load_versioned,
            &self.load_many,
            &self.save_many,
            &self.load_many_ordered,
            &self.delete,
            &self.sequence,
        ]
    }

    /// The statement a run of `op` must have executed.
    pub(crate) fn main_statement(&self, op: Op) -> &str {
        match op {
            Op::Load | Op::LoadDriver | Op::LoadWire => &self.load,
            Op::Save | Op::SaveGrouped => &self.save,
            Op::SaveIf | Op::Transform | Op::TransformContended => &self.save_if_sequence,
            Op::Delete => &self.delete,
        }
    }
}
