//! How typed states become bytes: CBOR by default, JSON to share a table
//! with Swift instances.

use std::error::Error as StdError;
use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The encoding of typed states. [`StateStore::raw`](crate::StateStore::raw)
/// bypasses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// CBOR through `ciborium`: compact, self-describing, the default.
    #[default]
    Cbor,
    /// JSON written as Swift's `JSONEncoder` writes it with default settings
    /// (compact, `/` escaped as `\/`, whole floating-point numbers without a
    /// fraction, fields in declaration order), so that a Rust struct and the
    /// same Swift `Codable` struct read each other's rows. Swift encodes
    /// `Date` as seconds since 2001-01-01 and `Data` as base64 by default:
    /// model such fields as `f64` and `String`. Swift leaves out a `nil`
    /// optional; mark `Option` fields
    /// `#[serde(skip_serializing_if = "Option::is_none", default)]` to do the same.
    Json,
}

impl Codec {
    /// Encodes `value`.
    ///
    /// # Errors
    ///
    /// The codec's error, for example a map with non-string keys in JSON.
    pub fn encode<T: Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<Vec<u8>, Box<dyn StdError + Send + Sync>> {
        let mut out = Vec::new();
        match self {
            Codec::Cbor => ciborium::into_writer(value, &mut out)?,
            Codec::Json => {
                let mut ser = serde_json::Serializer::with_formatter(&mut out, SwiftFormatter);
                value.serialize(&mut ser)?;
            }
        }
        Ok(out)
    }

    /// Decodes `bytes` into a `T`.
    ///
    /// Safe on untrusted bytes: truncated input, nesting deeper than
    /// [`CBOR_NESTING_LIMIT`](Self::CBOR_NESTING_LIMIT) (CBOR) or 128 (JSON)
    /// levels, and lengths that the input claims but does not hold give an
    /// error. A decode never allocates what a length claims (serde caps a
    /// collection's pre-allocation at 1 MiB), so its memory stays within a
    /// multiple of the input's size; at the nesting limit it needs about
    /// 200 KiB of stack in a release build (1 MiB unoptimised), well inside
    /// the 2 MiB of a spawned thread.
    /// `tests/bad_input_gets_a_clear_error/decode_fuzz.rs` checks this.
    ///
    /// # Errors
    ///
    /// The codec's error when the bytes are not valid for the codec or do not
    /// match `T`.
    pub fn decode<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
    ) -> Result<T, Box<dyn StdError + Send + Sync>> {
        match self {
            Codec::Cbor => Ok(ciborium::de::from_reader_with_recursion_limit(
                bytes,
                Self::CBOR_NESTING_LIMIT,
            )?),
            Codec::Json => Ok(serde_json::from_slice(bytes)?),
        }
    }

    /// How deeply nested (arrays, maps, tags, enums) a CBOR state may be for
    /// [`decode`](Self::decode): 256, ciborium's default, fixed here so that
    /// the stack a decode of untrusted bytes needs cannot change with a
    /// dependency. A state nested deeper encodes but does not decode.
    ///
    /// cbindgen:ignore
    pub const CBOR_NESTING_LIMIT: usize = 256;
}

/// serde_json's compact output, adjusted to Foundation's `JSONEncoder`.
struct SwiftFormatter;

impl serde_json::ser::Formatter for SwiftFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut parts = fragment.split('/');
        if let Some(first) = parts.next() {
            writer.write_all(first.as_bytes())?;
        }
        for part in parts {
            writer.write_all(b"\\/")?;
            writer.write_all(part.as_bytes())?;
        }
        Ok(())
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        // 2^53: every whole number below it is exact and printed without ".0".
        if value.fract() == 0.0 && value.abs() < 9_007_199_254_740_992.0 {
            write!(writer, "{}", value as i64)
        } else {
            serde_json::ser::CompactFormatter.write_f64(writer, value)
        }
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        if value.fract() == 0.0 && value.abs() < 16_777_216.0 {
            write!(writer, "{}", value as i64)
        } else {
            serde_json::ser::CompactFormatter.write_f32(writer, value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct GameState {
        name: String,
        round: u32,
        ratio: f64,
        whole: f64,
        scores: BTreeMap<String, i64>,
        url: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        winner: Option<String>,
    }

    fn sample() -> GameState {
        GameState {
            name: "Room \"A\"".into(),
            round: 3,
            ratio: 0.5,
            whole: 2.0,
            scores: [("alice".to_string(), 10)].into_iter().collect(),
            url: "https://example.com/a".into(),
            winner: None,
        }
    }

    #[test]
    fn json_matches_swift_json_encoder() {
        // What `JSONEncoder().encode(state)` gives for the same Swift struct.
        let bytes = Codec::Json.encode(&sample()).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"name":"Room \"A\"","round":3,"ratio":0.5,"whole":2,"scores":{"alice":10},"url":"https:\/\/example.com\/a"}"#
        );
    }

    #[test]
    fn both_codecs_round_trip() {
        for codec in [Codec::Cbor, Codec::Json] {
            let bytes = codec.encode(&sample()).unwrap();
            let back: GameState = codec.decode(&bytes).unwrap();
            assert_eq!(back, sample());
        }
    }

    #[test]
    fn decoding_the_wrong_type_is_an_error() {
        for codec in [Codec::Cbor, Codec::Json] {
            let bytes = codec.encode(&"just a string").unwrap();
            assert!(codec.decode::<GameState>(&bytes).is_err());
            assert!(codec.decode::<GameState>(b"\xff\x00garbage").is_err());
        }
    }
}
