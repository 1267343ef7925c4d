//! Malformed connection strings whose password holds spaces, `://`, quotes,
//! `&`, backslashes or bad percent-encoding: every error, through every way
//! in (parsing, `StateStore::connect`, the builders, `trebuchet.yaml`, the C
//! ABI), names a key or a byte position and never repeats any piece of the
//! password. Also the strings libpq accepts that used to be misread. Nothing
//! here reaches a server.

use std::error::Error as StdError;

use trebuchet_postgres::{ChangeListener, ConnectOptions, Error, StateConfig, StateStore};

/// A malformed string and the password it holds (as its author meant it).
struct Case {
    label: &'static str,
    text: &'static str,
    password: &'static str,
}

const MALFORMED: &[Case] = &[
    Case {
        label: "unquoted password with a space",
        text: "host=localhost password=Xk7 Qz9wLp dbname=app",
        password: "Xk7 Qz9wLp",
    },
    Case {
        label: "unquoted password with a space, at the end",
        text: "host=localhost dbname=app password=Xk7 Qz9wLp",
        password: "Xk7 Qz9wLp",
    },
    Case {
        label: "unquoted password with `://` and a space",
        text: "host=localhost password=Zr4://Mq8 Tn6Hd dbname=app",
        password: "Zr4://Mq8 Tn6Hd",
    },
    Case {
        label: "unquoted password with `://`, a key without `=` after it",
        text: "host=localhost password=Zr4://Mq8Tn6 dbname",
        password: "Zr4://Mq8Tn6",
    },
    Case {
        label: "quoted password with `://`, unterminated",
        text: "host=localhost password='Zr4://Mq8 Tn6Hd dbname=app",
        password: "Zr4://Mq8 Tn6Hd",
    },
    Case {
        label: "password whose second half looks like an unknown key",
        text: "host=localhost password=Wp3 Hv8Lk=Rt5 dbname=app",
        password: "Wp3 Hv8Lk=Rt5",
    },
    Case {
        label: "password whose second half sets sslmode",
        text: "host=localhost password=Nw2Bq sslmode=Pk7Rd",
        password: "Nw2Bq sslmode=Pk7Rd",
    },
    Case {
        label: "password whose second half sets a bad port",
        text: "host=localhost password=Fm3Tz port=Jq8Wz",
        password: "Fm3Tz port=Jq8Wz",
    },
    Case {
        label: "unquoted password with a quote inside",
        text: "host=localhost password=Ab'9Qm Tz4Kc dbname=app",
        password: "Ab'9Qm Tz4Kc",
    },
    Case {
        label: "escaped quote, then a space",
        text: "host=localhost password=Kj5\\'Bn8 Vc7Mx",
        password: "Kj5'Bn8 Vc7Mx",
    },
    Case {
        label: "quoted password, text glued after the closing quote",
        text: "host=localhost password='Lm4 Dx8'Gh2Wq dbname=app",
        password: "Lm4 Dx8'Gh2Wq",
    },
    Case {
        label: "a key missing before `=`",
        text: "host=localhost password=Ty6Vn =Bq3Zr",
        password: "Ty6Vn =Bq3Zr",
    },
    Case {
        label: "a trailing backslash inside quotes",
        text: "host=localhost password='Hs9Jd2\\",
        password: "Hs9Jd2\\",
    },
    Case {
        label: "key=value text with a URL-like password and no host key",
        text: "password=Cv5://Rn7Ym dbname",
        password: "Cv5://Rn7Ym",
    },
    Case {
        label: "URL with another scheme",
        text: "mysql://app:Hq5Vz8Pw@localhost/db",
        password: "Hq5Vz8Pw",
    },
    Case {
        label: "URL with a bad percent escape in the password",
        text: "postgresql://app:Hq5%zzVz8@localhost/db",
        password: "Hq5%zzVz8",
    },
    Case {
        label: "URL with a percent sign at the end of the password",
        text: "postgresql://app:Dn4Wc7%@localhost/db",
        password: "Dn4Wc7%",
    },
    Case {
        label: "URL with %00 in the password",
        text: "postgresql://app:Gk2%00Lp6@localhost/db",
        password: "Gk2%00Lp6",
    },
    Case {
        label: "URL with an unencoded `@` in the password",
        text: "postgresql://app:Gx5@Wr8Jm@localhost/db",
        password: "Gx5@Wr8Jm",
    },
    Case {
        label: "URL with a bad port after a password",
        text: "postgresql://app:Rb7Kw2Qs@localhost:port/db",
        password: "Rb7Kw2Qs",
    },
    Case {
        label: "URL query password with an unencoded `&`",
        text: "postgresql://localhost/db?user=app&password=Jz6&Pw4Tn=x",
        password: "Jz6&Pw4Tn=x",
    },
    Case {
        label: "URL query password with an unencoded `&`, no `=` after it",
        text: "postgresql://localhost/db?user=app&password=Jz6&Pw4Tn",
        password: "Jz6&Pw4Tn",
    },
    Case {
        label: "URL query password with an unencoded `&` before sslmode",
        text: "postgresql://localhost/db?password=Mb8Xs&sslmode=Qv3Lm9",
        password: "Mb8Xs&sslmode=Qv3Lm9",
    },
    Case {
        label: "URL query password with a bad percent escape",
        text: "postgresql://localhost/db?user=app&password=Yt5%g1Nk3",
        password: "Yt5%g1Nk3",
    },
    Case {
        label: "URL whose user name is not UTF-8 once decoded",
        text: "postgresql://%ff:Kd3Vb9Zx@localhost/db",
        password: "Kd3Vb9Zx",
    },
];

/// Every piece of length 3 or more of `password`.
fn fragments(password: &str) -> Vec<String> {
    let chars: Vec<char> = password.chars().collect();
    let mut pieces = Vec::new();
    for len in 3..=chars.len() {
        for start in 0..=chars.len() - len {
            pieces.push(chars[start..start + len].iter().collect());
        }
    }
    pieces
}

/// `Display` and `Debug` of the error and of every error in its `source()`
/// chain.
fn all_text(err: &(dyn StdError + 'static)) -> String {
    let mut text = format!("{err} / {err:?}");
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(&format!(" / {e} / {e:?}"));
        source = e.source();
    }
    text
}

/// Option names a password above swallows; an error names these on purpose.
const OPTION_NAMES: [&str; 3] = [" sslmode=", "&sslmode=", " port="];

/// Asserts that `text` holds no piece of 3 characters or more of the
/// password, except pieces wholly inside an option's name.
#[track_caller]
fn assert_no_fragment(case: &Case, how: &str, text: &str) {
    for piece in fragments(case.password) {
        if OPTION_NAMES
            .iter()
            .any(|name| name.contains(piece.as_str()))
        {
            continue;
        }
        assert!(
            !text.contains(&piece),
            "{} ({how}): the error repeats {piece:?} of the password: {text}",
            case.label
        );
    }
}

#[track_caller]
fn assert_connection_string_error(case: &Case, how: &str, err: &Error) {
    assert!(
        matches!(err, Error::InvalidConnectionString { .. }),
        "{} ({how}): expected InvalidConnectionString, got {err:?}",
        case.label
    );
    assert_no_fragment(case, how, &all_text(err));
}

#[test]
fn parse_errors_repeat_no_piece_of_the_password() {
    for case in MALFORMED {
        match case.text.parse::<ConnectOptions>() {
            Ok(options) => panic!(
                "{}: a malformed string was accepted: {options:?}",
                case.label
            ),
            Err(err) => assert_connection_string_error(case, "parse", &err),
        }
    }
}

#[test]
fn connect_and_builders_repeat_no_piece_of_the_password() {
    for case in MALFORMED {
        let err = StateStore::connect(case.text).unwrap_err();
        assert_connection_string_error(case, "StateStore::connect", &err);
        let err = StateStore::builder().url(case.text).build().unwrap_err();
        assert_connection_string_error(case, "StateStore::builder().url", &err);
        let err = ChangeListener::builder()
            .url(case.text)
            .build()
            .unwrap_err();
        assert_connection_string_error(case, "ChangeListener::builder().url", &err);
    }
}

/// `text` as a YAML double-quoted scalar.
fn yaml_quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[test]
fn config_file_errors_repeat_no_piece_of_the_password() {
    for case in MALFORMED {
        let yaml = format!(
            "state:\n  type: postgresql\n  connectionString: {}\n",
            yaml_quoted(case.text)
        );
        let err = StateConfig::from_yaml_with_env(&yaml, |_| None).unwrap_err();
        match &err {
            Error::ConfigFile { line, key, .. } => {
                assert_eq!(*line, Some(3), "{}: {err}", case.label);
                assert_eq!(
                    key.as_deref(),
                    Some("state.connectionString"),
                    "{}: {err}",
                    case.label
                );
            }
            other => panic!("{}: expected ConfigFile, got {other:?}", case.label),
        }
        assert_no_fragment(case, "trebuchet.yaml", &all_text(&err));
    }
}

#[test]
fn errors_name_a_key_or_a_byte_position() {
    for (text, expected) in [
        (
            "host=localhost password=Xk7 Qz9wLp dbname=app",
            "expected `=` after the key at byte 28",
        ),
        (
            "host=localhost password=Wp3 Hv8Lk=Rt5 dbname=app",
            "unknown option at byte 28",
        ),
        (
            "  host=localhost password=Wp3 Hv8Lk=Rt5",
            "unknown option at byte 30",
        ),
        (
            "host=localhost password='Zr4://Mq8 Tn6Hd dbname=app",
            "unterminated quoted value of `password` at byte 24",
        ),
        (
            "host=localhost password=Nw2Bq sslmode=Pk7Rd",
            "unknown sslmode at byte 38",
        ),
        (
            "host=localhost password=Fm3Tz port=Jq8Wz",
            "invalid value of `port` at byte 35",
        ),
        (
            "host=localhost password=Ty6Vn =Bq3Zr",
            "a key is missing before `=` at byte 30",
        ),
        ("mysql://app:Hq5Vz8Pw@localhost/db", "unsupported scheme"),
        (
            "postgresql://app:Hq5%zzVz8@localhost/db",
            "bad percent-encoding at byte 20",
        ),
        (
            "postgresql://app:Gk2%00Lp6@localhost/db",
            "NUL byte at byte 20",
        ),
        (
            "postgresql://localhost/db?user=app&password=Jz6&Pw4Tn=x",
            "unknown option at byte 48",
        ),
        (
            "postgresql://localhost/db?user=app&password=Jz6&Pw4Tn",
            "expected `=` in the query parameter at byte 48",
        ),
        (
            "postgresql://localhost/db?password=Mb8Xs&sslmode=Qv3Lm9",
            "unknown sslmode at byte 49",
        ),
        (
            "postgresql://app:Rb7Kw2Qs@localhost:port/db",
            "invalid value of `port`",
        ),
    ] {
        let err = text.parse::<ConnectOptions>().unwrap_err();
        assert!(
            err.to_string().contains(expected),
            "{text:?}: expected {expected:?} in: {err}"
        );
    }
}

#[test]
fn passwords_with_url_like_text_parse_as_libpq_does() {
    for (text, dbname) in [
        (
            "host=localhost password='Zr4://Mq8 Tn6Hd' dbname=app",
            "app",
        ),
        ("host=localhost password=Zr4://Mq8Tn6 dbname=app", "app"),
        ("password=Cv5://Rn7Ym host=localhost dbname=game", "game"),
        ("dbname=x://y host=localhost", "x://y"),
        ("host=localhost password=Kj5\\ Bn8Vc dbname=app", "app"),
    ] {
        let options: ConnectOptions = text
            .parse()
            .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
        assert!(options.has_password() || !text.contains("password"));
        assert_eq!(options.get_dbname(), Some(dbname), "{text:?}");
        assert_eq!(options.target(), "localhost:5432", "{text:?}");
    }
}

#[cfg(feature = "ffi")]
#[test]
fn the_c_abi_error_repeats_no_piece_of_the_password() {
    use std::ffi::{CStr, CString};
    use trebuchet_postgres::ffi::{trebuchet_last_error, trebuchet_status, trebuchet_store_open};

    for case in MALFORMED {
        let url = CString::new(case.text).unwrap();
        let mut store = std::ptr::null_mut();
        // SAFETY: a NUL-terminated string and a writable out-pointer.
        #[allow(unsafe_code)] // calls the C ABI as C would
        let (status, message) = unsafe {
            let status =
                trebuchet_store_open(url.as_ptr(), std::ptr::null(), std::ptr::null(), &mut store);
            let message = CStr::from_ptr(trebuchet_last_error())
                .to_string_lossy()
                .into_owned();
            (status, message)
        };
        assert_eq!(
            status,
            trebuchet_status::TREBUCHET_INVALID_CONFIG,
            "{}: {message}",
            case.label
        );
        assert!(store.is_null(), "{}", case.label);
        assert!(!message.is_empty(), "{}", case.label);
        assert_no_fragment(case, "trebuchet_last_error", &message);
    }
}
