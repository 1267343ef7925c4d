//! What the change feed delivers. [`payload`] parses the trigger's payload.

mod payload;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

pub use payload::MalformedPayload;

use crate::error::InvalidActorId;

/// Whether an actor was written or deleted, or announced without a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Inserted or updated.
    Saved,
    /// Deleted. Its sequence number is one above the last save.
    Deleted,
    /// Announced without a write
    /// ([`ChangeListener::announce`](crate::ChangeListener::announce), the
    /// payload's `op` is `"announce"`): reload the actor.
    ///
    /// Not a new version. Its sequence number is the actor's number when it
    /// was announced (a deleted actor's tombstone number, 0 when the actor
    /// never existed or the announcing listener knows no table), which a
    /// subscriber may have seen already, and which a write committed
    /// meanwhile may have passed. Subscribers receive it whatever numbers
    /// they have seen, it does not count as seen, and a
    /// [`StateCache`](crate::StateCache) reads the actor again even at a
    /// number it holds.
    Announced,
}

/// One actor's state changed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Change {
    /// The actor.
    pub actor_id: String,
    /// The sequence number the change produced.
    pub sequence: u64,
    /// When it was written (UTC), as announced by the trigger.
    pub timestamp: SystemTime,
    /// Saved or deleted.
    pub kind: ChangeKind,
    /// The table the change was made in, as `schema.table`, from the
    /// payload's `table` key. `None` for a payload without one, as the
    /// seed's own trigger or a hand-written `NOTIFY` sends.
    pub table: Option<String>,
}

/// Which table's changes a listener delivers, when it was told
/// ([`ChangeListenerBuilder::table`](crate::ChangeListenerBuilder::table)):
/// payloads naming another table are passed over, payloads naming none are
/// delivered. A name given without its schema is looked up on each new
/// connection, through that connection's search path, as the store finds
/// its table.
#[derive(Debug, Default)]
pub(crate) struct TableFilter {
    /// `(schema, name)` as configured; `None` delivers every table.
    configured: Option<(Option<String>, String)>,
    /// `schema.name`, as payloads name it.
    resolved: std::sync::Mutex<Option<String>>,
}

impl TableFilter {
    /// A filter for `table` (`name` or `schema.name`, both validated).
    pub fn new(table: Option<(Option<String>, String)>) -> TableFilter {
        let resolved = match &table {
            Some((Some(schema), name)) => Some(format!("{schema}.{name}")),
            _ => None,
        };
        TableFilter {
            configured: table,
            resolved: std::sync::Mutex::new(resolved),
        }
    }

    /// Finds the schema of a table named without one, on `client`: where
    /// the table is, or the first schema of the search path (where it will
    /// be created) when it does not exist yet.
    pub fn resolve(&self, client: &mut postgres::Client) -> Result<(), postgres::Error> {
        let Some((None, name)) = &self.configured else {
            return Ok(());
        };
        let row = client.query_one(
            "SELECT COALESCE((SELECT n.nspname::TEXT FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = pg_catalog.to_regclass($1)), pg_catalog.current_schema()::TEXT)",
            &[&format!("\"{name}\"")],
        )?;
        let schema: Option<String> = row.get(0);
        *self.lock() = schema.map(|schema| format!("{schema}.{name}"));
        Ok(())
    }

    /// The table as payloads name it, once known.
    pub fn table(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Whether a change belongs to the listener's table.
    pub fn admits(&self, change: &Change) -> bool {
        match (&self.configured, &change.table) {
            (None, _) | (_, None) => true,
            (Some(_), Some(table)) => self.lock().as_deref() == Some(table.as_str()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.resolved.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a subscriber must assume it missed changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The listener's connection was lost and has been re-established;
    /// changes committed in between were not announced.
    Reconnected,
    /// This subscriber's queue was full and changes were dropped for it.
    Lagged,
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncReason::Reconnected => f.write_str("reconnected"),
            ResyncReason::Lagged => f.write_str("lagged"),
        }
    }
}

/// What a subscription receives.
///
/// A change is shared: every subscriber that receives it holds the same
/// allocation (cloning an `Event` clones an [`Arc`]). Read its fields through
/// the `Arc` (`c.actor_id`, `c.sequence`); `Arc::unwrap_or_clone` gives an
/// owned [`Change`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An actor changed.
    Change(Arc<Change>),
    /// Changes may have been missed: reload whatever you keep. Always
    /// delivered before any change that follows the gap.
    Resync(ResyncReason),
}

/// The key of the probe payloads that
/// [`StateStore::notify_round_trip`](crate::StateStore::notify_round_trip)
/// sends: `{"trebuchetProbe":"<token>"}`.
pub(crate) const PROBE_KEY: &str = "trebuchetProbe";

/// Whether `payload` is a round-trip probe rather than a change.
pub(crate) fn is_probe(payload: &str) -> bool {
    payload
        .strip_prefix("{\"")
        .and_then(|rest| rest.strip_prefix(PROBE_KEY))
        .is_some_and(|rest| rest.starts_with('"'))
}

/// The longest actor id the table holds, in characters.
pub(crate) const MAX_ACTOR_ID_CHARS: usize = 255;

/// The payload's `op` of an announce.
pub(crate) const ANNOUNCE_OP: &str = "announce";

/// Whether the table can hold `id`: not empty, at most 255 characters, no
/// NUL (the rules of [`validate_actor_id`](crate::validate_actor_id)).
pub(crate) fn check_actor_id(id: &str) -> Result<(), InvalidActorId> {
    if id.is_empty() {
        return Err(InvalidActorId::Empty);
    }
    if id.len() > MAX_ACTOR_ID_CHARS {
        let chars = id.chars().count();
        if chars > MAX_ACTOR_ID_CHARS {
            return Err(InvalidActorId::TooLong { chars });
        }
    }
    if id.contains('\0') {
        return Err(InvalidActorId::ContainsNul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_recognised() {
        assert!(is_probe(r#"{"trebuchetProbe":"00ff"}"#));
        assert!(!is_probe(r#"{"trebuchetProbeX":"00ff"}"#));
        assert!(!is_probe(
            r#"{"actorID":"trebuchetProbe","sequenceNumber":1}"#
        ));
        assert!(Change::from_payload(r#"{"trebuchetProbe":"00ff"}"#).is_err());
    }
}
