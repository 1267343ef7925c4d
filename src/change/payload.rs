//! Parsing of the trigger's JSON payload into a [`Change`]: a small reader
//! of the plain form triggers write, and `serde_json` for anything else.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::{check_actor_id, Change, ChangeKind, ANNOUNCE_OP, MAX_ACTOR_ID_CHARS};
use crate::error::InvalidActorId;

/// The trigger's JSON: the seed's keys plus the optional `op` and `table`.
/// Strings are borrowed from the payload when they hold no escapes, so that
/// parsing allocates only what the [`Change`] keeps.
#[derive(Debug, PartialEq, Deserialize)]
struct Payload<'a> {
    #[serde(rename = "actorID", borrow)]
    actor_id: Cow<'a, str>,
    #[serde(rename = "sequenceNumber")]
    sequence_number: i64,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default, borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    table: Option<Cow<'a, str>>,
}

impl<'a> Payload<'a> {
    /// Reads the payloads that triggers write (the library's and the
    /// seed's), without serde's general machinery, which costs several times
    /// as much per change: one JSON object of the known keys, each at most
    /// once, strings without escapes, plain numbers. `None` for anything
    /// else, which `serde_json` then reads or rejects: it stays the
    /// reference, and this never accepts what it would reject.
    fn plain(payload: &'a str) -> Option<Payload<'a>> {
        let mut json = Scanner {
            text: payload,
            at: 0,
        };
        let (mut actor_id, mut sequence_number, mut timestamp, mut op, mut table) =
            (None, None, None, None, None);
        json.skip_space();
        json.expect(b'{')?;
        loop {
            json.skip_space();
            let key = json.string()?;
            json.skip_space();
            json.expect(b':')?;
            json.skip_space();
            match key {
                "actorID" if actor_id.is_none() => actor_id = Some(json.string()?),
                "sequenceNumber" if sequence_number.is_none() => {
                    sequence_number = Some(json.integer()?)
                }
                "timestamp" if timestamp.is_none() => timestamp = Some(json.number()?),
                "op" if op.is_none() => op = Some(json.string()?),
                "table" if table.is_none() => table = Some(json.string()?),
                _ => return None,
            }
            json.skip_space();
            match json.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
        json.skip_space();
        if json.at != payload.len() {
            return None;
        }
        Some(Payload {
            actor_id: Cow::Borrowed(actor_id?),
            sequence_number: sequence_number?,
            timestamp,
            op: op.map(Cow::Borrowed),
            table: table.map(Cow::Borrowed),
        })
    }
}

/// A cursor over JSON text for [`Payload::plain`]: each method returns
/// `None` where the text is not of the plain form it reads.
struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let len = self.text.as_bytes()[start..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        self.at = start + len;
        self.expect(b'"')?;
        Some(&self.text[start..start + len])
    }

    /// The bytes of a number: `-`, digits, `.`, `e`, `+`.
    fn number_text(&mut self) -> &'a str {
        let start = self.at;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.at += 1;
        }
        &self.text[start..self.at]
    }

    /// A JSON integer that fits an `i64`.
    fn integer(&mut self) -> Option<i64> {
        let text = self.number_text();
        let digits = text.strip_prefix('-').unwrap_or(text);
        let plain = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        if plain {
            text.parse().ok()
        } else {
            None
        }
    }

    /// A JSON number (`-`, an integer part without leading zeros, then an
    /// optional fraction and exponent).
    fn number(&mut self) -> Option<f64> {
        let text = self.number_text();
        let rest = text.strip_prefix('-').unwrap_or(text);
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, mut rest) = rest.split_at(int_len);
        if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
            return None;
        }
        if let Some(fraction) = rest.strip_prefix('.') {
            let len = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if len == 0 {
                return None;
            }
            rest = &fraction[len..];
        }
        if let Some(exponent) = rest.strip_prefix(['e', 'E']) {
            let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if exponent.is_empty() || !exponent.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            rest = "";
        }
        if !rest.is_empty() {
            return None;
        }
        let value: f64 = text.parse().ok()?;
        value.is_finite().then_some(value)
    }
}

/// Why a payload was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedPayload(pub(crate) String);

/// The most characters of a payload's fault kept in [`MalformedPayload`]:
/// a hostile payload of 8,000 bytes must not become a log line as long.
const MAX_REASON_CHARS: usize = 160;

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
    /// `op` (`"save"`, `"delete"`, or `"announce"` from
    /// [`ChangeListener::announce`](crate::ChangeListener::announce)) and
    /// `table`. Payloads written by the seed's own trigger (no `op`) are
    /// saves.
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
        let p = match Payload::plain(payload) {
            Some(p) => p,
            None => {
                serde_json::from_str(payload).map_err(|e| MalformedPayload::new(e.to_string()))?
            }
        };
        // The ids the table can hold, as `validate_actor_id` checks them.
        match check_actor_id(&p.actor_id) {
            Ok(()) => {}
            Err(InvalidActorId::Empty) => {
                return Err(MalformedPayload::new("empty actorID".into()))
            }
            Err(InvalidActorId::ContainsNul) => {
                return Err(MalformedPayload::new("actorID contains NUL".into()))
            }
            Err(_) => {
                return Err(MalformedPayload::new(format!(
                    "actorID longer than {MAX_ACTOR_ID_CHARS} characters"
                )))
            }
        }
        let sequence = u64::try_from(p.sequence_number).map_err(|_| {
            MalformedPayload::new(format!("negative sequenceNumber {}", p.sequence_number))
        })?;
        let kind = match p.op.as_deref() {
            None | Some("save") | Some("insert") | Some("update") => ChangeKind::Saved,
            Some("delete") => ChangeKind::Deleted,
            Some(ANNOUNCE_OP) => ChangeKind::Announced,
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
            actor_id: p.actor_id.into_owned(),
            sequence,
            timestamp,
            kind,
            table: p.table.map(Cow::into_owned),
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
    fn parses_announces() {
        let c = Change::from_payload(
            r#"{"actorID":"a","sequenceNumber":0,"timestamp":1,"op":"announce"}"#,
        )
        .unwrap();
        assert_eq!((c.kind, c.sequence), (ChangeKind::Announced, 0));
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
    fn escaped_strings_are_unescaped() {
        let c = Change::from_payload(
            r#"{"actorID":"r\u00e9\"1","sequenceNumber":2,"table":"g.\u0072ooms","op":"sav\u0065"}"#,
        )
        .unwrap();
        assert_eq!(c.actor_id, "ré\"1");
        assert_eq!(c.table.as_deref(), Some("g.rooms"));
        assert_eq!(c.kind, ChangeKind::Saved);
    }

    /// Whatever the plain reader reads, serde reads the same way. (Its
    /// timestamp may be a unit in the last place closer: serde_json's
    /// default float parsing does not always round correctly; std's does.)
    #[track_caller]
    fn same_as_serde(payload: &str) {
        if let Some(mut plain) = Payload::plain(payload) {
            let reference: Result<Payload<'_>, _> = serde_json::from_str(payload);
            match reference {
                Ok(reference) => {
                    if let (Some(ours), Some(theirs)) = (plain.timestamp, reference.timestamp) {
                        let ulp = theirs.abs() * f64::EPSILON;
                        assert!(
                            (ours - theirs).abs() <= ulp,
                            "{payload:?}: {ours} vs {theirs}"
                        );
                        plain.timestamp = reference.timestamp;
                    }
                    assert_eq!(plain, reference, "{payload:?}");
                }
                Err(e) => panic!("plain read {payload:?} as {plain:?}, serde rejects it: {e}"),
            }
        }
    }

    #[test]
    fn the_plain_reader_reads_trigger_payloads() {
        for payload in [
            r#"{"actorID" : "room-1", "sequenceNumber" : 3, "timestamp" : 1764000000.5}"#,
            r#"{"actorID":"a","sequenceNumber":4,"timestamp":1,"op":"delete","table":"public.t"}"#,
            r#" { "table":"s.t","op":"save","timestamp":1.5e9,"sequenceNumber":0,"actorID":"é" } "#,
        ] {
            assert!(Payload::plain(payload).is_some(), "{payload:?}");
            same_as_serde(payload);
        }
    }

    #[test]
    fn the_plain_reader_leaves_the_rest_to_serde() {
        for payload in [
            r#"{"actorID":"a\"b","sequenceNumber":1}"#,
            r#"{"actorID":"a","sequenceNumber":1,"extra":[1]}"#,
            r#"{"actorID":"a","actorID":"b","sequenceNumber":1}"#,
            r#"{"actorID":"a","sequenceNumber":1.0}"#,
            r#"{"actorID":"a","sequenceNumber":01}"#,
            r#"{"actorID":"a","sequenceNumber":1e2}"#,
            r#"{"actorID":"a","sequenceNumber":99999999999999999999}"#,
            r#"{"actorID":"a","sequenceNumber":1,"timestamp":null}"#,
            r#"{"actorID":"a","sequenceNumber":1,"timestamp":.5}"#,
            r#"{"actorID":"a","sequenceNumber":1,"timestamp":1.}"#,
            r#"{"actorID":"a","sequenceNumber":1,"timestamp":1e}"#,
            r#"{"actorID":"a","sequenceNumber":1,"timestamp":+1}"#,
            r#"{"actorID":"a","sequenceNumber":1,"timestamp":1e999}"#,
            r#"{"actorID":"a","sequenceNumber":1,}"#,
            r#"{"actorID":"a","sequenceNumber":1} x"#,
            "{\"actorID\":\"a\tb\",\"sequenceNumber\":1}",
            r#"{"sequenceNumber":1}"#,
            "{}",
        ] {
            assert!(Payload::plain(payload).is_none(), "{payload:?}");
        }
    }

    /// Random edits of trigger payloads: the plain reader never reads one
    /// differently from serde, nor accepts one that serde rejects.
    #[test]
    fn the_plain_reader_agrees_with_serde_on_edited_payloads() {
        let seeds = [
            r#"{"actorID":"room-1","sequenceNumber":12,"timestamp":1764000000.25,"op":"save","table":"public.actor_states"}"#,
            r#"{"actorID" : "x", "sequenceNumber" : 7, "timestamp" : 1764000000}"#,
        ];
        let alphabet = b"{}[]\":,. -+eE0123456789aA\\\tn";
        let mut rng = fastrand::Rng::with_seed(0x7eb0_c4e7);
        let mut plain = 0;
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].as_bytes().to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..bytes.len());
                match rng.u8(..3) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, alphabet[rng.usize(..alphabet.len())]),
                    _ => bytes[at] = alphabet[rng.usize(..alphabet.len())],
                }
            }
            let Ok(payload) = String::from_utf8(bytes) else {
                continue;
            };
            plain += usize::from(Payload::plain(&payload).is_some());
            same_as_serde(&payload);
        }
        assert!(plain > 1_000, "only {plain} edited payloads were plain");
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
