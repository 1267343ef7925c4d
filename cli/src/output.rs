//! Writing results: standard output that tolerates a closed pipe, text
//! made safe for a terminal, timestamps, sizes and progress bars.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};
use std::time::SystemTime;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::fail::{Failure, OK};

impl From<io::Error> for Failure {
    /// A reader that went away (`| head`) ends the command quietly; other
    /// write errors are errors.
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Failure::new(OK, "")
        } else {
            Failure::error(format!("cannot write the output: {e}"))
        }
    }
}

/// Writes one line of JSON and flushes it, so that a reader sees each line
/// as it happens.
pub fn json_line(out: &mut impl Write, value: &impl serde::Serialize) -> Result<(), Failure> {
    serde_json::to_writer(&mut *out, value).map_err(|e| Failure::from(std::io::Error::from(e)))?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// `text` made safe to print for a person: control characters (C0, DEL
/// and C1: a newline, a carriage return, the escape that starts a terminal
/// sequence) and the characters that break lines or reorder text on
/// screen (U+2028, U+2029, the bidirectional controls) are written as a
/// Rust string literal writes them (`\n`, `\r`, `\t`, `\u{1b}`). Everything
/// else, printable Unicode included, stays as it is, so an id prints on
/// one line and as it looks. Every human-readable output of text that
/// users or the database provide goes through here; JSON output escapes
/// on its own.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            // `char::escape_debug` writes `\n`, `\r`, `\t`, `\0` and
            // `\u{...}` for these.
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

/// Whether [`escape`] rewrites `c`.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{061c}' | '\u{200e}' | '\u{200f}' // bidirectional marks
            | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' // embeddings, isolates
        )
}

/// Says what is awaited when standard input is a terminal, where reading
/// it would otherwise look like a hang.
pub fn prompt_if_terminal(what: &str) {
    if io::stdin().is_terminal() {
        eprintln!("reading {what} from standard input; end it with Ctrl-D");
    }
}

/// `1 actor`, `2 actors`.
pub fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// RFC 3339 in UTC with microseconds, as PostgreSQL keeps them.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// A size as `pg_size_pretty` writes it: bytes, kB, MB, GB, TB.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 10 * 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 10.0 * 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{:.0} {}", value, UNITS[unit])
}

/// Whether to show progress: standard error is a terminal, and the data
/// does not go to the same terminal.
pub fn shows_progress(data_to_stdout: bool) -> bool {
    io::stderr().is_terminal() && !(data_to_stdout && io::stdout().is_terminal())
}

/// A progress bar on standard error, or a hidden one when `visible` is
/// false (a pipe or a file gets no bar).
pub fn progress(visible: bool, length: Option<u64>, style: ProgressStyle) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr()).with_style(style)
}

/// A counter of `unit` with its rate, for input of unknown length.
pub fn counter_style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{{spinner}} {{pos}} {unit} ({{per_sec}})"))
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// A bar of `unit` with rate and time left.
pub fn bar_style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{wide_bar}} {{pos}}/{{len}} {unit}, {{eta}} left"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// A bar of bytes with rate and time left.
pub fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template("{wide_bar} {bytes}/{total_bytes}, {eta} left")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_printable_text_is_kept() {
        assert!(matches!(escape("room-1 café ☕ 部屋"), Cow::Borrowed(_)));
        assert_eq!(escape("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(escape("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(
            escape("bell\u{7} del\u{7f} csi\u{9b}"),
            "bell\\u{7} del\\u{7f} csi\\u{9b}"
        );
        assert_eq!(escape("\0"), "\\0");
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape("one\u{2028}two"), "one\\u{2028}two");
        // A backslash and quotes are printable: kept as they are.
        assert_eq!(escape(r#"a\"b'"#), r#"a\"b'"#);
        // Joiners inside emoji sequences are kept.
        assert_eq!(escape("👩\u{200d}💻"), "👩\u{200d}💻");
    }

    #[test]
    fn sizes_read_like_pg_size_pretty() {
        assert_eq!(size(0), "0 bytes");
        assert_eq!(size(8192), "8192 bytes");
        assert_eq!(size(49152), "48 kB");
        assert_eq!(size(5 * 1024 * 1024 * 1024), "5120 MB");
        assert_eq!(size(50 * 1024 * 1024 * 1024), "50 GB");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_764_000_000_123_456);
        assert_eq!(timestamp(t), "2025-11-24T16:00:00.123456Z");
    }
}
