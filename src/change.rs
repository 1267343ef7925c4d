//! What the change feed delivers, and parsing of the trigger's payload.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// Whether an actor was written or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Inserted or updated.
    Saved,
    /// Deleted. Its sequence number is one above the last save.
    Deleted,
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
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An actor changed.
    Change(Change),
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

/// The trigger's JSON: the seed's keys plus the optional `op`.
#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "actorID")]
    actor_id: String,
    #[serde(rename = "sequenceNumber")]
    sequence_number: i64,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default)]
    op: Option<String>,
    #[serde(default)]
    table: Option<String>,
}

/// Why a payload was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedPayload(pub(crate) String);

/// The most characters of a payload's fault kept in [`MalformedPayload`]:
/// a hostile payload of 8,000 bytes must not become a log line as long.
const MAX_REASON_CHARS: usize = 160;

/// The longest actor id the table holds, in characters.
const MAX_ACTOR_ID_CHARS: usize = 255;

impl MalformedPayload {
    fn new(mut reason: String) -> MalformedPayload {
        if let Some((cut, _)) = reason.char_indices().nth(MAX_REASON_CHARS) {
            reason.truncate(cut);
            reason.push('…');
        }
        MalformedPayload(reason)
    }
}

impl fmt::Display for MalformedPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed change payload: {}", self.0)
    }
}

impl std::error::Error for MalformedPayload {}

impl Change {
    /// Parses the trigger's JSON payload: `actorID`, `sequenceNumber`,
    /// `timestamp` (seconds since the Unix epoch, UTC) and, when present,
    /// `op` (`"save"` or `"delete"`). Payloads written by the seed's own
    /// trigger (no `op`) are saves.
    ///
    /// # Errors
    ///
    /// [`MalformedPayload`] when the payload is not a JSON object, a key is
    /// missing or has the wrong type, `actorID` is not an id the table can
    /// hold (empty, over 255 characters, or with a NUL), the sequence number
    /// is negative, or `op` is unknown.
    pub fn from_payload(payload: &str) -> Result<Change, MalformedPayload> {
        // serde would also read a struct from a JSON array (`["a",1]`),
        // which no trigger sends.
        if !payload.trim_start().starts_with('{') {
            return Err(MalformedPayload::new("not a JSON object".into()));
        }
        let p: Payload =
            serde_json::from_str(payload).map_err(|e| MalformedPayload::new(e.to_string()))?;
        if p.actor_id.is_empty() {
            return Err(MalformedPayload::new("empty actorID".into()));
        }
        // The ids the table can hold, as `validate_actor_id` checks them.
        if p.actor_id.len() > MAX_ACTOR_ID_CHARS && p.actor_id.chars().count() > MAX_ACTOR_ID_CHARS
        {
            return Err(MalformedPayload::new(format!(
                "actorID longer than {MAX_ACTOR_ID_CHARS} characters"
            )));
        }
        if p.actor_id.contains('\0') {
            return Err(MalformedPayload::new("actorID contains NUL".into()));
        }
        let sequence = u64::try_from(p.sequence_number).map_err(|_| {
            MalformedPayload::new(format!("negative sequenceNumber {}", p.sequence_number))
        })?;
        let kind = match p.op.as_deref() {
            None | Some("save") | Some("insert") | Some("update") => ChangeKind::Saved,
            Some("delete") => ChangeKind::Deleted,
            Some(other) => return Err(MalformedPayload::new(format!("unknown op {other:?}"))),
        };
        let timestamp = match p.timestamp {
            Some(t) if (0.0..1e12).contains(&t) => {
                SystemTime::UNIX_EPOCH + Duration::from_secs_f64(t)
            }
            Some(t) => return Err(MalformedPayload::new(format!("timestamp {t} out of range"))),
            None => SystemTime::UNIX_EPOCH,
        };
        Ok(Change {
            actor_id: p.actor_id,
            sequence,
            timestamp,
            kind,
            table: p.table,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_ids_are_held_to_the_table_limit() {
        let payload = |id: &str| format!(r#"{{"actorID":"{id}","sequenceNumber":1}}"#);
        assert!(Change::from_payload(&payload(&"é".repeat(255))).is_ok());
        let err = Change::from_payload(&payload(&"é".repeat(256))).unwrap_err();
        assert!(err.to_string().contains("255"), "{err}");
    }

    #[test]
    fn reasons_are_short_whatever_the_payload() {
        let huge = format!(
            r#"{{"actorID":"a","sequenceNumber":"{}"}}"#,
            "9".repeat(7900)
        );
        let err = Change::from_payload(&huge).unwrap_err();
        assert!(err.0.chars().count() <= MAX_REASON_CHARS + 1, "{err}");
        assert!(err.0.ends_with('…'));
        let op = format!(
            r#"{{"actorID":"a","sequenceNumber":1,"op":"{}"}}"#,
            "é".repeat(4000)
        );
        assert!(Change::from_payload(&op).unwrap_err().0.chars().count() <= MAX_REASON_CHARS + 1);
    }

    #[test]
    fn parses_the_seed_payload() {
        let c = Change::from_payload(
            r#"{"actorID" : "room-1", "sequenceNumber" : 3, "timestamp" : 1764000000.5}"#,
        )
        .unwrap();
        assert_eq!(c.actor_id, "room-1");
        assert_eq!(c.sequence, 3);
        assert_eq!(c.kind, ChangeKind::Saved);
        assert_eq!(
            c.timestamp,
            SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1764000000.5)
        );
    }

    #[test]
    fn parses_deletes_and_ignores_unknown_keys() {
        let c = Change::from_payload(
            r#"{"actorID":"a","sequenceNumber":4,"timestamp":1,"op":"delete","extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(c.kind, ChangeKind::Deleted);
    }

    #[test]
    fn probes_are_recognised() {
        assert!(is_probe(r#"{"trebuchetProbe":"00ff"}"#));
        assert!(!is_probe(r#"{"trebuchetProbeX":"00ff"}"#));
        assert!(!is_probe(
            r#"{"actorID":"trebuchetProbe","sequenceNumber":1}"#
        ));
        assert!(Change::from_payload(r#"{"trebuchetProbe":"00ff"}"#).is_err());
    }

    #[test]
    fn rejects_malformed_payloads() {
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"actorID":"a"}"#,
            r#"{"actorID":1,"sequenceNumber":1}"#,
            r#"{"actorID":"a","sequenceNumber":"1"}"#,
            r#"{"actorID":"a","sequenceNumber":-1}"#,
            r#"{"actorID":"","sequenceNumber":1}"#,
            r#"{"actorID":"a","sequenceNumber":1,"op":"explode"}"#,
            r#"{"actorID":"a","sequenceNumber":1,"timestamp":-5}"#,
            "[1,2,3]",
            r#"["a",1]"#,
            r#"{"actorID":"a\u0000b","sequenceNumber":1}"#,
            r#"{"actorID":"a","actorID":"b","sequenceNumber":1}"#,
        ] {
            assert!(Change::from_payload(bad).is_err(), "{bad:?}");
        }
    }
}
