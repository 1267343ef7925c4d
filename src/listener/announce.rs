//! Announcing a change without a write ([`ChangeListener::announce`]).
//!
//! [`ChangeListener::announce`]: super::ChangeListener::announce

use super::catch_up;
use super::connector::Connector;
use super::query::CatchUpQuery;
use crate::error::{Error, Result};

/// Sends an announce of `actor_id` on a connection of its own: reads the
/// actor's number through the catch-up query when there is one, then
/// notifies, with the server's clock as the timestamp.
pub(super) fn announce(
    conn: &Connector,
    channel: &str,
    catch_up: Option<&CatchUpQuery>,
    actor_id: &str,
) -> Result<()> {
    let mut client = conn.dial(None)?;
    let sequence = match catch_up {
        Some(query) => {
            catch_up::current_number(&mut client, query, actor_id).map_err(Error::Database)?
        }
        None => 0,
    };
    let sequence = i64::try_from(sequence).map_err(|_| Error::SequenceOutOfRange(sequence))?;
    client
        .execute(
            ANNOUNCE_SQL,
            &[&channel, &actor_id, &sequence, &conn.table.table()],
        )
        .map_err(Error::Database)?;
    Ok(())
}

/// Notifies `$1` of an announce of actor `$2` at number `$3` in table `$4`
/// (a `NULL` table leaves the key out), with the seed's keys.
const ANNOUNCE_SQL: &str = "SELECT pg_notify($1::TEXT, json_strip_nulls(json_build_object( \
     'actorID', $2::TEXT, 'sequenceNumber', $3::BIGINT, \
     'timestamp', EXTRACT(EPOCH FROM clock_timestamp()), \
     'op', 'announce', 'table', $4::TEXT))::TEXT)";
