//! The `state:` section of the seed's `trebuchet.yaml`, from which a
//! program builds its [`StateStore`] and [`ChangeListener`].
//!
//! Only `state:` is read, strictly: an unknown key or a wrong type is an
//! error naming the key and its line. The file's other top-level keys
//! (`name`, `version`, `actors`, ...) belong to other tools and are ignored.

use std::path::Path;

use crate::codec::Codec;
use crate::config::ConnectOptions;
use crate::error::{Error, Result};
use crate::listener::{ChangeListener, ChangeListenerBuilder};
use crate::pool::PoolOptions;
use crate::store::{StateStore, StateStoreBuilder};

mod expand;
mod keys;
mod parser;

use parser::Parser;

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

#[cfg(test)]
mod tests;
