//! One general write (`save_with` and `WriteOptions`), one view of the
//! stored bytes (`raw()`), and one shape for versions (`Versioned`, with
//! its expiry), in every form that reads them.

mod common;

use std::time::{Duration, SystemTime};

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{BatchResult, Error, ErrorKind, Expected, WriteOptions};

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn options_combine_a_condition_and_a_time_to_live() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let seq = store
        .save_with(
            "s",
            &1u32,
            WriteOptions::new().expect(Expected::Absent).ttl(HOUR),
        )
        .unwrap();
    assert_eq!(seq, 1);
    let err = store
        .save_with(
            "s",
            &2u32,
            WriteOptions::new().expect(Expected::Absent).ttl(HOUR),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let seq = store
        .save_with(
            "s",
            &3u32,
            WriteOptions::new().expect(Expected::Sequence(1)).ttl(HOUR),
        )
        .unwrap();
    assert_eq!(seq, 2);
    let v = store.load_versioned::<u32>("s").unwrap().unwrap();
    assert_eq!((v.value, v.sequence), (3, 2));
    let left = v
        .expires_at
        .expect("saved with a time to live")
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(left > HOUR - Duration::from_secs(600) && left <= HOUR);
}

#[test]
fn the_plain_options_are_a_plain_save() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    assert_eq!(store.save_with("p", &1u8, WriteOptions::new()).unwrap(), 1);
    assert_eq!(
        store.save_with("p", &2u8, WriteOptions::default()).unwrap(),
        2
    );
    let v = store.load_versioned::<u8>("p").unwrap().unwrap();
    assert_eq!((v.value, v.sequence, v.expires_at), (2, 2, None));
}

#[test]
fn a_given_sequence_number_may_carry_a_time_to_live() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let seq = store
        .save_with("n", &7u32, WriteOptions::new().sequence(40).ttl(HOUR))
        .unwrap();
    assert_eq!(seq, 40, "the number given is the number written");
    let v = store.load_versioned::<u32>("n").unwrap().unwrap();
    assert_eq!((v.value, v.sequence), (7, 40));
    assert!(v.expires_at.is_some());
    // A number that is not above the stored one is refused.
    let err = store
        .save_with("n", &8u32, WriteOptions::new().sequence(40))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StaleSequence {
                sequence: 40,
                current: Some(40),
                ..
            }
        ),
        "{err}"
    );
    // Without a time to live the actor is kept for good again.
    store
        .save_with("n", &9u32, WriteOptions::new().sequence(41))
        .unwrap();
    assert_eq!(
        store
            .load_versioned::<u32>("n")
            .unwrap()
            .unwrap()
            .expires_at,
        None
    );
}

#[test]
fn a_sequence_number_and_a_condition_together_are_refused_before_anything_is_sent() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let both = WriteOptions::new()
        .sequence(3)
        .expect(Expected::Sequence(2));
    let err = store.save_with("x", &1u8, both).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { what: "write", .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = store.raw().save_with("x", b"1", both).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    // Out-of-range numbers are refused the same way, in either option.
    for options in [
        WriteOptions::new().sequence(u64::MAX),
        WriteOptions::new().expect(Expected::Sequence(u64::MAX)),
    ] {
        let err = store.save_with("x", &1u8, options).unwrap_err();
        assert!(matches!(err, Error::SequenceOutOfRange(_)), "{err}");
    }
    for ttl in [Duration::ZERO, Duration::from_secs(u64::MAX)] {
        let err = store
            .save_with("x", &1u8, WriteOptions::new().ttl(ttl))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
    assert!(!store.exists("x").unwrap(), "nothing was written");
}

#[test]
fn every_read_of_versions_carries_the_expiry() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store
        .save_with("e1", &1u32, WriteOptions::new().ttl(HOUR))
        .unwrap();
    store.save("e2", &2u32).unwrap();

    let typed = store
        .load_many_versioned::<u32, _>(&["e1", "e2", "e3"])
        .unwrap();
    let raw = store
        .raw()
        .load_many_versioned(&["e1", "e2", "e3"])
        .unwrap();
    for (i, (t, r)) in typed.iter().zip(&raw).enumerate() {
        match (t, r) {
            (Some(t), Some(r)) => {
                assert_eq!(t.expires_at, r.expires_at, "item {i}");
                assert_eq!(t.sequence, r.sequence, "item {i}");
            }
            (None, None) => assert_eq!(i, 2, "only e3 is absent"),
            _ => panic!("item {i}: typed and raw reads differ"),
        }
    }
    assert!(typed[0].as_ref().unwrap().expires_at.is_some());
    assert_eq!(typed[1].as_ref().unwrap().expires_at, None);
    let single = store.raw().load_versioned("e1").unwrap().unwrap();
    assert_eq!(single.expires_at, typed[0].as_ref().unwrap().expires_at);

    let mut walked = Vec::new();
    store
        .raw()
        .for_each("e", |id, v| {
            walked.push((id, v.expires_at.is_some()));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(
        walked,
        vec![("e1".to_owned(), true), ("e2".to_owned(), false)]
    );
}

#[test]
fn the_raw_view_reads_and_writes_bytes_as_stored() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let raw = store.raw();
    assert_eq!(raw.save("b", b"\x00\xff").unwrap(), 1);
    assert_eq!(raw.load("b").unwrap().as_deref(), Some(&b"\x00\xff"[..]));
    assert_eq!(raw.save_if("b", b"\x01", Expected::Sequence(1)).unwrap(), 2);
    let v = raw
        .transform("b", |current| {
            let mut next = current.unwrap_or_default().to_vec();
            next.push(2);
            next
        })
        .unwrap();
    assert_eq!((v.value, v.sequence), (vec![1, 2], 3));
    assert_eq!(
        raw.load_many(&["b", "none"]).unwrap(),
        vec![Some(vec![1, 2]), None]
    );
    let seqs = raw
        .save_many(&[("c", &b"c"[..]), ("d", &b"d"[..])])
        .unwrap();
    assert_eq!(seqs, vec![1, 1]);
    let results = raw
        .save_many_if(&[
            ("c", &b"c2"[..], Expected::Sequence(1)),
            ("d", &b"d2"[..], Expected::Absent),
        ])
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap(), &2);
    assert!(results[1].as_ref().unwrap_err().is_conflict());

    let steps = raw
        .batch()
        .save("e", b"e1")
        .save_if("e", b"e2", Expected::Sequence(1))
        .delete("c")
        .commit()
        .unwrap();
    assert_eq!(
        steps,
        vec![
            BatchResult::Saved(1),
            BatchResult::Saved(2),
            BatchResult::Deleted(true)
        ]
    );
    assert_eq!(raw.load("e").unwrap().as_deref(), Some(&b"e2"[..]));
}

#[test]
fn a_failing_raw_transform_writes_nothing_and_returns_the_callers_error() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.raw().save("t", b"1").unwrap();

    #[derive(Debug)]
    enum Step {
        Refused,
        Store(Error),
    }
    impl From<Error> for Step {
        fn from(e: Error) -> Self {
            Step::Store(e)
        }
    }
    let result = store
        .raw()
        .try_transform("t", |_| Err::<Vec<u8>, _>(Step::Refused));
    assert!(matches!(result, Err(Step::Refused)), "{result:?}");
    let v = store.raw().load_versioned("t").unwrap().unwrap();
    assert_eq!((v.value, v.sequence), (b"1".to_vec(), 1));
    let result = store.raw().try_transform::<Step, _>("", |_| Ok(Vec::new()));
    assert!(
        matches!(result, Err(Step::Store(Error::InvalidActorId(_)))),
        "{result:?}"
    );
}
