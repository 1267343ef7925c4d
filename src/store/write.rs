//! Options of one write ([`WriteOptions`]) and the single-actor write paths they
//! choose between: the group-commit combiner, one statement of its own, or
//! a write at a given sequence number.

use super::*;

/// How [`StateStore::save_with`] (and [`Raw::save_with`]) writes: a
/// condition on the stored version, a time to live, or a sequence number of
/// the caller's choosing. Options, not verbs, in the manner of
/// [`std::fs::OpenOptions`]: start from [`WriteOptions::new`] (a plain save) and
/// add what the write needs.
///
/// ```no_run
/// use std::time::Duration;
/// use trebuchet_postgres::{Expected, StateStore, WriteOptions};
///
/// let store = StateStore::from_env()?;
/// // Create a session only if there is none, and let it expire in 30 minutes.
/// let ttl = Duration::from_secs(30 * 60);
/// store.save_with("session-42", &"token", WriteOptions::new().expect(Expected::Absent).ttl(ttl))?;
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    expected: Option<Expected>,
    ttl: Option<Duration>,
    sequence: Option<u64>,
}

impl WriteOptions {
    /// A plain save: no condition, no time to live, the next sequence
    /// number.
    pub fn new() -> WriteOptions {
        WriteOptions::default()
    }

    /// Writes only when the stored version is what `expected` says
    /// (optimistic locking), as [`StateStore::save_if`]; otherwise the call
    /// fails with [`Error::Conflict`] and writes nothing. An expired actor
    /// counts as absent.
    #[must_use]
    pub fn expect(mut self, expected: Expected) -> WriteOptions {
        self.expected = Some(expected);
        self
    }

    /// Gives the state a time to live: it reads as absent once `ttl` has
    /// passed (by the server's clock), and the sweeper
    /// ([`StateStore::sweep_expired`]) deletes it later, announcing a
    /// delete. Every write sets the time to live anew: a later write
    /// without one keeps the state for good.
    ///
    /// An expired actor is treated as deleted at the number after its last:
    /// a save after expiry continues above that, and starts a new
    /// `created_at`. Writes with a time to live take a statement and a
    /// commit of their own (group commit does not combine them).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> WriteOptions {
        self.ttl = Some(ttl);
        self
    }

    /// Writes at this sequence number instead of the next one (the seed's
    /// `saveWithSequence`, for moving actors between stores). It must be
    /// greater than the stored number, and than a deleted actor's last one,
    /// so that numbers only grow; otherwise the call fails with
    /// [`Error::StaleSequence`]. Cannot be combined with
    /// [`expect`](Self::expect): the number is the condition.
    #[must_use]
    pub fn sequence(mut self, sequence: u64) -> WriteOptions {
        self.sequence = Some(sequence);
        self
    }
}

impl StateStore {
    /// Saves `state` as `options` say ([`WriteOptions`]: a condition, a time to
    /// live, a sequence number of the caller's choosing) and returns its
    /// sequence number. [`save`](Self::save) and [`save_if`](Self::save_if)
    /// are its short forms.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use trebuchet_postgres::{Expected, StateStore, WriteOptions};
    /// # let store = StateStore::from_env()?;
    /// let seq = store.save_with("session-42", &"token", WriteOptions::new().ttl(Duration::from_secs(60)))?;
    /// let seq = store.save_with(
    ///     "session-42",
    ///     &"renewed",
    ///     WriteOptions::new().expect(Expected::Sequence(seq)).ttl(Duration::from_secs(60)),
    /// )?;
    /// // Moving an actor from another store keeps its number.
    /// store.save_with("imported-7", &"state", WriteOptions::new().sequence(41))?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a time to live under 1 ms or over
    /// 1,000 years, or a sequence number combined with a condition (nothing
    /// is sent); [`Error::Conflict`] as [`save_if`](Self::save_if);
    /// [`Error::StaleSequence`] when a given sequence number is not greater
    /// than the stored one; otherwise as [`save`](Self::save).
    pub fn save_with<T: Serialize + ?Sized>(
        &self,
        id: &str,
        state: &T,
        options: WriteOptions,
    ) -> Result<u64> {
        check_actor_id(id)?;
        let ttl = options.check()?;
        // `encode` checks the size.
        let bytes = self.encode(state)?;
        self.write_checked(id, &bytes, options, ttl)
    }

    /// Writes stored bytes as `options` say: the one path behind every
    /// single-actor save, typed or raw.
    pub(super) fn write_bytes(&self, id: &str, state: &[u8], options: WriteOptions) -> Result<u64> {
        check_actor_id(id)?;
        self.check_size(state)?;
        let ttl = options.check()?;
        self.write_checked(id, state, options, ttl)
    }

    /// [`write_bytes`](Self::write_bytes) after its checks; `ttl` in
    /// microseconds, from [`WriteOptions::check`].
    fn write_checked(
        &self,
        id: &str,
        state: &[u8],
        options: WriteOptions,
        ttl: Option<i64>,
    ) -> Result<u64> {
        if let Some(sequence) = options.sequence {
            return self.save_at(id, state, sequence, ttl).map(|()| sequence);
        }
        match (ttl, &self.inner.combiner) {
            (None, Some(combiner)) => combiner.submit(
                Item {
                    id: id.to_owned(),
                    state: state.to_vec(),
                    expected: options.expected,
                    write_id: write_id(),
                },
                |items| self.write_group(items),
            ),
            _ => match options.expected {
                None => self.save_one(id, state, write_id(), ttl),
                Some(expected) => self.save_one_if(id, state, expected, write_id(), ttl),
            },
        }
    }
}

impl WriteOptions {
    /// Checks the options before anything is sent; returns the time to
    /// live in microseconds.
    fn check(&self) -> Result<Option<i64>> {
        if self.sequence.is_some() && self.expected.is_some() {
            return Err(Error::invalid_argument(
                "write",
                "a sequence number cannot be combined with a condition: the number is the condition",
            ));
        }
        if let Some(n) = self.sequence.or(match self.expected {
            Some(Expected::Sequence(n)) => Some(n),
            _ => None,
        }) {
            to_i64(n)?;
        }
        self.ttl.map(ttl_micros).transpose()
    }
}

impl StateStore {
    /// One unconditional save in its own statement; `ttl` in microseconds.
    fn save_one(&self, id: &str, state: &[u8], w: i64, ttl: Option<i64>) -> Result<u64> {
        self.write(
            &[id],
            |core, c| {
                let st = c.prepare(&core.sql().save)?;
                let row = st.query_one(&mut c.client, &[&id, &state, &w, &ttl])?;
                Ok(to_u64(row.get(0)))
            },
            |t| t.one(id, w, None),
        )
    }

    fn save_one_if(
        &self,
        id: &str,
        state: &[u8],
        expected: Expected,
        w: i64,
        ttl: Option<i64>,
    ) -> Result<u64> {
        let written = self.write(
            &[id],
            |core, c| {
                let write = Conditional {
                    state,
                    expected,
                    ttl,
                    write_id: w,
                };
                write_if_on(core, c, id, &write, true)
            },
            |t| settle_if(t, id, expected, w),
        )?;
        match written {
            Written::Yes { sequence, .. } => Ok(sequence),
            Written::Blocked { actual } => Err(Error::Conflict {
                actor_id: id.to_owned(),
                expected,
                actual,
            }),
            Written::Lost(e) => Err(e),
        }
    }

    fn write_item(&self, item: &Item) -> Result<u64> {
        match item.expected {
            None => self.save_one(&item.id, &item.state, item.write_id, None),
            Some(expected) => {
                self.save_one_if(&item.id, &item.state, expected, item.write_id, None)
            }
        }
    }

    /// Writes a group-commit batch: per round (each actor once), the
    /// unconditional rows in one statement and the conditional ones in
    /// another. Returns one result per item, in order.
    fn write_group(&self, items: Vec<Item>) -> Vec<Result<u64>> {
        if items.len() == 1 {
            return vec![self.write_item(&items[0])];
        }
        let mut results: Vec<Option<Result<u64>>> = (0..items.len()).map(|_| None).collect();
        for round in rounds(&items) {
            let (plain, conditional): (Vec<usize>, Vec<usize>) = round
                .into_iter()
                .partition(|&i| items[i].expected.is_none());
            if !plain.is_empty() {
                let written = self.write_plain_group(&items, &plain);
                self.settle_group(&items, &plain, written, &mut results);
            }
            if !conditional.is_empty() {
                let written = self.write_conditional_group(&items, &conditional);
                self.settle_group(&items, &conditional, written, &mut results);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every item belongs to one round"))
            .collect()
    }

    /// The unconditional items of one round, in one statement.
    fn write_plain_group(&self, items: &[Item], plain: &[usize]) -> Result<Vec<Result<u64>>> {
        let ids: Vec<&str> = plain.iter().map(|&i| items[i].id.as_str()).collect();
        let states: Vec<&[u8]> = plain.iter().map(|&i| items[i].state.as_slice()).collect();
        let write_ids: Vec<i64> = plain.iter().map(|&i| items[i].write_id).collect();
        self.write(
            &ids,
            |core, c| {
                let st = c.prepare(&core.sql().save_many)?;
                let written = st
                    .query(&mut c.client, &[&ids, &states, &write_ids])?
                    .iter()
                    .map(|row| (row.get::<_, String>(0), to_u64(row.get(1))))
                    .collect::<HashMap<String, u64>>();
                Ok(plain
                    .iter()
                    .map(|&i| Ok(written.get(&items[i].id).copied().unwrap_or(0)))
                    .collect())
            },
            |t| {
                Ok(plain
                    .iter()
                    .map(|&i| t.one(&items[i].id, items[i].write_id, None))
                    .collect())
            },
        )
    }

    /// The conditional items of one round, in one statement.
    fn write_conditional_group(
        &self,
        items: &[Item],
        conditional: &[usize],
    ) -> Result<Vec<Result<u64>>> {
        let ids: Vec<&str> = conditional.iter().map(|&i| items[i].id.as_str()).collect();
        let states: Vec<&[u8]> = conditional
            .iter()
            .map(|&i| items[i].state.as_slice())
            .collect();
        let expected: Vec<Option<i64>> = conditional
            .iter()
            .map(|&i| match items[i].expected {
                Some(Expected::Sequence(n)) => i64::try_from(n).ok(),
                _ => None,
            })
            .collect();
        let write_ids: Vec<i64> = conditional.iter().map(|&i| items[i].write_id).collect();
        self.write(
            &ids,
            |core, c| {
                let outcomes = many_if_on(core, c, &ids, &states, &expected, &write_ids)?;
                Ok(conditional
                    .iter()
                    .zip(outcomes)
                    .map(|(&i, outcome)| match outcome {
                        Written::Yes { sequence, .. } => Ok(sequence),
                        Written::Blocked { actual } => Err(Error::Conflict {
                            actor_id: items[i].id.clone(),
                            expected: items[i].expected.unwrap_or(Expected::Absent),
                            actual,
                        }),
                        Written::Lost(e) => Err(e),
                    })
                    .collect())
            },
            |t| {
                Ok(conditional
                    .iter()
                    .map(|&i| {
                        let target = match items[i].expected {
                            Some(Expected::Sequence(n)) => Some(n.saturating_add(1)),
                            _ => None,
                        };
                        t.one(&items[i].id, items[i].write_id, target)
                    })
                    .collect())
            },
        )
    }

    /// Hands out one statement's outcome. When the connection was lost and
    /// the outcome could not be found out, every caller gets that error; any
    /// other failure means nothing was written, and each row is written on
    /// its own so that one bad row fails only its caller.
    fn settle_group(
        &self,
        items: &[Item],
        indexes: &[usize],
        outcome: Result<Vec<Result<u64>>>,
        results: &mut [Option<Result<u64>>],
    ) {
        match outcome {
            Ok(per_item) => {
                for (&i, r) in indexes.iter().zip(per_item) {
                    results[i] = Some(r);
                }
            }
            Err(Error::OutcomeUnknown { source, .. }) => {
                for &i in indexes {
                    results[i] = Some(Err(Error::OutcomeUnknown {
                        actor_id: items[i].id.clone(),
                        source: Arc::clone(&source),
                    }));
                }
            }
            Err(_) => {
                for &i in indexes {
                    results[i] = Some(self.write_item(&items[i]));
                }
            }
        }
    }

    /// A write at a sequence number of the caller's choosing; `ttl` in
    /// microseconds.
    fn save_at(&self, id: &str, state: &[u8], sequence: u64, ttl: Option<i64>) -> Result<()> {
        let wanted = to_i64(sequence)?;
        let w = write_id();
        // `Some(current)` when a higher sequence number blocked the write.
        let blocked = self.write(
            &[id],
            |core, c| {
                let attempts = core.retry().max_attempts.max(1);
                for _ in 0..attempts {
                    let st = c.prepare(&core.sql().save_with_sequence)?;
                    // On Citus the statement answers nothing when it was
                    // blocked, and the number is read next.
                    let row = st.query_opt(&mut c.client, &[&id, &state, &wanted, &w, &ttl])?;
                    if row
                        .as_ref()
                        .is_some_and(|row| row.get::<_, Option<i64>>(0).is_some())
                    {
                        return Ok(None);
                    }
                    // The statement's snapshot may predate the writer that
                    // blocked it: a number below the one given (or none)
                    // is read again, and where the reading still does not
                    // explain the block, the write is made again.
                    let seen = row.and_then(|row| row.get::<_, Option<i64>>(3));
                    if seen.is_some_and(|n| n >= wanted) {
                        return Ok(Some(seen.map(to_u64)));
                    }
                    let st = c.prepare(&core.sql().sequence)?;
                    let now = st
                        .query_opt(&mut c.client, &[&id])?
                        .map(|r| r.get::<_, i64>(0));
                    match now {
                        Some(n) if n >= wanted => return Ok(Some(Some(to_u64(n)))),
                        None if seen.is_none() => return Ok(Some(None)),
                        _ => {}
                    }
                }
                Err(Failure::Store(Error::TooManyConflicts {
                    actor_id: id.to_owned(),
                    attempts: core.retry().max_attempts.max(1),
                }))
            },
            |t| t.one(id, w, Some(sequence)).map(|_| None),
        )?;
        match blocked {
            None => Ok(()),
            Some(current) => Err(Error::StaleSequence {
                actor_id: id.to_owned(),
                sequence,
                current,
            }),
        }
    }
}
