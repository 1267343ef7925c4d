//! Listing, walking and restoring whole tables against a real PostgreSQL:
//! `list_actors`, `count_actors`, `for_each_bytes` and `restore_many_bytes`,
//! and their forms with expiries.

mod common;

use std::ops::ControlFlow;

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Error, RestoreOutcome, Versioned, WriteOptions};

#[test]
fn pages_are_in_key_order_and_follow_each_other() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    for id in ["room-3", "room-1", "player-1", "room-5", "room-2", "room-4"] {
        store.save(id, &id.len()).unwrap();
    }
    store.save("room-2", &0u8).unwrap();

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = store.list_actors("room-", after.as_deref(), 2).unwrap();
        pages += 1;
        assert!(page.actors.len() <= 2);
        seen.extend(page.actors.iter().map(|a| (a.actor_id.clone(), a.sequence)));
        for actor in &page.actors {
            assert!(actor.size > 0, "{actor:?}");
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        [
            ("room-1".to_owned(), 1),
            ("room-2".to_owned(), 2),
            ("room-3".to_owned(), 1),
            ("room-4".to_owned(), 1),
            ("room-5".to_owned(), 1)
        ]
    );
    let all = store.list_actors("", None, 100).unwrap();
    assert_eq!(all.actors.len(), 6);
    assert_eq!(all.next, None);
    assert_eq!(all.actors[0].actor_id, "player-1");
    assert!(store
        .list_actors("nobody", None, 10)
        .unwrap()
        .actors
        .is_empty());
    // A prefix is text, not a pattern.
    assert!(store
        .list_actors("room-_", None, 10)
        .unwrap()
        .actors
        .is_empty());
    assert!(store.list_actors("%", None, 10).unwrap().actors.is_empty());

    assert_eq!(store.count_actors("room-").unwrap(), 5);
    assert_eq!(store.count_actors("").unwrap(), 6);
    let err = store.list_actors("", None, 0).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { what: "limit", .. }),
        "{err:?}"
    );
}

#[test]
fn a_walk_sees_one_snapshot_and_can_stop() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let other = schema.store_builder().build().unwrap();
    for id in ["a", "b", "c"] {
        store.save(id, &1u32).unwrap();
    }
    let mut ids = Vec::new();
    let visited = store
        .raw()
        .for_each("", |id, v| {
            if id == "a" {
                // Written during the walk: not part of its snapshot.
                other.save("b", &2u32).unwrap();
                other.save("aa", &2u32).unwrap();
            }
            ids.push((id, v.sequence));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(visited, 3);
    assert_eq!(
        ids,
        [
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("c".to_owned(), 1)
        ]
    );
    assert_eq!(store.sequence("b").unwrap(), Some(2));

    let visited = store
        .raw()
        .for_each("", |_, _| ControlFlow::Break(()))
        .unwrap();
    assert_eq!(visited, 1);
    let visited = store
        .raw()
        .for_each("a", |id, _| {
            assert!(id.starts_with('a'));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(visited, 2);
}

/// Everything a walk reads, restored into another table, comes back with
/// the same bytes, sequence numbers and timestamps; again, nothing changes;
/// and a restore never replaces a newer or deleted version.
#[test]
fn restores_reproduce_versions_and_never_go_backwards() {
    let source_schema = TestDatabase::shared().schema();
    let source = source_schema.store();
    for round in 0..3u32 {
        source.save("a", &round).unwrap();
    }
    source.save("b", &"bee").unwrap();
    source.delete("b").unwrap();
    source.save("b", &"bee again").unwrap();
    source.raw().save("raw", b"\x00\x01\xff").unwrap();

    let exported = common::export(&source, "");
    assert_eq!(exported.len(), 3);

    let target_schema = TestDatabase::shared().schema();
    let target = target_schema.store();
    let outcomes = target.raw().restore_many(&exported).unwrap();
    assert_eq!(outcomes, [RestoreOutcome::Written; 3]);
    for (id, v) in &exported {
        let restored = target.raw().load_versioned(id).unwrap().unwrap();
        assert_eq!(&restored, v, "{id}");
    }
    assert_eq!(target.sequence("a").unwrap(), Some(3));
    assert_eq!(target.sequence("b").unwrap(), Some(3));

    // Idempotent.
    let outcomes = target.raw().restore_many(&exported).unwrap();
    assert_eq!(outcomes, [RestoreOutcome::Unchanged; 3]);

    // Newer in the target, deleted in the target, same number other bytes.
    target.save("a", &99u32).unwrap();
    target.delete("b").unwrap();
    let mut changed = exported.clone();
    changed[2].1.value = b"other".to_vec();
    let outcomes = target.raw().restore_many(&changed).unwrap();
    assert_eq!(
        outcomes,
        [
            RestoreOutcome::Superseded { current: 4 },
            RestoreOutcome::Deleted { current: 4 },
            RestoreOutcome::Superseded { current: 1 },
        ]
    );
    assert_eq!(target.load::<u32>("a").unwrap(), Some(99));
    assert!(!target.exists("b").unwrap());

    // A later save continues above a restored number.
    let next = target.save("raw", &1u8).unwrap();
    assert_eq!(next, 2);

    let err = target
        .raw()
        .restore_many(&[exported[0].clone(), exported[0].clone()])
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateActorId { .. }), "{err:?}");
    let mut zero = exported[0].clone();
    zero.0 = "zero".into();
    zero.1.sequence = 0;
    assert_eq!(
        target.raw().restore_many(&[zero]).unwrap(),
        [RestoreOutcome::Superseded { current: 0 }]
    );
    assert!(!target.exists("zero").unwrap());
}

/// An actor as a walk gives it.
type Walked = (String, Versioned<Vec<u8>>);

/// Every actor of `store` with its expiry, in id order.
fn walk_with_expiry(store: &trebuchet_postgres::StateStore) -> Vec<Walked> {
    let mut walked = Vec::new();
    store
        .raw()
        .for_each("", |id, v| {
            walked.push((id, v));
            ControlFlow::Continue(())
        })
        .unwrap();
    walked
}

#[test]
fn times_to_live_go_out_with_a_walk_and_come_back_with_a_restore() {
    use std::collections::HashMap;
    use std::time::{Duration, SystemTime};

    let source_schema = TestDatabase::shared().schema();
    let source = source_schema.store();
    source
        .save_with(
            "session",
            &1u32,
            WriteOptions::new().ttl(Duration::from_secs(3600)),
        )
        .unwrap();
    source.save("kept", &2u32).unwrap();
    let walked = walk_with_expiry(&source);
    let expiries: HashMap<&str, Option<SystemTime>> = walked
        .iter()
        .map(|(id, v)| (id.as_str(), v.expires_at))
        .collect();
    assert_eq!(expiries["kept"], None);
    let session_expires = expiries["session"].expect("the session has an expiry");
    let left = session_expires
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(left > Duration::from_secs(3000) && left <= Duration::from_secs(3600));

    let target_schema = TestDatabase::shared().schema();
    let target = target_schema.store();
    let outcomes = target.raw().restore_many(&walked).unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, RestoreOutcome::Written)));
    let restored = walk_with_expiry(&target);
    assert_eq!(restored, walked, "the same versions and expiries");

    // An expiry already past is restored as it is: the actor reads as absent.
    let past = SystemTime::now() - Duration::from_secs(60);
    let now = SystemTime::now();
    let stale = Versioned::new(&b"\x01"[..], 4, now, now).with_expires_at(Some(past));
    let outcomes = target.raw().restore_many(&[("stale", stale)]).unwrap();
    assert!(matches!(outcomes[0], RestoreOutcome::Written));
    assert!(!target.exists("stale").unwrap());
    // A newer version without an expiry keeps the actor for good.
    let renewed = Versioned::new(&b"\x02"[..], 5, now, now);
    target.raw().restore_many(&[("stale", renewed)]).unwrap();
    assert_eq!(
        target.raw().load("stale").unwrap().as_deref(),
        Some(&b"\x02"[..])
    );
}
