//! Several actors in one statement: bulk loads, saves and deletes.

use super::*;

impl StateStore {
    /// Loads several actors in one query. The result has one entry per id, in
    /// the order given: the state, or `None` for an actor that does not exist.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let ids = ["room-1", "room-2", "room-404"];
    /// let rooms: Vec<Option<Vec<String>>> = store.load_many(&ids)?;
    /// for (id, players) in ids.iter().zip(rooms) {
    ///     println!("{id}: {players:?}"); // None for room-404
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`] for any bad id (nothing is sent);
    /// [`Error::Decode`] naming the first actor that does not decode;
    /// connection and database errors.
    pub fn load_many<T: DeserializeOwned, S: AsRef<str>>(
        &self,
        ids: &[S],
    ) -> Result<Vec<Option<T>>> {
        let found = self.raw().load_many(ids)?;
        ids.iter()
            .zip(found)
            .map(|(id, bytes)| bytes.map(|b| self.decode(id.as_ref(), &b)).transpose())
            .collect()
    }

    /// [`load_many`](Self::load_many) with each actor's sequence number and
    /// timestamps: one entry per id, in the order given, `None` for an
    /// actor that does not exist.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::Expected;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Read two counters, then write both back unless either changed meanwhile.
    /// let found = store.load_many_versioned::<u64, _>(&["hits-a", "hits-b"])?;
    /// let items: Vec<_> = ["hits-a", "hits-b"]
    ///     .iter()
    ///     .zip(found)
    ///     .map(|(id, v)| match v {
    ///         Some(v) => (*id, v.value + 1, Expected::Sequence(v.sequence)),
    ///         None => (*id, 1, Expected::Absent),
    ///     })
    ///     .collect();
    /// store.save_many_if(&items)?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`load_many`](Self::load_many).
    pub fn load_many_versioned<T: DeserializeOwned, S: AsRef<str>>(
        &self,
        ids: &[S],
    ) -> Result<Vec<Option<Versioned<T>>>> {
        let found = self.raw().load_many_versioned(ids)?;
        ids.iter()
            .zip(found)
            .map(|(id, found)| {
                found
                    .map(|v| v.try_map(|bytes| self.decode(id.as_ref(), &bytes)))
                    .transpose()
            })
            .collect()
    }

    /// Saves several actors unconditionally in one statement (upserts) and
    /// returns their new sequence numbers, in the order given. Every row is
    /// announced on the channel. All or nothing: the statement commits as a
    /// whole.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seqs = store.save_many(&[
    ///     ("room-1", vec!["alice"]),
    ///     ("room-2", vec!["bob", "carol"]),
    /// ])?;
    /// assert_eq!(seqs.len(), 2); // one number per actor, in order
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateActorId`] when an actor appears twice; otherwise as
    /// [`save`](Self::save).
    pub fn save_many<T: Serialize, S: AsRef<str>>(&self, items: &[(S, T)]) -> Result<Vec<u64>> {
        let encoded = items
            .iter()
            .map(|(id, state)| Ok((id.as_ref(), self.encode(state)?)))
            .collect::<Result<Vec<_>>>()?;
        self.raw().save_many(&encoded)
    }

    /// Saves several actors, each only when its stored version is what its
    /// [`Expected`] says, in one statement. The result has one entry per
    /// item, in the order given: the new sequence number, or
    /// [`Error::Conflict`] for that item alone; a conflict on one item does
    /// not stop the others.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::Expected;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let results = store.save_many_if(&[
    ///     ("room-1", 10u32, Expected::Absent),
    ///     ("room-2", 20u32, Expected::Sequence(4)),
    /// ])?;
    /// for result in results {
    ///     match result {
    ///         Ok(seq) => println!("saved at {seq}"),
    ///         Err(e) if e.is_conflict() => println!("{e}"), // this item only
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The outer `Result` fails, writing nothing, for bad input
    /// ([`Error::InvalidActorId`], [`Error::DuplicateActorId`],
    /// [`Error::StateTooLarge`], [`Error::Encode`]) and connection or
    /// database errors.
    pub fn save_many_if<T: Serialize, S: AsRef<str>>(
        &self,
        items: &[(S, T, Expected)],
    ) -> Result<Vec<Result<u64>>> {
        let encoded = items
            .iter()
            .map(|(id, state, expected)| Ok((id.as_ref(), self.encode(state)?, *expected)))
            .collect::<Result<Vec<_>>>()?;
        self.raw().save_many_if(&encoded)
    }

    /// Deletes several actors in one statement and returns, in the order
    /// given, whether each existed. Every delete is announced and leaves a
    /// tombstone, as [`delete`](Self::delete) does.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let existed = store.delete_many(&["room-1", "room-2"])?;
    /// let gone = existed.iter().filter(|&&e| e).count();
    /// println!("deleted {gone} of 2");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn delete_many<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<bool>> {
        let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
        for id in &ids {
            check_actor_id(id)?;
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let w = write_id();
        let deleted: std::collections::HashSet<String> = self.write(
            &ids,
            |core, c| {
                let rows = bulk_query(core, c, &core.sql().delete_many, &[&ids, &w], Some(w))?;
                Ok(live_deletes(rows))
            },
            |t| {
                if !t.committed(ids.iter().map(|id| (*id, None)), w)? {
                    return Err(t.not_applied());
                }
                Ok(ids
                    .iter()
                    .filter(|id| matches!(t.landed(id, w, None), Landed::Yes(_)))
                    .map(|id| (*id).to_owned())
                    .collect())
            },
        )?;
        Ok(ids.iter().map(|id| deleted.contains(*id)).collect())
    }

    /// Checks ids, sizes and duplicates of a bulk write; returns the ids and
    /// states as the statement's array parameters.
    pub(crate) fn check_batch<'a>(
        &self,
        items: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<(Vec<&'a str>, Vec<&'a [u8]>)> {
        let (ids, states): (Vec<&str>, Vec<&[u8]>) = items.unzip();
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for (id, state) in ids.iter().zip(&states) {
            check_actor_id(id)?;
            self.check_size(state)?;
            if !seen.insert(*id) {
                return Err(Error::DuplicateActorId {
                    actor_id: (*id).to_owned(),
                });
            }
        }
        Ok((ids, states))
    }
}

impl Raw<'_> {
    /// [`StateStore::load_many`] returning the stored bytes.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let found = store.raw().load_many(&["blob-1", "blob-2"])?;
    /// let total: usize = found.iter().flatten().map(Vec::len).sum();
    /// println!("{total} bytes in all");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::load_many`], without decoding.
    pub fn load_many<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<Option<Vec<u8>>>> {
        Ok(self
            .load_many_versioned(ids)?
            .into_iter()
            .map(|found| found.map(|v| v.value))
            .collect())
    }

    /// [`StateStore::load_many_versioned`] returning the stored bytes.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::StateStore;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let archive = StateStore::builder().table("archive").build()?;
    /// // Copy two actors with their sequence numbers and timestamps.
    /// let ids = ["room-1", "room-2"];
    /// let found = store.raw().load_many_versioned(&ids)?;
    /// let items: Vec<_> = ids
    ///     .iter()
    ///     .zip(found)
    ///     .filter_map(|(id, v)| Some((*id, v?)))
    ///     .collect();
    /// archive.raw().restore_many(&items)?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::load_many`], without decoding.
    pub fn load_many_versioned<S: AsRef<str>>(
        &self,
        ids: &[S],
    ) -> Result<Vec<Option<Versioned<Vec<u8>>>>> {
        let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
        for id in &ids {
            check_actor_id(id)?;
        }
        let mut found: Vec<Option<Versioned<Vec<u8>>>> = vec![None; ids.len()];
        if ids.is_empty() {
            return Ok(found);
        }
        // Rows come back with their position in `ids`: no lookup by id.
        let rows = self.store.call(true, |core, c| {
            let st = c.prepare(&core.sql().load_many_ordered)?;
            Ok(st.query(&mut c.client, &[&ids])?)
        })?;
        for row in rows {
            let position: i64 = row.get(0);
            if let Some(slot) = usize::try_from(position - 1)
                .ok()
                .and_then(|i| found.get_mut(i))
            {
                *slot = Some(
                    Versioned::new(row.get(1), to_u64(row.get(2)), row.get(3), row.get(4))
                        .with_expires_at(row.get(5)),
                );
            }
        }
        Ok(found)
    }

    /// [`StateStore::save_many`] with stored bytes.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seqs = store.raw().save_many(&[("blob-1", vec![1u8]), ("blob-2", vec![2, 3])])?;
    /// assert_eq!(seqs.len(), 2);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::save_many`].
    pub fn save_many<S: AsRef<str>, B: AsRef<[u8]>>(&self, items: &[(S, B)]) -> Result<Vec<u64>> {
        let (ids, states) = self
            .store
            .check_batch(items.iter().map(|(id, b)| (id.as_ref(), b.as_ref())))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let w = write_id();
        let write_ids = vec![w; ids.len()];
        let written: HashMap<String, u64> = self.store.write(
            &ids,
            |core, c| {
                let rows = bulk_query(
                    core,
                    c,
                    &core.sql().save_many,
                    &[&ids, &states, &write_ids],
                    Some(w),
                )?;
                Ok(rows
                    .iter()
                    .map(|row| (row.get(0), to_u64(row.get(1))))
                    .collect())
            },
            |t| {
                if !t.committed(ids.iter().map(|id| (*id, None)), w)? {
                    return Err(t.not_applied());
                }
                // It landed; a row whose tag others have pushed out since
                // no longer says at which number.
                ids.iter()
                    .map(|id| match t.landed(id, w, None) {
                        Landed::Yes(sequence) => Ok(((*id).to_owned(), sequence)),
                        _ => Err(t.unknown()),
                    })
                    .collect()
            },
        )?;
        Ok(ids
            .iter()
            .map(|id| written.get(*id).copied().unwrap_or(0))
            .collect())
    }

    /// [`StateStore::save_many_if`] with stored bytes.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::Expected;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let results = store.raw().save_many_if(&[
    ///     ("blob-1", vec![1u8], Expected::Absent),
    ///     ("blob-2", vec![2u8], Expected::Sequence(3)),
    /// ])?;
    /// let conflicts = results
    ///     .iter()
    ///     .filter(|r| matches!(r, Err(e) if e.is_conflict()))
    ///     .count();
    /// println!("{conflicts} not written");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::save_many_if`].
    pub fn save_many_if<S: AsRef<str>, B: AsRef<[u8]>>(
        &self,
        items: &[(S, B, Expected)],
    ) -> Result<Vec<Result<u64>>> {
        let (ids, states) = self
            .store
            .check_batch(items.iter().map(|(id, b, _)| (id.as_ref(), b.as_ref())))?;
        let expected = items
            .iter()
            .map(|(_, _, e)| match e {
                Expected::Absent => Ok(None),
                Expected::Sequence(n) => to_i64(*n).map(Some),
            })
            .collect::<Result<Vec<Option<i64>>>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let w = write_id();
        let write_ids = vec![w; ids.len()];
        let outcomes = self.store.write(
            &ids,
            |core, c| many_if_on(core, c, &ids, &states, &expected, &write_ids),
            |t| settle_many_if(t, &ids, &expected, &write_ids),
        )?;
        Ok(items
            .iter()
            .zip(outcomes)
            .map(|((id, _, expected), outcome)| match outcome {
                Written::Yes { sequence, .. } => Ok(sequence),
                Written::Blocked { actual } => Err(Error::Conflict {
                    actor_id: id.as_ref().to_owned(),
                    expected: *expected,
                    actual,
                }),
                Written::Lost(e) => Err(e),
            })
            .collect())
    }
}

/// Runs a write of several actors. On Citus it spans shards, which commit
/// in two phases: it runs in a transaction of its own whose settings stop
/// the trigger's `NOTIFY` on the workers (the statement announces from the
/// coordinator) and hand the trigger the write id.
pub(crate) fn bulk_query(
    core: &Core,
    c: &mut Connection,
    sql: &crate::pool::Sql,
    params: &[&(dyn postgres::types::ToSql + Sync)],
    write_id: Option<i64>,
) -> Result<Vec<postgres::Row>, Failure> {
    let st = c.prepare(sql)?;
    let Some(settings) = core.sql().bulk_settings(write_id) else {
        return Ok(st.query(&mut c.client, params)?);
    };
    let mut tx = c.client.transaction()?;
    tx.batch_execute(&settings)?;
    let rows = st.query(&mut tx, params)?;
    tx.commit()?;
    Ok(rows)
}
