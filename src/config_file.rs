//! The `state:` section of the seed's `trebuchet.yaml`, from which a
//! program builds its [`StateStore`] and [`ChangeListener`].
//!
//! Only `state:` is read, strictly: an unknown key or a wrong type is an
//! error naming the key and its line. The file's other top-level keys
//! (`name`, `version`, `actors`, ...) belong to other tools and are ignored.

use std::path::{Path, PathBuf};

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use crate::codec::Codec;
use crate::config::{validate_identifier, ConnectOptions, SslMode, DEFAULT_CHANNEL, DEFAULT_TABLE};
use crate::error::{Error, Result};
use crate::listener::{ChangeListener, ChangeListenerBuilder};
use crate::pool::PoolOptions;
use crate::schema::Names;
use crate::store::{StateStore, StateStoreBuilder};

/// The keys of the `state:` section, in the order the docs list them.
const KEYS: [&str; 13] = [
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
const PARTS: [&str; 5] = ["host", "port", "database", "username", "password"];

/// Keys whose values are never repeated in a message.
const SECRET: [&str; 2] = ["password", "connectionString"];

/// The largest `poolSize` accepted.
const MAX_POOL_SIZE: i64 = 1000;

/// Where a [`StateConfig`]'s connection settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionSource {
    /// `connectionString`.
    ConnectionString,
    /// `host`, `port`, `database`, `username` and `password` (each with the
    /// seed's default when left out).
    Parts,
    /// None of those keys: the environment, as
    /// [`ConnectOptions::from_env`] reads it.
    Environment,
}

/// The `state:` section of a `trebuchet.yaml`:
///
/// ```yaml
/// state:
///   type: postgresql                      # the only type this crate serves
///   host: localhost                       # default localhost
///   port: 5432                            # default 5432
///   database: trebuchet                   # default trebuchet
///   username: postgres                    # default postgres
///   password: ${POSTGRES_PASSWORD}        # ${VAR} and ${VAR:-default} expand
///   # or instead of the five above:
///   # connectionString: ${DATABASE_URL}
///   sslmode: verify-full                  # libpq's modes; default prefer
///   sslrootcert: certs/root.pem           # relative to the file's directory; or system
///   table: actor_states                   # or schema.table
///   channel: actor_state_changes
///   poolSize: 10
///   codec: cbor                           # or json, to share with Swift
/// ```
///
/// Every key is optional. With none of `connectionString`, `host`, `port`,
/// `database`, `username` and `password`, the connection comes from the
/// environment ([`ConnectOptions::from_env`]). `${NAME}` in any string value
/// is replaced by that environment variable (an error when it is unset),
/// `${NAME:-default}` falls back to `default`, and `$$` is a literal `$`.
/// An empty value (`password:`) is the same as leaving the key out.
///
/// ```no_run
/// use trebuchet_postgres::StateConfig;
///
/// let config = StateConfig::from_file("trebuchet.yaml")?;
/// let store = config.store()?;
/// let listener = store.listener()?; // same server and channel, with catch-up
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
///
/// `Debug` never shows the password.
#[derive(Debug, Clone)]
pub struct StateConfig {
    connect: ConnectOptions,
    source: ConnectionSource,
    table: String,
    channel: String,
    pool_size: Option<u32>,
    codec: Codec,
    origin: String,
}

impl StateConfig {
    /// Reads the `state:` section of a YAML file, expanding `${VAR}` from
    /// the process's environment. A relative `sslrootcert` is taken relative
    /// to the file's directory.
    ///
    /// # Errors
    ///
    /// [`Error::ConfigFile`] naming the file, and the line and key where
    /// there is one: the file cannot be read or is not YAML, it has no
    /// `state:` section, a key is unknown, a value has the wrong type or is
    /// out of range, or an environment variable it names is unset.
    pub fn from_file(path: impl AsRef<Path>) -> Result<StateConfig> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            origin: origin.clone(),
            line: None,
            key: None,
            reason: format!("cannot read it: {e}"),
        })?;
        let parser = Parser {
            origin,
            base_dir: path.parent().map(Path::to_path_buf),
            lookup: |key: &str| std::env::var(key).ok(),
        };
        parser.parse(&text)
    }

    /// Reads the `state:` section of YAML text, expanding `${VAR}` from the
    /// process's environment.
    ///
    /// # Errors
    ///
    /// As [`from_file`](Self::from_file), naming the origin `configuration`.
    pub fn from_yaml(text: &str) -> Result<StateConfig> {
        Self::from_yaml_with_env(text, |key| std::env::var(key).ok())
    }

    /// Reads the `state:` section of YAML text, taking the variables that
    /// `${VAR}` and the environment fallback name from `lookup` instead of
    /// the process's environment.
    ///
    /// ```
    /// use trebuchet_postgres::StateConfig;
    ///
    /// let yaml = "name: my-game-server\nstate:\n  type: postgresql\n  connectionString: ${DATABASE_URL}\n";
    /// let config = StateConfig::from_yaml_with_env(yaml, |key| {
    ///     (key == "DATABASE_URL").then(|| "postgresql://app@db.internal/game".to_owned())
    /// })?;
    /// assert_eq!(config.connect_options().target(), "db.internal:5432");
    /// assert_eq!(config.table(), "actor_states");
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`from_yaml`](Self::from_yaml).
    pub fn from_yaml_with_env(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<StateConfig> {
        Parser {
            origin: "configuration".to_owned(),
            base_dir: None,
            lookup,
        }
        .parse(text)
    }

    /// Where to connect.
    pub fn connect_options(&self) -> &ConnectOptions {
        &self.connect
    }

    /// Which keys (or the environment) the connection settings came from.
    pub fn connection_source(&self) -> ConnectionSource {
        self.source
    }

    /// The table (`table`, default `actor_states`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The notification channel (`channel`, default `actor_state_changes`).
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The pool's maximum size (`poolSize`), when given.
    pub fn pool_size(&self) -> Option<u32> {
        self.pool_size
    }

    /// The codec for typed states (`codec`, default CBOR).
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The file the configuration came from, or `configuration`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// A store builder with this configuration; change anything else on it
    /// before [`build`](StateStoreBuilder::build).
    pub fn store_builder(&self) -> StateStoreBuilder {
        let mut builder = StateStore::builder()
            .connect_options(self.connect.clone())
            .table(self.table.clone())
            .channel(self.channel.clone())
            .codec(self.codec);
        if let Some(size) = self.pool_size {
            builder = builder.pool_options(PoolOptions::default().max_size(size));
        }
        builder
    }

    /// Builds the store.
    ///
    /// # Errors
    ///
    /// As [`StateStoreBuilder::build`].
    pub fn store(&self) -> Result<StateStore> {
        self.store_builder().build()
    }

    /// A listener builder for this configuration's server and channel. A
    /// listener made from the store ([`StateStore::listener`]) is better
    /// when you have one: its filtered subscriptions catch up exactly after
    /// a reconnect.
    pub fn listener_builder(&self) -> ChangeListenerBuilder {
        ChangeListener::builder()
            .connect_options(self.connect.clone())
            .channel(self.channel.clone())
    }

    /// Starts a listener on this configuration's server and channel.
    ///
    /// # Errors
    ///
    /// As [`ChangeListenerBuilder::build`].
    pub fn listener(&self) -> Result<ChangeListener> {
        self.listener_builder().build()
    }
}

/// Parses one document; `lookup` reads environment variables.
struct Parser<L> {
    origin: String,
    base_dir: Option<PathBuf>,
    lookup: L,
}

/// A string or integer value with where it was written.
struct Value {
    text: String,
    line: usize,
}

impl<L: Fn(&str) -> Option<String>> Parser<L> {
    fn error(&self, line: Option<usize>, key: Option<&str>, reason: impl Into<String>) -> Error {
        Error::ConfigFile {
            origin: self.origin.clone(),
            line,
            key: key.map(|k| format!("state.{k}")),
            reason: reason.into(),
        }
    }

    fn parse(&self, text: &str) -> Result<StateConfig> {
        let docs = MarkedYaml::load_from_str(text).map_err(|e| {
            self.error(
                Some(e.marker().line()),
                None,
                format!("not valid YAML: {}", e.info()),
            )
        })?;
        let root = match docs.as_slice() {
            [] => return Err(self.error(None, None, "it is empty: add a `state:` section")),
            [root] => root,
            more => {
                return Err(self.error(
                    None,
                    None,
                    format!("it holds {} YAML documents; expected one", more.len()),
                ))
            }
        };
        let YamlData::Mapping(top) = &untagged(root).data else {
            return Err(self.error(
                Some(root.span.start.line()),
                None,
                "the top level must be a mapping with a `state:` key",
            ));
        };
        let state = top
            .iter()
            .find(|(key, _)| untagged(key).data.as_str() == Some("state"));
        let Some((state_key, state)) = state else {
            return Err(self.error(
                None,
                None,
                "it has no `state:` section: add one (see StateConfig's documentation)",
            ));
        };
        let section_line = state_key.span.start.line();
        let entries = match &untagged(state).data {
            YamlData::Mapping(entries) => entries,
            YamlData::Value(Scalar::Null) => {
                return Err(Error::ConfigFile {
                    origin: self.origin.clone(),
                    line: Some(section_line),
                    key: Some("state".into()),
                    reason: "the section is empty: add at least `type: postgresql`".into(),
                })
            }
            _ => {
                return Err(Error::ConfigFile {
                    origin: self.origin.clone(),
                    line: Some(section_line),
                    key: Some("state".into()),
                    reason: "expected a mapping of keys such as host and port".into(),
                })
            }
        };

        let mut values: Vec<(&'static str, usize, Option<Value>)> = Vec::new();
        for (key_node, value) in entries {
            let line = key_node.span.start.line();
            let Some(key) = untagged(key_node).data.as_str() else {
                return Err(self.error(Some(line), None, "keys of `state:` must be strings"));
            };
            let Some(known) = KEYS.iter().find(|k| **k == key) else {
                return Err(self.error(Some(line), Some(key), unknown_key_reason(key)));
            };
            values.push((known, line, self.scalar(known, line, value)?));
        }
        let get = |name: &str| {
            values
                .iter()
                .find(|(key, _, _)| *key == name)
                .and_then(|(_, _, value)| value.as_ref())
        };

        if let Some(kind) = get("type") {
            if !matches!(kind.text.as_str(), "postgresql" | "postgres") {
                return Err(self.error(
                    Some(kind.line),
                    Some("type"),
                    format!(
                        "found {:?}, but this store is PostgreSQL: use `type: postgresql`",
                        kind.text
                    ),
                ));
            }
        }

        let (mut connect, source) = match get("connectionString") {
            Some(url) => {
                if let Some((part, line, _)) = values
                    .iter()
                    .find(|(key, _, value)| PARTS.contains(key) && value.is_some())
                {
                    return Err(self.error(
                        Some(*line),
                        Some(part),
                        "connectionString already says where to connect: \
                         keep either it or host/port/database/username/password",
                    ));
                }
                if url.text.trim().is_empty() {
                    return Err(self.error(
                        Some(url.line),
                        Some("connectionString"),
                        "it is empty (after expanding environment variables)",
                    ));
                }
                let options = url.text.parse::<ConnectOptions>().map_err(|e| {
                    // Our parse errors never repeat the string itself.
                    self.error(Some(url.line), Some("connectionString"), e.to_string())
                })?;
                (options, ConnectionSource::ConnectionString)
            }
            None if PARTS.iter().any(|part| get(part).is_some()) => {
                let mut options = ConnectOptions::new();
                options
                    .host(get("host").map_or("localhost", |v| &v.text))
                    .dbname(get("database").map_or("trebuchet", |v| &v.text))
                    .user(get("username").map_or("postgres", |v| &v.text));
                if let Some(port) = get("port") {
                    options.port(self.integer(port, "port", 1, i64::from(u16::MAX))? as u16);
                }
                if let Some(password) = get("password") {
                    options.password(&password.text);
                }
                (options, ConnectionSource::Parts)
            }
            None => {
                let options =
                    ConnectOptions::from_lookup(&self.lookup).map_err(|e| Error::ConfigFile {
                        origin: self.origin.clone(),
                        line: Some(section_line),
                        key: Some("state".into()),
                        reason: format!(
                            "names no connectionString or host, so the environment says where \
                             to connect, and it is wrong: {e}"
                        ),
                    })?;
                (options, ConnectionSource::Environment)
            }
        };
        if let Some(mode) = get("sslmode") {
            let parsed = mode.text.parse::<SslMode>().map_err(|_| {
                self.error(
                    Some(mode.line),
                    Some("sslmode"),
                    format!(
                        "unknown mode {:?}: use disable, allow, prefer, require, verify-ca or verify-full",
                        mode.text
                    ),
                )
            })?;
            connect.ssl_mode(parsed);
        }
        if let Some(cert) = get("sslrootcert") {
            let path = PathBuf::from(&cert.text);
            // `system` names the system's roots, not a file next to this one.
            let path = match &self.base_dir {
                Some(dir) if path.is_relative() && cert.text != "system" => dir.join(path),
                _ => path,
            };
            connect.ssl_root_cert(path);
        }
        if let Err(e) = connect.check_tls_rules() {
            let at = ["sslrootcert", "sslmode"]
                .into_iter()
                .find_map(|key| get(key).map(|v| (v.line, key)));
            return Err(self.error(at.map(|a| a.0), at.map(|a| a.1), e.to_string()));
        }

        let table = match get("table") {
            Some(table) => {
                Names::new(&table.text, DEFAULT_CHANNEL)
                    .map_err(|e| self.error(Some(table.line), Some("table"), e.to_string()))?;
                table.text.clone()
            }
            None => DEFAULT_TABLE.to_owned(),
        };
        let channel = match get("channel") {
            Some(channel) => {
                validate_identifier("channel", &channel.text)
                    .map_err(|e| self.error(Some(channel.line), Some("channel"), e.to_string()))?;
                channel.text.clone()
            }
            None => DEFAULT_CHANNEL.to_owned(),
        };
        let pool_size = get("poolSize")
            .map(|size| {
                self.integer(size, "poolSize", 1, MAX_POOL_SIZE)
                    .map(|n| n as u32)
            })
            .transpose()?;
        let codec = match get("codec") {
            None => Codec::default(),
            Some(v) if v.text == "cbor" => Codec::Cbor,
            Some(v) if v.text == "json" => Codec::Json,
            Some(v) => {
                return Err(self.error(
                    Some(v.line),
                    Some("codec"),
                    format!("unknown codec {:?}: use cbor or json", v.text),
                ))
            }
        };
        Ok(StateConfig {
            connect,
            source,
            table,
            channel,
            pool_size,
            codec,
            origin: self.origin.clone(),
        })
    }

    /// A scalar value as text, with `${VAR}` expanded in strings; `None`
    /// for an empty value. Integers are accepted where integers belong.
    /// Problems are reported at the key's `line`.
    fn scalar(
        &self,
        key: &'static str,
        line: usize,
        node: &MarkedYaml<'_>,
    ) -> Result<Option<Value>> {
        let numeric = matches!(key, "port" | "poolSize");
        let text = match &untagged(node).data {
            YamlData::Value(Scalar::Null) => return Ok(None),
            YamlData::Value(Scalar::String(s)) => expand(s, SECRET.contains(&key), &self.lookup)
                .map_err(|reason| self.error(Some(line), Some(key), reason))?,
            YamlData::Value(Scalar::Integer(n)) if numeric => n.to_string(),
            YamlData::Value(scalar) => {
                let (found, fix) = match scalar {
                    Scalar::Integer(_) => ("an integer", "quote it"),
                    Scalar::FloatingPoint(_) => ("a number", "quote it"),
                    Scalar::Boolean(_) => ("a boolean", "quote it"),
                    _ => ("something else", "quote it"),
                };
                let (expected, fix) = if numeric {
                    ("an integer", "write a whole number")
                } else {
                    ("a string", fix)
                };
                return Err(self.error(
                    Some(line),
                    Some(key),
                    format!("expected {expected}, found {found}: {fix}"),
                ));
            }
            YamlData::Sequence(_) => {
                return Err(self.error(
                    Some(line),
                    Some(key),
                    "expected a single value, found a list",
                ))
            }
            YamlData::Mapping(_) => {
                return Err(self.error(
                    Some(line),
                    Some(key),
                    "expected a single value, found a mapping (check the indentation)",
                ))
            }
            _ => {
                return Err(self.error(
                    Some(line),
                    Some(key),
                    "expected a single value (anchors and aliases are not supported)",
                ))
            }
        };
        Ok(Some(Value { text, line }))
    }

    /// An integer value within `min..=max`.
    fn integer(&self, value: &Value, key: &str, min: i64, max: i64) -> Result<i64> {
        let shown = if SECRET.contains(&key) {
            String::new()
        } else {
            format!(" {:?}", value.text)
        };
        match value.text.trim().parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            Ok(_) => Err(self.error(
                Some(value.line),
                Some(key),
                format!("{} is out of range: use {min} to {max}", value.text.trim()),
            )),
            Err(_) => Err(self.error(
                Some(value.line),
                Some(key),
                format!("expected an integer, found{shown}"),
            )),
        }
    }
}

/// The node under any user-defined tag (`!secret foo` reads as `foo`).
fn untagged<'a, 'input>(node: &'a MarkedYaml<'input>) -> &'a MarkedYaml<'input> {
    match &node.data {
        YamlData::Tagged(_, inner) => untagged(inner),
        _ => node,
    }
}

/// Why `key` is not a key of `state:`, with the nearest known key.
fn unknown_key_reason(key: &str) -> String {
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

/// Expands `${NAME}` and `${NAME:-default}` from `lookup`; `$$` is a `$`.
/// An error names the variable, never a value, and in a `secret` value not
/// even a malformed name.
fn expand(
    text: &str,
    secret: bool,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').ok_or_else(|| {
                "unterminated `${`: close it with `}` (write `$$` for a `$`)".to_owned()
            })?;
            let expression = &inner[..end];
            let (name, default) = match expression.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expression, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                let shown = if secret { "..." } else { name };
                return Err(format!(
                    "`${{{shown}}}` does not name an environment variable \
                     (letters, digits and underscores; write `$$` for a `$`)"
                ));
            }
            match (
                lookup(name).filter(|v| !(v.is_empty() && default.is_some())),
                default,
            ) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set: set it, or write \
                         `${{{name}:-default}}`"
                    ))
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (line, key, reason) =
            config_error("name: x\nstate:\n  type: postgresql\n  prot: 5432\n");
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
}
