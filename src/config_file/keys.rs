//! The keys of the `state:` section, and a suggestion for a key that is
//! not one of them.

/// The keys of the `state:` section, in the order the docs list them.
pub(super) const KEYS: [&str; 13] = [
    "type",
    "host",
    "port",
    "database",
    "username",
    "password",
    "connectionString",
    "sslmode",
    "sslrootcert",
    "table",
    "channel",
    "poolSize",
    "codec",
];

/// The keys that say where to connect piece by piece, which
/// `connectionString` says at once.
pub(super) const PARTS: [&str; 5] = ["host", "port", "database", "username", "password"];

/// Keys whose values are never repeated in a message.
pub(super) const SECRET: [&str; 2] = ["password", "connectionString"];

/// Why `key` is not a key of `state:`, with the nearest known key.
pub(super) fn unknown_key_reason(key: &str) -> String {
    let nearest = KEYS
        .iter()
        .map(|known| {
            (
                edit_distance(&key.to_lowercase(), &known.to_lowercase()),
                known,
            )
        })
        .min();
    let known = KEYS.join(", ");
    match nearest {
        Some((distance, known_key)) if distance <= 2 || key.eq_ignore_ascii_case(known_key) => {
            format!("unknown key; did you mean `{known_key}`? The keys are {known}")
        }
        _ => format!("unknown key; the keys are {known}"),
    }
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}
