//! The machine's PostgreSQL: where its server binaries are, and the user
//! that runs them when this process is root.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::other;

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(super) fn current_uid() -> io::Result<u32> {
    command_output("id", &["-u"])
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| other("cannot run `id -u`".into()))
}

pub(super) fn postgres_ids() -> io::Result<(u32, u32)> {
    let uid = command_output("id", &["-u", "postgres"]).and_then(|s| s.parse().ok());
    let gid = command_output("id", &["-g", "postgres"]).and_then(|s| s.parse().ok());
    match (uid, gid) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(other(
            "running as root, but there is no `postgres` user to run PostgreSQL as \
             (PostgreSQL refuses to run as root): install PostgreSQL or create the user"
                .into(),
        )),
    }
}

pub(super) fn find_bindir() -> io::Result<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    if let Some(dir) = command_output("pg_config", &["--bindir"]).map(PathBuf::from) {
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    Err(other(
        "cannot find PostgreSQL's initdb: install PostgreSQL (Debian: apt-get install postgresql), \
         set PG_BINDIR, or set TEST_DATABASE_URL to a running server"
            .into(),
    ))
}
