//! TLS: the modes with libpq's meanings, the rule for the system's roots,
//! the connector, and the second attempt of `sslmode=allow`.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use postgres::config::SslMode as PgSslMode;
use postgres_native_tls::MakeTlsConnector;
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;

use super::ConnectOptions;
use crate::error::{Error, Result};

/// TLS mode, with libpq's meanings.
///
/// | mode | encrypts | checks the certificate chain | checks the host name |
/// |---|---|---|---|
/// | `Disable` | no | – | – |
/// | `Allow` | only if the server refuses plain text | no | no |
/// | `Prefer` (default) | if the server offers it | no | no |
/// | `Require` | yes | only when a root certificate is given | no |
/// | `VerifyCa` | yes | yes | no |
/// | `VerifyFull` | yes | yes | yes |
///
/// `VerifyCa` and `VerifyFull` check against
/// [`ConnectOptions::ssl_root_cert`] when set, otherwise against the system's
/// trusted roots. As in libpq 16, the root certificate `system` names the
/// system's trusted roots and goes with `VerifyFull` only: it is then the
/// default mode, and any other mode with it is an
/// [`Error::InvalidConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Connect in plain text; only when the server refuses that (its
    /// `pg_hba.conf` has only `hostssl` lines for the client), connect again
    /// with TLS, without checking certificates.
    Allow,
    /// Use TLS when the server supports it, without checking certificates.
    #[default]
    Prefer,
    /// Always use TLS; check the certificate only when a root certificate is given.
    Require,
    /// Always use TLS and check the certificate chain, not the host name.
    VerifyCa,
    /// Always use TLS and check both the certificate chain and the host name.
    VerifyFull,
}

/// The `sslmode` values, for messages.
pub(super) const SSL_MODE_NAMES: &str = "disable, allow, prefer, require, verify-ca or verify-full";

impl SslMode {
    /// libpq's name of the mode (`verify-full`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "allow" => Ok(SslMode::Allow),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(Error::invalid_connection_string(format!(
                "unknown sslmode {other:?}: use {SSL_MODE_NAMES}"
            ))),
        }
    }
}

impl ConnectOptions {
    /// Whether the root certificate is `system`: the system's trusted roots.
    pub(super) fn roots_are_the_systems(&self) -> bool {
        self.ssl_root_cert
            .as_ref()
            .is_some_and(|path| path.as_os_str() == "system")
    }

    /// libpq's rule: `sslrootcert=system` goes with `verify-full` only, since
    /// any certificate a public authority signed for any name would pass a
    /// weaker check.
    pub(crate) fn check_tls_rules(&self) -> Result<()> {
        match self.get_ssl_mode() {
            SslMode::VerifyFull => Ok(()),
            _ if !self.roots_are_the_systems() => Ok(()),
            mode => Err(Error::invalid_config(format!(
                "sslrootcert=system needs sslmode=verify-full (libpq's rule: the system's \
                 roots vouch for any public name, so the host name must be checked too), \
                 and sslmode is {}: remove sslmode or set it to verify-full",
                mode.name()
            ))),
        }
    }

    /// Builds the TLS connector for these options. Build it once and share
    /// it: each one costs up to a megabyte and tens of milliseconds. A
    /// connector that checks nothing (`disable`, `allow`, `prefer`, `require` without
    /// a root certificate) is built once per process and loads no root
    /// certificates at all.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for `sslrootcert=system` without
    /// `verify-full`, [`Error::Tls`] for an unreadable root certificate.
    pub(crate) fn tls_connector(&self) -> Result<postgres_native_tls::MakeTlsConnector> {
        self.check_tls_rules()?;
        let root = self
            .ssl_root_cert
            .as_ref()
            .filter(|_| !self.roots_are_the_systems());
        let mode = self.get_ssl_mode();
        let verifies = match mode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => false,
            SslMode::Require => root.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        };
        if !verifies {
            static UNVERIFIED: OnceLock<postgres_native_tls::MakeTlsConnector> = OnceLock::new();
            if let Some(connector) = UNVERIFIED.get() {
                return Ok(connector.clone());
            }
            let connector = native_tls::TlsConnector::builder()
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true)
                .disable_built_in_roots(true)
                .build()
                .map_err(|e| Error::Tls(Box::new(e)))?;
            let connector = postgres_native_tls::MakeTlsConnector::new(connector);
            return Ok(UNVERIFIED.get_or_init(|| connector).clone());
        }
        let mut builder = native_tls::TlsConnector::builder();
        if let Some(path) = root {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Tls(format!("cannot read sslrootcert {}: {e}", path.display()).into())
            })?;
            let cert =
                native_tls::Certificate::from_pem(&pem).map_err(|e| Error::Tls(Box::new(e)))?;
            builder
                .add_root_certificate(cert)
                .disable_built_in_roots(true);
        }
        if mode != SslMode::VerifyFull {
            // require with a root certificate, and verify-ca: the chain only.
            builder.danger_accept_invalid_hostnames(true);
        }
        let connector = builder.build().map_err(|e| Error::Tls(Box::new(e)))?;
        Ok(postgres_native_tls::MakeTlsConnector::new(connector))
    }

    /// The driver configuration and the TLS connector, to open connections
    /// with.
    ///
    /// # Errors
    ///
    /// As [`tls_connector`](Self::tls_connector).
    pub(crate) fn dialer(&self) -> Result<Dialer> {
        let config = self.driver_config();
        let tls = self.tls_connector()?;
        let tls_after_refusal = (self.get_ssl_mode() == SslMode::Allow).then(|| {
            let mut with_tls = config.clone();
            with_tls.ssl_mode(PgSslMode::Require);
            Arc::new(PostgresConnectionManager::new(with_tls, tls.clone()))
        });
        Ok(Dialer {
            first: Arc::new(PostgresConnectionManager::new(config.clone(), tls)),
            config,
            tls_after_refusal,
        })
    }
}

/// Opens driver connections for one [`ConnectOptions`], with libpq's second
/// attempt under `sslmode=allow`.
#[derive(Clone)]
pub(crate) struct Dialer {
    /// The driver's configuration (plain text first under `allow`).
    pub(crate) config: postgres::Config,
    /// Opens the first attempt, as the pool's manager.
    first: Arc<PostgresConnectionManager<MakeTlsConnector>>,
    /// `allow`: when the server refuses the plain connection, the attempt
    /// with TLS.
    tls_after_refusal: Option<Arc<PostgresConnectionManager<MakeTlsConnector>>>,
}

impl Dialer {
    /// Connects. Under `allow`, a plain connection the server refused (an
    /// error response during startup, such as no `pg_hba.conf` line for an
    /// unencrypted connection) is made again with TLS, as libpq does; when
    /// that attempt fails without the server answering (it offers no TLS),
    /// the plain attempt's error is the one returned.
    pub(crate) fn connect(&self) -> std::result::Result<postgres::Client, postgres::Error> {
        match self.first.connect() {
            Err(plain) if self.tls_after_refusal.is_some() && plain.as_db_error().is_some() => {
                let with_tls = self.tls_after_refusal.as_ref().expect("checked above");
                match with_tls.connect() {
                    Err(tls) if tls.as_db_error().is_none() => Err(plain),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// [`connect`](Self::connect), failing with [`Error::Connect`] for
    /// `target` (`host:port`, for messages).
    pub(crate) fn open(&self, target: &str) -> Result<postgres::Client> {
        self.connect().map_err(|e| Error::Connect {
            failure: super::classify_connect(&e),
            target: target.to_owned(),
            user: self.config.get_user().unwrap_or("postgres").to_owned(),
            source: Some(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_starts_in_plain_text_and_may_try_again_with_tls() {
        let o: ConnectOptions = "host=h sslmode=allow".parse().unwrap();
        assert_eq!(o.get_ssl_mode(), SslMode::Allow);
        let dialer = o.dialer().unwrap();
        assert_eq!(dialer.config.get_ssl_mode(), PgSslMode::Disable);
        assert!(dialer.tls_after_refusal.is_some());
        for other in ["disable", "prefer", "require"] {
            let o: ConnectOptions = format!("host=h sslmode={other}").parse().unwrap();
            assert!(o.dialer().unwrap().tls_after_refusal.is_none(), "{other}");
        }
    }

    #[test]
    fn system_roots_make_verify_full_the_default_and_refuse_other_modes() {
        let mut o = ConnectOptions::new();
        o.ssl_root_cert("system");
        assert_eq!(o.get_ssl_mode(), SslMode::VerifyFull);
        assert!(o.tls_connector().is_ok());
        o.ssl_mode(SslMode::Require);
        let err = o
            .tls_connector()
            .err()
            .expect("require with the system's roots");
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
        assert!(err.to_string().contains("sslmode is require"), "{err}");
        o.ssl_mode(SslMode::VerifyFull);
        assert!(o.tls_connector().is_ok());
        // A file that happens to be called system elsewhere is a path.
        o.ssl_root_cert("./system").ssl_mode(SslMode::Require);
        assert!(o.check_tls_rules().is_ok());
    }
}
