//! Where to connect and what to work on: `--url`, the config file or the
//! environment, then `--table`, `--channel` and `--codec` on top.

use std::path::Path;

use trebuchet_postgres::{
    Codec, ConnectOptions, ConnectionSource, PoolOptions, SslMode, StateConfig, StateStore,
    StateStoreBuilder, DEFAULT_CHANNEL, DEFAULT_MAX_STATE_SIZE, DEFAULT_TABLE,
};

use crate::args::{CodecArg, Global};
use crate::fail::Failure;

/// The config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "trebuchet.yaml";

/// The pool size when the config file gives none: a command needs one
/// connection, and `watch` one more of its own.
const POOL_SIZE: u32 = 2;

/// The resolved settings of one run.
#[derive(Debug)]
pub struct Settings {
    url: Option<String>,
    config: Option<StateConfig>,
    pub table: String,
    pub channel: String,
    pub codec: Codec,
    /// The largest state the store accepts, in bytes; also how much of
    /// standard input `put` reads at most.
    pub max_state_size: usize,
}

impl Settings {
    /// Reads the config file (when there is one) and applies the flags.
    /// Connects to nothing.
    pub fn resolve(global: &Global) -> Result<Settings, Failure> {
        let config = match (&global.config, global.no_config) {
            (_, true) => None,
            (Some(path), false) => Some(StateConfig::from_file(path)?),
            (None, false) if Path::new(DEFAULT_CONFIG).is_file() => {
                Some(StateConfig::from_file(DEFAULT_CONFIG)?)
            }
            (None, false) => None,
        };
        let table = global
            .table
            .clone()
            .or_else(|| config.as_ref().map(|c| c.table().to_owned()))
            .unwrap_or_else(|| DEFAULT_TABLE.to_owned());
        let channel = global
            .channel
            .clone()
            .or_else(|| config.as_ref().map(|c| c.channel().to_owned()))
            .unwrap_or_else(|| DEFAULT_CHANNEL.to_owned());
        let codec = match global.codec {
            Some(CodecArg::Cbor) => Codec::Cbor,
            Some(CodecArg::Json) => Codec::Json,
            None => config
                .as_ref()
                .map_or_else(Codec::default, StateConfig::codec),
        };
        Ok(Settings {
            url: global.url.clone(),
            config,
            table,
            channel,
            codec,
            max_state_size: DEFAULT_MAX_STATE_SIZE,
        })
    }

    /// Where to connect, and where that was said.
    pub fn connect_options(&self) -> Result<(ConnectOptions, String), Failure> {
        if let Some(url) = &self.url {
            return Ok((url.parse::<ConnectOptions>()?, "--url".to_owned()));
        }
        if let Some(config) = &self.config {
            let what = match config.connection_source() {
                ConnectionSource::ConnectionString => "its connectionString".to_owned(),
                ConnectionSource::Parts => "its host, port, database and username".to_owned(),
                _ => format!("the environment ({})", environment_source()),
            };
            return Ok((
                config.connect_options().clone(),
                format!("{}, {what}", config.origin()),
            ));
        }
        let options = ConnectOptions::from_env()
            .map_err(|e| Failure::error(format!("{e} (settings from {})", environment_source())))?;
        Ok((options, environment_source()))
    }

    /// A store builder with every setting; not yet connected.
    pub fn builder(&self) -> Result<(StateStoreBuilder, String), Failure> {
        let (options, source) = self.connect_options()?;
        let pool_size = self
            .config
            .as_ref()
            .and_then(StateConfig::pool_size)
            .unwrap_or(POOL_SIZE);
        let builder = StateStore::builder()
            .connect_options(options)
            .pool_options(PoolOptions::default().max_size(pool_size))
            .table(self.table.clone())
            .channel(self.channel.clone())
            .codec(self.codec)
            .max_state_size(self.max_state_size);
        Ok((builder, source))
    }

    /// Connects.
    pub fn store(&self) -> Result<Connected, Failure> {
        self.store_with(|builder| builder)
    }

    /// Connects, with more settings on the builder.
    pub fn store_with(
        &self,
        more: impl FnOnce(StateStoreBuilder) -> StateStoreBuilder,
    ) -> Result<Connected, Failure> {
        let (builder, source) = self.builder()?;
        let store = more(builder)
            .build()
            .map_err(|e| Failure::from_store(e, &source))?;
        Ok(Connected { store, source })
    }
}

/// A connected store and where its settings came from, for messages.
pub struct Connected {
    pub store: StateStore,
    pub source: String,
}

impl Connected {
    /// A library error as a failure that names the settings' source.
    pub fn fail(&self, error: trebuchet_postgres::Error) -> Failure {
        Failure::from_store(error, &self.source)
    }
}

/// Which environment variables say where to connect.
fn environment_source() -> String {
    let set = |key: &str| std::env::var(key).is_ok_and(|v| !v.trim().is_empty());
    if set("DATABASE_URL") {
        "DATABASE_URL".to_owned()
    } else if [
        "POSTGRES_HOST",
        "POSTGRES_PORT",
        "POSTGRES_DATABASE",
        "POSTGRES_USER",
    ]
    .iter()
    .any(|key| set(key))
    {
        "the POSTGRES_* variables".to_owned()
    } else {
        "the defaults: no --url, config file, DATABASE_URL or POSTGRES_* variables".to_owned()
    }
}

/// `user@host:port/database (sslmode=..., password set)`, never the password.
pub fn describe(options: &ConnectOptions) -> String {
    format!(
        "{}@{}/{} (sslmode={}{})",
        options.get_user().unwrap_or("postgres"),
        options.target(),
        options
            .get_dbname()
            .unwrap_or_else(|| options.get_user().unwrap_or("postgres")),
        ssl_mode_name(options.get_ssl_mode()),
        if options.has_password() {
            ", password set"
        } else {
            ""
        }
    )
}

pub fn ssl_mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
        _ => "other",
    }
}
