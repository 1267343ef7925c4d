//! Batches of stored bytes: [`RawBatch`], from [`Raw::batch`].

use super::*;

/// A [`Batch`] whose saves take stored bytes, bypassing the codec; from
/// [`Raw::batch`]. The same steps, order and guarantees.
///
/// ```no_run
/// # use trebuchet_postgres::{BatchResult, Expected, StateStore};
/// # let store = StateStore::from_env()?;
/// let results = store
///     .raw()
///     .batch()
///     .save("blob-1", b"\x01")
///     .save_if("blob-1", b"\x02", Expected::Sequence(1))
///     .delete("blob-2")
///     .commit()?;
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
#[must_use = "a batch does nothing until commit() is called"]
#[derive(Debug)]
pub struct RawBatch<'s>(Batch<'s>);

impl<'s> Raw<'s> {
    /// Starts a batch of saves and deletes of stored bytes ([`RawBatch`]),
    /// as [`StateStore::batch`] does for typed states.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::BatchResult;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let results = store.raw().batch().save("blob-1", b"\x01").delete("blob-2").commit()?;
    /// assert!(matches!(results[0], BatchResult::Saved(_)));
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn batch(&self) -> RawBatch<'s> {
        RawBatch(Batch::new(self.store))
    }
}

impl RawBatch<'_> {
    /// [`Batch::save`] with stored bytes.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Two blobs written together, or neither.
    /// let results = store
    ///     .raw()
    ///     .batch()
    ///     .save("blob-1", b"\x01")
    ///     .save("blob-2", b"\x02")
    ///     .commit()?;
    /// assert_eq!(results.len(), 2);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn save(self, id: &str, state: &[u8]) -> Self {
        RawBatch(self.0.push_save(id, Ok(state.to_vec()), None))
    }

    /// [`Batch::save_if`] with stored bytes.
    ///
    /// ```no_run
    /// # use trebuchet_postgres::Expected;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// // Create the blob and its index entry, unless the blob exists.
    /// store
    ///     .raw()
    ///     .batch()
    ///     .save_if("blob-9", b"\x01", Expected::Absent)
    ///     .save("index-blob-9", b"blob-9")
    ///     .commit()?;
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn save_if(self, id: &str, state: &[u8], expected: Expected) -> Self {
        RawBatch(self.0.push_save(id, Ok(state.to_vec()), Some(expected)))
    }

    /// [`Batch::delete`].
    ///
    /// ```no_run
    /// # use trebuchet_postgres::BatchResult;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let results = store.raw().batch().delete("blob-1").delete("index-blob-1").commit()?;
    /// if results[0] == BatchResult::Deleted(false) {
    ///     println!("blob-1 was already gone");
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn delete(self, id: &str) -> Self {
        RawBatch(self.0.delete(id))
    }

    /// [`Batch::commit`].
    ///
    /// ```no_run
    /// # use trebuchet_postgres::BatchResult;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// for result in store.raw().batch().save("blob-1", b"\x01").delete("blob-2").commit()? {
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
    /// As [`Batch::commit`].
    pub fn commit(self) -> Result<Vec<BatchResult>> {
        self.0.commit()
    }
}
