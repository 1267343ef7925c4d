//! The command line: global options and one struct per subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Printed after each subcommand's help.
const EXIT_CODES: &str = "\
Exit codes: 0 success, 1 error, 2 usage, 3 conflict, 4 not found \
(`trebuchet-postgres --help` says more).";

/// Printed after the top-level help.
const AFTER_HELP: &str = "\
Connection: --url, else the config file (--config PATH, or ./trebuchet.yaml when it
exists), else the environment: DATABASE_URL, else POSTGRES_HOST, POSTGRES_PORT,
POSTGRES_DATABASE, POSTGRES_USER and POSTGRES_PASSWORD (defaults localhost, 5432,
trebuchet, postgres). --table, --channel and --codec override the config file.
Keep passwords out of --url where other users can list processes.

Exit codes:
  0  success
  1  error: connection, database, configuration file, or problems that
     verify and doctor report
  2  usage: bad arguments, or input rejected before anything was sent
  3  conflict: --if-sequence or --if-absent did not match, or import kept
     a version the table already had
  4  not found: get, seq or delete of an actor that does not exist";

/// Actor state in PostgreSQL: inspect and change it, watch it change,
/// check and monitor a deployment, export and import it.
#[derive(Debug, Parser)]
#[command(name = "trebuchet-postgres", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection and table")]
pub struct Global {
    /// Connection string: postgresql://user@host:5432/database?sslmode=verify-full
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,

    /// The config file whose `state:` section says where to connect
    /// [default: ./trebuchet.yaml when it exists]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Ignore ./trebuchet.yaml
    #[arg(long, global = true, conflicts_with = "config")]
    pub no_config: bool,

    /// The state table, optionally schema-qualified [default: actor_states]
    #[arg(long, global = true, value_name = "NAME")]
    pub table: Option<String>,

    /// The notification channel [default: actor_state_changes]
    #[arg(long, global = true, value_name = "NAME")]
    pub channel: Option<String>,

    /// How typed states are encoded: cbor (this crate's default) or json
    /// (Swift's JSONEncoder) [default: cbor]
    #[arg(long, global = true, value_enum)]
    pub codec: Option<CodecArg>,
}

/// The codecs a command line can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CodecArg {
    Cbor,
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the table, its tombstones, function and trigger
    #[command(
        long_about = "Create or upgrade the table, its tombstone table, notification function \
        and trigger. Idempotent and safe to run from several processes at once; also puts back a \
        dropped trigger, function or tombstone table."
    )]
    #[command(after_help = EXIT_CODES)]
    Migrate(Migrate),
    /// Convert the table into N hash partitions by actor id, losing nothing
    #[command(
        long_about = "Convert the table into N hash partitions by actor id (from a plain table, \
        or from another number of partitions) in one transaction: every row is copied with its \
        sequence number and timestamps, the indexes, storage parameters and grants are carried \
        over, and the trigger is created on the new table; on any error nothing changes. Writes \
        wait for the copy (reads go on until the final swap): on a large table run it when writes \
        can pause. A table that already has N partitions is left alone."
    )]
    #[command(after_help = EXIT_CODES)]
    Partition(Partition),
    /// Delete expired actors in batches, each announced as a delete (for cron)
    #[command(
        long_about = "Delete the actors whose time to live has passed, in batches of --batch \
        rows, each batch its own transaction; every removal goes through the trigger, so it is \
        announced as a delete and leaves a tombstone. Expired actors already read as absent: this \
        reclaims their space and tells listeners. At most one sweeper works on a table at a time, \
        across every process: when another holds the table's sweep lock this one says so and \
        exits 0. Meant for cron, e.g. `*/5 * * * * trebuchet-postgres sweep`."
    )]
    #[command(after_help = EXIT_CODES)]
    Sweep(Sweep),
    /// Forget the tombstones of actors deleted long ago
    #[command(
        long_about = "Delete the tombstones of actors deleted more than --older-than ago, 10,000 \
        per transaction. A tombstone keeps a deleted actor's last sequence number so that an \
        actor created again under the same id continues above it; the tombstone table grows by \
        one row per id ever deleted (sessions, expiring actors, generated ids). After a purge an \
        actor created again under a purged id starts again at 1, and a process that still \
        remembers the id's old numbers (a cache, a subscriber) takes its first changes for old \
        ones: purge only ids that are not used again, or tombstones older than anything a \
        running process remembers."
    )]
    #[command(after_help = EXIT_CODES)]
    PurgeTombstones(PurgeTombstones),
    /// Check the schema and a notification round trip (exit 1 on a problem)
    #[command(
        long_about = "Check what the seed's \"Notifications Not Received\" checklist checks: \
        the table and its columns, the tombstone table, the notification function and its channel, \
        the trigger (present, enabled, firing on insert, update and delete), and a notification \
        round trip through the channel. Exits 1 when something is wrong, with the fix for each \
        problem."
    )]
    #[command(after_help = EXIT_CODES)]
    Verify(Verify),
    /// Check settings, connection, TLS, authentication, schema and notifications, with fixes
    #[command(
        long_about = "Check a deployment step by step: where the settings come from, the \
        connection, TLS, authentication and the database, the schema and trigger, the role's \
        privileges, a notification round trip through the real channel, the notification queue \
        and the server's connection count. Each failure says what to do. Exits 1 when a check \
        fails."
    )]
    #[command(after_help = EXIT_CODES)]
    Doctor(Doctor),
    /// Print an actor's state as JSON (exit 4 when it does not exist)
    #[command(after_help = EXIT_CODES)]
    Get(Get),
    /// Write an actor's state from JSON or raw bytes (exit 3 on a conflict)
    #[command(
        long_about = "Write an actor's state and print its new sequence number. The state is \
        JSON (encoded with --codec) or, with --raw, bytes stored as they are; it comes from the \
        VALUE argument, or from standard input when VALUE is left out or is `-`. With \
        --if-sequence or --if-absent the write happens only when the stored version matches, \
        and exits 3 otherwise."
    )]
    #[command(after_help = EXIT_CODES)]
    Put(Put),
    /// Delete an actor (exit 4 when it does not exist)
    #[command(after_help = EXIT_CODES)]
    Delete(Delete),
    /// List actor ids in a stable order, page by page
    #[command(name = "ls")]
    #[command(after_help = EXIT_CODES)]
    Ls(Ls),
    /// Print an actor's sequence number (exit 4 when it does not exist)
    #[command(after_help = EXIT_CODES)]
    Seq(Seq),
    /// Print changes as JSON lines until interrupted
    #[command(
        long_about = "Print every change on the channel as a JSON line until interrupted \
        (Ctrl-C): {\"type\":\"change\",\"actor_id\":...,\"sequence\":...,\"op\":\"save\"|\"delete\",\
        \"timestamp\":...}. When the connection drops, it reconnects and prints \
        {\"type\":\"resync\",\"reason\":\"reconnected\"}: changes in the gap were missed. With \
        --actor, it follows only those actors and, after a reconnect, prints their current \
        versions instead of a resync."
    )]
    #[command(after_help = EXIT_CODES)]
    Watch(Watch),
    /// Table size, actors, writes per second, listeners, notification queue, slow statements
    #[command(
        long_about = "Print the seed's Monitoring figures: the table's size and actor count, \
        writes per second over a window, the sessions listening on the channel, how full the \
        notification queue is, the server's connections, and the slowest statements on the table \
        when pg_stat_statements is installed (saying so when it is not)."
    )]
    #[command(after_help = EXIT_CODES)]
    Stats(Stats),
    /// Write every actor with its sequence number as JSON lines
    #[command(
        long_about = "Write every actor as a JSON line, in id order, from one consistent \
        snapshot: {\"actor_id\":...,\"sequence\":...,\"updated_at\":...,\"created_at\":...,\
        \"state\":BASE64}. Shows a progress bar when standard error is a terminal."
    )]
    #[command(after_help = EXIT_CODES)]
    Export(Export),
    /// Read JSON lines from export and write them with their sequence numbers
    #[command(
        long_about = "Read the JSON lines that export writes and write each actor with its \
        own sequence number and timestamps. Idempotent: an actor already stored at that version \
        is skipped, and a newer or deleted version in the table is kept and reported (exit 3). \
        Shows a progress bar when standard error is a terminal."
    )]
    #[command(after_help = EXIT_CODES)]
    Import(Import),
}

/// `migrate`
#[derive(Debug, Args)]
pub struct Migrate {
    /// Print the SQL instead of running it (connects to nothing)
    #[arg(long)]
    pub print: bool,
    /// Create the table hash-partitioned by actor id into N partitions (an
    /// existing table is not converted: see `partition`)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: Option<u32>,
}

/// `partition`
#[derive(Debug, Args)]
pub struct Partition {
    /// The number of hash partitions, 1 to 1024
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,
}

/// `sweep`
#[derive(Debug, Args)]
pub struct Sweep {
    /// Rows deleted per transaction, 1 to 100000
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,
}

/// `purge-tombstones`
#[derive(Debug, Args)]
pub struct PurgeTombstones {
    /// Purge tombstones older than this: a number with a unit, such as
    /// 30d, 12h or 90m, or a number of seconds
    #[arg(long, value_name = "AGE", value_parser = age)]
    pub older_than: Duration,
}

/// `verify`
#[derive(Debug, Args)]
pub struct Verify {
    /// How long to wait for the notification round trip, in seconds
    #[arg(long, default_value = "5", value_name = "SECONDS", value_parser = seconds)]
    pub timeout: Duration,
}

/// `doctor`
#[derive(Debug, Args)]
pub struct Doctor {
    /// How long to wait for the notification round trip, in seconds
    #[arg(long, default_value = "5", value_name = "SECONDS", value_parser = seconds)]
    pub timeout: Duration,
}

/// `get`
#[derive(Debug, Args)]
pub struct Get {
    /// The actor
    pub id: String,
    /// Write the stored bytes as they are, without decoding
    #[arg(long, conflicts_with_all = ["meta", "compact"])]
    pub raw: bool,
    /// Print {"actor_id", "sequence", "updated_at", "created_at", "state"}
    #[arg(long)]
    pub meta: bool,
    /// One line instead of indented JSON
    #[arg(long)]
    pub compact: bool,
}

/// `put`
#[derive(Debug, Args)]
pub struct Put {
    /// The actor
    pub id: String,
    /// The state; read from standard input when left out or `-`, up to the
    /// store's maximum state size (64 MiB)
    pub value: Option<String>,
    /// Store the bytes as they are instead of encoding JSON
    #[arg(long)]
    pub raw: bool,
    /// Write only if the stored sequence number is N
    #[arg(long, value_name = "N", conflicts_with = "if_absent")]
    pub if_sequence: Option<u64>,
    /// Write only if the actor does not exist
    #[arg(long)]
    pub if_absent: bool,
    /// Let the state expire after this many seconds (at least 0.001); it
    /// then reads as absent and `sweep` deletes it
    #[arg(long, value_name = "SECONDS", value_parser = any_seconds)]
    pub ttl: Option<Duration>,
}

/// `delete`
#[derive(Debug, Args)]
pub struct Delete {
    /// The actor
    pub id: String,
    /// Exit 0 when the actor does not exist
    #[arg(long)]
    pub missing_ok: bool,
}

/// `ls`
#[derive(Debug, Args)]
pub struct Ls {
    /// Only ids that start with this text
    #[arg(long, default_value = "", value_name = "P")]
    pub prefix: String,
    /// Start after this id (what an earlier, limited listing said to continue with)
    #[arg(long, value_name = "ID")]
    pub after: Option<String>,
    /// Print at most N ids
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Also print sequence number, size and last update
    #[arg(short = 'l', long, conflicts_with = "json")]
    pub long: bool,
    /// JSON lines: {"actor_id", "sequence", "size", "updated_at"}
    #[arg(long)]
    pub json: bool,
    /// Ids fetched per round trip
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub page_size: u32,
}

/// `seq`
#[derive(Debug, Args)]
pub struct Seq {
    /// The actor
    pub id: String,
}

/// `watch`
#[derive(Debug, Args)]
pub struct Watch {
    /// Only this actor (repeat for several)
    #[arg(long = "actor", value_name = "ID")]
    pub actors: Vec<String>,
    /// Exit after N changes
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// `stats`
#[derive(Debug, Args)]
pub struct Stats {
    /// One JSON object instead of text
    #[arg(long)]
    pub json: bool,
    /// Measure writes per second over this many seconds (0: no rate, no wait)
    #[arg(long, default_value = "5", value_name = "SECONDS", value_parser = seconds)]
    pub window: Duration,
}

/// `export`
#[derive(Debug, Args)]
pub struct Export {
    /// Only actors whose id starts with this text
    #[arg(long, default_value = "", value_name = "P")]
    pub prefix: String,
    /// Write to this file instead of standard output
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `import`
#[derive(Debug, Args)]
pub struct Import {
    /// The file to read; standard input when left out or `-`
    pub file: Option<PathBuf>,
    /// Actors written per statement
    #[arg(long, default_value_t = 500, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
}

/// Any number of seconds, such as `3600` or `0.5`; the library checks the
/// range.
fn any_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| "expected a number of seconds, such as 3600 or 0.5".to_owned())
}

/// An age: a number with a unit (`30d`, `12h`, `90m`, `45s`) or a number of
/// seconds.
fn age(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.char_indices().last() {
        Some((i, unit @ ('d' | 'h' | 'm' | 's'))) => (&text[..i], unit),
        _ => (text, 's'),
    };
    let scale = match unit {
        'd' => 86_400.0,
        'h' => 3_600.0,
        'm' => 60.0,
        _ => 1.0,
    };
    number
        .parse::<f64>()
        .ok()
        .and_then(|n| Duration::try_from_secs_f64(n * scale).ok())
        .ok_or_else(|| "expected an age such as 30d, 12h, 90m or 3600 (seconds)".to_owned())
}

/// A number of seconds, such as `5` or `0.5`.
fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && (0.0..=86_400.0).contains(s))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| "expected seconds from 0 to 86400, such as 5 or 0.5".to_owned())
}
