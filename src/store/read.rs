//! Point reads (`load`, `load_versioned`, `exists`, `sequence`), coalesced:
//! when several threads read at once, one statement (`= ANY` over their
//! ids) answers them all on one connection, and each caller gets its own
//! row. A lone reader runs its own one-row statement at once, as without
//! coalescing. See [`StateStoreBuilder::coalesce_reads`](super::StateStoreBuilder::coalesce_reads).

use postgres::Row;

use super::{check_actor_id, load_versioned_on, to_u64, Core, Failure, StateStore, Versioned};
use crate::error::Result;
use crate::pool::Connection;

/// Read statements in flight at once, each answering every reader queued
/// when it was sent: two keep the server busy while the client hands out
/// one answer and gathers the next readers.
pub(super) const READ_STATEMENTS: usize = 2;

/// Readers answered by one statement at most.
pub(super) const MAX_READ_GROUP: usize = 1000;

/// What a reader asks of its actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    State,
    Versioned,
    Exists,
    Sequence,
}

impl Kind {
    /// Whether the answer includes the state's bytes.
    fn needs_state(self) -> bool {
        matches!(self, Kind::State | Kind::Versioned)
    }
}

/// One queued read.
pub(super) struct Item {
    id: String,
    kind: Kind,
}

/// A reader's answer, as its kind asks.
pub(super) enum Answer {
    State(Option<Vec<u8>>),
    Versioned(Option<Versioned<Vec<u8>>>),
    Exists(bool),
    Sequence(Option<u64>),
}

impl StateStore {
    /// Reads `id` as `kind` asks, coalesced with concurrent readers when
    /// the store coalesces reads.
    pub(super) fn read(&self, id: &str, kind: Kind) -> Result<Answer> {
        check_actor_id(id)?;
        let Some(reads) = &self.inner.reads else {
            return self.call(true, |core, c| read_one(core, c, id, kind));
        };
        let item = Item {
            id: id.to_owned(),
            kind,
        };
        let answer = reads.submit(item, |items| match items.as_slice() {
            [one] => vec![self
                .call(true, |core, c| read_one(core, c, &one.id, one.kind))
                .map(Some)],
            // When the statement fails, each reader reads on its own, so
            // that it gets its own error, or its row.
            _ => match self.call(true, |core, c| read_many(core, c, &items)) {
                Ok(answers) => answers.into_iter().map(|a| Ok(Some(a))).collect(),
                Err(e) => {
                    log::debug!("a coalesced read failed: {e}; its readers read alone");
                    items.iter().map(|_| Ok(None)).collect()
                }
            },
        })?;
        match answer {
            Some(answer) => Ok(answer),
            None => self.call(true, |core, c| read_one(core, c, id, kind)),
        }
    }
}

/// One reader alone: its own one-row statement.
fn read_one(core: &Core, c: &mut Connection, id: &str, kind: Kind) -> Result<Answer, Failure> {
    let sql = core.sql();
    Ok(match kind {
        Kind::State => {
            let st = c.prepare(&sql.load)?;
            Answer::State(st.query_opt(&mut c.client, &[&id])?.map(|row| row.get(0)))
        }
        Kind::Versioned => Answer::Versioned(load_versioned_on(core, c, id)?),
        Kind::Exists => {
            let st = c.prepare(&sql.exists)?;
            Answer::Exists(st.query_one(&mut c.client, &[&id])?.get(0))
        }
        Kind::Sequence => {
            let st = c.prepare(&sql.sequence)?;
            Answer::Sequence(
                st.query_opt(&mut c.client, &[&id])?
                    .map(|row| to_u64(row.get(0))),
            )
        }
    })
}

/// Several readers: one statement, its rows matched to the readers by
/// position (an id read twice is answered twice).
fn read_many(core: &Core, c: &mut Connection, items: &[Item]) -> Result<Vec<Answer>, Failure> {
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let states: Vec<bool> = items.iter().map(|i| i.kind.needs_state()).collect();
    let st = c.prepare(&core.sql().read_many)?;
    let mut rows: Vec<Option<Row>> = (0..items.len()).map(|_| None).collect();
    for row in st.query(&mut c.client, &[&ids, &states])? {
        let n: i64 = row.get(0);
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| rows.get_mut(i)) {
            *slot = Some(row);
        }
    }
    Ok(items
        .iter()
        .zip(rows)
        .map(|(item, row)| answer(item.kind, row))
        .collect())
}

/// A reader's answer from its row of [`read_many`]: position, state (when
/// asked for), sequence number, updated, created, expires.
fn answer(kind: Kind, row: Option<Row>) -> Answer {
    match kind {
        Kind::State => Answer::State(row.map(|r| r.get(1))),
        Kind::Versioned => Answer::Versioned(row.map(|r| {
            Versioned::new(r.get(1), to_u64(r.get(2)), r.get(3), r.get(4)).with_expires_at(r.get(5))
        })),
        Kind::Exists => Answer::Exists(row.is_some()),
        Kind::Sequence => Answer::Sequence(row.map(|r| to_u64(r.get(2)))),
    }
}
