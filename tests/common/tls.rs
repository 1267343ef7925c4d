//! Certificates for the TLS tests, made with the `openssl` command: a CA,
//! a server certificate it signed, and an unrelated CA.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use postgres::Client;
use trebuchet_postgres::testing::TestCluster;

/// Runs `openssl` with `args` in `dir`, failing the test loudly when openssl
/// is missing or fails: the TLS test must never pass without running.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the TLS test needs the `openssl` command, which could not be run ({e}); \
                 install it (Debian: apt-get install openssl)"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The uid and gid the server runs as: `postgres` when we are root.
fn server_owner() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    Some((
        id(&["-u", "postgres"]).expect("a postgres user"),
        id(&["-g", "postgres"]).expect("a postgres group"),
    ))
}

/// The files [`make_certificates`] made, removed with the value.
pub struct Certificates {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A CA, a server certificate it signed for `localhost` and 127.0.0.1, and
/// an unrelated CA.
pub fn make_certificates() -> Certificates {
    let dir = tempfile::Builder::new()
        .prefix("trebuchet-tls-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    // The server must reach its files.
    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        d.join("server.ext"),
        "basicConstraints = CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = DNS:localhost, IP:127.0.0.1\n",
    )
    .unwrap();
    for ca in ["ca", "other-ca"] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=trebuchet test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "4242",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    let certs = Certificates {
        ca: d.join("ca.pem"),
        other_ca: d.join("other-ca.pem"),
        server_cert: d.join("server.pem"),
        server_key: d.join("server.key"),
        _dir: dir,
    };
    fs::set_permissions(&certs.server_cert, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&certs.server_key, fs::Permissions::from_mode(0o600)).unwrap();
    if let Some((uid, gid)) = server_owner() {
        for file in [&certs.server_cert, &certs.server_key] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
        }
    }
    certs
}

/// A cluster serving TLS with `certs`' server certificate, next to plain
/// connections (its `pg_hba.conf` has `host` lines).
pub fn tls_cluster(certs: &Certificates) -> TestCluster {
    let cert = certs.server_cert.to_str().unwrap();
    let key = certs.server_key.to_str().unwrap();
    TestCluster::start_with(&[
        ("fsync", "off"),
        ("ssl", "on"),
        ("ssl_cert_file", cert),
        ("ssl_key_file", key),
    ])
    .expect("start a cluster with TLS")
}

/// Sessions with this `application_name`: (all, encrypted).
pub fn sessions(admin: &mut Client, application_name: &str) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1",
            &[&application_name],
        )
        .unwrap();
    (row.get(0), row.get(1))
}
