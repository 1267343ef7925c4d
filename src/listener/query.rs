//! The catch-up query, typed: the current version of a set of actors. The
//! store hands its text to the listeners it builds.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postgres::{Client, Row};

/// Reads the current version of each of a set of actors, or its tombstone:
/// what a listener made by a store delivers after a gap instead of a resync,
/// and the number an announce carries. Built once per store from its names;
/// cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct CatchUpQuery {
    sql: Arc<str>,
}

/// One actor as [`CatchUpQuery::run`] found it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ActorVersion {
    pub actor_id: String,
    /// Its sequence number, or its tombstone's when it is deleted. A row
    /// that has expired counts as deleted at the number its sweep will
    /// announce.
    pub sequence: u64,
    /// Whether it is deleted (or expired).
    pub deleted: bool,
    /// When that version was written, deleted or expired (the Unix epoch
    /// for a time that does not fit).
    pub at: SystemTime,
}

impl CatchUpQuery {
    /// A query of `sql`, which takes the ids as `$1` (`VARCHAR[]`) and
    /// returns the columns `actor_id` (`TEXT`), `sequence_number`
    /// (`BIGINT`), `deleted` (`BOOLEAN`) and `at_epoch` (`FLOAT8`, seconds).
    pub(crate) fn new(sql: &str) -> CatchUpQuery {
        CatchUpQuery { sql: sql.into() }
    }

    /// The current version of those of `ids` that exist or existed, in no
    /// particular order; an id never written is absent.
    ///
    /// # Errors
    ///
    /// The server's, or the driver's when a column is not of its type.
    pub(crate) fn run(
        &self,
        client: &mut Client,
        ids: &[String],
    ) -> Result<Vec<ActorVersion>, postgres::Error> {
        client
            .query(&*self.sql, &[&ids])?
            .iter()
            .map(ActorVersion::from_row)
            .collect()
    }
}

impl ActorVersion {
    fn from_row(row: &Row) -> Result<ActorVersion, postgres::Error> {
        let sequence: i64 = row.try_get("sequence_number")?;
        let seconds: Option<f64> = row.try_get("at_epoch")?;
        Ok(ActorVersion {
            actor_id: row.try_get("actor_id")?,
            sequence: u64::try_from(sequence).unwrap_or(0),
            deleted: row.try_get("deleted")?,
            // An 'infinity' timestamp must not end the listener's thread.
            at: seconds
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map_or(SystemTime::UNIX_EPOCH, |d| SystemTime::UNIX_EPOCH + d),
        })
    }
}
