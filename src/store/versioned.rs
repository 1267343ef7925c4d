//! What every read of versions returns: [`Versioned`].

use std::time::SystemTime;

/// A stored state with its version and timestamps.
///
/// Every read that returns versions returns this, typed or as bytes
/// ([`Raw`](crate::Raw)); [`Raw::restore_many`](crate::Raw::restore_many)
/// takes it back. More fields may come (hence `#[non_exhaustive]`): build
/// one with [`new`](Self::new).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Versioned<T> {
    /// The state.
    pub value: T,
    /// Its sequence number: 1 for the first save, then one more per write.
    pub sequence: u64,
    /// When it was last written (UTC, from the server's clock).
    pub updated_at: SystemTime,
    /// When the actor was created (UTC, from the server's clock).
    pub created_at: SystemTime,
    /// When it expires (UTC, from the server's clock), for a state saved
    /// with a time to live ([`WriteOptions::ttl`](crate::WriteOptions::ttl));
    /// `None` for one kept for good.
    pub expires_at: Option<SystemTime>,
}

impl<T> Versioned<T> {
    /// A version of `value` without expiry, for
    /// [`Raw::restore_many`](crate::Raw::restore_many) and for tests.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use trebuchet_postgres::Versioned;
    ///
    /// let now = SystemTime::now();
    /// let v = Versioned::new(b"state".to_vec(), 7, now, now)
    ///     .with_expires_at(Some(now + Duration::from_secs(60)));
    /// assert_eq!(v.sequence, 7);
    /// ```
    pub fn new(value: T, sequence: u64, updated_at: SystemTime, created_at: SystemTime) -> Self {
        Versioned {
            value,
            sequence,
            updated_at,
            created_at,
            expires_at: None,
        }
    }

    /// The same version expiring at `expires_at` (`None`: kept for good).
    #[must_use]
    pub fn with_expires_at(mut self, expires_at: Option<SystemTime>) -> Self {
        self.expires_at = expires_at;
        self
    }

    /// The same version holding `f(value)`.
    ///
    /// ```
    /// # use std::time::SystemTime;
    /// # use trebuchet_postgres::Versioned;
    /// # let now = SystemTime::now();
    /// let v = Versioned::new(2u32, 1, now, now).map(|n| n * 10);
    /// assert_eq!(v.value, 20);
    /// ```
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Versioned<U> {
        match self.try_map(|value| Ok::<U, std::convert::Infallible>(f(value))) {
            Ok(mapped) => mapped,
            Err(never) => match never {},
        }
    }

    /// [`map`](Self::map) with a step that may fail.
    pub(crate) fn try_map<U, E>(
        self,
        f: impl FnOnce(T) -> std::result::Result<U, E>,
    ) -> std::result::Result<Versioned<U>, E> {
        Ok(Versioned {
            value: f(self.value)?,
            sequence: self.sequence,
            updated_at: self.updated_at,
            created_at: self.created_at,
            expires_at: self.expires_at,
        })
    }
}
