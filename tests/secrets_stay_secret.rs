//! Guarantee 8 of the design, **Secrets stay secret**:
//!
//! > Passwords never appear in `Debug`, `Display`, errors or logs. Table and
//! > channel names are validated and quoted: no SQL injection.
//!
//! - `security`: against a real server, passwords kept out of every log
//!   line, error, `Debug` and health text; in its submodules, a role with
//!   only the grants it needs (`security::least_privilege`), and hostile
//!   actor ids and notification payloads (`security::hostile_input`);
//! - `connection_strings`: malformed connection strings whose password holds
//!   delimiters: no error, through any way in, repeats a piece of the
//!   password.
//!
//! Hostile table and channel names are refused before anything is sent, and
//! names are quoted, in tests/bad_input_gets_a_clear_error.rs.

mod common;
#[path = "secrets_stay_secret/connection_strings.rs"]
mod connection_strings;
#[path = "secrets_stay_secret/security.rs"]
mod security;
