//! Typed states are opaque to this program: it decodes them with the
//! store's codec into generic JSON, and encodes JSON the same way.

use base64::Engine as _;
use serde_json::{Map, Number, Value};
use trebuchet_postgres::Codec;

/// The stored bytes as JSON. CBOR maps whose keys are not text get the
/// keys' JSON text as keys, byte strings become base64 text, tags are
/// dropped, and non-finite floats become `null`.
pub fn decode(codec: Codec, bytes: &[u8]) -> Result<Value, String> {
    match codec {
        Codec::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        _ => {
            let mut rest = bytes;
            let value = ciborium::from_reader::<ciborium::Value, _>(&mut rest)
                .map_err(|e| e.to_string())?;
            if !rest.is_empty() {
                return Err(format!("{} bytes follow the CBOR value", rest.len()));
            }
            Ok(cbor_to_json(value))
        }
    }
}

/// JSON as the codec stores it.
pub fn encode(codec: Codec, value: &Value) -> Result<Vec<u8>, String> {
    codec.encode(value).map_err(|e| e.to_string())
}

fn cbor_to_json(value: ciborium::Value) -> Value {
    match value {
        ciborium::Value::Integer(n) => {
            let n = i128::from(n);
            if let Ok(n) = i64::try_from(n) {
                Value::from(n)
            } else if let Ok(n) = u64::try_from(n) {
                Value::from(n)
            } else {
                Value::String(n.to_string())
            }
        }
        ciborium::Value::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        ciborium::Value::Bytes(b) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        ciborium::Value::Text(s) => Value::String(s),
        ciborium::Value::Bool(b) => Value::Bool(b),
        ciborium::Value::Null => Value::Null,
        ciborium::Value::Tag(_, inner) => cbor_to_json(*inner),
        ciborium::Value::Array(items) => {
            Value::Array(items.into_iter().map(cbor_to_json).collect())
        }
        ciborium::Value::Map(entries) => {
            let mut map = Map::new();
            for (key, value) in entries {
                let key = match cbor_to_json(key) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                map.insert(key, cbor_to_json(value));
            }
            Value::Object(map)
        }
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    struct Room {
        name: String,
        scores: BTreeMap<String, i64>,
        round: u32,
        ratio: f64,
        tags: Vec<String>,
        owner: Option<String>,
    }

    #[test]
    fn cbor_structs_decode_to_the_json_serde_would_write() {
        let room = Room {
            name: "lobby".into(),
            scores: [("alice".to_owned(), 10), ("bob".to_owned(), -3)].into(),
            round: 7,
            ratio: 0.5,
            tags: vec!["a".into()],
            owner: None,
        };
        let bytes = Codec::Cbor.encode(&room).unwrap();
        assert_eq!(
            decode(Codec::Cbor, &bytes).unwrap(),
            serde_json::to_value(&room).unwrap()
        );
        let json = Codec::Json.encode(&room).unwrap();
        assert_eq!(
            decode(Codec::Json, &json).unwrap(),
            serde_json::to_value(&room).unwrap()
        );
    }

    #[test]
    fn json_round_trips_through_either_codec() {
        let value = serde_json::json!({"a": [1, -2, 3.5, true, null, "x"], "b": {"c": u64::MAX}});
        for codec in [Codec::Cbor, Codec::Json] {
            let bytes = encode(codec, &value).unwrap();
            assert_eq!(decode(codec, &bytes).unwrap(), value, "{codec:?}");
        }
    }

    #[test]
    fn cbor_beyond_json_is_mapped() {
        let value = ciborium::Value::Map(vec![
            (
                ciborium::Value::Integer(1.into()),
                ciborium::Value::Bytes(vec![0, 255]),
            ),
            (
                ciborium::Value::Text("t".into()),
                ciborium::Value::Tag(1, Box::new(ciborium::Value::Float(f64::NAN))),
            ),
        ]);
        let mut bytes = Vec::new();
        ciborium::into_writer(&value, &mut bytes).unwrap();
        assert_eq!(
            decode(Codec::Cbor, &bytes).unwrap(),
            serde_json::json!({"1": "AP8=", "t": null})
        );
        assert!(decode(Codec::Cbor, b"\xff\x00").is_err());
        assert!(decode(Codec::Cbor, b"\x00\x01binary")
            .unwrap_err()
            .contains("7 bytes follow"));
        assert!(decode(Codec::Json, b"{").is_err());
    }
}
