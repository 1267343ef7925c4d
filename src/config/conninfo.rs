//! Connection strings, read as libpq reads them: `key=value` text and
//! `postgresql://` URLs, split into the text the driver parses and the keys
//! this crate handles itself.
//!
//! A connection string may hold a password, and a malformed one may hold it
//! anywhere (a space in an unquoted password starts a new "key"), so no
//! error here repeats any of the text: errors name a key from the list of
//! known keys, or a byte position.

use std::error::Error as StdError;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// Keys the driver parses.
const DRIVER_KEYS: [&str; 17] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "options",
    "application_name",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// Keys this crate handles itself: the driver does not accept all of
/// libpq's values for them.
const OUR_KEYS: [&str; 2] = ["sslmode", "sslrootcert"];

/// The two URL prefixes libpq accepts (case-sensitive, as in libpq).
const URL_PREFIXES: [&str; 2] = ["postgresql://", "postgres://"];

/// A connection string split into what the driver parses and what this
/// crate handles.
pub(super) struct Split {
    /// What the driver read: every setting but [`OUR_KEYS`].
    pub(super) config: postgres::Config,
    /// `sslmode` and `sslrootcert`, in order, with the byte position of each
    /// value.
    pub(super) ours: Vec<(&'static str, String, usize)>,
    /// Whether a `keepalives*` key was given.
    pub(super) keepalives: bool,
}

fn refused(reason: impl Into<String>) -> Error {
    Error::invalid_connection_string(reason)
}

/// The known key equal to `key`, as a static name that errors may show.
fn known(key: &str) -> Option<&'static str> {
    DRIVER_KEYS
        .iter()
        .chain(OUR_KEYS.iter())
        .copied()
        .find(|k| *k == key)
}

fn unknown_option(at: usize) -> Error {
    let mut names: Vec<&str> = DRIVER_KEYS.iter().chain(OUR_KEYS.iter()).copied().collect();
    names.sort_unstable();
    refused(format!(
        "unknown option at byte {at}; the options are {}",
        names.join(", ")
    ))
}

/// libpq's white space (C `isspace` in the C locale).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Splits `s`, a URL or key=value text. Byte positions in errors count from
/// the start of `s`.
pub(super) fn split(s: &str) -> Result<Split> {
    let lead = s.len() - s.trim_start().len();
    let text = s.trim();
    if text.is_empty() {
        return Err(refused(
            "it is empty; expected postgresql://user:password@host:port/database \
             or key=value pairs such as `host=localhost dbname=app`",
        ));
    }
    if let Some(prefix) = URL_PREFIXES.iter().find(|p| text.starts_with(**p)) {
        return split_url(text, prefix.len(), lead);
    }
    if has_url_scheme(text) {
        return Err(refused(
            "unsupported scheme: start the URL with postgresql:// or postgres://",
        ));
    }
    if text.contains('=') {
        return split_key_values(s);
    }
    Err(refused(
        "it is neither a URL starting with postgresql:// or postgres:// \
         nor key=value pairs such as `host=localhost dbname=app`",
    ))
}

/// Whether `text` starts with an RFC 3986 scheme and `://`: a letter, then
/// letters, digits, `+`, `-` or `.`. Key=value text never does, since its
/// first key is followed by `=`.
fn has_url_scheme(text: &str) -> bool {
    let Some(end) = text.find("://") else {
        return false;
    };
    let scheme = &text.as_bytes()[..end];
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// One `key=value` of libpq's key=value syntax.
struct Pair<'a> {
    key: &'a str,
    key_at: usize,
    value: String,
    value_at: usize,
}

/// Reads libpq key=value text: keys end at `=` or white space, values are
/// either `'quoted'` or run to the next white space, and a backslash takes
/// the next character literally in both.
fn key_values(s: &str) -> Result<Vec<Pair<'_>>> {
    let b = s.as_bytes();
    let skip_space = |mut i: usize| {
        while i < b.len() && is_space(b[i]) {
            i += 1;
        }
        i
    };
    let mut pairs = Vec::new();
    let mut i = skip_space(0);
    while i < b.len() {
        let key_at = i;
        while i < b.len() && b[i] != b'=' && !is_space(b[i]) {
            i += 1;
        }
        let key = &s[key_at..i];
        i = skip_space(i);
        if b.get(i) != Some(&b'=') {
            return Err(refused(format!(
                "expected `=` after the key at byte {key_at}"
            )));
        }
        if key.is_empty() {
            return Err(refused(format!("a key is missing before `=` at byte {i}")));
        }
        i = skip_space(i + 1);
        let value_at = i;
        // Only ASCII bytes (quotes, backslashes) are left out, so the bytes
        // kept are UTF-8 as `s` is.
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i) {
                    None => {
                        let of = known(key).map_or(String::new(), |k| format!(" of `{k}`"));
                        return Err(refused(format!(
                            "unterminated quoted value{of} at byte {value_at}: end it with `'` \
                             (write a `'` inside it as \\')"
                        )));
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        if let Some(&next) = b.get(i + 1) {
                            value.push(next);
                        }
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(&c) = b.get(i) {
                if is_space(c) {
                    break;
                }
                if c == b'\\' {
                    if let Some(&next) = b.get(i + 1) {
                        value.push(next);
                    }
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
        }
        pairs.push(Pair {
            key,
            key_at,
            value: String::from_utf8_lossy(&value).into_owned(),
            value_at,
        });
        i = skip_space(i.min(b.len()));
    }
    Ok(pairs)
}

/// `value` quoted for the driver's key=value parser.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn split_key_values(s: &str) -> Result<Split> {
    let mut driver = String::new();
    let mut ours = Vec::new();
    let mut keepalives = false;
    let mut for_driver = Vec::new();
    for pair in key_values(s)? {
        let Some(key) = known(pair.key) else {
            return Err(unknown_option(pair.key_at));
        };
        keepalives |= key.starts_with("keepalives");
        if OUR_KEYS.contains(&key) {
            ours.push((key, pair.value, pair.value_at));
        } else {
            driver.push_str(key);
            driver.push('=');
            driver.push_str(&quoted(&pair.value));
            driver.push(' ');
            for_driver.push((key, pair.value_at, pair.value));
        }
    }
    let config = driver.parse::<postgres::Config>().map_err(|e| {
        // The driver refuses only values of known keys: find which one.
        for_driver
            .iter()
            .find(|(key, _, value)| {
                format!("{key}={}", quoted(value))
                    .parse::<postgres::Config>()
                    .is_err()
            })
            .map_or_else(
                || driver_refusal(&e),
                |(key, at, _)| refused(format!("invalid value of `{key}` at byte {at}")),
            )
    })?;
    Ok(Split {
        config,
        ours,
        keepalives,
    })
}

/// Why the driver refused text this module prepared, naming only a known key.
fn driver_refusal(e: &postgres::Error) -> Error {
    let Some(cause) = e.source() else {
        return refused("the driver could not read it");
    };
    if cause.is::<std::str::Utf8Error>() {
        return refused("a percent-encoded part does not decode to UTF-8");
    }
    let text = cause.to_string();
    match DRIVER_KEYS
        .iter()
        .find(|key| text == format!("invalid value for option `{key}`"))
    {
        Some(key) => refused(format!("invalid value of `{key}`")),
        None => refused("the driver could not read it"),
    }
}

/// Checks that every `%` of `part` (at byte `at` of the string) starts a
/// `%XX` escape other than `%00`, as libpq does.
fn check_percent(part: &str, at: usize) -> Result<()> {
    let b = part.as_bytes();
    for (i, _) in part.match_indices('%') {
        let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
        if !(hex(i + 1) && hex(i + 2)) {
            return Err(refused(format!(
                "bad percent-encoding at byte {}: a `%` must start an escape such as %2F; \
                 write a `%` itself as %25",
                at + i
            )));
        }
        if &b[i + 1..i + 3] == b"00" {
            return Err(refused(format!(
                "a percent-encoded NUL byte at byte {} is not allowed: \
                 a connection string cannot hold one",
                at + i
            )));
        }
    }
    Ok(())
}

/// `part` percent-decoded, which must be UTF-8; `what` names it for the error.
fn decoded(part: &str, at: usize, what: &str) -> Result<String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|d| d.into_owned())
        .map_err(|_| {
            refused(format!(
                "{what} at byte {at} does not decode to UTF-8: percent-encode UTF-8 text only"
            ))
        })
}

/// Splits a `postgresql://` URL whose prefix is `prefix` bytes long; `lead`
/// is the white space trimmed before `text`. Mirrors libpq: credentials are
/// what comes before an `@` that comes before the first `/`, and every `%`
/// must start a valid escape.
fn split_url(text: &str, prefix: usize, lead: usize) -> Result<Split> {
    let rest = &text[prefix..];
    let base = lead + prefix;
    check_percent(rest, base)?;
    let creds_end = match rest.find(['@', '/']) {
        Some(i) if rest.as_bytes()[i] == b'@' => Some(i),
        _ => None,
    };
    let host_start = creds_end.map_or(0, |i| i + 1);
    let host_end = rest[host_start..]
        .find(['/', '?'])
        .map_or(rest.len(), |i| host_start + i);
    let host_part = &rest[host_start..host_end];
    if host_part.contains('@') {
        return Err(refused(
            "the user name or password contains an unencoded `@`: percent-encode it as %40",
        ));
    }
    if let Some(end) = creds_end {
        let user = rest[..end].split(':').next().unwrap_or("");
        decoded(user, base, "the user name")?;
    }
    let (path, query) = match rest[host_end..].find('?') {
        Some(i) => (&rest[host_end..host_end + i], Some(host_end + i + 1)),
        None => (&rest[host_end..], None),
    };
    if let Some(dbname) = path.strip_prefix('/') {
        decoded(dbname, base + host_end + 1, "the database name")?;
    }
    let mut ours = Vec::new();
    let mut keepalives = false;
    let mut kept = Vec::new();
    let mut host_param = false;
    if let Some(query_at) = query {
        let mut at = query_at;
        for pair in rest[query_at..].split('&') {
            let pair_at = at;
            at += pair.len() + 1;
            if pair.is_empty() {
                continue;
            }
            let Some((k, v)) = pair.split_once('=') else {
                return Err(refused(format!(
                    "expected `=` in the query parameter at byte {}",
                    base + pair_at
                )));
            };
            let key = decoded(k, base + pair_at, "a key")?;
            let Some(key) = known(&key) else {
                return Err(unknown_option(base + pair_at));
            };
            let value_at = base + pair_at + k.len() + 1;
            keepalives |= key.starts_with("keepalives");
            host_param |= key == "host" || key == "hostaddr";
            if OUR_KEYS.contains(&key) {
                ours.push((key, decoded(v, value_at, "the value")?, value_at));
            } else {
                if key != "host" {
                    decoded(v, value_at, "the value")?;
                }
                kept.push(pair);
            }
        }
    }
    if host_part.is_empty() && !host_param {
        return Err(refused(
            "it names no host: write postgresql://user@host:port/database",
        ));
    }
    // The driver takes the first `@` anywhere for the end of the
    // credentials; hide the others (in the path and the query) from it.
    let mut driver = format!("{}{}", &text[..prefix], &rest[..host_end]);
    driver.push_str(&path.replace('@', "%40"));
    if !kept.is_empty() {
        driver.push('?');
        driver.push_str(&kept.join("&").replace('@', "%40"));
    }
    let config = driver
        .parse::<postgres::Config>()
        .map_err(|e| driver_refusal(&e))?;
    Ok(Split {
        config,
        ours,
        keepalives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver_password(s: &str) -> Option<Vec<u8>> {
        let split = split(s).unwrap();
        split.config.get_password().map(<[u8]>::to_vec)
    }

    #[test]
    fn key_value_passwords_are_read_as_libpq_reads_them() {
        for (text, password) in [
            ("host=h password=ab://cd", "ab://cd"),
            ("host=h password='ab://cd ef'", "ab://cd ef"),
            ("password = 'a\\'b\\\\c' host=h", "a'b\\c"),
            ("host=h password=a\\ b", "a b"),
            ("host=h password=tail\\", "tail"),
            ("host=h password=it's", "it's"),
            ("host=h password=é€😀", "é€😀"),
            ("host=h password=''", ""),
            ("host=h\tpassword=x\ndbname=d\r", "x"),
        ] {
            let got = driver_password(text);
            assert_eq!(
                got.as_deref(),
                Some(password.as_bytes()),
                "{text:?}: {:?}",
                got.as_deref().map(String::from_utf8_lossy)
            );
        }
    }

    #[test]
    fn a_quoted_value_may_be_followed_directly_by_the_next_key() {
        let config = split("password='a b'host=h dbname=d").unwrap().config;
        assert_eq!(config.get_password(), Some(&b"a b"[..]));
        assert_eq!(config.get_dbname(), Some("d"));
    }

    #[test]
    fn url_passwords_are_percent_decoded_and_may_hold_a_question_mark() {
        for (text, password) in [
            ("postgresql://u:p%40ss%3Aw%2Frd@h/db", &b"p@ss:w/rd"[..]),
            ("postgresql://u:a?b@h/db", b"a?b"),
            ("postgresql://u:%ff@h/db", b"\xff"),
            ("postgres://u:x@h:5433/db?application_name=a@b", b"x"),
        ] {
            assert_eq!(driver_password(text).as_deref(), Some(password), "{text:?}");
        }
    }

    #[test]
    fn an_at_sign_in_the_query_is_not_taken_for_credentials() {
        let config = split("postgresql://h/db?application_name=a@b")
            .unwrap()
            .config;
        assert_eq!(config.get_user(), None);
        assert_eq!(config.get_application_name(), Some("a@b"));
        assert_eq!(config.get_dbname(), Some("db"));
    }

    #[test]
    fn our_keys_are_split_off_with_their_positions() {
        let split = split("host=h sslmode=verify-full sslrootcert='/a b/ca.pem'").unwrap();
        assert_eq!(
            split.ours,
            vec![
                ("sslmode", "verify-full".to_owned(), 15),
                ("sslrootcert", "/a b/ca.pem".to_owned(), 39),
            ]
        );
        let split =
            super::split("postgresql://h/db?sslrootcert=%2Fca.pem&application_name=x").unwrap();
        assert_eq!(split.ours, vec![("sslrootcert", "/ca.pem".to_owned(), 30)]);
        assert_eq!(split.config.get_application_name(), Some("x"));
    }

    #[test]
    fn errors_give_positions() {
        for (text, expected) in [
            ("host=h dbname", "expected `=` after the key at byte 7"),
            ("host=h =x", "a key is missing before `=` at byte 7"),
            ("host=h bogus=1", "unknown option at byte 7"),
            (
                "host=h port='1",
                "unterminated quoted value of `port` at byte 12",
            ),
            ("host=h bogus='1", "unterminated quoted value at byte 13"),
            ("host=h port=x", "invalid value of `port` at byte 12"),
            ("host=h port=1 port=y", "invalid value of `port` at byte 19"),
            (
                "postgresql://h/db?x",
                "expected `=` in the query parameter at byte 18",
            ),
            ("postgresql://h/db?a=1&&b=2", "unknown option at byte 18"),
            ("postgresql://h/%zz", "bad percent-encoding at byte 15"),
            ("postgresql://h/db?port=%00", "NUL byte at byte 23"),
            ("postgresql://h/%ff", "the database name at byte 15"),
            ("  postgresql://h/db?x", "at byte 20"),
            ("postgresql://u:p@h:x/db", "invalid value of `port`"),
            ("postgresql://[::1/db", "invalid value of `host`"),
            ("HTTP://h/db", "unsupported scheme"),
        ] {
            let Err(err) = split(text) else {
                panic!("{text:?} was accepted");
            };
            assert!(
                err.to_string().contains(expected),
                "{text:?}: expected {expected:?} in {err}"
            );
        }
    }

    #[test]
    fn key_value_text_with_a_url_inside_is_not_a_url() {
        assert!(!has_url_scheme("host=h password=ab://cd"));
        assert!(!has_url_scheme("password='x://y'"));
        assert!(!has_url_scheme("1http://h"));
        assert!(has_url_scheme("svn+ssh://h"));
        assert!(has_url_scheme("http://h"));
    }
}
