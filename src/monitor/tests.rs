//! The catalog queries, and the pure logic beside them.

use std::time::{Duration, SystemTime};

use super::connection::SESSION_INFO;
use super::notify::NOTIFY;
use super::sessions::{is_listen_on, SESSIONS};
use super::slow_statements::STATEMENTS_EXTENSION;
use super::stats::{rate, TABLE_FIGURES, WRITE_COUNTER};

#[test]
fn every_query_declares_the_types_its_casts_name() {
    for sql in [
        &*TABLE_FIGURES,
        &*WRITE_COUNTER,
        &*SESSIONS,
        &*STATEMENTS_EXTENSION,
        &*SESSION_INFO,
        &*NOTIFY,
    ] {
        assert_eq!(
            crate::pool::param_types(sql.text()).as_deref(),
            Some(sql.types()),
            "{sql:?}"
        );
    }
}

#[test]
fn listen_statements_are_recognised() {
    assert!(is_listen_on(
        "LISTEN \"actor_state_changes\"",
        "actor_state_changes"
    ));
    assert!(is_listen_on(
        "listen actor_state_changes;",
        "actor_state_changes"
    ));
    assert!(is_listen_on(
        "  LISTEN   Actor_State_Changes ",
        "actor_state_changes"
    ));
    assert!(is_listen_on("LISTEN \"Mixed\"", "Mixed"));
    assert!(!is_listen_on("LISTEN Mixed", "Mixed"));
    assert!(!is_listen_on("LISTEN \"other\"", "actor_state_changes"));
    assert!(!is_listen_on(
        "LISTENactor_state_changes",
        "actor_state_changes"
    ));
    assert!(!is_listen_on(
        "SELECT 'LISTEN actor_state_changes'",
        "actor_state_changes"
    ));
    assert!(!is_listen_on(
        "UNLISTEN actor_state_changes",
        "actor_state_changes"
    ));
    assert!(!is_listen_on("", "x"));
}

#[test]
fn rates_need_a_forward_window_and_a_growing_counter() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
    let t1 = t0 + Duration::from_secs(4);
    assert_eq!(rate(10, t0, 30, t1), Some(5.0));
    assert_eq!(rate(10, t1, 30, t0), None);
    assert_eq!(rate(30, t0, 10, t1), None);
    assert_eq!(rate(10, t0, 30, t0), None);
}
