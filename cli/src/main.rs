//! `trebuchet-postgres`: actor state in PostgreSQL from the command line.
//!
//! Every subcommand and option is described by `--help`; the README has a
//! section per group with example output.

#![warn(rust_2018_idioms, clippy::all)]
#![forbid(unsafe_code)]

mod actors;
mod args;
mod fail;
mod output;
mod schema;
mod settings;
mod state_json;
mod stats;
mod transfer;
mod watch;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use crate::args::{Cli, Command};
use crate::fail::{Failure, OK, USAGE};
use crate::settings::Settings;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if failure.code != OK {
                eprintln!("error: {failure}");
            }
            ExitCode::from(failure.code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let settings = Settings::resolve(&cli.global)?;
    match cli.command {
        Command::Migrate(args) => schema::migrate(&settings, &args),
        Command::Partition(args) => schema::partition(&settings, &args),
        Command::Sweep(args) => actors::sweep(&settings, &args),
        Command::PurgeTombstones(args) => actors::purge_tombstones(&settings, &args),
        Command::Verify(args) => schema::verify(&settings, &args),
        Command::Doctor(args) => schema::doctor(&settings, &args),
        Command::Get(args) => actors::get(&settings, &args),
        Command::Put(args) => actors::put(&settings, &args),
        Command::Delete(args) => actors::delete(&settings, &args),
        Command::Ls(args) => actors::ls(&settings, &args),
        Command::Seq(args) => actors::seq(&settings, &args),
        Command::Watch(args) => watch::watch(&settings, &args),
        Command::Stats(args) => stats::stats(&settings, &args),
        Command::Export(args) => transfer::export(&settings, &args),
        Command::Import(args) => transfer::import(&settings, &args),
    }
}

/// Help and version go to standard output with exit 0; a usage error
/// becomes one line on standard error with exit 2, naming the subcommand's
/// `--help`.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(USAGE)
        }
        _ => {
            let rendered = e.render().to_string();
            let mut help = "trebuchet-postgres --help".to_owned();
            let mut parts = Vec::new();
            for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if let Some(usage) = line.strip_prefix("Usage: ") {
                    // "trebuchet-postgres get [OPTIONS] <ID>": the command words.
                    let words: Vec<&str> = usage
                        .split_whitespace()
                        .take_while(|w| !w.starts_with(['[', '<', '-']))
                        .collect();
                    help = format!("{} --help", words.join(" "));
                } else if !line.starts_with("For more information") {
                    parts.push(line.strip_prefix("error: ").unwrap_or(line).to_owned());
                }
            }
            let mut message = String::new();
            for part in &parts {
                if !message.is_empty() {
                    message.push_str(if message.ends_with(':') { " " } else { "; " });
                }
                message.push_str(part);
            }
            // The message quotes the arguments as given.
            eprintln!("error: {}; see `{help}`", output::escape(&message));
            ExitCode::from(USAGE)
        }
    }
}
