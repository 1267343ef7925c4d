//! What a conditional write expects to find.

use std::fmt;

/// What a conditional write expected to find.
///
/// Used by [`StateStore::save_if`](crate::StateStore::save_if) and carried by
/// [`Error::Conflict`](crate::Error::Conflict).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expected {
    /// The actor must not exist yet.
    Absent,
    /// The actor's stored sequence number must equal this one.
    Sequence(u64),
}

impl From<u64> for Expected {
    fn from(sequence: u64) -> Self {
        Expected::Sequence(sequence)
    }
}

impl From<Option<u64>> for Expected {
    /// `None` means [`Expected::Absent`].
    fn from(sequence: Option<u64>) -> Self {
        sequence.map_or(Expected::Absent, Expected::Sequence)
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Absent => f.write_str("absent"),
            Expected::Sequence(n) => write!(f, "sequence {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_from_option() {
        assert_eq!(Expected::from(None), Expected::Absent);
        assert_eq!(Expected::from(Some(3)), Expected::Sequence(3));
    }
}
