//! Listing by prefix: the index range of a prefix, and page tokens.

use crate::error::{Error, Result};
use crate::pool::Connection;
use crate::store::{check_actor_id, Failure, Inner};

/// Where the ids that start with `prefix` end, for statements that read
/// them as one index range (`prefix` up to this bound): `None` for the empty
/// prefix, for a table whose key order is not code point order (see
/// `KEY_ORDER` in the schema), and for the rare prefix without a successor.
/// The key order is read from the catalog once per store.
pub(super) fn prefix_end(
    inner: &Inner,
    c: &mut Connection,
    prefix: &str,
) -> Result<Option<String>, Failure> {
    if prefix.is_empty() {
        return Ok(None);
    }
    let ordered = match inner.key_order.get() {
        Some(&ordered) => ordered,
        None => {
            let row = c
                .prepare(&inner.sql.key_order)?
                .query_one(&mut c.client, &[&inner.names.table_sql()])?;
            *inner.key_order.get_or_init(|| row.get(0))
        }
    };
    Ok(if ordered { successor(prefix) } else { None })
}

/// The least string, in code point order, above every string that starts
/// with `prefix`: its last character that has a next one, moved on by one
/// and with what follows it dropped. `None` when every character is
/// U+10FFFF.
fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match u32::from(last) + 1 {
            // The surrogates are not characters.
            0xD800 => Some('\u{E000}'),
            n => char::from_u32(n),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Page tokens: a version byte, the prefix (length and bytes), the last id
/// of the page, and a checksum, as lower-case hex.
const TOKEN_VERSION: u8 = 1;

fn fnv32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

pub(super) fn encode_token(prefix: &str, last: &str) -> String {
    let mut bytes = vec![TOKEN_VERSION];
    bytes.extend_from_slice(
        &u32::try_from(prefix.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    bytes.extend_from_slice(prefix.as_bytes());
    bytes.extend_from_slice(last.as_bytes());
    let sum = fnv32(&bytes);
    bytes.extend_from_slice(&sum.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last id of the page before, from a token made for `prefix`.
pub(super) fn decode_token(token: &str, prefix: &str) -> Result<String> {
    let bad = |reason: &str| Error::invalid_argument("page token", reason.to_owned());
    let damaged = "it is damaged or was not made by list_ids: pass next_page as it was given";
    if token.len() % 2 != 0 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(damaged));
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).unwrap_or(0))
        .collect();
    if bytes.len() < 1 + 4 + 4 || bytes[0] != TOKEN_VERSION {
        return Err(bad(damaged));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 4);
    if fnv32(body).to_be_bytes() != sum {
        return Err(bad(damaged));
    }
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let rest = &body[5..];
    if length > rest.len() {
        return Err(bad(damaged));
    }
    let (given_prefix, last) = rest.split_at(length);
    if given_prefix != prefix.as_bytes() {
        return Err(bad(
            "it continues a listing with another prefix: pass the prefix it was made for",
        ));
    }
    let last = String::from_utf8(last.to_vec()).map_err(|_| bad(damaged))?;
    if check_actor_id(&last).is_err() || !last.starts_with(prefix) {
        return Err(bad(damaged));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_successor_is_the_least_string_above_its_ids() {
        assert_eq!(successor("room-").as_deref(), Some("room."));
        assert_eq!(successor("user-z").as_deref(), Some("user-{"));
        assert_eq!(successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(
            successor("a\u{10FFFF}\u{10FFFF}").as_deref(),
            Some("b"),
            "every trailing last character is dropped"
        );
        assert_eq!(successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(successor("é").as_deref(), Some("ê"));
        assert_eq!(successor("\u{10FFFF}"), None);
        for prefix in ["room-", "a\u{10FFFF}", "\u{D7FF}", "é"] {
            let end = successor(prefix).unwrap();
            for id in [
                prefix.to_owned(),
                format!("{prefix}\u{10FFFF}"),
                format!("{prefix}~"),
            ] {
                assert!(
                    prefix <= id.as_str() && id < end,
                    "{id:?} in {prefix:?}..{end:?}"
                );
            }
        }
    }

    #[test]
    fn page_tokens_round_trip_and_reject_damage() {
        let token = encode_token("room-", "room-17");
        assert_eq!(decode_token(&token, "room-").unwrap(), "room-17");
        assert_eq!(decode_token(&encode_token("", "é-1"), "").unwrap(), "é-1");
        let wrong_prefix = decode_token(&token, "player-").unwrap_err();
        assert!(
            wrong_prefix.to_string().contains("another prefix"),
            "{wrong_prefix}"
        );
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 10;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            "",
            "zz",
            "0",
            &token[..token.len() - 2],
            &flipped,
            "01000000",
        ] {
            let err = decode_token(bad, "room-").unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        what: "page token",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }
}
