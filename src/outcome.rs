//! Finding out whether a write landed when its connection broke before the
//! reply arrived.
//!
//! Every write carries a random 64-bit write id. Each row it writes records
//! the tag `write id XOR new sequence number` in `recent_writes`, which keeps
//! the actor's 64 most recent tags (a delete records its tag in the
//! tombstone, and a re-created actor carries the tombstone's tags on). The
//! statement is the same round trip as without tags: the normal path pays a
//! few bytes per row and nothing else.
//!
//! When the connection breaks mid-write, the writer opens a new connection,
//! makes sure the server process that ran the old one is gone (so that the
//! write cannot land later), and reads the tags back:
//!
//! - a tag that decodes, with its write id, to one of the actor's sequence
//!   numbers means the write landed at that number;
//! - no such tag among fewer than 64 means it did not;
//! - no such tag among a full set means it did not if the write's own
//!   sequence number is known (conditional writes) and fewer than 64 writes
//!   can have followed it; otherwise the outcome is unknown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};
use crate::pool::{Backend, Connection, Pool};
use crate::schema::{Engine, Statements, WRITE_TAGS};

/// How the writes of a store whose connection broke mid-write turned out,
/// since the store was built: from [`StateStore::lost_writes`](crate::StateStore::lost_writes).
/// One count per statement: a group commit or a bulk write counts once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LostWrites {
    /// Found applied: the caller got its result as if nothing had happened.
    pub applied: u64,
    /// Found not applied: the caller got [`Error::NotApplied`] (or, inside
    /// `transform`, the step ran again).
    pub not_applied: u64,
    /// Not found out: the caller got [`Error::OutcomeUnknown`].
    pub unknown: u64,
}

/// The counters behind [`LostWrites`].
#[derive(Debug, Default)]
pub(crate) struct LostWriteCounters {
    applied: AtomicU64,
    not_applied: AtomicU64,
    unknown: AtomicU64,
}

/// A write's settled result, as the counters see it: a result that holds
/// one outcome per caller (a group commit) says through its first item
/// whether the statement landed.
pub(crate) trait Settled {
    /// The error that says the write did not land or is unknown, if any.
    fn lost(&self) -> Option<&Error> {
        None
    }
}

impl Settled for Vec<Result<u64>> {
    fn lost(&self) -> Option<&Error> {
        self.first().and_then(|r| r.as_ref().err())
    }
}

/// The error that says a settled write did not land or is unknown, if any.
pub(crate) fn lost<R: Settled>(result: &Result<R>) -> Option<&Error> {
    match result {
        Ok(settled) => settled.lost(),
        Err(e) => Some(e),
    }
}

impl LostWriteCounters {
    /// Counts how one lost write turned out.
    pub fn count<R: Settled>(&self, result: &Result<R>) {
        let counter = match lost(result) {
            Some(Error::NotApplied { .. }) => &self.not_applied,
            Some(Error::OutcomeUnknown { .. }) => &self.unknown,
            _ => &self.applied,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LostWrites {
        LostWrites {
            applied: self.applied.load(Ordering::Relaxed),
            not_applied: self.not_applied.load(Ordering::Relaxed),
            unknown: self.unknown.load(Ordering::Relaxed),
        }
    }
}

/// A new random write id (never 0).
pub(crate) fn write_id() -> i64 {
    loop {
        let id = fastrand::i64(..);
        if id != 0 {
            return id;
        }
    }
}

/// What an actor's row and tombstone say about recent writes.
#[derive(Debug, Default, Clone)]
pub(crate) struct Trace {
    pub row_sequence: Option<i64>,
    pub row_tags: Vec<i64>,
    pub tomb_sequence: Option<i64>,
    pub tomb_tags: Vec<i64>,
    pub updated_at: Option<SystemTime>,
    pub created_at: Option<SystemTime>,
}

/// Whether one write landed on one actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Landed {
    /// At this sequence number.
    Yes(u64),
    No,
    Unknown,
}

impl Trace {
    /// Whether the write `write_id` landed on this actor. `target` is the
    /// sequence number the write would have produced, when known.
    pub fn landed(&self, write_id: i64, target: Option<u64>) -> Landed {
        let newest = self
            .row_sequence
            .unwrap_or(0)
            .max(self.tomb_sequence.unwrap_or(0));
        let found = self
            .row_tags
            .iter()
            .chain(&self.tomb_tags)
            .map(|tag| tag ^ write_id)
            .find(|sequence| (1..=newest).contains(sequence));
        if let Some(sequence) = found {
            return Landed::Yes(sequence.unsigned_abs());
        }
        // Tags are only ever pushed out by later tagged writes, each with a
        // higher sequence number than the one before it.
        let complete = self.row_tags.len() < WRITE_TAGS && self.tomb_tags.len() < WRITE_TAGS;
        let too_few_since = target.is_some_and(|target| {
            u64::try_from(newest).unwrap_or(0) < target.saturating_add(WRITE_TAGS as u64)
        });
        if complete || too_few_since {
            Landed::No
        } else {
            Landed::Unknown
        }
    }
}

/// The traces of the actors a broken write was for, and how it broke.
#[derive(Debug)]
pub(crate) struct Traces {
    by_id: HashMap<String, Trace>,
    /// Whether the broken connection's server process is known to be gone.
    /// Behind a pooler it is not known (its server connection serves other
    /// clients and is not ours to stop), so a write still running there
    /// could land later: "not applied" is then never said.
    settled: bool,
    source: Arc<postgres::Error>,
    first: String,
}

impl Traces {
    pub fn of(&self, id: &str) -> Trace {
        self.by_id.get(id).cloned().unwrap_or_default()
    }

    pub fn landed(&self, id: &str, write_id: i64, target: Option<u64>) -> Landed {
        let landed = self
            .by_id
            .get(id)
            .map_or(Landed::No, |t| t.landed(write_id, target));
        match landed {
            Landed::No if !self.settled => Landed::Unknown,
            other => other,
        }
    }

    /// The current sequence number of `id`, if it exists.
    pub fn sequence(&self, id: &str) -> Option<u64> {
        self.by_id
            .get(id)
            .and_then(|t| t.row_sequence)
            .map(i64::unsigned_abs)
    }

    pub fn not_applied(&self) -> Error {
        Error::NotApplied {
            actor_id: self.first.clone(),
            source: Arc::clone(&self.source),
        }
    }

    pub fn unknown(&self) -> Error {
        Error::OutcomeUnknown {
            actor_id: self.first.clone(),
            source: Arc::clone(&self.source),
        }
    }

    /// A single-actor write's result: its sequence number, or why not.
    pub fn one(&self, id: &str, write_id: i64, target: Option<u64>) -> Result<u64> {
        match self.landed(id, write_id, target) {
            Landed::Yes(sequence) => Ok(sequence),
            Landed::No => Err(self.not_applied()),
            Landed::Unknown => Err(self.unknown()),
        }
    }

    /// Whether an all-or-nothing write over `items` (id, target) with one
    /// write id committed: `Ok(true)` when any of its tags is there,
    /// `Ok(false)` when none can be, else the unknown-outcome error.
    pub fn committed<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a str, Option<u64>)>,
        write_id: i64,
    ) -> Result<bool> {
        let mut unknown = false;
        for (id, target) in items {
            match self.landed(id, write_id, target) {
                Landed::Yes(_) => return Ok(true),
                Landed::No => {}
                Landed::Unknown => unknown = true,
            }
        }
        if unknown {
            Err(self.unknown())
        } else {
            Ok(false)
        }
    }
}

/// Finds out, on new connections, what the rows of `ids` say after a write
/// on a connection served by `backend` broke with `source`. First makes sure
/// that server process has exited, so the write cannot land afterwards.
/// Gives up with [`Error::OutcomeUnknown`] after `timeout`.
pub(crate) fn find_out(
    pool: &Pool,
    sql: &Statements,
    ids: &[&str],
    backend: Option<Backend>,
    source: Arc<postgres::Error>,
    timeout: Duration,
) -> Result<Traces> {
    let first = ids.first().copied().unwrap_or_default().to_owned();
    let deadline = Instant::now() + timeout;
    // A short, steady pause: while this writer waits, others may write the
    // same actor as soon as the server is back, and every write of theirs
    // pushes an older tag out. (A refused connect costs next to nothing.)
    let pause = Duration::from_millis(5);
    loop {
        match pool.open_unpooled() {
            Ok(mut conn) => match read(&mut conn, sql, ids, backend, deadline) {
                Ok(Some(by_id)) => {
                    return Ok(Traces {
                        by_id,
                        settled: backend.is_some(),
                        source,
                        first,
                    })
                }
                Ok(None) => break,
                Err(e) => log::debug!("finding out a write's outcome failed: {e}; trying again"),
            },
            Err(e) => log::debug!("finding out a write's outcome: {e}; trying again"),
        }
        if Instant::now() + pause >= deadline {
            break;
        }
        std::thread::sleep(pause);
    }
    Err(Error::OutcomeUnknown {
        actor_id: first,
        source,
    })
}

/// On Citus, whether the server processes on the workers that ran the
/// write for the coordinator's process `pid` have all ended (before
/// `deadline`). They outlive it: one that received its COMMIT before the
/// coordinator's process was stopped may still commit the write, after
/// that process is gone. Citus gives them the coordinator process's global
/// id, which `citus_stat_activity` shows for every node.
fn workers_done(
    conn: &mut Connection,
    pid: i32,
    deadline: Instant,
) -> std::result::Result<bool, postgres::Error> {
    poll(deadline, Duration::from_millis(2), || {
        let running: bool = conn
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM citus_stat_activity WHERE global_pid = \
                 citus_calculate_gpid(COALESCE((SELECT nodeid FROM pg_dist_node \
                 WHERE groupid = 0 AND noderole = 'primary'), 99999999), $1::INT4))",
                &[&pid],
            )?
            .get(0);
        Ok(!running)
    })
}

/// On Citus, whether the transactions that the coordinator's process `pid`
/// left prepared on the workers (a write of several actors commits in two
/// phases) have all been committed or rolled back, before `deadline`. They
/// outlive the process, holding their rows, until the coordinator settles
/// them from its record of what committed: `recover_prepared_transactions()`
/// does so at once where the role may call it, and the coordinator's
/// maintenance does within `citus.recover_2pc_interval` otherwise. Citus
/// names them `citus_<group>_<pid>_...`; the coordinator's group is 0.
fn prepared_done(
    conn: &mut Connection,
    pid: i32,
    deadline: Instant,
) -> std::result::Result<bool, postgres::Error> {
    // Once: the process and its workers' processes are gone, so no
    // transaction of theirs is prepared after this.
    if let Err(e) = conn
        .client
        .batch_execute("SELECT recover_prepared_transactions()")
    {
        if e.as_db_error().is_none() {
            return Err(e);
        }
        log::debug!("could not settle prepared transactions now: {e}");
    }
    let pattern = format!("citus\\_0\\_{pid}\\_%");
    poll(deadline, Duration::from_millis(10), || {
        let left: i64 = conn
            .client
            .query_one(
                "SELECT COALESCE(sum(result::INT8), 0)::INT8 FROM run_command_on_workers(\
                 format('SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE %L', $1::TEXT)) \
                 WHERE success",
                &[&pattern],
            )?
            .get(0);
        Ok(left == 0)
    })
}

/// Asks `done` every `pause` until it says so (`true`) or `deadline` has
/// passed (`false`).
fn poll(
    deadline: Instant,
    pause: Duration,
    mut done: impl FnMut() -> std::result::Result<bool, postgres::Error>,
) -> std::result::Result<bool, postgres::Error> {
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause);
    }
}

/// `None` when the old server process outlived the deadline.
fn read(
    conn: &mut Connection,
    sql: &Statements,
    ids: &[&str],
    backend: Option<Backend>,
    deadline: Instant,
) -> std::result::Result<Option<HashMap<String, Trace>>, postgres::Error> {
    if let Some(Backend { pid, started }) = backend {
        // A process of the same role may be signalled; where that is not
        // allowed, wait for the server to notice the broken socket itself.
        let terminate = conn.client.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid = $1 AND backend_start = $2",
            &[&pid, &started],
        );
        if let Err(e) = terminate {
            if e.as_db_error().is_none() {
                return Err(e);
            }
            log::debug!("could not end the broken connection's server process: {e}");
        }
        let gone = poll(deadline, Duration::from_millis(2), || {
            let alive: bool = conn
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                     WHERE pid = $1 AND backend_start = $2)",
                    &[&pid, &started],
                )?
                .get(0);
            Ok(!alive)
        })?;
        if !gone {
            return Ok(None);
        }
        if sql.engine == Engine::Citus
            && !(workers_done(conn, pid, deadline)? && prepared_done(conn, pid, deadline)?)
        {
            return Ok(None);
        }
    }
    let rows = conn
        .prepare(&sql.outcomes)?
        .query(&mut conn.client, &[&ids])?;
    Ok(Some(
        rows.iter()
            .map(|row| {
                (
                    row.get::<_, String>(0),
                    Trace {
                        row_sequence: row.get(1),
                        row_tags: tags(row.get(2)),
                        tomb_sequence: row.get(3),
                        tomb_tags: tags(row.get(4)),
                        updated_at: row.get(5),
                        created_at: row.get(6),
                    },
                )
            })
            .collect(),
    ))
}

/// The tags of a `recent_writes` array; NULL (no tagged write yet) is none.
fn tags(array: Option<Vec<Option<i64>>>) -> Vec<i64> {
    array.unwrap_or_default().into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(row: Option<i64>, tags: Vec<i64>) -> Trace {
        Trace {
            row_sequence: row,
            row_tags: tags,
            ..Trace::default()
        }
    }

    #[test]
    fn a_tag_of_this_write_says_where_it_landed() {
        let w = 0x1234_5678_9abc_def0;
        let t = trace(Some(7), vec![99 ^ 7, w ^ 6, 5 ^ 5]);
        assert_eq!(t.landed(w, None), Landed::Yes(6));
        assert_eq!(t.landed(w, Some(6)), Landed::Yes(6));
    }

    #[test]
    fn no_tag_among_fewer_than_all_means_not_applied() {
        let t = trace(Some(3), vec![11 ^ 3, 12 ^ 2, 13 ^ 1]);
        assert_eq!(t.landed(42, None), Landed::No);
        assert_eq!(trace(None, vec![]).landed(42, None), Landed::No);
    }

    #[test]
    fn a_full_set_decides_only_for_a_known_target() {
        let newest = 1000_i64;
        let tags: Vec<i64> = (0..WRITE_TAGS as i64)
            .map(|i| (5000 + i) ^ (newest - i))
            .collect();
        let t = trace(Some(newest), tags);
        // Unknown target: the write might have been pushed out.
        assert_eq!(t.landed(42, None), Landed::Unknown);
        // Ten writes at most followed it: it would still be there.
        assert_eq!(t.landed(42, Some(newest as u64 - 10)), Landed::No);
        // More writes than tags may have followed and pushed it out.
        let old = newest as u64 - WRITE_TAGS as u64 - 5;
        assert_eq!(t.landed(42, Some(old)), Landed::Unknown);
    }

    #[test]
    fn tombstone_tags_count_for_deletes() {
        let w = 77;
        let t = Trace {
            tomb_sequence: Some(4),
            tomb_tags: vec![w ^ 4],
            ..Trace::default()
        };
        assert_eq!(t.landed(w, None), Landed::Yes(4));
    }
}
