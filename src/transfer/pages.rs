//! Listing by prefix: the index range of a prefix.

use crate::error::Result;
use crate::pool::Connection;
use crate::store::{Core, Failure};

/// Where the ids that start with `prefix` end, for statements that read
/// them as one index range (`prefix` up to this bound): `None` for the empty
/// prefix, for a table whose key order is not code point order (see
/// `KEY_ORDER` in the schema), and for the rare prefix without a successor.
/// The key order is read from the catalog once per store.
pub(super) fn prefix_end(
    core: &Core,
    c: &mut Connection,
    prefix: &str,
) -> Result<Option<String>, Failure> {
    if prefix.is_empty() {
        return Ok(None);
    }
    let ordered = match core.key_order().get() {
        Some(&ordered) => ordered,
        None => {
            let row = c
                .prepare(&core.sql().key_order)?
                .query_one(&mut c.client, &[&core.names().table_sql()])?;
            *core.key_order().get_or_init(|| row.get(0))
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
}
