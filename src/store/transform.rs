//! Read-modify-write: `transform` and its retries.

use super::*;

/// How [`StateStore::transform`] retries after losing a race: up to
/// `max_attempts` tries, sleeping a random time up to an exponentially
/// growing bound (from `initial_backoff`, doubling, capped at `max_backoff`)
/// between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before [`Error::TooManyConflicts`] (default 100).
    pub max_attempts: u32,
    /// The first back-off bound (default 1 ms).
    pub initial_backoff: Duration,
    /// The largest back-off bound (default 100 ms).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// The pause before attempt `attempt + 1`: full jitter, so that
    /// contenders spread out instead of colliding again in step.
    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let bound = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max_backoff);
        bound.mul_f64(fastrand::f64())
    }
}

impl StateStore {
    /// Atomically replaces an actor's state with `f(current)`, where
    /// `current` is `None` for a new actor, and returns what was written.
    ///
    /// Unlike a load followed by a save, no concurrent update is ever lost:
    /// the write is conditional on the version `f` saw, and when another
    /// writer got there first the state is read again and **`f` runs
    /// again**, after a jittered back-off ([`RetryPolicy`]). So `f` may run
    /// more than once and should have no side effects beyond computing the
    /// new state. It runs while the attempt holds a pooled connection: keep
    /// it short.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // A counter from which no concurrent increment is lost.
    /// let v = store.transform("visits", |n: Option<u64>| n.unwrap_or(0) + 1)?;
    /// println!("visit {} at sequence {}", v.value, v.sequence);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::TooManyConflicts`] after [`RetryPolicy::max_attempts`]
    /// lost races (nothing written by this call); [`Error::Decode`] when the
    /// stored state is not a `T`; otherwise as [`save`](Self::save).
    pub fn transform<T, F>(&self, id: &str, mut f: F) -> Result<Versioned<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> T,
    {
        self.try_transform(id, |current| Ok::<T, Error>(f(current)))
    }

    /// [`transform`](Self::transform) with a step that may fail: when `f`
    /// returns an error, the call ends with it and writes nothing. The
    /// error type is the caller's, as long as the store's errors convert
    /// into it (`E: From<Error>`; [`Error`] itself, or an application error
    /// with a variant for the store's).
    ///
    /// ```no_run
    /// # use trebuchet_postgres::{Error, StateStore};
    /// # let store = StateStore::from_env()?;
    /// #[derive(Debug)]
    /// enum Spend {
    ///     Insufficient { balance: u64 },
    ///     Store(Error),
    /// }
    /// impl From<Error> for Spend {
    ///     fn from(e: Error) -> Self {
    ///         Spend::Store(e)
    ///     }
    /// }
    ///
    /// let result = store.try_transform("wallet-1", |balance: Option<u64>| {
    ///     let balance = balance.unwrap_or(0);
    ///     balance.checked_sub(30).ok_or(Spend::Insufficient { balance })
    /// });
    /// match result {
    ///     Ok(v) => println!("{} left at sequence {}", v.value, v.sequence),
    ///     Err(Spend::Insufficient { balance }) => println!("only {balance}; nothing written"),
    ///     Err(Spend::Store(e)) => return Err(e),
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `f`'s error, unchanged (nothing written); otherwise the store's
    /// errors as [`transform`](Self::transform), converted into `E`.
    pub fn try_transform<T, E, F>(&self, id: &str, mut f: F) -> std::result::Result<Versioned<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnMut(Option<T>) -> std::result::Result<T, E>,
    {
        check_actor_id(id)?;
        let mut value = None;
        let versioned = self.raw().try_transform::<E, _>(id, |current| {
            let current = current
                .map(|bytes| self.decode(id, bytes))
                .transpose()
                .map_err(E::from)?;
            let next = f(current)?;
            let bytes = self.encode(&next).map_err(E::from)?;
            value = Some(next);
            Ok(bytes)
        })?;
        Ok(versioned.map(|_| value.expect("set by the successful attempt")))
    }
}

impl Raw<'_> {
    /// [`StateStore::transform`] on stored bytes: `f` gets the stored
    /// bytes (`None` for a new actor) and returns the bytes to store. The
    /// same retry rules apply, so `f` may run more than once.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // A counter kept as 8 little-endian bytes.
    /// let v = store.raw().transform("hits", |current| {
    ///     let n = current.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
    ///     (n + 1).to_le_bytes().to_vec()
    /// })?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::transform`], without decoding.
    pub fn transform<F>(&self, id: &str, mut f: F) -> Result<Versioned<Vec<u8>>>
    where
        F: FnMut(Option<&[u8]>) -> Vec<u8>,
    {
        self.try_transform(id, |current| Ok::<_, Error>(f(current)))
    }

    /// [`StateStore::try_transform`] on stored bytes: an error from `f`
    /// ends the call without writing.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Append to a log kept as bytes, but never past 1 KiB.
    /// type BoxError = Box<dyn std::error::Error + Send + Sync>;
    /// let v = store.raw().try_transform("log-1", |current| -> Result<Vec<u8>, BoxError> {
    ///     let mut log = current.unwrap_or_default().to_vec();
    ///     if log.len() >= 1024 {
    ///         return Err("log is full".into()); // nothing is written
    ///     }
    ///     log.push(b'+');
    ///     Ok(log)
    /// })?;
    /// println!("{} bytes at sequence {}", v.value.len(), v.sequence);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `f`'s error, unchanged (nothing written); otherwise as
    /// [`transform`](Self::transform), converted into `E`.
    pub fn try_transform<E, F>(
        &self,
        id: &str,
        mut f: F,
    ) -> std::result::Result<Versioned<Vec<u8>>, E>
    where
        E: From<Error>,
        F: FnMut(Option<&[u8]>) -> std::result::Result<Vec<u8>, E>,
    {
        check_actor_id(id)?;
        let store = self.store;
        let mut value = Vec::new();
        let mut failed = None;
        let versioned = store.transform_loop(id, |current| match f(current) {
            Ok(next) => {
                store.check_size(&next)?;
                value.clone_from(&next);
                Ok(next)
            }
            Err(e) => {
                failed = Some(e);
                // Ends the attempt; the caller gets `e` instead.
                Err(Error::invalid_argument("transform", "the step failed"))
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(versioned?.map(|()| value))
    }
}

impl StateStore {
    /// Read, compute, conditional write; again after a back-off when another
    /// writer won. Each attempt holds one connection for its two round trips.
    fn transform_loop(
        &self,
        id: &str,
        mut next: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>>,
    ) -> Result<Versioned<()>> {
        let policy = self.inner.core.retry();
        for attempt in 1..=policy.max_attempts {
            let w = write_id();
            let expected = std::cell::Cell::new(None);
            let written = self.write(
                &[id],
                |core, c| {
                    let current = load_versioned_on(core, c, id)?;
                    let bytes = next(current.as_ref().map(|v| v.value.as_slice()))?;
                    let wanted =
                        current.map_or(Expected::Absent, |v| Expected::Sequence(v.sequence));
                    expected.set(Some(wanted));
                    // A lost race is retried from a fresh read: no need for
                    // the exact version that won.
                    let write = Conditional {
                        state: &bytes,
                        expected: wanted,
                        ttl: None,
                        write_id: w,
                    };
                    write_if_on(core, c, id, &write, false)
                },
                |t| match expected.get() {
                    Some(wanted) => settle_if(t, id, wanted, w),
                    // Lost before the read returned: nothing was written.
                    None => Err(t.not_applied()),
                },
            );
            let written = match written {
                // Nothing was written: run the step again, as after a lost
                // race.
                Err(e) if e.is_not_applied() && attempt < policy.max_attempts => {
                    log::debug!("transform of {id:?} was not applied ({e}); running it again");
                    continue;
                }
                other => other?,
            };
            match written {
                Written::Yes {
                    sequence,
                    updated_at,
                    created_at,
                } => return Ok(Versioned::new((), sequence, updated_at, created_at)),
                Written::Blocked { .. } if attempt < policy.max_attempts => {
                    let pause = policy.backoff(attempt - 1);
                    log::trace!("transform of {id:?} lost a race (attempt {attempt}); retrying in {pause:?}");
                    std::thread::sleep(pause);
                }
                Written::Blocked { .. } => {}
                Written::Lost(e) => return Err(e),
            }
        }
        Err(Error::TooManyConflicts {
            actor_id: id.to_owned(),
            attempts: policy.max_attempts,
        })
    }
}
