//! Atomic batches of saves and deletes over several actors.

use super::*;

/// What one operation of a committed [`Batch`] did, in the order added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchResult {
    /// The actor was saved at this sequence number.
    Saved(u64),
    /// The actor was deleted (`true`) or did not exist (`false`).
    Deleted(bool),
}

/// An atomic set of saves and deletes over several actors, from
/// [`StateStore::batch`]. Nothing is sent until [`commit`](Self::commit);
/// then every operation is applied in one transaction, or none is.
///
/// Each actor may appear once per batch. A failed condition
/// ([`save_if`](Self::save_if)) rolls the whole batch back. The batch locks
/// its existing actors in id order before writing, so batches over the same
/// actors wait for each other instead of deadlocking; one that the server
/// rolls back anyway (deadlock, serialization failure) is run again, up to
/// three more times.
#[must_use = "a batch does nothing until commit() is called"]
pub struct Batch<'s> {
    store: &'s StateStore,
    /// (order, id, bytes, condition)
    saves: Vec<(usize, String, Vec<u8>, Option<Expected>)>,
    /// (order, id)
    deletes: Vec<(usize, String)>,
    error: Option<Error>,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("saves", &self.saves.len())
            .field("deletes", &self.deletes.len())
            .finish()
    }
}

impl<'s> Batch<'s> {
    /// An empty batch on `store`; [`StateStore::batch`].
    pub(super) fn new(store: &'s StateStore) -> Batch<'s> {
        Batch {
            store,
            saves: Vec::new(),
            deletes: Vec::new(),
            error: None,
        }
    }

    fn next_index(&self) -> usize {
        self.saves.len() + self.deletes.len()
    }

    fn push_save(mut self, id: &str, bytes: Result<Vec<u8>>, condition: Option<Expected>) -> Self {
        if self.error.is_none() {
            match bytes {
                Ok(bytes) => {
                    let index = self.next_index();
                    self.saves.push((index, id.to_owned(), bytes, condition));
                }
                Err(e) => self.error = Some(e),
            }
        }
        self
    }

    /// Saves `state` unconditionally.
    pub fn save<T: Serialize + ?Sized>(self, id: &str, state: &T) -> Self {
        let bytes = self.store.encode(state);
        self.push_save(id, bytes, None)
    }

    /// Saves `state` when the stored version is what `expected` says;
    /// otherwise the whole batch fails with [`Error::Conflict`].
    pub fn save_if<T: Serialize + ?Sized>(self, id: &str, state: &T, expected: Expected) -> Self {
        let bytes = self.store.encode(state);
        self.push_save(id, bytes, Some(expected))
    }

    /// [`save`](Self::save) with raw bytes.
    pub fn save_bytes(self, id: &str, state: &[u8]) -> Self {
        self.push_save(id, Ok(state.to_vec()), None)
    }

    /// [`save_if`](Self::save_if) with raw bytes.
    pub fn save_bytes_if(self, id: &str, state: &[u8], expected: Expected) -> Self {
        self.push_save(id, Ok(state.to_vec()), Some(expected))
    }

    /// Deletes the actor (a missing actor is not an error).
    pub fn delete(mut self, id: &str) -> Self {
        let index = self.next_index();
        self.deletes.push((index, id.to_owned()));
        self
    }

    /// Applies every operation in one transaction and returns what each did,
    /// in the order added.
    ///
    /// # Errors
    ///
    /// Nothing is applied on any error: the first encoding or input error
    /// ([`Error::InvalidActorId`], [`Error::DuplicateActorId`],
    /// [`Error::StateTooLarge`], [`Error::Encode`]); [`Error::Conflict`] for
    /// the first failed condition; connection and database errors.
    pub fn commit(self) -> Result<Vec<BatchResult>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let store = self.store;
        let mut seen = std::collections::HashSet::new();
        for id in self
            .saves
            .iter()
            .map(|s| &s.1)
            .chain(self.deletes.iter().map(|d| &d.1))
        {
            check_actor_id(id)?;
            if !seen.insert(id.as_str()) {
                return Err(Error::DuplicateActorId {
                    actor_id: id.clone(),
                });
            }
        }
        for (_, _, bytes, _) in &self.saves {
            store.check_size(bytes)?;
        }
        let total = self.next_index();
        if total == 0 {
            return Ok(Vec::new());
        }
        let (plain, conditional): (Vec<_>, Vec<_>) = self
            .saves
            .iter()
            .partition(|(_, _, _, condition)| condition.is_none());
        let cond_expected = conditional
            .iter()
            .map(|s| match s.3 {
                Some(Expected::Sequence(n)) => to_i64(n).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<Option<i64>>>>()?;

        // Another transaction locking the same actors in another order can
        // deadlock with this one; the server then rolls one back, which is
        // safe to run again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_commit(total, &plain, &conditional, &cond_expected) {
                Err(e) if attempt < 4 && is_transient(&e) => {
                    std::thread::sleep(Duration::from_millis(fastrand::u64(1..=10 * attempt)));
                    log::debug!("batch rolled back by the server ({e}); running it again");
                }
                outcome => return outcome,
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_commit(
        &self,
        total: usize,
        plain: &[&(usize, String, Vec<u8>, Option<Expected>)],
        conditional: &[&(usize, String, Vec<u8>, Option<Expected>)],
        cond_expected: &[Option<i64>],
    ) -> Result<Vec<BatchResult>> {
        let store = self.store;
        let plain_ids: Vec<&str> = plain.iter().map(|s| s.1.as_str()).collect();
        let plain_states: Vec<&[u8]> = plain.iter().map(|s| s.2.as_slice()).collect();
        let cond_ids: Vec<&str> = conditional.iter().map(|s| s.1.as_str()).collect();
        let cond_states: Vec<&[u8]> = conditional.iter().map(|s| s.2.as_slice()).collect();
        let delete_ids: Vec<&str> = self.deletes.iter().map(|d| d.1.as_str()).collect();
        let w = write_id();
        let plain_write_ids = vec![w; plain_ids.len()];
        let cond_write_ids = vec![w; cond_ids.len()];
        let all_ids: Vec<&str> = cond_ids
            .iter()
            .chain(&plain_ids)
            .chain(&delete_ids)
            .copied()
            .collect();
        let settle = |t: &Traces| {
            let targets = conditional
                .iter()
                .map(|s| match s.3 {
                    Some(Expected::Sequence(n)) => Some(n.saturating_add(1)),
                    _ => None,
                })
                .chain(std::iter::repeat(None));
            if !t.committed(all_ids.iter().copied().zip(targets), w)? {
                return Err(t.not_applied());
            }
            let mut results: Vec<Option<BatchResult>> = vec![None; total];
            // It landed; a row whose tag others have pushed out since no
            // longer says at which number.
            for save in conditional.iter().chain(plain) {
                match t.landed(&save.1, w, None) {
                    Landed::Yes(sequence) => results[save.0] = Some(BatchResult::Saved(sequence)),
                    _ => return Err(t.unknown()),
                }
            }
            for (index, id) in &self.deletes {
                let landed = matches!(t.landed(id, w, None), Landed::Yes(_));
                results[*index] = Some(BatchResult::Deleted(landed));
            }
            Ok(Ok(results
                .into_iter()
                .map(|r| r.expect("every operation has a result"))
                .collect()))
        };
        let outcome = store.write(
            &all_ids,
            |inner, c| {
                // Prepared (and cached) before the transaction borrows the client.
                let save_if_st = c.prepare(&inner.sql.save_many_if)?;
                let save_st = c.prepare(&inner.sql.save_many)?;
                let delete_st = c.prepare(&inner.sql.delete_many)?;
                let lock_st = c.prepare(&inner.sql.lock_many)?;
                let sequence_st = c.prepare(&inner.sql.sequence)?;
                let attempts = inner.retry.max_attempts.max(1);
                for _ in 0..attempts {
                    let mut results: Vec<Option<BatchResult>> = vec![None; total];
                    let mut tx = c.client.transaction()?;
                    if total > 1 {
                        lock_st.execute(&mut tx, &[&all_ids])?;
                    }
                    let mut conflict = None;
                    if !cond_ids.is_empty() {
                        let rows = save_if_st.query(
                            &mut tx,
                            &[&cond_ids, &cond_states, &cond_expected, &cond_write_ids],
                        )?;
                        let by_id: HashMap<String, (Option<i64>, Option<i64>)> = rows
                            .iter()
                            .map(|row| (row.get(0), (row.get(1), row.get(2))))
                            .collect();
                        for (save, id) in conditional.iter().zip(&cond_ids) {
                            match by_id.get(*id) {
                                Some((Some(sequence), _)) => {
                                    results[save.0] = Some(BatchResult::Saved(to_u64(*sequence)))
                                }
                                other => {
                                    conflict.get_or_insert((
                                        *id,
                                        save.3.unwrap_or(Expected::Absent),
                                        other.and_then(|(_, actual)| actual.map(to_u64)),
                                    ));
                                }
                            }
                        }
                    }
                    if let Some((id, expected, mut actual)) = conflict {
                        tx.rollback()?;
                        // As for a lone conditional write (`write_if_on`): the
                        // statement's snapshot may predate the writer that
                        // blocked it, and a create may find the actor absent
                        // again.
                        if Expected::from(actual) == expected {
                            actual = sequence_st
                                .query_opt(&mut c.client, &[&id])?
                                .map(|r| to_u64(r.get(0)));
                        }
                        if Expected::from(actual) == expected {
                            continue;
                        }
                        return Ok(Err(Error::Conflict {
                            actor_id: id.to_owned(),
                            expected,
                            actual,
                        }));
                    }
                    if !plain_ids.is_empty() {
                        let written: HashMap<String, i64> = save_st
                            .query(&mut tx, &[&plain_ids, &plain_states, &plain_write_ids])?
                            .iter()
                            .map(|row| (row.get(0), row.get(1)))
                            .collect();
                        for (save, id) in plain.iter().zip(&plain_ids) {
                            let sequence = written.get(*id).copied().unwrap_or(0);
                            results[save.0] = Some(BatchResult::Saved(to_u64(sequence)));
                        }
                    }
                    if !delete_ids.is_empty() {
                        let deleted = live_deletes(delete_st.query(&mut tx, &[&delete_ids, &w])?);
                        for (index, id) in &self.deletes {
                            results[*index] = Some(BatchResult::Deleted(deleted.contains(id)));
                        }
                    }
                    tx.commit()?;
                    return Ok(Ok(results
                        .into_iter()
                        .map(|r| r.expect("every operation has a result"))
                        .collect()));
                }
                Err(Failure::Store(Error::TooManyConflicts {
                    actor_id: cond_ids.first().copied().unwrap_or_default().to_owned(),
                    attempts,
                }))
            },
            settle,
        )?;
        outcome
    }
}
