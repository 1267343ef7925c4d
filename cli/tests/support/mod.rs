//! What the program's tests share: the built program, run without the
//! connection settings of the environment the tests run in.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// The program under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_trebuchet-postgres");

/// Variables that would point the program somewhere else.
pub const CONNECTION_VARIABLES: [&str; 8] = [
    "DATABASE_URL",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DATABASE",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "PGPASSWORD",
    "PGHOST",
];

/// The program, in `dir`, with none of [`CONNECTION_VARIABLES`] set.
pub fn bare(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir);
    for key in CONNECTION_VARIABLES {
        command.env_remove(key);
    }
    command
}
