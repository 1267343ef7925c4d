//! The store seen as bytes: [`Raw`], from [`StateStore::raw`].

use super::*;

/// The store's verbs on stored bytes, bypassing the codec: for states that
/// are already encoded, for tools that move actors without knowing their
/// type, and for bindings to other languages. From [`StateStore::raw`];
/// `Copy`, and as cheap as a reference.
///
/// Each method is the typed method of the same name with `&[u8]` in and
/// `Vec<u8>` out; sizes, ids and every guarantee are checked the same way.
///
/// ```no_run
/// # use trebuchet_postgres::{Expected, StateStore};
/// # let store = StateStore::from_env()?;
/// let raw = store.raw();
/// let seq = raw.save("blob-1", b"\x01\x02\x03")?;
/// assert_eq!(raw.load("blob-1")?.as_deref(), Some(&b"\x01\x02\x03"[..]));
/// raw.save_if("blob-1", b"\x04", Expected::Sequence(seq))?;
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct Raw<'s> {
    pub(crate) store: &'s StateStore,
}

impl fmt::Debug for Raw<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Raw").field("store", self.store).finish()
    }
}

impl StateStore {
    /// This store's verbs on stored bytes, bypassing the codec ([`Raw`]).
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Copy an actor without knowing its type.
    /// if let Some(bytes) = store.raw().load("room-1")? {
    ///     store.raw().save("room-1-copy", &bytes)?;
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn raw(&self) -> Raw<'_> {
        Raw { store: self }
    }
}

impl Raw<'_> {
    /// [`StateStore::save`] with stored bytes.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let seq = store.raw().save("blob-1", b"\x01\x02\x03")?;
    /// assert!(seq >= 1);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::save`].
    pub fn save(&self, id: &str, state: &[u8]) -> Result<u64> {
        self.store.write_bytes(id, state, WriteOptions::new())
    }

    /// [`StateStore::save_if`] with stored bytes.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::Expected;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let raw = store.raw();
    /// let seq = raw.save_if("blob-1", b"v1", Expected::Absent)?; // creates it
    /// let err = raw.save_if("blob-1", b"v1", Expected::Absent).unwrap_err();
    /// assert!(err.is_conflict());
    /// raw.save_if("blob-1", b"v2", Expected::Sequence(seq))?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::save_if`].
    pub fn save_if(&self, id: &str, state: &[u8], expected: Expected) -> Result<u64> {
        self.store
            .write_bytes(id, state, WriteOptions::new().expect(expected))
    }

    /// [`StateStore::save_with`] with stored bytes.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use trebuchet_postgres::WriteOptions;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // A rendered page, kept for an hour.
    /// let ttl = Duration::from_secs(3600);
    /// store.raw().save_with("page-home", b"<html>...</html>", WriteOptions::new().ttl(ttl))?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::save_with`].
    pub fn save_with(&self, id: &str, state: &[u8], options: WriteOptions) -> Result<u64> {
        self.store.write_bytes(id, state, options)
    }

    /// [`StateStore::load`] returning the stored bytes.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// match store.raw().load("blob-1")? {
    ///     Some(bytes) => println!("{} bytes", bytes.len()),
    ///     None => println!("no such actor"),
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::load`], without decoding.
    pub fn load(&self, id: &str) -> Result<Option<Vec<u8>>> {
        match self.store.read(id, Kind::State)? {
            Answer::State(state) => Ok(state),
            _ => unreachable!("a read answers as its kind asks"),
        }
    }

    /// [`StateStore::load_versioned`] returning the stored bytes.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// if let Some(v) = store.raw().load_versioned("blob-1")? {
    ///     println!("{} bytes at sequence {}", v.value.len(), v.sequence);
    ///     println!("expires at {:?}", v.expires_at); // None: kept for good
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`StateStore::load`], without decoding.
    pub fn load_versioned(&self, id: &str) -> Result<Option<Versioned<Vec<u8>>>> {
        match self.store.read(id, Kind::Versioned)? {
            Answer::Versioned(found) => Ok(found),
            _ => unreachable!("a read answers as its kind asks"),
        }
    }
}
