//! `sslmode=allow` and `sslrootcert=system` with libpq's meanings, against
//! throwaway clusters serving TLS with openssl-made certificates: `allow`
//! tries plain text first and TLS only when the server refuses it, and
//! `sslrootcert=system` trusts the system's roots and goes with
//! `verify-full` only.

mod common;

use common::tls::{make_certificates, sessions, tls_cluster};
use common::{admin, rewrite_hba};

use std::path::Path;

use trebuchet_postgres::{
    ChangeListener, ConnectFailure, ConnectOptions, Error, Pool, PoolOptions, SslMode, StateConfig,
};

/// Options for the cluster at `port` with these TLS settings and this
/// `application_name`.
fn options(settings: &str, port: u16, app: &str) -> ConnectOptions {
    format!(
        "{settings} port={port} user=postgres dbname=postgres \
         application_name={app} connect_timeout=5"
    )
    .parse()
    .unwrap_or_else(|e| panic!("{settings:?} does not parse: {e}"))
}

#[test]
fn allow_tries_plain_text_first_and_tls_when_refused() {
    let certs = make_certificates();
    let cluster = tls_cluster(&certs);
    let mut admin = admin(&cluster);
    let port = cluster.port();
    assert_eq!(
        options("host=localhost sslmode=allow", port, "x").get_ssl_mode(),
        SslMode::Allow
    );

    // A server that accepts both: plain text, for the pool and the listener.
    let app = common::unique("allow_plain");
    let pool = Pool::new(
        options("host=localhost sslmode=allow", port, &app),
        PoolOptions::default().max_size(1),
    )
    .expect("allow connects to a server that accepts plain text");
    let listener = ChangeListener::builder()
        .connect_options(options("host=localhost sslmode=allow", port, &app))
        .build()
        .expect("a listener connects with allow");
    let (all, encrypted) = sessions(&mut admin, &app);
    assert!(all >= 2, "{all} sessions for the pool and the listener");
    assert_eq!(
        encrypted, 0,
        "allow encrypted {encrypted} of {all} sessions"
    );
    drop((pool, listener));

    // A server that accepts only TLS (hostssl): allow falls back to it.
    rewrite_hba(
        &cluster,
        &mut admin,
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostssl all all ::1/128 trust\n",
    );
    let app = common::unique("allow_fallback");
    let pool = Pool::new(
        options("host=localhost sslmode=allow", port, &app),
        PoolOptions::default().max_size(1),
    )
    .expect("allow falls back to TLS when plain text is refused");
    let listener = ChangeListener::builder()
        .connect_options(options("host=localhost sslmode=allow", port, &app))
        .build()
        .expect("a listener falls back to TLS with allow");
    let (all, encrypted) = sessions(&mut admin, &app);
    assert!(all >= 2, "{all} sessions for the pool and the listener");
    assert_eq!(
        encrypted, all,
        "allow encrypted {encrypted} of {all} sessions"
    );
    drop((pool, listener));

    // disable does not fall back.
    let app = common::unique("disable_refused");
    match Pool::new(
        options("host=localhost sslmode=disable", port, &app),
        PoolOptions::default().max_size(1),
    ) {
        Err(Error::Connect { .. }) => {}
        other => panic!("disable against a hostssl-only server: {other:?}"),
    }
}

#[track_caller]
fn assert_names_the_rule(what: &str, result: trebuchet_postgres::Result<impl std::fmt::Debug>) {
    match result {
        Err(err @ Error::InvalidConfig { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("sslrootcert=system") && text.contains("verify-full"),
                "{what}: the message should name the rule: {text}"
            );
            assert!(err.is_invalid_input(), "{what}");
        }
        other => panic!("{what}: expected Error::InvalidConfig, got {other:?}"),
    }
}

#[test]
fn sslrootcert_system_goes_with_verify_full_only() {
    for mode in ["require", "verify-ca", "prefer", "allow", "disable"] {
        for text in [
            format!("host=localhost sslrootcert=system sslmode={mode}"),
            format!("host=localhost sslmode={mode} sslrootcert=system"),
            format!("postgresql://localhost/db?sslrootcert=system&sslmode={mode}"),
        ] {
            assert_names_the_rule(&text, text.parse::<ConnectOptions>());
        }
        let yaml = format!("state:\n  host: localhost\n  sslmode: {mode}\n  sslrootcert: system\n");
        match StateConfig::from_yaml_with_env(&yaml, |_| None) {
            Err(err @ Error::ConfigFile { .. }) => {
                let text = err.to_string();
                assert!(
                    text.contains("sslrootcert=system") && text.contains("verify-full"),
                    "{yaml:?}: {text}"
                );
            }
            other => panic!("{yaml:?}: expected Error::ConfigFile, got {other:?}"),
        }
    }
    // Set in parts, the rule holds when connecting; nothing is contacted.
    for mode in [
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::Prefer,
        SslMode::Allow,
        SslMode::Disable,
    ] {
        let mut options = ConnectOptions::new();
        options
            .host("127.0.0.1")
            .port(1)
            .ssl_mode(mode)
            .ssl_root_cert("system");
        assert_names_the_rule(
            &format!("{mode:?} in parts"),
            Pool::new(options, PoolOptions::default()),
        );
    }
    // Without sslmode, sslrootcert=system means verify-full.
    for text in [
        "host=localhost sslrootcert=system",
        "postgresql://localhost/db?sslrootcert=system",
        "host=localhost sslrootcert=system sslmode=verify-full",
    ] {
        let options: ConnectOptions = text.parse().unwrap();
        assert_eq!(options.get_ssl_mode(), SslMode::VerifyFull, "{text}");
        assert_eq!(options.get_ssl_root_cert(), Some(Path::new("system")));
    }
    let mut options = ConnectOptions::new();
    options.ssl_root_cert("system");
    assert_eq!(options.get_ssl_mode(), SslMode::VerifyFull);
    // In a configuration file, `system` is not a path next to the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trebuchet.yaml");
    std::fs::write(&file, "state:\n  host: localhost\n  sslrootcert: system\n").unwrap();
    let config = StateConfig::from_file(&file).unwrap();
    assert_eq!(
        config.connect_options().get_ssl_root_cert(),
        Some(Path::new("system"))
    );
    assert_eq!(config.connect_options().get_ssl_mode(), SslMode::VerifyFull);
}

#[test]
fn sslrootcert_system_checks_against_the_system_roots() {
    let certs = make_certificates();
    let cluster = tls_cluster(&certs);
    let port = cluster.port();
    // The test CA is in no system store: verification fails.
    for settings in [
        "host=localhost sslrootcert=system",
        "host=localhost sslrootcert=system sslmode=verify-full",
    ] {
        let app = common::unique("system_roots");
        match Pool::new(
            options(settings, port, &app),
            PoolOptions::default().max_size(1),
        ) {
            Err(
                err @ Error::Connect {
                    failure: ConnectFailure::Tls,
                    ..
                },
            ) => assert!(err.to_string().contains("sslrootcert"), "{err}"),
            other => panic!("{settings}: expected a TLS failure, got {other:?}"),
        }
        let listener = ChangeListener::builder()
            .connect_options(options(settings, port, &app))
            .build();
        assert!(
            matches!(
                listener,
                Err(Error::Connect {
                    failure: ConnectFailure::Tls,
                    ..
                })
            ),
            "{settings}: the listener should fail verification: {:?}",
            listener.err()
        );
    }
    // The same server with its CA given connects, encrypted.
    let ca = certs.ca.to_str().unwrap();
    let app = common::unique("own_ca");
    let pool = Pool::new(
        options(
            &format!("host=localhost sslmode=verify-full sslrootcert={ca}"),
            port,
            &app,
        ),
        PoolOptions::default().max_size(1),
    )
    .expect("verify-full with the test CA");
    let (all, encrypted) = sessions(&mut admin(&cluster), &app);
    assert!(
        all >= 1 && encrypted == all,
        "{encrypted} of {all} encrypted"
    );
    drop(pool);
}
