//! Conditional writes: the statement, the re-reading of a version the
//! snapshot could not show, and what a broken connection left behind.

use super::*;

/// The conditional bulk write: one outcome per id, in order.
///
/// A blocked item reports a version other than the one it expected, as
/// [`write_if_on`] does: where the statement's snapshot shows the expected
/// version (it predates the writer that blocked the item), the version is
/// read once more, and the items whose reading shows the expected version
/// again are written again in a statement of their own, up to the retry
/// policy's attempts.
pub(super) fn many_if_on(
    core: &Core,
    c: &mut Connection,
    ids: &[&str],
    states: &[&[u8]],
    expected: &[Option<i64>],
    write_ids: &[i64],
) -> Result<Vec<Written>, Failure> {
    let mut outcomes: Vec<Option<Written>> = ids.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..ids.len()).collect();
    let attempts = core.retry().max_attempts.max(1);
    for _ in 0..attempts {
        fn pick<T: Copy>(all: &[T], at: &[usize]) -> Vec<T> {
            at.iter().map(|&i| all[i]).collect()
        }
        let (p_ids, p_states) = (pick(ids, &pending), pick(states, &pending));
        let p_expected = pick(expected, &pending);
        let p_write_ids = pick(write_ids, &pending);
        let rows = bulk_query(
            core,
            c,
            &core.sql().save_many_if,
            &[&p_ids, &p_states, &p_expected, &p_write_ids],
            None,
        )?;
        let mut by_id: HashMap<String, (Option<i64>, Option<i64>)> = rows
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect();
        let stale: Vec<&str> = p_ids
            .iter()
            .zip(&p_expected)
            .filter(|(id, e)| match by_id.get(**id) {
                Some((Some(_), _)) => false,
                Some((None, actual)) => actual == *e,
                None => true,
            })
            .map(|(id, _)| *id)
            .collect();
        if !stale.is_empty() {
            let st = c.prepare(&core.sql().load_many)?;
            let current: HashMap<String, i64> = st
                .query(&mut c.client, &[&stale])?
                .iter()
                .map(|row| (row.get(0), row.get(2)))
                .collect();
            for id in stale {
                by_id.insert(id.to_owned(), (None, current.get(id).copied()));
            }
        }
        let mut again = Vec::new();
        for i in pending {
            outcomes[i] = match by_id.get(ids[i]) {
                Some((Some(sequence), _)) => Some(Written::Yes {
                    sequence: to_u64(*sequence),
                    updated_at: SystemTime::UNIX_EPOCH,
                    created_at: SystemTime::UNIX_EPOCH,
                }),
                Some((None, actual)) if *actual != expected[i] => Some(Written::Blocked {
                    actual: actual.map(to_u64),
                }),
                _ => {
                    again.push(i);
                    None
                }
            };
        }
        pending = again;
        if pending.is_empty() {
            return Ok(outcomes
                .into_iter()
                .map(|o| o.expect("every item has an outcome"))
                .collect());
        }
    }
    Err(Failure::Store(Error::TooManyConflicts {
        actor_id: ids[pending[0]].to_owned(),
        attempts,
    }))
}

/// A conditional write's result after its connection broke.
pub(super) fn settle_if(t: &Traces, id: &str, expected: Expected, w: i64) -> Result<Written> {
    let target = match expected {
        Expected::Sequence(n) => Some(n.saturating_add(1)),
        Expected::Absent => None,
    };
    let sequence = t.one(id, w, target)?;
    let trace = t.of(id);
    Ok(Written::Yes {
        sequence,
        updated_at: trace.updated_at.unwrap_or(SystemTime::UNIX_EPOCH),
        created_at: trace.created_at.unwrap_or(SystemTime::UNIX_EPOCH),
    })
}

/// The conditional bulk write's outcomes after its connection broke. Where
/// none of its rows landed, nothing was written. Otherwise each item landed,
/// or did not (blocked, or its statement of a second attempt was lost): a
/// conflict when the actor now holds another version than the expected
/// one, else not applied; or its tag was pushed out by later writes, and
/// its outcome is unknown.
pub(super) fn settle_many_if(
    t: &Traces,
    ids: &[&str],
    expected: &[Option<i64>],
    write_ids: &[i64],
) -> Result<Vec<Written>> {
    let target = |e: &Option<i64>| e.map(|n| to_u64(n).saturating_add(1));
    let w = write_ids.first().copied().unwrap_or_default();
    let committed = t.committed(ids.iter().copied().zip(expected.iter().map(target)), w)?;
    if !committed {
        return Err(t.not_applied());
    }
    Ok(ids
        .iter()
        .zip(expected)
        .map(|(id, e)| match t.landed(id, w, target(e)) {
            Landed::Yes(sequence) => Written::Yes {
                sequence,
                updated_at: SystemTime::UNIX_EPOCH,
                created_at: SystemTime::UNIX_EPOCH,
            },
            Landed::No => match t.sequence(id) {
                actual if actual.and_then(|n| i64::try_from(n).ok()) != *e => {
                    Written::Blocked { actual }
                }
                _ => Written::Lost(t.not_applied()),
            },
            Landed::Unknown => Written::Lost(t.unknown()),
        })
        .collect())
}

/// The ids a bulk delete removed while they were live (not expired).
pub(super) fn live_deletes(rows: Vec<postgres::Row>) -> std::collections::HashSet<String> {
    rows.iter()
        .filter(|row| row.get::<_, bool>(1))
        .map(|row| row.get(0))
        .collect()
}

pub(super) fn load_versioned_on(
    core: &Core,
    c: &mut Connection,
    id: &str,
) -> Result<Option<Versioned<Vec<u8>>>, Failure> {
    let st = c.prepare(&core.sql().load_versioned)?;
    Ok(st.query_opt(&mut c.client, &[&id])?.map(|row| {
        Versioned::new(row.get(0), to_u64(row.get(1)), row.get(2), row.get(3))
            .with_expires_at(row.get(4))
    }))
}

/// One conditional write: the state, the version it expects, its time to
/// live in microseconds and its write id.
#[derive(Clone, Copy)]
pub(super) struct Conditional<'a> {
    pub(super) state: &'a [u8],
    pub(super) expected: Expected,
    pub(super) ttl: Option<i64>,
    pub(super) write_id: i64,
}

/// The conditional write, in one round trip in the common case; `ttl` in
/// microseconds.
///
/// When `report_actual` is set, a write that is blocked reports a version
/// other than the expected one, true at some moment while it ran. The
/// statement's own reading comes from its snapshot, which may predate the
/// writer that blocked it (then it shows the expected version): the version
/// is read once more. When that reading shows the expected version again (a
/// create blocked by an actor that was deleted since), nothing stands in the
/// write's way any more and it is made again, up to the retry policy's
/// attempts.
pub(super) fn write_if_on(
    core: &Core,
    c: &mut Connection,
    id: &str,
    write: &Conditional<'_>,
    report_actual: bool,
) -> Result<Written, Failure> {
    let attempts = core.retry().max_attempts.max(1);
    for _ in 0..attempts {
        let actual = match write_if_once(core, c, id, write)? {
            Ok(written) => return Ok(written),
            Err(actual) => actual,
        };
        if !report_actual || Expected::from(actual) != write.expected {
            return Ok(Written::Blocked { actual });
        }
        let st = c.prepare(&core.sql().sequence)?;
        let actual = st
            .query_opt(&mut c.client, &[&id])?
            .map(|r| to_u64(r.get(0)));
        if Expected::from(actual) != write.expected {
            return Ok(Written::Blocked { actual });
        }
    }
    Err(Failure::Store(Error::TooManyConflicts {
        actor_id: id.to_owned(),
        attempts,
    }))
}

/// One conditional statement: what it wrote, or the version its snapshot
/// showed when it was blocked.
pub(super) fn write_if_once(
    core: &Core,
    c: &mut Connection,
    id: &str,
    write: &Conditional<'_>,
) -> Result<std::result::Result<Written, Option<u64>>, Failure> {
    let Conditional {
        state,
        expected,
        ttl,
        write_id,
    } = *write;
    let row = match expected {
        // On Citus the create answers nothing when it was blocked: the
        // number that blocked it is read next (a version the actor was in
        // while this write ran).
        Expected::Absent if core.sql().engine == Engine::Citus => {
            let st = c.prepare(&core.sql().save_if_absent)?;
            match st.query_opt(&mut c.client, &[&id, &state, &write_id, &ttl])? {
                Some(row) => row,
                None => {
                    let st = c.prepare(&core.sql().sequence)?;
                    let actual = st.query_opt(&mut c.client, &[&id])?;
                    return Ok(Err(actual.map(|row| to_u64(row.get(0)))));
                }
            }
        }
        Expected::Absent => {
            let st = c.prepare(&core.sql().save_if_absent)?;
            st.query_one(&mut c.client, &[&id, &state, &write_id, &ttl])?
        }
        Expected::Sequence(n) => {
            let n = to_i64(n)?;
            let st = c.prepare(&core.sql().save_if_sequence)?;
            st.query_one(&mut c.client, &[&id, &state, &n, &write_id, &ttl])?
        }
    };
    Ok(match row.get::<_, Option<i64>>(0) {
        Some(sequence) => Ok(Written::Yes {
            sequence: to_u64(sequence),
            updated_at: row
                .get::<_, Option<SystemTime>>(1)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            created_at: row
                .get::<_, Option<SystemTime>>(2)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }),
        None => Err(row.get::<_, Option<i64>>(3).map(to_u64)),
    })
}
