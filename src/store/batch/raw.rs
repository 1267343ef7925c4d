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
    pub fn batch(&self) -> RawBatch<'s> {
        RawBatch(Batch::new(self.store))
    }
}

impl RawBatch<'_> {
    /// [`Batch::save`] with stored bytes.
    pub fn save(self, id: &str, state: &[u8]) -> Self {
        RawBatch(self.0.push_save(id, Ok(state.to_vec()), None))
    }

    /// [`Batch::save_if`] with stored bytes.
    pub fn save_if(self, id: &str, state: &[u8], expected: Expected) -> Self {
        RawBatch(self.0.push_save(id, Ok(state.to_vec()), Some(expected)))
    }

    /// [`Batch::delete`].
    pub fn delete(self, id: &str) -> Self {
        RawBatch(self.0.delete(id))
    }

    /// [`Batch::commit`].
    ///
    /// # Errors
    ///
    /// As [`Batch::commit`].
    pub fn commit(self) -> Result<Vec<BatchResult>> {
        self.0.commit()
    }
}
