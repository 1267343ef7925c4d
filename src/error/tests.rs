//! Messages, kinds and sources of errors.

use super::*;

#[test]
fn conflict_message_names_expected_and_actual() {
    let e = Error::Conflict {
        actor_id: "a".into(),
        expected: Expected::Sequence(1),
        actual: Some(2),
    };
    assert_eq!(
        e.to_string(),
        "conflict on actor \"a\": expected sequence 1, found sequence 2"
    );
    assert!(e.is_conflict());
    let e = Error::Conflict {
        actor_id: "a".into(),
        expected: Expected::Absent,
        actual: Some(1),
    };
    assert!(e.to_string().contains("expected absent, found sequence 1"));
}

#[test]
fn config_file_errors_name_file_line_and_key() {
    let e = Error::ConfigFile {
        origin: "trebuchet.yaml".into(),
        line: Some(7),
        key: Some("state.prot".into()),
        reason: "unknown key; did you mean port?".into(),
    };
    assert_eq!(
        e.to_string(),
        "trebuchet.yaml, line 7, state.prot: unknown key; did you mean port?"
    );
    assert!(e.is_invalid_input());
    let e = Error::ConfigFile {
        origin: "x.yaml".into(),
        line: None,
        key: None,
        reason: "cannot read it".into(),
    };
    assert_eq!(e.to_string(), "x.yaml: cannot read it");
}

#[test]
fn kinds_tell_conflicts_apart() {
    let conflict = Error::Conflict {
        actor_id: "a".into(),
        expected: Expected::Absent,
        actual: Some(1),
    };
    let stale = Error::StaleSequence {
        actor_id: "a".into(),
        sequence: 3,
        current: Some(5),
    };
    let contended = Error::TooManyConflicts {
        actor_id: "a".into(),
        attempts: 8,
    };
    assert_eq!(conflict.kind(), ErrorKind::Conflict);
    assert_eq!(stale.kind(), ErrorKind::StaleSequence);
    assert_eq!(contended.kind(), ErrorKind::TooManyConflicts);
    assert!(conflict.is_conflict());
    assert!(!stale.is_conflict() && !contended.is_conflict());
    assert_eq!(
        Error::invalid_argument("limit", "at least 1").kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn a_thread_that_cannot_start_has_its_own_error() {
    let e = Error::thread_start("the listener thread")(std::io::Error::other("EAGAIN"));
    assert_eq!(e.kind(), ErrorKind::Resources);
    assert!(
        e.to_string()
            .starts_with("cannot start the listener thread"),
        "{e}"
    );
    assert!(!e.is_invalid_input());
    assert_eq!(e.source().unwrap().to_string(), "EAGAIN");
}

#[test]
fn a_decode_error_gives_its_cause_as_the_source_only() {
    let e = Error::Decode {
        actor_id: "a".into(),
        source: "invalid type: string, expected u32".into(),
    };
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(!e.to_string().contains("invalid type"), "{e}");
    assert_eq!(
        e.source().unwrap().to_string(),
        "invalid type: string, expected u32"
    );
}

#[test]
fn error_is_send_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Error>();
}
