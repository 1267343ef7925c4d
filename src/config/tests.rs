//! Connection strings, the environment and parts.

use std::path::Path;

use postgres::config::Host;

use super::{ConnectOptions, SslMode};
use crate::error::{Error, Result};

fn parse(s: &str) -> Result<ConnectOptions> {
    s.parse()
}

#[test]
fn parses_the_seed_urls() {
    let o = parse("postgresql://user:pass@localhost:5432/mydb").unwrap();
    assert_eq!(o.get_user(), Some("user"));
    assert_eq!(o.get_dbname(), Some("mydb"));
    assert_eq!(o.get_port(), 5432);
    assert!(o.has_password());
    let o = parse("postgresql://user@localhost/mydb").unwrap();
    assert!(!o.has_password());
    let o = parse("postgresql://localhost/mydb").unwrap();
    assert_eq!(o.get_user(), None);
    assert_eq!(o.driver_config().get_user(), Some("postgres"));
    let o = parse("postgres://user:pass@host.example.com:5433/production").unwrap();
    assert_eq!(o.get_port(), 5433);
    assert_eq!(o.target(), "host.example.com:5433");
}

#[test]
fn rejects_malformed_strings_with_a_reason() {
    for (s, needle) in [
        ("not-a-url", "neither a URL"),
        ("postgresql://", "names no host"),
        ("http://localhost/db", "unsupported scheme"),
        ("", "empty"),
        ("   ", "empty"),
        ("postgresql://u:p@h:notaport/db", "port"),
        ("postgresql://h/db?sslmode=bogus", "unknown sslmode"),
        ("host=localhost dbname", "expected `=`"),
        ("host='unterminated", "unterminated"),
    ] {
        let err = parse(s).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConnectionString { .. }),
            "{s:?}: {err:?}"
        );
        assert!(err.to_string().contains(needle), "{s:?}: {err}");
    }
}

#[test]
fn ssl_modes_libpq_rejects_in_the_driver_are_ours() {
    let o = parse("postgresql://h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem").unwrap();
    assert_eq!(o.get_ssl_mode(), SslMode::VerifyFull);
    assert_eq!(o.get_ssl_root_cert(), Some(Path::new("/tmp/ca.pem")));
    let o = parse("host=h sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=x").unwrap();
    assert_eq!(o.get_ssl_mode(), SslMode::VerifyCa);
    assert_eq!(o.get_ssl_root_cert(), Some(Path::new("/a b/ca.pem")));
    assert_eq!(o.get_dbname(), Some("x"));
    assert_eq!(
        parse("postgresql://h/db").unwrap().get_ssl_mode(),
        SslMode::Prefer
    );
    assert_eq!(
        parse("postgresql://h/db?sslmode=disable")
            .unwrap()
            .get_ssl_mode(),
        SslMode::Disable
    );
}

#[test]
fn arbitrary_text_never_panics() {
    let alphabet: Vec<char> = "ab=' \\/:@?&%é€😀\t\n0".chars().collect();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..20_000 {
        let len = rng.usize(0..24);
        let mut text: String = (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect();
        if rng.bool() {
            text.insert_str(0, if rng.bool() { "postgresql://" } else { "host=" });
        }
        let _ = parse(&text);
    }
}

#[test]
fn escapes_of_multibyte_characters_do_not_panic() {
    let o = parse("host=h password='p\\é\\'x' dbname=d\\é").unwrap();
    assert!(o.has_password());
    assert_eq!(o.get_dbname(), Some("dé"));
    assert!(parse("host=h password='\\é").is_err());
}

#[test]
fn key_value_strings_parse() {
    let o = parse("host=db port=6000 user=app password='s3 cr\\'et' dbname=game").unwrap();
    assert_eq!(o.get_port(), 6000);
    assert_eq!(o.get_user(), Some("app"));
    assert_eq!(o.target(), "db:6000");
    assert!(o.has_password());
}

#[test]
fn debug_and_errors_never_show_the_password() {
    let o = parse("postgresql://user:hunter2@localhost/db").unwrap();
    assert!(!format!("{o:?}").contains("hunter2"));
    let e = parse("postgresql://user:hunter2@localhost:xx/db").unwrap_err();
    assert!(!e.to_string().contains("hunter2"));
    assert!(!format!("{e:?}").contains("hunter2"));
    let e = parse("https://user:hunter2@localhost/db").unwrap_err();
    assert!(!format!("{e:?} {e}").contains("hunter2"));
}

#[test]
fn environment_follows_the_seed() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let o = ConnectOptions::from_lookup(env(&[])).unwrap();
    assert_eq!(o.target(), "localhost:5432");
    assert_eq!(o.get_dbname(), Some("trebuchet"));
    assert_eq!(o.get_user(), Some("postgres"));
    let o = ConnectOptions::from_lookup(env(&[
        ("POSTGRES_HOST", "pg"),
        ("POSTGRES_PORT", "6543"),
        ("POSTGRES_DATABASE", "game"),
        ("POSTGRES_USER", "app"),
        ("POSTGRES_PASSWORD", "pw"),
    ]))
    .unwrap();
    assert_eq!(o.target(), "pg:6543");
    assert_eq!(o.get_dbname(), Some("game"));
    assert!(o.has_password());
    let o = ConnectOptions::from_lookup(env(&[
        ("DATABASE_URL", "postgres://u@urlhost/db"),
        ("POSTGRES_HOST", "ignored"),
    ]))
    .unwrap();
    assert_eq!(o.target(), "urlhost:5432");
    let e = ConnectOptions::from_lookup(env(&[("POSTGRES_PORT", "abc")])).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }));
}

#[test]
fn parts_have_the_seed_defaults() {
    let mut o = ConnectOptions::new();
    o.dbname("trebuchet").password("pw");
    assert_eq!(
        o.driver_config().get_hosts(),
        &[Host::Tcp("localhost".into())]
    );
    assert_eq!(o.get_port(), 5432);
    o.port(6000).host("db");
    assert_eq!(o.target(), "db:6000");
    assert!(o.has_password());
    assert_eq!(o.get_dbname(), Some("trebuchet"));
}
