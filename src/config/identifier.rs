//! Table and channel names: the seed's defaults, and the check every name
//! passes before it is used.

use crate::error::{Error, Result};

/// The seed's table name.
pub const DEFAULT_TABLE: &str = "actor_states";
/// The seed's notification channel.
pub const DEFAULT_CHANNEL: &str = "actor_state_changes";

/// PostgreSQL's identifier limit (`NAMEDATALEN - 1`).
pub(crate) const MAX_IDENTIFIER_BYTES: usize = 63;

/// Checks that `name` is a plain identifier: an ASCII letter or underscore,
/// then letters, digits or underscores, at most 63 bytes.
pub(crate) fn validate_identifier(what: &'static str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(Error::invalid_identifier(what, "it is empty"));
    };
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Err(Error::invalid_identifier(
            what,
            format!(
                "it is {} bytes long; PostgreSQL allows at most {MAX_IDENTIFIER_BYTES}",
                name.len()
            ),
        ));
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(Error::invalid_identifier(
            what,
            format!("{name:?} must start with a letter or underscore"),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(Error::invalid_identifier(
            what,
            format!("{name:?} contains {bad:?}; use letters, digits and underscores"),
        ));
    }
    Ok(())
}
