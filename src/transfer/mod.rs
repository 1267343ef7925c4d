//! Whole-table work: listing actors page by page, reading every actor from
//! one snapshot (export), and writing actors back with their own sequence
//! numbers and timestamps (import).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::SystemTime;

use postgres::IsolationLevel;

use crate::error::{Error, Result};
use crate::store::{bulk_query, to_i64, to_u64, Raw, StateStore, Versioned};

mod pages;

use pages::prefix_end;

/// Rows fetched per round trip by [`Raw::for_each`].
const SCAN_BATCH: i32 = 500;

/// One actor in a listing: its id, version and stored size.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ActorSummary {
    /// The actor.
    pub actor_id: String,
    /// Its sequence number.
    pub sequence: u64,
    /// When it was last written (UTC, from the server's clock).
    pub updated_at: SystemTime,
    /// The size of its stored state in bytes.
    pub size: u64,
}

/// One page of a listing, from [`StateStore::list_actors`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ActorPage {
    /// The actors of this page, in the table's key order.
    pub actors: Vec<ActorSummary>,
    /// Where the next page starts: pass it as `after` to
    /// [`list_actors`](StateStore::list_actors) with the same prefix. It is
    /// the last id of this page, and holds the place, not a cursor on the
    /// server: it can be kept, handed to another process or used much
    /// later. `None` on the last page.
    pub next: Option<String>,
}

/// What [`Raw::restore_many`](crate::Raw::restore_many) did with one actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoreOutcome {
    /// Written with the given state, sequence number and timestamps.
    Written,
    /// Already stored at this sequence number with these bytes: nothing
    /// was written. Restoring the same data twice gives this.
    Unchanged,
    /// Not written: the table holds the actor at `current`, at or above the
    /// given number, with other bytes.
    Superseded {
        /// The stored sequence number.
        current: u64,
    },
    /// Not written: the actor was deleted at `current`, at or above the
    /// given number, and a restore never brings back an older version.
    Deleted {
        /// The sequence number its delete took.
        current: u64,
    },
}

/// What the restore statement says of one item: written; the stored
/// sequence number; whether the stored bytes are the ones given; the
/// tombstone's sequence number.
type RestoreRow = (bool, Option<i64>, Option<bool>, Option<i64>);

impl StateStore {
    /// One page of the actors whose id starts with `prefix` (`""` for
    /// all), with each one's sequence number, last write and stored size,
    /// in the order of the table's primary key (the database's collation;
    /// byte order under the `C` locale), starting after the id `after`
    /// (`None` for the first page).
    ///
    /// Paging is consistent under concurrent writes: an actor that
    /// exists from the first page to the last is listed exactly once, never
    /// skipped or repeated, however many actors are created or deleted
    /// meanwhile; actors created or deleted during the walk may or may not
    /// appear. Expired actors are not listed.
    ///
    /// Each page is one index range scan, on a partitioned table too. When
    /// the ids sort in code point order (the column's collation, or the
    /// database's, is `C`, `POSIX` or `C.UTF-8` in a UTF-8 database), the
    /// range holds just the prefix's ids; under a language collation a
    /// prefix's ids need not be contiguous, and the scan runs from the
    /// page's start until the page is full or the table ends.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let mut after: Option<String> = None;
    /// loop {
    ///     let page = store.list_actors("room-", after.as_deref(), 1000)?;
    ///     for actor in &page.actors {
    ///         println!("{} at {}, {} bytes", actor.actor_id, actor.sequence, actor.size);
    ///     }
    ///     match page.next {
    ///         Some(next) => after = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `limit` is 0; connection and
    /// database errors; [`Error::SchemaMissing`] before migration.
    pub fn list_actors(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<ActorPage> {
        if limit == 0 {
            return Err(Error::invalid_argument(
                "limit",
                "a page holds at least 1 actor",
            ));
        }
        let after = after.unwrap_or("");
        // One more than asked tells whether another page follows.
        let fetch = i64::from(limit) + 1;
        let rows = self.call(true, |core, c| {
            Ok(match prefix_end(core, c, prefix)? {
                Some(end) => c
                    .prepare(&core.sql().list_page_range)?
                    .query(&mut c.client, &[&prefix, &after, &fetch, &prefix, &end])?,
                None => c
                    .prepare(&core.sql().list_page)?
                    .query(&mut c.client, &[&prefix, &after, &fetch])?,
            })
        })?;
        let mut actors: Vec<ActorSummary> = rows
            .iter()
            .map(|row| ActorSummary {
                actor_id: row.get(0),
                sequence: to_u64(row.get(1)),
                updated_at: row.get(2),
                size: to_u64(row.get(3)),
            })
            .collect();
        let next = if actors.len() > limit as usize {
            actors.truncate(limit as usize);
            actors.last().map(|a| a.actor_id.clone())
        } else {
            None
        };
        Ok(ActorPage { actors, next })
    }

    /// How many actors have an id starting with `prefix` (`""` for all).
    /// Counts every row with the prefix, reading only those when the ids
    /// sort in code point order (see [`list_actors`](Self::list_actors)) and the
    /// whole table otherwise: then, or for `""`, a large table takes a
    /// while.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let rooms = store.count_actors("room-")?;
    /// let all = store.count_actors("")?;
    /// println!("{rooms} rooms among {all} actors");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Connection and database errors; [`Error::SchemaMissing`] before
    /// migration.
    pub fn count_actors(&self, prefix: &str) -> Result<u64> {
        self.call(true, |core, c| {
            let row = match prefix_end(core, c, prefix)? {
                Some(end) => c
                    .prepare(&core.sql().count_prefix_range)?
                    .query_one(&mut c.client, &[&prefix, &prefix, &end])?,
                None => c
                    .prepare(&core.sql().count_prefix)?
                    .query_one(&mut c.client, &[&prefix])?,
            };
            Ok(to_u64(row.get(0)))
        })
    }
}

impl Raw<'_> {
    /// Calls `f` with every actor whose id starts with `prefix` (`""` for
    /// all), in id order, with its stored bytes, sequence number and
    /// timestamps and expiry, and returns how many it visited. `f` returns
    /// [`ControlFlow::Break`] to stop early.
    ///
    /// All actors come from one snapshot (a read-only `REPEATABLE READ`
    /// transaction), so the result is the table as it was at one instant,
    /// however long the walk takes; rows are fetched 500 at a time, so
    /// memory stays flat. The walk holds one pooled connection, and its
    /// snapshot, until it ends: on a busy server a long walk holds back
    /// vacuum, so keep `f` quick.
    ///
    /// ```no_run
    /// # use std::ops::ControlFlow;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let visited = store.raw().for_each("", |id, v| {
    ///     println!("{id} at {}: {} bytes", v.sequence, v.value.len());
    ///     ControlFlow::Continue(())
    /// })?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Connection and database errors; [`Error::SchemaMissing`] before
    /// migration. An error after some actors were visited ends the walk.
    pub fn for_each<F>(&self, prefix: &str, mut f: F) -> Result<u64>
    where
        F: FnMut(String, Versioned<Vec<u8>>) -> ControlFlow<()>,
    {
        // Not retried on a lost connection: `f` has seen some actors already.
        self.store.call(false, |core, c| {
            let end = prefix_end(core, c, prefix)?;
            let st = c.prepare(match end {
                Some(_) => &core.sql().scan_prefix_range,
                None => &core.sql().scan_prefix,
            })?;
            let mut tx = c
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let portal = match &end {
                Some(end) => st.bind(&mut tx, &[&prefix, &prefix, end])?,
                None => st.bind(&mut tx, &[&prefix])?,
            };
            let mut visited = 0;
            'walk: loop {
                let rows = tx.query_portal(&portal, SCAN_BATCH)?;
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    visited += 1;
                    let versioned =
                        Versioned::new(row.get(1), to_u64(row.get(2)), row.get(3), row.get(4))
                            .with_expires_at(row.get(5));
                    if f(row.get(0), versioned).is_break() {
                        break 'walk;
                    }
                }
            }
            tx.commit()?;
            Ok(visited)
        })
    }

    /// Writes actors with the sequence numbers and timestamps given, as an
    /// import from [`for_each`](Self::for_each) output needs, in
    /// one statement; returns one [`RestoreOutcome`] per item, in order.
    ///
    /// An actor is written when the table holds it at a lower sequence
    /// number or not at all (and it was not deleted at that number or
    /// later); otherwise nothing changes for it. So restoring the same data
    /// again writes nothing ([`RestoreOutcome::Unchanged`]), and a restore
    /// never replaces a newer version. Every written row is announced on
    /// the channel, with its restored `updated_at` as the timestamp. A
    /// sequence number of 0 is never written (numbers start at 1). A restored
    /// actor expires at its [`Versioned::expires_at`] (`None`: kept for
    /// good).
    ///
    /// ```no_run
    /// # use std::time::SystemTime;
    /// # use trebuchet_postgres::{RestoreOutcome, Versioned};
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let now = SystemTime::now();
    /// let item = Versioned::new(b"\xa0".to_vec(), 7, now, now);
    /// let outcomes = store.raw().restore_many(&[("room-1", item)])?;
    /// assert!(matches!(outcomes[0], RestoreOutcome::Written | RestoreOutcome::Unchanged));
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Nothing is written on an error: [`Error::InvalidActorId`],
    /// [`Error::DuplicateActorId`], [`Error::StateTooLarge`],
    /// [`Error::SequenceOutOfRange`]; connection and database errors;
    /// [`Error::SchemaMissing`] before migration.
    pub fn restore_many<S: AsRef<str>, B: AsRef<[u8]>>(
        &self,
        items: &[(S, Versioned<B>)],
    ) -> Result<Vec<RestoreOutcome>> {
        let (ids, states) = self
            .store
            .check_batch(items.iter().map(|(id, v)| (id.as_ref(), v.value.as_ref())))?;
        let sequences = items
            .iter()
            .map(|(_, v)| to_i64(v.sequence))
            .collect::<Result<Vec<i64>>>()?;
        let updated: Vec<Option<SystemTime>> =
            items.iter().map(|(_, v)| Some(v.updated_at)).collect();
        let created: Vec<Option<SystemTime>> =
            items.iter().map(|(_, v)| Some(v.created_at)).collect();
        let expires: Vec<Option<SystemTime>> = items.iter().map(|(_, v)| v.expires_at).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (by_id, current) = self.store.call(false, |core, c| {
            let rows = bulk_query(
                core,
                c,
                &core.sql().restore_many,
                &[&ids, &states, &sequences, &updated, &created, &expires],
                None,
            )?;
            let by_id: HashMap<String, RestoreRow> = rows
                .iter()
                .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3), row.get(4))))
                .collect();
            // Blocked with neither a row nor a tombstone in the statement's
            // snapshot: a concurrent writer created the actor meanwhile.
            let unseen: Vec<&str> = by_id
                .iter()
                .filter(|(_, (written, row, _, tomb))| !written && row.is_none() && tomb.is_none())
                .map(|(id, _)| id.as_str())
                .collect();
            let mut current = HashMap::new();
            if !unseen.is_empty() {
                let st = c.prepare(&core.sql().load_many)?;
                for row in st.query(&mut c.client, &[&unseen])? {
                    current.insert(row.get::<_, String>(0), to_u64(row.get(2)));
                }
            }
            Ok((by_id, current))
        })?;
        Ok(ids
            .iter()
            .zip(&sequences)
            .map(|(id, wanted)| match by_id.get(*id) {
                Some((true, ..)) => RestoreOutcome::Written,
                Some((false, Some(stored), same, _)) => {
                    if stored == wanted && *same == Some(true) {
                        RestoreOutcome::Unchanged
                    } else {
                        RestoreOutcome::Superseded {
                            current: to_u64(*stored),
                        }
                    }
                }
                Some((false, None, _, Some(deleted))) => RestoreOutcome::Deleted {
                    current: to_u64(*deleted),
                },
                _ => RestoreOutcome::Superseded {
                    current: current.get(*id).copied().unwrap_or(0),
                },
            })
            .collect())
    }
}
