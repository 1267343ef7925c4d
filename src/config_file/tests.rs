//! Reading the seed's files, and the errors for everything else.

use std::path::Path;

use super::expand::expand;
use super::{ConnectionSource, StateConfig};
use crate::codec::Codec;
use crate::config::{SslMode, DEFAULT_CHANNEL, DEFAULT_TABLE};
use crate::error::{Error, Result};

fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |key| {
        pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
    }
}

fn parse(yaml: &str) -> Result<StateConfig> {
    StateConfig::from_yaml_with_env(yaml, env(&[]))
}

#[track_caller]
fn config_error(yaml: &str) -> (Option<usize>, Option<String>, String) {
    match parse(yaml).unwrap_err() {
        Error::ConfigFile {
            line, key, reason, ..
        } => (line, key, reason),
        other => panic!("expected a ConfigFile error, got {other:?}"),
    }
}

#[test]
fn the_seeds_local_development_file() {
    let c = parse(
        "# trebuchet.yaml\nstate:\n  type: postgresql\n  host: localhost\n  port: 5432\n  \
         database: trebuchet_dev\n  username: postgres\n  password: password\n",
    )
    .unwrap();
    assert_eq!(c.connection_source(), ConnectionSource::Parts);
    let o = c.connect_options();
    assert_eq!(o.target(), "localhost:5432");
    assert_eq!(o.get_dbname(), Some("trebuchet_dev"));
    assert_eq!(o.get_user(), Some("postgres"));
    assert!(o.has_password());
    assert_eq!(c.table(), DEFAULT_TABLE);
    assert_eq!(c.channel(), DEFAULT_CHANNEL);
    assert_eq!(c.codec(), Codec::Cbor);
    assert_eq!(c.pool_size(), None);
    assert!(!format!("{c:?}").contains("password\""));
}

#[test]
fn the_seeds_fly_file_expands_database_url_and_ignores_other_keys() {
    let yaml = "name: my-game-server\nversion: \"1\"\n\nstate:\n  type: postgresql\n  \
                # Fly.io auto-injects DATABASE_URL\n  connectionString: ${DATABASE_URL}\n\n\
                actors:\n  GameRoom:\n    stateful: true\n    memory: 512\n";
    let c = StateConfig::from_yaml_with_env(
        yaml,
        env(&[(
            "DATABASE_URL",
            "postgres://app:s3cret@fly-db.internal:5433/game",
        )]),
    )
    .unwrap();
    assert_eq!(c.connection_source(), ConnectionSource::ConnectionString);
    assert_eq!(c.connect_options().target(), "fly-db.internal:5433");
    assert_eq!(c.connect_options().get_dbname(), Some("game"));
    assert!(c.connect_options().has_password());
    assert!(!format!("{c:?}").contains("s3cret"));

    let (line, key, reason) = config_error(yaml);
    assert_eq!(
        (line, key.as_deref()),
        (Some(7), Some("state.connectionString"))
    );
    assert!(reason.contains("DATABASE_URL is not set"), "{reason}");
}

#[test]
fn the_seeds_aws_file_has_no_password() {
    let c = parse(
        "state:\n  type: postgresql\n  host: trebuchet.abc123.us-east-1.rds.amazonaws.com\n  \
         port: 5432\n  database: trebuchet\n  username: admin\n  # Password from AWS Secrets Manager\n",
    )
    .unwrap();
    assert_eq!(
        c.connect_options().target(),
        "trebuchet.abc123.us-east-1.rds.amazonaws.com:5432"
    );
    assert_eq!(c.connect_options().get_user(), Some("admin"));
    assert!(!c.connect_options().has_password());
}

#[test]
fn every_key_with_its_extras() {
    let c = StateConfig::from_yaml_with_env(
        "state:\n  type: postgres\n  host: ${PGHOST_X:-db}\n  port: \"${PORT}\"\n  \
         password: ${PW}\n  sslmode: verify-full\n  sslrootcert: /etc/ssl/root.pem\n  \
         table: game.rooms\n  channel: room_changes\n  poolSize: 4\n  codec: json\n",
        env(&[("PORT", "6543"), ("PW", "pa$$word")]),
    )
    .unwrap();
    assert_eq!(c.connect_options().target(), "db:6543");
    assert_eq!(c.connect_options().get_ssl_mode(), SslMode::VerifyFull);
    assert_eq!(
        c.connect_options().get_ssl_root_cert(),
        Some(Path::new("/etc/ssl/root.pem"))
    );
    assert_eq!(c.table(), "game.rooms");
    assert_eq!(c.channel(), "room_changes");
    assert_eq!(c.pool_size(), Some(4));
    assert_eq!(c.codec(), Codec::Json);
}

#[test]
fn no_connection_keys_means_the_environment() {
    let c = StateConfig::from_yaml_with_env(
        "state:\n  type: postgresql\n  table: rooms\n  sslmode: disable\n",
        env(&[("POSTGRES_HOST", "envhost"), ("POSTGRES_PORT", "7000")]),
    )
    .unwrap();
    assert_eq!(c.connection_source(), ConnectionSource::Environment);
    assert_eq!(c.connect_options().target(), "envhost:7000");
    assert_eq!(c.connect_options().get_ssl_mode(), SslMode::Disable);
    assert_eq!(c.table(), "rooms");

    let err = StateConfig::from_yaml_with_env(
        "state:\n  type: postgresql\n",
        env(&[("POSTGRES_PORT", "nope")]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("POSTGRES_PORT"), "{err}");
}

#[test]
fn unknown_keys_name_the_key_the_line_and_a_suggestion() {
    let (line, key, reason) = config_error("name: x\nstate:\n  type: postgresql\n  prot: 5432\n");
    assert_eq!(line, Some(4));
    assert_eq!(key.as_deref(), Some("state.prot"));
    assert!(reason.contains("did you mean `port`?"), "{reason}");
    let (_, key, reason) = config_error("state:\n  connection_string: x\n");
    assert_eq!(key.as_deref(), Some("state.connection_string"));
    assert!(reason.contains("unknown key"), "{reason}");
    let (_, _, reason) = config_error("state:\n  poolsize: 3\n");
    assert!(reason.contains("`poolSize`"), "{reason}");
}

#[test]
fn wrong_types_name_the_key_and_the_line() {
    for (yaml, line, key, needle) in [
        (
            "state:\n  port: abc\n",
            2,
            "state.port",
            "expected an integer, found \"abc\"",
        ),
        ("state:\n  port: 70000\n", 2, "state.port", "out of range"),
        (
            "state:\n\n  host: [a, b]\n",
            3,
            "state.host",
            "found a list",
        ),
        (
            "state:\n  username: 42\n",
            2,
            "state.username",
            "expected a string, found an integer",
        ),
        (
            "state:\n  password: 12345\n",
            2,
            "state.password",
            "quote it",
        ),
        (
            "state:\n  poolSize: 0\n",
            2,
            "state.poolSize",
            "out of range",
        ),
        (
            "state:\n  poolSize: 2.5\n",
            2,
            "state.poolSize",
            "expected an integer",
        ),
        (
            "state:\n  sslmode: sometimes\n",
            2,
            "state.sslmode",
            "unknown mode",
        ),
        ("state:\n  codec: xml\n", 2, "state.codec", "unknown codec"),
        (
            "state:\n  type: dynamodb\n",
            2,
            "state.type",
            "type: postgresql",
        ),
        (
            "state:\n  table: \"bad-name\"\n",
            2,
            "state.table",
            "invalid table name",
        ),
        (
            "state:\n  channel: \"a b\"\n",
            2,
            "state.channel",
            "invalid channel name",
        ),
        (
            "state:\n  connectionString: http://x/db\n",
            2,
            "state.connectionString",
            "unsupported scheme",
        ),
        (
            "state:\n  connectionString: postgresql://h/db\n  host: h\n",
            3,
            "state.host",
            "keep either",
        ),
        ("state:\n  host:\n    name: x\n", 2, "state.host", "mapping"),
    ] {
        let (got_line, got_key, reason) = config_error(yaml);
        assert_eq!(got_line, Some(line), "{yaml:?}: {reason}");
        assert_eq!(got_key.as_deref(), Some(key), "{yaml:?}: {reason}");
        assert!(reason.contains(needle), "{yaml:?}: {reason}");
    }
}

#[test]
fn secrets_never_appear_in_errors() {
    for yaml in [
        "state:\n  password: [hunter2]\n",
        "state:\n  connectionString: \"hxxp://u:hunter2@h/db\"\n",
        "state:\n  connectionString: \"postgresql://u:hunter2@h:99999/db\"\n",
        "state:\n  password: hunter2\n  prot: 1\n",
        "state:\n  password: \"${hunter2 x}\"\n",
    ] {
        let err = parse(yaml).unwrap_err();
        assert!(
            !format!("{err} {err:?}").contains("hunter2"),
            "{yaml:?}: {err}"
        );
    }
}

#[test]
fn missing_or_malformed_sections() {
    for (yaml, needle) in [
        ("", "empty"),
        ("name: x\n", "no `state:` section"),
        ("state:\n", "section is empty"),
        ("state: postgresql\n", "expected a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("state:\n  host: a\n  host: b\n", "not valid YAML"),
        ("state: [\n", "not valid YAML"),
        ("a: 1\n---\nb: 2\n", "2 YAML documents"),
    ] {
        let err = parse(yaml).unwrap_err();
        assert!(err.to_string().contains(needle), "{yaml:?}: {err}");
    }
}

#[test]
fn environment_expansion() {
    let lookup = env(&[("A", "1"), ("EMPTY", "")]);
    let expand = |text| expand(text, false, &lookup);
    assert_eq!(expand("x${A}y").unwrap(), "x1y");
    assert_eq!(expand("${B:-two}").unwrap(), "two");
    assert_eq!(expand("${EMPTY:-fallback}").unwrap(), "fallback");
    assert_eq!(expand("${EMPTY}").unwrap(), "");
    assert_eq!(expand("a$$b $x $").unwrap(), "a$b $x $");
    assert!(expand("${B}").unwrap_err().contains("B is not set"));
    assert!(expand("${A").unwrap_err().contains("unterminated"));
    assert!(expand("${1A}")
        .unwrap_err()
        .contains("`${1A}` does not name"));
}

#[test]
fn relative_root_certificates_follow_the_file() {
    let dir = std::env::temp_dir().join(format!("trebuchet-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trebuchet.yaml");
    std::fs::write(&path, "state:\n  host: h\n  sslrootcert: certs/root.pem\n").unwrap();
    let c = StateConfig::from_file(&path).unwrap();
    assert_eq!(
        c.connect_options().get_ssl_root_cert(),
        Some(dir.join("certs/root.pem").as_path())
    );
    assert_eq!(c.origin(), path.display().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let err = StateConfig::from_file(dir.join("missing.yaml")).unwrap_err();
    assert!(err.to_string().contains("cannot read it"), "{err}");
}
