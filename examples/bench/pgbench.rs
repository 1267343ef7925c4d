//! pgbench: finding it, its scripts, and its runs.

use super::*;

// ----- pgbench ---------------------------------------------------------------

pub(crate) fn find_pgbench() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("pgbench");
            if path.is_file() {
                return Some(path);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin/pgbench")))
        })
        .filter(|(_, path)| path.is_file())
        .collect();
    versions.sort();
    if let Some((_, path)) = versions.pop() {
        return Some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("pgbench"))
        .find(|path| path.is_file())
}

pub(crate) struct Pgbench {
    pub(crate) path: PathBuf,
    /// Connection arguments: `-h 127.0.0.1 -p PORT -U postgres postgres`, or
    /// the URL as the database name (libpq expands it).
    pub(crate) conn_args: Vec<String>,
    pub(crate) dir: PathBuf,
}

#[derive(Debug, Clone)]
pub(crate) struct PgbenchRun {
    /// From the `tps = ...` line (without initial connection time).
    pub(crate) tps: f64,
    pub(crate) latency_avg_ms: f64,
    pub(crate) processed: u64,
    pub(crate) failed: u64,
    /// pgbench's own CPU time (user + system), seconds.
    pub(crate) cpu_secs: f64,
}

impl Pgbench {
    pub(crate) fn run(
        &self,
        name: &str,
        script: &str,
        clients: usize,
        seconds: u64,
        defines: &[(&str, String)],
    ) -> Result<PgbenchRun, String> {
        let file = self.dir.join(format!("{name}.sql"));
        std::fs::write(&file, script).map_err(|e| format!("cannot write {file:?}: {e}"))?;
        let mut cmd = Command::new(&self.path);
        cmd.args(["-n", "-M", "prepared"])
            .args(["-c", &clients.to_string()])
            .args(["-j", &clients.min(2).to_string()])
            .args(["-T", &seconds.to_string()])
            .arg("-f")
            .arg(&file);
        for (key, value) in defines {
            cmd.arg("-D").arg(format!("{key}={value}"));
        }
        cmd.args(&self.conn_args);
        let before = cpu_times().1;
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.path.display()))?;
        let cpu_secs = cpu_times().1 - before;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "pgbench failed ({}):\n{stdout}{stderr}",
                out.status
            ));
        }
        let field = |prefix: &str| -> Option<f64> {
            stdout.lines().find_map(|line| {
                let rest = line.trim().strip_prefix(prefix)?;
                rest.split_whitespace().next()?.parse().ok()
            })
        };
        // PostgreSQL 14+: "tps = N (without initial connection time)";
        // older: "tps = N (excluding connections establishing)".
        let tps = stdout
            .lines()
            .filter(|l| l.starts_with("tps = "))
            .find(|l| l.contains("without initial connection") || l.contains("excluding"))
            .and_then(|l| l["tps = ".len()..].split_whitespace().next()?.parse().ok());
        match (tps, field("latency average =")) {
            (Some(tps), Some(latency_avg_ms)) => Ok(PgbenchRun {
                tps,
                latency_avg_ms,
                processed: field("number of transactions actually processed:").unwrap_or(0.0)
                    as u64,
                failed: field("number of failed transactions:").unwrap_or(0.0) as u64,
                cpu_secs,
            }),
            _ => Err(format!("cannot parse pgbench's output:\n{stdout}{stderr}")),
        }
    }
}

/// The pgbench script of `op`: the library's statement with `:id` for the
/// actor id and a bytea literal for the state.
pub(crate) fn pgbench_script(op: Op, sql: &LibrarySql, bytea: &str, threads: usize) -> String {
    // A random write id, as the library draws one per write.
    let write_id = "\\set w random(1, 9223372036854775806)\n";
    let bind = |statement: &str| {
        statement
            .replace("$1", ":id")
            .replace("$2", bytea)
            .replace("$3", ":w")
            // No time to live.
            .replace("$4", "NULL")
    };
    // The ids of client c: 1 + c, 1 + c + T, ... (the library's threads use
    // the same sets).
    let own_id = format!(
        "\\set id 1 + :client_id + {threads} * random(0, {} - 1)\n",
        ACTORS / threads as u64
    );
    match op {
        Op::Load | Op::LoadDriver | Op::LoadWire => {
            format!("\\set id random(1, {ACTORS})\n{};\n", bind(&sql.load))
        }
        Op::Save | Op::SaveGrouped => {
            format!(
                "\\set id random(1, {ACTORS})\n{write_id}{};\n",
                bind(&sql.save)
            )
        }
        // No literal can carry the expected sequence: read it in a subselect
        // of the same statement (one more index lookup than the library).
        Op::SaveIf => format!(
            "{own_id}{write_id}{};\n",
            sql.save_if_sequence
                .replace("$1", ":id")
                .replace("$2", bytea)
                .replace("$4", ":w")
                .replace("$5", "NULL")
                .replace(
                    "$3",
                    &format!(
                        "(SELECT sequence_number FROM {} WHERE actor_id = :id::VARCHAR)",
                        quote_identifier(TABLE)
                    )
                )
        ),
        // The library's two round trips: read the version, write if unchanged.
        Op::Transform | Op::TransformContended => {
            let id = if op == Op::Transform {
                own_id
            } else {
                format!("\\set id {CONTENDED_ID}\n")
            };
            format!(
                "{id}{write_id}{} \\gset\n{};\n",
                sql.load_versioned.replace("$1", ":id"),
                sql.save_if_sequence
                    .replace("$1", ":id")
                    .replace("$2", bytea)
                    .replace("$4", ":w")
                    .replace("$5", "NULL")
                    .replace("$5", "NULL")
                    .replace("$3", ":sequence_number")
            )
        }
        // Client c deletes base + c * per + 0, 1, 2, ... (n counts per client).
        Op::Delete => format!(
            "\\set id :base + :client_id * :per + :n\n\\set n :n + 1\n{write_id}{};\n",
            sql.delete.replace("$1", ":id").replace("$2", ":w")
        ),
    }
}
