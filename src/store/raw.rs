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
    pub fn raw(&self) -> Raw<'_> {
        Raw { store: self }
    }
}

impl Raw<'_> {
    /// [`StateStore::save`] with stored bytes.
    ///
    /// # Errors
    ///
    /// As [`StateStore::save`].
    pub fn save(&self, id: &str, state: &[u8]) -> Result<u64> {
        self.store.write_bytes(id, state, WriteOptions::new())
    }

    /// [`StateStore::save_if`] with stored bytes.
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
    /// # Errors
    ///
    /// As [`StateStore::save_with`].
    pub fn save_with(&self, id: &str, state: &[u8], options: WriteOptions) -> Result<u64> {
        self.store.write_bytes(id, state, options)
    }

    /// [`StateStore::load`] returning the stored bytes.
    ///
    /// # Errors
    ///
    /// As [`StateStore::load`], without decoding.
    pub fn load(&self, id: &str) -> Result<Option<Vec<u8>>> {
        check_actor_id(id)?;
        self.store.call(true, |inner, c| {
            let st = c.prepare(&inner.sql.load)?;
            Ok(st.query_opt(&mut c.client, &[&id])?.map(|row| row.get(0)))
        })
    }

    /// [`StateStore::load_versioned`] returning the stored bytes.
    ///
    /// # Errors
    ///
    /// As [`StateStore::load`], without decoding.
    pub fn load_versioned(&self, id: &str) -> Result<Option<Versioned<Vec<u8>>>> {
        check_actor_id(id)?;
        self.store
            .call(true, |inner, c| load_versioned_on(inner, c, id))
    }
}
