//! Reading the `state:` section: YAML nodes to a [`StateConfig`], with the
//! line and key of every problem.

use std::path::PathBuf;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use super::expand::expand;
use super::keys::{unknown_key_reason, KEYS, PARTS, SECRET};
use super::{ConnectionSource, StateConfig};
use crate::codec::Codec;
use crate::config::{validate_identifier, ConnectOptions, SslMode, DEFAULT_CHANNEL, DEFAULT_TABLE};
use crate::error::{Error, Result};
use crate::schema::Names;

/// The largest `poolSize` accepted.
const MAX_POOL_SIZE: i64 = 1000;

/// Parses one document; `lookup` reads environment variables.
pub(super) struct Parser<L> {
    pub(super) origin: String,
    pub(super) base_dir: Option<PathBuf>,
    pub(super) lookup: L,
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

    pub(super) fn parse(&self, text: &str) -> Result<StateConfig> {
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
