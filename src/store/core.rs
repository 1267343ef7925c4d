//! What every operation on the table works with: the pool, the table's
//! names, its statements (built once per store, in the form its engine
//! needs), the codec and the retry policy. [`StateStore::call`] and
//! [`StateStore::write`] hand it to the operation modules (`monitor`,
//! `transfer`, `cache` and the store's own) together with a connection;
//! they read it through these accessors only.
//!
//! [`StateStore::call`]: super::StateStore::call
//! [`StateStore::write`]: super::StateStore::write

use std::sync::OnceLock;

use super::RetryPolicy;
use crate::codec::Codec;
use crate::pool::Pool;
use crate::schema::{Names, Statements};

pub(crate) struct Core {
    pool: Pool,
    names: Names,
    sql: Statements,
    codec: Codec,
    retry: RetryPolicy,
    /// Whether the table's ids sort in code point order, read from the
    /// catalog on the first listing by prefix.
    key_order: OnceLock<bool>,
}

impl Core {
    pub(super) fn new(
        pool: Pool,
        names: Names,
        sql: Statements,
        codec: Codec,
        retry: RetryPolicy,
    ) -> Core {
        Core {
            pool,
            names,
            sql,
            codec,
            retry,
            key_order: OnceLock::new(),
        }
    }

    /// The statements in another engine's form, once the builder has found
    /// where the table lives.
    pub(super) fn set_statements(&mut self, sql: Statements) {
        self.sql = sql;
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    pub(crate) fn sql(&self) -> &Statements {
        &self.sql
    }

    pub(crate) fn codec(&self) -> Codec {
        self.codec
    }

    pub(crate) fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Whether ids sort in code point order, once read; see
    /// `transfer::pages`.
    pub(crate) fn key_order(&self) -> &OnceLock<bool> {
        &self.key_order
    }
}
