//! Where and how to connect: connection strings, parts, the environment, TLS.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use postgres::config::{Host, SslMode as PgSslMode};

pub(crate) use crate::error::server::classify_connect;
use crate::error::{Error, Result};

mod connect;
mod conninfo;
mod identifier;
mod pooler;
mod tls;

pub(crate) use connect::{within_timeout, Abandoned};
pub(crate) use identifier::{validate_identifier, MAX_IDENTIFIER_BYTES};
pub use identifier::{DEFAULT_CHANNEL, DEFAULT_TABLE};
pub(crate) use pooler::listen_through_transaction_pooler;
pub use pooler::PoolerMode;
pub(crate) use tls::Dialer;
pub use tls::SslMode;
use tls::SSL_MODE_NAMES;

/// How to reach the server: host, port, database, credentials, TLS and
/// socket settings.
///
/// Build it from a connection string (`"postgresql://user:pass@host:5432/db"`
/// or `"host=localhost dbname=app"`) with [`str::parse`], from the
/// environment with [`ConnectOptions::from_env`], or from parts with
/// [`ConnectOptions::new`] and the setters.
///
/// Defaults: host `localhost`, port `5432`, user `postgres`, database the
/// user's name, `sslmode=prefer` (`verify-full` with `sslrootcert=system`), TCP keepalives on (idle 30 s, interval
/// 10 s, 3 probes), connect timeout 10 s, application name
/// `trebuchet-postgres`.
///
/// `Debug` never shows the password.
///
/// ```
/// use trebuchet_postgres::ConnectOptions;
///
/// let opts: ConnectOptions = "postgresql://app:secret@db.example.com:5433/game?sslmode=verify-full"
///     .parse()?;
/// assert_eq!(opts.get_port(), 5433);
/// assert!(!format!("{opts:?}").contains("secret"));
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
#[derive(Clone)]
pub struct ConnectOptions {
    pub(crate) pg: postgres::Config,
    /// `None` until set: then `prefer`, or `verify-full` with
    /// `sslrootcert=system`.
    ssl_mode: Option<SslMode>,
    ssl_root_cert: Option<PathBuf>,
    pooler: PoolerMode,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectOptions {
    /// Options with every default: `postgres@localhost:5432`, database `postgres`.
    pub fn new() -> Self {
        let mut pg = postgres::Config::new();
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .connect_timeout(Duration::from_secs(10))
            .application_name("trebuchet-postgres");
        ConnectOptions {
            pg,
            ssl_mode: None,
            ssl_root_cert: None,
            pooler: PoolerMode::None,
        }
    }

    /// Reads the environment, as the seed's deployments set it:
    /// `DATABASE_URL` when set, otherwise `POSTGRES_HOST` (default
    /// `localhost`), `POSTGRES_PORT` (5432), `POSTGRES_DATABASE`
    /// (`trebuchet`), `POSTGRES_USER` (`postgres`) and `POSTGRES_PASSWORD`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConnectionString`] when `DATABASE_URL` does not parse,
    /// [`Error::InvalidConfig`] when `POSTGRES_PORT` is not a port number.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Like [`from_env`](Self::from_env) with another source of variables
    /// (for example a configuration map).
    ///
    /// # Errors
    ///
    /// As [`from_env`](Self::from_env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        if let Some(url) = lookup("DATABASE_URL").filter(|u| !u.trim().is_empty()) {
            return url.parse();
        }
        let mut opts = ConnectOptions::new();
        opts.host(lookup("POSTGRES_HOST").as_deref().unwrap_or("localhost"));
        if let Some(port) = lookup("POSTGRES_PORT") {
            let port = port.trim().parse::<u16>().map_err(|_| {
                Error::invalid_config(format!(
                    "POSTGRES_PORT={port:?} is not a port number (1-65535)"
                ))
            })?;
            opts.port(port);
        }
        opts.dbname(
            lookup("POSTGRES_DATABASE")
                .as_deref()
                .unwrap_or("trebuchet"),
        );
        opts.user(lookup("POSTGRES_USER").as_deref().unwrap_or("postgres"));
        if let Some(password) = lookup("POSTGRES_PASSWORD") {
            opts.password(password);
        }
        Ok(opts)
    }

    /// Sets the host name, IP address, or Unix socket directory (a path
    /// starting with `/`). Replaces any hosts set before.
    pub fn host(&mut self, host: &str) -> &mut Self {
        let mut pg = postgres::Config::new();
        pg.host(host);
        copy_settings(&self.pg, &mut pg);
        for port in self.pg.get_ports() {
            pg.port(*port);
        }
        self.pg = pg;
        self
    }

    /// Sets the port (default 5432).
    pub fn port(&mut self, port: u16) -> &mut Self {
        let mut pg = postgres::Config::new();
        for host in self.pg.get_hosts() {
            match host {
                Host::Tcp(h) => pg.host(h),
                Host::Unix(p) => pg.host_path(p),
            };
        }
        for addr in self.pg.get_hostaddrs() {
            pg.hostaddr(*addr);
        }
        copy_settings(&self.pg, &mut pg);
        pg.port(port);
        self.pg = pg;
        self
    }

    /// Sets the database name (default: the user name).
    pub fn dbname(&mut self, dbname: &str) -> &mut Self {
        self.pg.dbname(dbname);
        self
    }

    /// Sets the user name (default `postgres`).
    pub fn user(&mut self, user: &str) -> &mut Self {
        self.pg.user(user);
        self
    }

    /// Sets the password. It never appears in `Debug` output or errors.
    pub fn password(&mut self, password: impl AsRef<[u8]>) -> &mut Self {
        self.pg.password(password);
        self
    }

    /// Sets the TLS mode (default [`SslMode::Prefer`], or
    /// [`SslMode::VerifyFull`] with the root certificate `system`).
    pub fn ssl_mode(&mut self, mode: SslMode) -> &mut Self {
        self.ssl_mode = Some(mode);
        self
    }

    /// Sets a PEM file of root certificates to check the server against
    /// (libpq's `sslrootcert`). `system` names the system's trusted roots,
    /// as in libpq 16: it needs [`SslMode::VerifyFull`], which is then the
    /// default mode; connecting with another mode set is an
    /// [`Error::InvalidConfig`].
    pub fn ssl_root_cert(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.ssl_root_cert = Some(path.into());
        self
    }

    /// Declares a connection pooler between the client and PostgreSQL
    /// (default [`PoolerMode::None`]). Through PgBouncer in transaction mode
    /// set [`PoolerMode::Transaction`]: statements are then sent unnamed,
    /// and a listener refuses these options.
    ///
    /// ```
    /// use trebuchet_postgres::{ConnectOptions, PoolerMode};
    ///
    /// let mut opts: ConnectOptions = "postgresql://app@pgbouncer:6432/game".parse()?;
    /// opts.pooler(PoolerMode::Transaction);
    /// assert_eq!(opts.get_pooler(), PoolerMode::Transaction);
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn pooler(&mut self, mode: PoolerMode) -> &mut Self {
        self.pooler = mode;
        self
    }

    /// The declared pooler.
    pub fn get_pooler(&self) -> PoolerMode {
        self.pooler
    }

    /// Sets `application_name`, shown in `pg_stat_activity`.
    pub fn application_name(&mut self, name: &str) -> &mut Self {
        self.pg.application_name(name);
        self
    }

    /// Sets the time allowed to establish one connection (default 10 s).
    pub fn connect_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.pg.connect_timeout(timeout);
        self
    }

    /// Sets TCP keepalives: idle time before the first probe, interval
    /// between probes, and probes before the connection is declared dead.
    /// With the defaults a dead peer is noticed within about a minute.
    pub fn keepalives(&mut self, idle: Duration, interval: Duration, retries: u32) -> &mut Self {
        self.pg
            .keepalives(true)
            .keepalives_idle(idle)
            .keepalives_interval(interval)
            .keepalives_retries(retries);
        self
    }

    /// Turns TCP keepalives off.
    pub fn disable_keepalives(&mut self) -> &mut Self {
        self.pg.keepalives(false);
        self
    }

    /// The TLS mode: the one set, otherwise [`SslMode::VerifyFull`] with the
    /// root certificate `system` and [`SslMode::Prefer`] without.
    pub fn get_ssl_mode(&self) -> SslMode {
        match self.ssl_mode {
            Some(mode) => mode,
            None if self.roots_are_the_systems() => SslMode::VerifyFull,
            None => SslMode::Prefer,
        }
    }

    /// The root certificate file, if one was set.
    pub fn get_ssl_root_cert(&self) -> Option<&Path> {
        self.ssl_root_cert.as_deref()
    }

    /// The first port (5432 unless set).
    pub fn get_port(&self) -> u16 {
        self.pg.get_ports().first().copied().unwrap_or(5432)
    }

    /// The database name, if set.
    pub fn get_dbname(&self) -> Option<&str> {
        self.pg.get_dbname()
    }

    /// The user name, if set.
    pub fn get_user(&self) -> Option<&str> {
        self.pg.get_user()
    }

    /// The host names or socket directories.
    pub fn get_hosts(&self) -> &[Host] {
        self.pg.get_hosts()
    }

    /// True when a password is set. The password itself is not readable
    /// through this type.
    pub fn has_password(&self) -> bool {
        self.pg.get_password().is_some()
    }

    /// `host:port` of the first host, for messages. Never holds credentials.
    pub fn target(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        format!("{host}:{}", self.get_port())
    }

    /// Opens one plain driver connection with these options, as the store
    /// and the listener open theirs: the same user, TLS (with
    /// `sslmode=allow`'s second attempt) and the driver's connect timeout.
    /// For statements of your own beside a store, such as administration
    /// or tests.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] saying why (never with the password),
    /// [`Error::Tls`] when TLS cannot be set up.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use trebuchet_postgres::ConnectOptions;
    ///
    /// let mut client = ConnectOptions::from_env()?.connect()?;
    /// let row = client.query_one("SELECT current_user::TEXT", &[])?;
    /// println!("connected as {}", row.get::<_, String>(0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connect(&self) -> Result<postgres::Client> {
        self.dialer()?.open(&self.target())
    }

    /// The underlying driver configuration with this crate's defaults filled
    /// in, ready to connect.
    pub(crate) fn driver_config(&self) -> postgres::Config {
        let mut pg = self.pg.clone();
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            pg.user("postgres");
        }
        pg.ssl_mode(match self.get_ssl_mode() {
            // Plain text first; see `Dialer::connect`.
            SslMode::Disable | SslMode::Allow => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        pg
    }
}

/// Copies every setting but hosts, host addresses and ports.
fn copy_settings(from: &postgres::Config, to: &mut postgres::Config) {
    if let Some(u) = from.get_user() {
        to.user(u);
    }
    if let Some(p) = from.get_password() {
        to.password(p);
    }
    if let Some(d) = from.get_dbname() {
        to.dbname(d);
    }
    if let Some(o) = from.get_options() {
        to.options(o);
    }
    if let Some(a) = from.get_application_name() {
        to.application_name(a);
    }
    if let Some(t) = from.get_connect_timeout() {
        to.connect_timeout(*t);
    }
    if let Some(t) = from.get_tcp_user_timeout() {
        to.tcp_user_timeout(*t);
    }
    to.keepalives(from.get_keepalives())
        .keepalives_idle(from.get_keepalives_idle());
    if let Some(i) = from.get_keepalives_interval() {
        to.keepalives_interval(i);
    }
    if let Some(r) = from.get_keepalives_retries() {
        to.keepalives_retries(r);
    }
    to.target_session_attrs(from.get_target_session_attrs())
        .channel_binding(from.get_channel_binding())
        .load_balance_hosts(from.get_load_balance_hosts());
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("hosts", &self.pg.get_hosts())
            .field("ports", &self.pg.get_ports())
            .field("dbname", &self.pg.get_dbname())
            .field("user", &self.pg.get_user())
            .field("password", &self.pg.get_password().map(|_| "<redacted>"))
            .field("ssl_mode", &self.get_ssl_mode())
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("application_name", &self.pg.get_application_name())
            .field("pooler", &self.pooler)
            .finish_non_exhaustive()
    }
}

impl FromStr for ConnectOptions {
    type Err = Error;

    /// Parses a `postgresql://` / `postgres://` URL or a libpq key=value
    /// string, as libpq reads them. Nothing is contacted. Errors name a key
    /// or a byte position, never any of the text, which may hold a password.
    fn from_str(s: &str) -> Result<Self> {
        let split = conninfo::split(s)?;
        let pg = split.config;
        let mut opts = ConnectOptions::new();
        copy_settings(&pg, &mut opts.pg);
        // Our defaults win only where the string said nothing.
        if pg.get_application_name().is_none() {
            opts.pg.application_name("trebuchet-postgres");
        }
        if pg.get_connect_timeout().is_none() {
            opts.pg.connect_timeout(Duration::from_secs(10));
        }
        if !split.keepalives {
            opts.pg
                .keepalives(true)
                .keepalives_idle(Duration::from_secs(30))
                .keepalives_interval(Duration::from_secs(10))
                .keepalives_retries(3);
        }
        for host in pg.get_hosts() {
            match host {
                Host::Tcp(h) => opts.pg.host(h),
                Host::Unix(p) => opts.pg.host_path(p),
            };
        }
        for addr in pg.get_hostaddrs() {
            opts.pg.hostaddr(*addr);
        }
        for port in pg.get_ports() {
            opts.pg.port(*port);
        }
        for (key, value, at) in split.ours {
            match key {
                "sslmode" => {
                    opts.ssl_mode = Some(value.parse().map_err(|_| {
                        Error::invalid_connection_string(format!(
                            "unknown sslmode at byte {at}: use {SSL_MODE_NAMES}"
                        ))
                    })?)
                }
                _ if value.is_empty() => opts.ssl_root_cert = None,
                _ => opts.ssl_root_cert = Some(PathBuf::from(value)),
            }
        }
        opts.check_tls_rules()?;
        Ok(opts)
    }
}

#[cfg(test)]
mod tests;
