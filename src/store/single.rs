//! Operations on one actor: save, load, conditional saves, delete,
//! existence and sequence number, and starting a batch.

use super::*;

impl StateStore {
    /// Saves `state` unconditionally (an upsert) and returns its new sequence
    /// number: 1 for a new actor, one more than before otherwise.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = store.save("room-1", &vec!["alice", "bob"])?;
    /// assert!(seq >= 1);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// When `Ok` is returned the write is committed. When the connection
    /// breaks after the statement was sent, the store finds out what became
    /// of it (see [Lost connections](Self#lost-connections)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`], [`Error::Encode`] and
    /// [`Error::StateTooLarge`] before anything is sent; connection and
    /// database errors; [`Error::SchemaMissing`] before migration.
    pub fn save<T: Serialize + ?Sized>(&self, id: &str, state: &T) -> Result<u64> {
        self.save_with(id, state, WriteOptions::new())
    }

    /// Loads an actor's state, or `None` when it does not exist.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let players: Option<Vec<String>> = store.load("room-1")?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the stored bytes are not a `T` in this store's
    /// codec; otherwise as [`save`](Self::save).
    pub fn load<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>> {
        match self.raw().load(id)? {
            Some(bytes) => self.decode(id, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Loads state, sequence number, timestamps and expiry in one query.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// if let Some(v) = store.load_versioned::<Vec<String>>("room-1")? {
    ///     println!("{:?} at {}, written {:?}", v.value, v.sequence, v.updated_at);
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn load_versioned<T: DeserializeOwned>(&self, id: &str) -> Result<Option<Versioned<T>>> {
        self.raw()
            .load_versioned(id)?
            .map(|v| v.try_map(|bytes| self.decode(id, &bytes)))
            .transpose()
    }

    /// Saves `state` only when the stored version is what `expected` says
    /// (optimistic locking), and returns the new sequence number. The short
    /// form of `save_with(id, state, WriteOptions::new().expect(expected))`.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::{Expected, StateStore};
    /// # let store = StateStore::from_env()?;
    /// store.save_if("actor-1", &1u32, Expected::Absent)?; // creates, sequence 1
    /// let err = store.save_if("actor-1", &2u32, Expected::Absent).unwrap_err();
    /// assert!(err.is_conflict()); // "expected absent, found sequence 1"
    /// store.save_if("actor-1", &2u32, Expected::Sequence(1))?; // sequence 2
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] with the expected and actual versions when they
    /// differ (nothing is written). The actual version is one the actor was
    /// in while the call ran, never the expected one: when a writer the
    /// call waited for committed after the call's snapshot, the version is
    /// read again, and a create that finds the actor deleted again by then
    /// is made again ([`Error::TooManyConflicts`] after
    /// [`RetryPolicy::max_attempts`] such rounds). Otherwise as
    /// [`save`](Self::save).
    pub fn save_if<T: Serialize + ?Sized>(
        &self,
        id: &str,
        state: &T,
        expected: Expected,
    ) -> Result<u64> {
        self.save_with(id, state, WriteOptions::new().expect(expected))
    }

    /// Deletes an actor and returns whether it existed. The delete is
    /// announced on the channel and the actor's last sequence number is
    /// kept, so a later save continues above it.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = store.save("room-9", &1u8)?;
    /// assert!(store.delete("room-9")?);
    /// assert!(!store.delete("room-9")?); // already gone
    /// assert!(store.save("room-9", &1u8)? > seq + 1); // numbers never repeat
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn delete(&self, id: &str) -> Result<bool> {
        check_actor_id(id)?;
        let w = write_id();
        // An expired row is deleted (and announced) too, but it no longer
        // existed: the statement says whether the row was live.
        self.write(
            &[id],
            |core, c| {
                let st = c.prepare(&core.sql().delete)?;
                Ok(st
                    .query_opt(&mut c.client, &[&id, &w])?
                    .is_some_and(|row| row.get(0)))
            },
            |t| t.one(id, w, None).map(|_| true),
        )
    }

    /// Whether the actor exists.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// if !store.exists("room-1")? {
    ///     store.save("room-1", &Vec::<String>::new())?;
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn exists(&self, id: &str) -> Result<bool> {
        match self.read(id, Kind::Exists)? {
            Answer::Exists(found) => Ok(found),
            _ => unreachable!("a read answers as its kind asks"),
        }
    }

    /// The actor's current sequence number, or `None` when it does not exist.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = store.save("room-1", &0u8)?;
    /// assert_eq!(store.sequence("room-1")?, Some(seq)); // unless another writer came in between
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidActorId`]; connection and database errors.
    pub fn sequence(&self, id: &str) -> Result<Option<u64>> {
        match self.read(id, Kind::Sequence)? {
            Answer::Sequence(found) => Ok(found),
            _ => unreachable!("a read answers as its kind asks"),
        }
    }

    /// Starts an atomic batch of saves and deletes over several actors: all
    /// of them are applied in one transaction, or none is.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::{Expected, StateStore};
    /// # let store = StateStore::from_env()?;
    /// // Move an item from one inventory to another, atomically.
    /// let from: Vec<String> = vec![];
    /// let to: Vec<String> = vec!["sword".into()];
    /// store
    ///     .batch()
    ///     .save_if("player-1", &from, Expected::Sequence(7))
    ///     .save_if("player-2", &to, Expected::Sequence(3))
    ///     .delete("trade-offer-9")
    ///     .commit()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn batch(&self) -> Batch<'_> {
        Batch::new(self)
    }
}
