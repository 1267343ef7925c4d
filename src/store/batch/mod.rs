//! Atomic batches of saves and deletes over one or more actors, run in the
//! order given.

use std::collections::HashSet;

use super::*;

mod plan;
mod raw;
mod settle;

use plan::{plan, Kind, Op, Plan, Statement, Step};
pub use raw::RawBatch;

/// What one step of a committed [`Batch`] did, in the order added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchResult {
    /// The actor was saved at this sequence number.
    Saved(u64),
    /// The actor was deleted (`true`), or did not exist at that step
    /// (`false`).
    Deleted(bool),
}

/// An atomic sequence of saves and deletes over one or more actors, from
/// [`StateStore::batch`]. Nothing is sent until [`commit`](Self::commit);
/// then every step is applied in one transaction, or none is.
///
/// Steps run in the order added, and an actor may appear more than once:
/// each step sees what the earlier ones left, as in Dapr's transactional
/// state API. A [`save_if`](Self::save_if) after a save of the same actor
/// expects the number that save produced; one after a delete may expect
/// [`Expected::Absent`]. A failed condition rolls the whole batch back.
/// Numbers grow through a batch as through separate calls: a delete takes
/// the next number, and a save after it continues above that.
///
/// ```no_run
/// # use trebuchet_postgres::{BatchResult, StateStore};
/// # let store = StateStore::from_env()?;
/// let results = store
///     .batch()
///     .delete("k1")
///     .save("k2", &"draft")
///     .delete("k2")
///     .save("k3", &"final")
///     .commit()?;
/// // k1 and k2 are absent, k3 is saved.
/// assert!(matches!(results[3], BatchResult::Saved(_)));
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
///
/// Steps of distinct actors have no order between them, so steps of one
/// kind share a statement: a batch that names each actor once takes at most
/// three (conditional saves, saves, deletes), and one that names an actor
/// `k` times at most `3k`. A listener hears each actor's changes in the
/// order of its steps; changes of distinct actors may come in another order.
///
/// The batch locks its existing actors in id order before writing, so
/// batches over the same actors wait for each other instead of deadlocking;
/// one that the server rolls back anyway (deadlock, serialization failure)
/// is run again, up to three more times. An actor that does not exist
/// cannot be locked: when another writer creates it between a delete of the
/// batch that found nothing and a later step of the batch on it, the batch
/// runs again (its delete then finds the actor) rather than take the new
/// actor over.
#[must_use = "a batch does nothing until commit() is called"]
pub struct Batch<'s> {
    store: &'s StateStore,
    steps: Vec<Step>,
    error: Option<Error>,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let deletes = self
            .steps
            .iter()
            .filter(|s| matches!(s.op, Op::Delete))
            .count();
        f.debug_struct("Batch")
            .field("saves", &(self.steps.len() - deletes))
            .field("deletes", &deletes)
            .finish()
    }
}

impl<'s> Batch<'s> {
    /// An empty batch on `store`; [`StateStore::batch`].
    pub(super) fn new(store: &'s StateStore) -> Batch<'s> {
        Batch {
            store,
            steps: Vec::new(),
            error: None,
        }
    }

    fn push_save(mut self, id: &str, bytes: Result<Vec<u8>>, condition: Option<Expected>) -> Self {
        if self.error.is_none() {
            match bytes {
                Ok(state) => self.steps.push(Step {
                    id: id.to_owned(),
                    op: Op::Save { state, condition },
                }),
                Err(e) => self.error = Some(e),
            }
        }
        self
    }

    /// Saves `state` unconditionally.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Two rooms created together, or neither.
    /// let results = store
    ///     .batch()
    ///     .save("room-1", &vec!["alice"])
    ///     .save("room-2", &vec!["bob"])
    ///     .commit()?;
    /// assert_eq!(results.len(), 2);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn save<T: Serialize + ?Sized>(self, id: &str, state: &T) -> Self {
        let bytes = self.store.encode(state);
        self.push_save(id, bytes, None)
    }

    /// Saves `state` when the actor's version, as the earlier steps of the
    /// batch left it, is what `expected` says; otherwise the whole batch
    /// fails with [`Error::Conflict`].
    ///
    /// ```no_run
    /// # use trebuchet_postgres::Expected;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Take a seat only if nobody holds it; otherwise the booking is not saved either.
    /// let booked = store
    ///     .batch()
    ///     .save_if("seat-12", &"alice", Expected::Absent)
    ///     .save("booking-77", &"seat-12")
    ///     .commit();
    /// match booked {
    ///     Ok(_) => println!("booked"),
    ///     Err(e) if e.is_conflict() => println!("seat-12 is taken"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn save_if<T: Serialize + ?Sized>(self, id: &str, state: &T, expected: Expected) -> Self {
        let bytes = self.store.encode(state);
        self.push_save(id, bytes, Some(expected))
    }

    /// Deletes the actor (a missing actor is not an error).
    ///
    /// ```no_run
    /// # use trebuchet_postgres::BatchResult;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Close a room: the room and its chat log go together.
    /// let results = store.batch().delete("room-1").delete("chat-room-1").commit()?;
    /// if results[0] == BatchResult::Deleted(false) {
    ///     println!("room-1 was already gone");
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn delete(mut self, id: &str) -> Self {
        self.steps.push(Step {
            id: id.to_owned(),
            op: Op::Delete,
        });
        self
    }

    /// Applies every step in one transaction, in the order added, and
    /// returns what each did, in that order: [`BatchResult::Saved`] with
    /// the number a save produced, [`BatchResult::Deleted`] saying whether
    /// a delete found the actor at that step.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::BatchResult;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// for result in store.batch().save("k1", &1u32).delete("k2").commit()? {
    ///     match result {
    ///         BatchResult::Saved(seq) => println!("saved at {seq}"),
    ///         BatchResult::Deleted(existed) => println!("deleted (existed: {existed})"),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Nothing is applied on any error: the first encoding or input error
    /// ([`Error::InvalidActorId`], [`Error::StateTooLarge`],
    /// [`Error::Encode`], [`Error::SequenceOutOfRange`]); [`Error::Conflict`]
    /// for a failed condition, with the version the actor was in at that
    /// step (which an earlier step may have made); [`Error::TooManyConflicts`]
    /// as for [`StateStore::save_if`]; [`Error::NotApplied`] or
    /// [`Error::OutcomeUnknown`] when the connection broke before the reply
    /// (see [lost connections](StateStore#lost-connections): when the batch
    /// committed, the result is the one it would have had); connection and
    /// database errors.
    pub fn commit(self) -> Result<Vec<BatchResult>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        for step in &self.steps {
            check_actor_id(&step.id)?;
        }
        for step in &self.steps {
            self.store.check_size(step.state())?;
            if let Some(Expected::Sequence(n)) = step.condition() {
                to_i64(n)?;
            }
        }
        if self.steps.is_empty() {
            return Ok(Vec::new());
        }
        let plan = plan(&self.steps);

        // Another transaction locking the same actors in another order can
        // deadlock with this one; the server then rolls one back, which is
        // safe to run again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_commit(&plan) {
                Err(e) if attempt < 4 && is_transient(&e) => {
                    std::thread::sleep(Duration::from_millis(fastrand::u64(1..=10 * attempt)));
                    log::debug!("batch rolled back by the server ({e}); running it again");
                }
                outcome => return outcome,
            }
        }
    }

    fn try_commit(&self, plan: &Plan) -> Result<Vec<BatchResult>> {
        let steps = &self.steps;
        let w = write_id();
        // Each actor once, in the order the statements first name it: for a
        // batch that names each actor once, its conditional saves, then its
        // saves, then its deletes.
        let mut seen = HashSet::new();
        let ids: Vec<&str> = plan
            .statements
            .iter()
            .flat_map(|statement| &statement.steps)
            .map(|&i| steps[i].id.as_str())
            .filter(|id| seen.insert(*id))
            .collect();
        let params = plan
            .statements
            .iter()
            .map(|statement| Params::new(steps, statement, w))
            .collect::<Result<Vec<_>>>()?;
        self.store.write(
            &ids,
            |core, c| self.run(core, c, plan, &params, &ids, w),
            |t| settle::settle(t, steps, w).map(Ok),
        )?
    }

    /// One attempt's transaction: the lock, then each statement of the
    /// plan. A failed condition rolls it back; when the statement's
    /// snapshot may have predated the write that blocked it, the version is
    /// read again, and the batch made again if nothing stands in its way
    /// any more (as for a lone conditional write, `write_if_on`). A create
    /// after a delete that found nothing, blocked by a writer that created
    /// the actor meanwhile, makes the batch again too: the delete would
    /// have found it.
    fn run(
        &self,
        core: &Core,
        c: &mut Connection,
        plan: &Plan,
        params: &[Params<'_>],
        ids: &[&str],
        w: i64,
    ) -> Result<Result<Vec<BatchResult>>, Failure> {
        let steps = &self.steps;
        // Prepared (and cached) before the transaction borrows the client.
        let save_if_st = c.prepare(&core.sql().save_many_if)?;
        let save_st = c.prepare(&core.sql().save_many)?;
        let delete_st = c.prepare(&core.sql().delete_many)?;
        let lock_st = c.prepare(&core.sql().lock_many)?;
        let sequence_st = c.prepare(&core.sql().sequence)?;
        let attempts = core.retry().max_attempts.max(1);
        let mut blocked_by = ids.first().copied().unwrap_or_default();
        for _ in 0..attempts {
            // A step that is not sent is a delete right after a delete: it
            // finds nothing.
            let mut results: Vec<Option<BatchResult>> = steps
                .iter()
                .zip(&plan.after_delete)
                .map(|(step, after)| {
                    step.kind(*after)
                        .is_none()
                        .then_some(BatchResult::Deleted(false))
                })
                .collect();
            // The actors this attempt has written (or deleted): a condition
            // on one of them meets the batch's own write, which nothing else
            // can change before the batch ends.
            let mut written: HashSet<&str> = HashSet::new();
            let mut failed = None;
            let mut tx = c.client.transaction()?;
            if let Some(settings) = core.sql().bulk_settings(Some(w)) {
                // On Citus, across shards: the trigger stays quiet and the
                // statements announce from the coordinator; the rows are
                // locked one id at a time, in id order.
                tx.batch_execute(&settings)?;
                if ids.len() > 1 {
                    let mut ordered = ids.to_vec();
                    ordered.sort_unstable();
                    for id in ordered {
                        lock_st.execute(&mut tx, &[&id])?;
                    }
                }
            } else if ids.len() > 1 {
                lock_st.execute(&mut tx, &[&ids])?;
            }
            for (statement, p) in plan.statements.iter().zip(params) {
                match statement.kind {
                    Kind::Conditional => {
                        // A sequence number expected right after a delete:
                        // the actor is absent.
                        let doomed = statement.steps.iter().find(|&&i| {
                            plan.after_delete[i]
                                && matches!(steps[i].condition(), Some(Expected::Sequence(_)))
                        });
                        if let Some(&i) = doomed {
                            failed = Some(Failed::Conflict {
                                id: &steps[i].id,
                                expected: steps[i].condition().unwrap_or(Expected::Absent),
                                actual: None,
                                seen_by_batch: true,
                            });
                            break;
                        }
                        let rows = save_if_st
                            .query(&mut tx, &[&p.ids, &p.states, &p.expected, &p.write_ids])?;
                        let by_id: HashMap<String, (Option<i64>, Option<i64>)> = rows
                            .iter()
                            .map(|row| (row.get(0), (row.get(1), row.get(2))))
                            .collect();
                        for (&i, id) in statement.steps.iter().zip(&p.ids) {
                            match by_id.get(*id) {
                                Some((Some(sequence), _)) => {
                                    results[i] = Some(BatchResult::Saved(to_u64(*sequence)));
                                }
                                other => {
                                    failed.get_or_insert_with(|| {
                                        let condition = steps[i].condition();
                                        let own = written.contains(id);
                                        match condition {
                                            Some(expected) if own || !plan.after_delete[i] => {
                                                Failed::Conflict {
                                                    id,
                                                    expected,
                                                    actual: other
                                                        .and_then(|(_, actual)| actual.map(to_u64)),
                                                    seen_by_batch: own,
                                                }
                                            }
                                            _ => Failed::CreatedMeanwhile { id },
                                        }
                                    });
                                }
                            }
                        }
                        if failed.is_some() {
                            break;
                        }
                        written.extend(&p.ids);
                    }
                    Kind::Plain => {
                        let saved: HashMap<String, i64> = save_st
                            .query(&mut tx, &[&p.ids, &p.states, &p.write_ids])?
                            .iter()
                            .map(|row| (row.get(0), row.get(1)))
                            .collect();
                        for (&i, id) in statement.steps.iter().zip(&p.ids) {
                            let sequence = saved.get(*id).copied().unwrap_or(0);
                            results[i] = Some(BatchResult::Saved(to_u64(sequence)));
                        }
                        written.extend(&p.ids);
                    }
                    Kind::Delete => {
                        // Each deleted id, and whether it was live (not
                        // expired): only a live one existed.
                        let deleted: HashMap<String, bool> = delete_st
                            .query(&mut tx, &[&p.ids, &w])?
                            .iter()
                            .map(|row| (row.get(0), row.get(1)))
                            .collect();
                        for (&i, id) in statement.steps.iter().zip(&p.ids) {
                            let live = deleted.get(*id).copied();
                            results[i] = Some(BatchResult::Deleted(live == Some(true)));
                            if live.is_some() {
                                written.insert(id);
                            }
                        }
                    }
                }
            }
            let (id, expected, mut actual, seen_by_batch) = match failed {
                None => {
                    tx.commit()?;
                    return Ok(Ok(results
                        .into_iter()
                        .map(|r| r.expect("every step has a result"))
                        .collect()));
                }
                Some(Failed::CreatedMeanwhile { id }) => {
                    tx.rollback()?;
                    blocked_by = id;
                    continue;
                }
                Some(Failed::Conflict {
                    id,
                    expected,
                    actual,
                    seen_by_batch,
                }) => (id, expected, actual, seen_by_batch),
            };
            tx.rollback()?;
            if !seen_by_batch {
                // As for a lone conditional write (`write_if_on`): the
                // statement's snapshot may predate the writer that blocked
                // it, and a create may find the actor absent again.
                if Expected::from(actual) == expected {
                    actual = sequence_st
                        .query_opt(&mut c.client, &[&id])?
                        .map(|r| to_u64(r.get(0)));
                }
                if Expected::from(actual) == expected {
                    blocked_by = id;
                    continue;
                }
            }
            return Ok(Err(Error::Conflict {
                actor_id: id.to_owned(),
                expected,
                actual,
            }));
        }
        Err(Failure::Store(Error::TooManyConflicts {
            actor_id: blocked_by.to_owned(),
            attempts,
        }))
    }
}

/// Why an attempt stopped short of its commit.
enum Failed<'a> {
    /// A condition failed. `seen_by_batch`: the actor's version is one the
    /// batch made or holds, so the version reported is exact.
    Conflict {
        id: &'a str,
        expected: Expected,
        actual: Option<u64>,
        seen_by_batch: bool,
    },
    /// A create after a delete that found nothing met an actor another
    /// writer created meanwhile: running the batch again, the delete finds
    /// it.
    CreatedMeanwhile { id: &'a str },
}

/// The parameters of one statement of a plan.
struct Params<'a> {
    ids: Vec<&'a str>,
    states: Vec<&'a [u8]>,
    /// For conditional saves: the sequence number expected, `None` for
    /// absent.
    expected: Vec<Option<i64>>,
    write_ids: Vec<i64>,
}

impl<'a> Params<'a> {
    fn new(steps: &'a [Step], statement: &Statement, w: i64) -> Result<Params<'a>> {
        let of = statement.steps.iter().map(|&i| &steps[i]);
        Ok(Params {
            ids: of.clone().map(|s| s.id.as_str()).collect(),
            states: of.clone().map(Step::state).collect(),
            expected: of
                .clone()
                .map(|s| match s.condition() {
                    Some(Expected::Sequence(n)) => to_i64(n).map(Some),
                    _ => Ok(None),
                })
                .collect::<Result<_>>()?,
            write_ids: vec![w; statement.steps.len()],
        })
    }
}
