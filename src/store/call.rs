//! The one way every operation reaches the server: [`StateStore::call`]
//! for reads and [`StateStore::write`] for writes, which classify errors,
//! run again what the server rolled back, and settle writes whose
//! connection broke (see the lost-write protocol in `crate::outcome`).

use super::*;
use crate::error::server;
pub(super) use crate::error::server::is_transient;

/// Why a call on a connection failed: a driver error, to be classified with
/// the connection at hand, or one of ours.
pub(crate) enum Failure {
    Pg(postgres::Error),
    Store(Error),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Store(e)
    }
}

// Writes whose result is one outcome for the whole statement: the counters
// read it from the `Result` around them.
impl Settled for u64 {}
impl Settled for bool {}
impl Settled for Option<Option<u64>> {}
impl Settled for HashMap<String, u64> {}
impl Settled for std::collections::HashSet<String> {}
impl Settled for Written {}
impl Settled for Vec<Written> {}
impl Settled for Result<Vec<BatchResult>> {}

/// The outcome of a conditional write.
pub(super) enum Written {
    Yes {
        sequence: u64,
        updated_at: SystemTime,
        created_at: SystemTime,
    },
    Blocked {
        actual: Option<u64>,
    },
    /// The connection broke and this error says what became of the item
    /// (from a bulk write's outcomes, found out afterwards).
    Lost(Error),
}

impl StateStore {
    /// Runs `f` on a pooled connection and classifies its errors. Reads
    /// (`retry_lost`) run once more on another connection when the first
    /// one turns out to be dead; writes never do, since the first attempt
    /// may have been applied. Work the server rolled back for a reason that
    /// running it again cures (see [`is_transient`]) runs again.
    pub(crate) fn call<R>(
        &self,
        retry_lost: bool,
        mut f: impl FnMut(&Core, &mut Connection) -> Result<R, Failure>,
    ) -> Result<R> {
        let attempts = if retry_lost { 2 } else { 1 };
        let mut attempt = 0;
        let mut rolled_back = 0;
        loop {
            attempt += 1;
            let mut conn = self.inner.core.pool().get()?;
            let e = match f(&self.inner.core, &mut conn) {
                Ok(r) => return Ok(r),
                Err(Failure::Store(e)) => return Err(e),
                Err(Failure::Pg(e)) => e,
            };
            let (error, lost) = self.inner.core.pool().call_error(&mut conn, e);
            if lost && attempt < attempts {
                continue;
            }
            if self.again_after_rollback(&error, &mut rolled_back) {
                attempt -= 1;
                continue;
            }
            return Err(self.schema_hint(error));
        }
    }

    /// Whether to run work again that the server rolled back as a whole
    /// for a reason that running it again cures: a deadlock, a
    /// serialization failure, or a create that a concurrent delete
    /// overtook (the trigger refuses a row that would start at or below
    /// the tombstone that delete left, so that numbers never repeat). Pauses
    /// as the retry policy says before saying yes; `count` is the caller's
    /// tally of such rollbacks.
    fn again_after_rollback(&self, error: &Error, count: &mut u32) -> bool {
        if !is_transient(error) {
            return false;
        }
        *count += 1;
        let policy = self.inner.core.retry();
        if *count >= policy.max_attempts {
            return false;
        }
        log::debug!("the server rolled a write back ({error}); running it again");
        std::thread::sleep(policy.backoff(*count - 1));
        true
    }

    /// Runs a write on a pooled connection. When the connection breaks
    /// before the reply arrives, the write may or may not have landed:
    /// `settle` gives the result from what the rows of `ids` say, read on a
    /// new connection once the old one's server process is gone (see the
    /// section on lost connections).
    ///
    /// A write found not applied on a connection that had just been checked
    /// because another one broke is made once more: the check can pass just
    /// before a restart or a mass disconnect reaches that connection's
    /// server process, and the caller has not failed for this fault yet.
    pub(crate) fn write<R: Settled>(
        &self,
        ids: &[&str],
        mut f: impl FnMut(&Core, &mut Connection) -> Result<R, Failure>,
        settle: impl Fn(&Traces) -> Result<R>,
    ) -> Result<R> {
        let mut again = true;
        let mut rolled_back = 0;
        loop {
            let mut conn = self.inner.core.pool().get()?;
            let e = match f(&self.inner.core, &mut conn) {
                Ok(r) => return Ok(r),
                Err(Failure::Store(e)) => return Err(e),
                Err(Failure::Pg(e)) => e,
            };
            let (backend, checked) = (conn.backend, conn.checked);
            let (error, _) = self.inner.core.pool().call_error(&mut conn, e);
            drop(conn);
            if self.again_after_rollback(&error, &mut rolled_back) {
                continue;
            }
            let Error::ConnectionLost(source) = error else {
                return Err(self.schema_hint(error));
            };
            log::info!(
                "connection lost during a write to {:?}; finding out whether it was applied",
                ids.first().copied().unwrap_or_default()
            );
            let result = outcome::find_out(
                self.inner.core.pool(),
                self.inner.core.sql(),
                ids,
                backend,
                source,
                self.inner.outcome_timeout,
            )
            .and_then(|traces| settle(&traces));
            self.inner.lost_writes.count(&result);
            let not_applied = matches!(outcome::lost(&result), Some(Error::NotApplied { .. }));
            if checked && again && not_applied {
                again = false;
                continue;
            }
            return result;
        }
    }

    fn schema_hint(&self, error: Error) -> Error {
        match error.sql_state() {
            _ if server::is_undefined_table(&error) => Error::SchemaMissing {
                table: self.inner.core.names().table_sql(),
            },
            _ => schema::privilege_error(error, self.inner.core.names(), false),
        }
    }
}
