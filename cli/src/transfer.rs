//! `export` and `import`: every actor with its sequence number, as JSON
//! lines.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use trebuchet_postgres::{RestoreOutcome, StateStore, Versioned};

use crate::args::{Export, Import};
use crate::fail::{Failure, CONFLICT};
use crate::output::{
    bar_style, bytes_style, count, counter_style, progress, prompt_if_terminal, shows_progress,
    timestamp,
};
use crate::settings::{Connected, Settings};

/// One actor in an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    actor_id: String,
    sequence: u64,
    #[serde(default)]
    updated_at: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    /// When a state saved with a time to live expires; absent for one kept
    /// for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    /// The stored bytes, base64 (standard alphabet, padded).
    state: String,
}

pub fn export(settings: &Settings, args: &Export) -> Result<(), Failure> {
    let connected = settings.store()?;
    let store = &connected.store;
    let visible = shows_progress(args.output.is_none());
    let total = if visible {
        Some(
            store
                .count_actors(&args.prefix)
                .map_err(|e| connected.fail(e))?,
        )
    } else {
        None
    };
    let bar = progress(visible, total, bar_style("actors"));
    let (mut out, partial): (Box<dyn Write>, Option<PathBuf>) = match &args.output {
        Some(path) => {
            let partial = partial_path(path);
            let file = File::create(&partial)
                .map_err(|e| Failure::error(format!("cannot create {}: {e}", partial.display())))?;
            (Box::new(BufWriter::new(file)), Some(partial))
        }
        None => (Box::new(BufWriter::new(io::stdout().lock())), None),
    };
    let mut failed: Option<Failure> = None;
    let visited = store.raw().for_each(&args.prefix, |actor_id, v| {
        let line = Line {
            actor_id,
            sequence: v.sequence,
            updated_at: Some(timestamp(v.updated_at)),
            created_at: Some(timestamp(v.created_at)),
            expires_at: v.expires_at.map(timestamp),
            state: BASE64.encode(&v.value),
        };
        let written = serde_json::to_writer(&mut out, &line)
            .map_err(io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        match written {
            Ok(()) => {
                bar.inc(1);
                ControlFlow::Continue(())
            }
            Err(e) => {
                failed = Some(e.into());
                ControlFlow::Break(())
            }
        }
    });
    bar.finish_and_clear();
    let visited = visited.map_err(|e| connected.fail(e))?;
    if let Some(failure) = failed {
        return Err(failure);
    }
    out.flush()?;
    drop(out);
    if let (Some(partial), Some(path)) = (partial, &args.output) {
        std::fs::rename(&partial, path)
            .map_err(|e| Failure::error(format!("cannot write {}: {e}", path.display())))?;
    }
    eprintln!(
        "exported {} from {}",
        count(visited, "actor"),
        store.table()
    );
    Ok(())
}

/// `FILE.partial` beside `FILE`, renamed to it once the export is complete.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

pub fn import(settings: &Settings, args: &Import) -> Result<(), Failure> {
    let (reader, size): (Box<dyn BufRead>, Option<u64>) = match args.file.as_deref() {
        Some(path) if path != Path::new("-") => {
            let file = File::open(path)
                .map_err(|e| Failure::error(format!("cannot open {}: {e}", path.display())))?;
            let size = file.metadata().ok().map(|m| m.len());
            (Box::new(BufReader::new(file)), size)
        }
        _ => {
            prompt_if_terminal("export lines");
            (Box::new(io::stdin().lock()), None)
        }
    };
    let connected = settings.store()?;
    let style = match size {
        Some(_) => bytes_style(),
        None => counter_style("actors"),
    };
    let bar = progress(shows_progress(false), size, style);
    let mut import = Importer {
        connected: &connected,
        bar: &bar,
        batch: Vec::new(),
        lines: Vec::new(),
        ids: HashSet::new(),
        batch_size: args.batch as usize,
        written: 0,
        unchanged: 0,
        kept: 0,
    };
    let result = import.run(reader, size.is_some());
    bar.finish_and_clear();
    result?;
    let table = connected.store.table();
    eprintln!(
        "imported {} into {table}; skipped {} already there, {} kept in a newer or deleted \
         version",
        count(import.written, "actor"),
        import.unchanged,
        import.kept
    );
    if import.kept > 0 {
        return Err(Failure::new(
            CONFLICT,
            format!(
                "{} not imported: {table} holds newer or deleted versions (listed above)",
                if import.kept == 1 {
                    "1 actor was".to_owned()
                } else {
                    format!("{} actors were", import.kept)
                },
            ),
        ));
    }
    Ok(())
}

struct Importer<'a> {
    connected: &'a Connected,
    bar: &'a ProgressBar,
    /// The actors read and not yet written.
    batch: Vec<Item>,
    /// The line number of each actor of `batch`.
    lines: Vec<usize>,
    ids: HashSet<String>,
    batch_size: usize,
    written: u64,
    unchanged: u64,
    kept: u64,
}

impl Importer<'_> {
    fn run(&mut self, reader: Box<dyn BufRead>, by_bytes: bool) -> Result<(), Failure> {
        for (index, line) in reader.lines().enumerate() {
            let number = index + 1;
            let line =
                line.map_err(|e| Failure::error(format!("cannot read line {number}: {e}")))?;
            if by_bytes {
                self.bar.inc(line.len() as u64 + 1);
            }
            if line.trim().is_empty() {
                continue;
            }
            let (id, version) = match parse(&line) {
                Ok(parsed) => parsed,
                Err(reason) => {
                    // Everything before the bad line goes in, so that a rerun
                    // after fixing it (imports are idempotent) has less to do.
                    self.flush()?;
                    return Err(Failure::error(format!(
                        "line {number}: {reason}; the lines before it were imported, \
                         nothing after it"
                    )));
                }
            };
            if self.ids.contains(&id) || self.batch.len() >= self.batch_size {
                self.flush()?;
            }
            self.ids.insert(id.clone());
            self.batch.push((id, version));
            self.lines.push(number);
            if !by_bytes {
                self.bar.inc(1);
            }
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), Failure> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let store: &StateStore = &self.connected.store;
        let outcomes = store.raw().restore_many(&self.batch).map_err(|e| {
            let first = self.lines.first().copied().unwrap_or(0);
            let mut failure = self.connected.fail(e);
            failure.append(&format!(
                "(in the lines from {first}; {} actors were imported before them)",
                self.written
            ));
            failure
        })?;
        for (((id, v), number), outcome) in self.batch.iter().zip(&self.lines).zip(outcomes) {
            let skipped = match outcome {
                RestoreOutcome::Written => {
                    self.written += 1;
                    None
                }
                RestoreOutcome::Unchanged => {
                    self.unchanged += 1;
                    None
                }
                RestoreOutcome::Superseded { current } => Some(format!(
                    "the table holds sequence {current}, line {number} has {}",
                    v.sequence
                )),
                RestoreOutcome::Deleted { current } => Some(format!(
                    "deleted at sequence {current} in the table, line {number} has {}",
                    v.sequence
                )),
                _ => Some(format!("not written (line {number})")),
            };
            if let Some(why) = skipped {
                self.kept += 1;
                self.bar.suspend(|| eprintln!("skipped {id:?}: {why}"));
            }
        }
        self.batch.clear();
        self.lines.clear();
        self.ids.clear();
        Ok(())
    }
}

/// An actor as an export line holds it: its id, version and expiry.
type Item = (String, Versioned<Vec<u8>>);

/// One line of an export.
fn parse(line: &str) -> Result<Item, String> {
    let line: Line = serde_json::from_str(line).map_err(|e| format!("not an export line: {e}"))?;
    if line.sequence == 0 {
        return Err(format!(
            "actor {:?} has sequence 0; sequence numbers start at 1",
            line.actor_id
        ));
    }
    let value = BASE64.decode(line.state.as_bytes()).map_err(|e| {
        let e = e.to_string();
        format!(
            "the state of actor {:?} is not base64: {}",
            line.actor_id,
            e.trim_end_matches('.')
        )
    })?;
    let time = |field: &str, text: &Option<String>| -> Result<SystemTime, String> {
        match text {
            None => Ok(SystemTime::now()),
            Some(text) => humantime::parse_rfc3339_weak(text)
                .map_err(|e| format!("{field} {text:?} is not an RFC 3339 time: {e}")),
        }
    };
    let updated_at = time("updated_at", &line.updated_at)?;
    let created_at = time("created_at", &line.created_at)?;
    let expires_at = match &line.expires_at {
        None => None,
        Some(_) => Some(time("expires_at", &line.expires_at)?),
    };
    Ok((
        line.actor_id,
        Versioned::new(value, line.sequence, updated_at, created_at).with_expires_at(expires_at),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_say_what_is_wrong() {
        let (id, v) = parse(
            r#"{"actor_id":"a","sequence":3,"updated_at":"2025-11-24T16:00:00.123456Z","created_at":"2025-11-24T15:00:00Z","state":"AP8="}"#,
        )
        .unwrap();
        assert_eq!(id, "a");
        assert_eq!(v.sequence, 3);
        assert_eq!(v.value, [0, 255]);
        assert_eq!(timestamp(v.updated_at), "2025-11-24T16:00:00.123456Z");
        assert_eq!(v.expires_at, None, "no expires_at: kept for good");
        let (_, v) = parse(r#"{"actor_id":"b","sequence":1,"state":""}"#).unwrap();
        assert!(v.value.is_empty());
        let (_, v) = parse(
            r#"{"actor_id":"c","sequence":1,"state":"","expires_at":"2030-01-02T03:04:05.5Z"}"#,
        )
        .unwrap();
        assert_eq!(
            v.expires_at.map(timestamp).as_deref(),
            Some("2030-01-02T03:04:05.500000Z")
        );
        for (line, needle) in [
            ("{", "not an export line"),
            (r#"{"actor_id":"a","sequence":1}"#, "missing field `state`"),
            (
                r#"{"actor_id":"a","seq":1,"state":""}"#,
                "unknown field `seq`",
            ),
            (r#"{"actor_id":"a","sequence":0,"state":""}"#, "start at 1"),
            (
                r#"{"actor_id":"a","sequence":1,"state":"!!"}"#,
                "not base64",
            ),
            (
                r#"{"actor_id":"a","sequence":1,"state":"","updated_at":"yesterday"}"#,
                "not an RFC 3339 time",
            ),
            (
                r#"{"actor_id":"a","sequence":1,"state":"","expires_at":"soon"}"#,
                "expires_at \"soon\" is not an RFC 3339 time",
            ),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(needle), "{line}: {err}");
        }
    }

    #[test]
    fn partial_files_sit_beside_the_output() {
        assert_eq!(
            partial_path(Path::new("/tmp/x/actors.jsonl")),
            Path::new("/tmp/x/actors.jsonl.partial")
        );
        assert_eq!(partial_path(Path::new("a")), Path::new("a.partial"));
    }
}
