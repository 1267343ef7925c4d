//! `ChangeListener::announce`: a change published without a write, so that
//! peers reload an actor. It reaches every subscriber of the channel (other
//! listeners, other processes, the Swift adapter's JSON), carries the
//! actor's current number with the `announce` marker, makes a cache reload
//! an actor whatever number it holds, and an invalid actor id sends nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use trebuchet_postgres::crossbeam_channel::RecvTimeoutError;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{
    Change, ChangeKind, ChangeListener, Error, Event, InvalidActorId, StateCache, Subscription,
};

/// How long a test waits for an event that should come.
const WAIT: Duration = Duration::from_secs(30);

/// A short wait for something that should not come.
const QUIET: Duration = Duration::from_millis(300);

/// The next event, which must be a change of `actor` of `kind`.
#[track_caller]
fn next_change_of(sub: &Subscription, actor: &str, kind: ChangeKind) -> Arc<Change> {
    match sub.recv_timeout(WAIT) {
        Ok(Event::Change(c)) if c.actor_id == actor && c.kind == kind => c,
        other => panic!("expected a {kind:?} change of {actor:?}, got {other:?}"),
    }
}

/// A connection of the test's own that listens on `schema`'s channel, to
/// read payloads as another process (or the Swift adapter) reads them.
fn raw_listener(schema: &TestSchema) -> postgres::Client {
    let mut client = schema.client().unwrap();
    client
        .batch_execute(&format!(
            "LISTEN {}",
            trebuchet_postgres::quote_identifier(&schema.channel())
        ))
        .unwrap();
    client
}

#[test]
fn an_announce_reaches_every_listener_with_the_current_number_and_the_seeds_keys() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let announcer = store.listener().unwrap();
    // Another listener, with a connection of its own: as in another process.
    let peer = store.listener().unwrap();
    let own = announcer.subscribe();
    let everything = peer.subscribe();
    let one = peer.subscribe_actor("room");
    let unwritten = peer.subscribe_actor("never-written");
    let mut raw = raw_listener(&schema);

    store.save("room", &1u32).unwrap();
    store.save("room", &2u32).unwrap();
    for n in 1..=2 {
        for sub in [&own, &everything, &one] {
            assert_eq!(next_change_of(sub, "room", ChangeKind::Saved).sequence, n);
        }
        common::next_payload(&mut raw);
    }

    announcer.announce("room").unwrap();

    // Every subscriber gets it, the filtered one too although it has seen
    // number 2 already: an announce is not a new version.
    for sub in [&own, &everything, &one] {
        let c = next_change_of(sub, "room", ChangeKind::Announced);
        assert_eq!(c.sequence, 2, "{c:?}");
        assert_eq!(
            c.table.as_deref(),
            Some(format!("{}.actor_states", schema.name()).as_str())
        );
        common::assert_recent("announce timestamp", c.timestamp);
    }
    // The payload has the seed's keys (what the Swift adapter reads) and
    // the library's.
    let (channel, payload) = common::next_payload(&mut raw);
    assert_eq!(channel, schema.channel());
    assert_eq!(payload["actorID"], "room", "{payload}");
    assert_eq!(payload["sequenceNumber"], 2, "{payload}");
    common::assert_recent_epoch("timestamp", payload["timestamp"].as_f64().unwrap());
    assert_eq!(payload["op"], "announce", "{payload}");
    assert_eq!(
        payload["table"],
        format!("{}.actor_states", schema.name()),
        "{payload}"
    );

    // A deleted actor is announced at its tombstone's number, one never
    // written at 0.
    assert!(store.delete("room").unwrap());
    assert_eq!(
        next_change_of(&one, "room", ChangeKind::Deleted).sequence,
        3
    );
    announcer.announce("room").unwrap();
    assert_eq!(
        next_change_of(&one, "room", ChangeKind::Announced).sequence,
        3
    );
    announcer.announce("never-written").unwrap();
    assert_eq!(
        next_change_of(&unwritten, "never-written", ChangeKind::Announced).sequence,
        0
    );

    // The numbers that follow are not held back by the announces.
    assert_eq!(store.save("room", &3u32).unwrap(), 4);
    assert_eq!(next_change_of(&one, "room", ChangeKind::Saved).sequence, 4);
    let health = peer.health();
    assert_eq!((health.malformed, health.dropped), (0, 0), "{health:?}");
}

#[test]
fn a_listener_without_a_store_announces_number_zero_without_a_table() {
    let schema = TestDatabase::shared().schema();
    let listener = ChangeListener::builder()
        .connect_options(schema.connect_options())
        .channel(schema.channel())
        .build()
        .unwrap();
    let sub = listener.subscribe();
    let mut raw = raw_listener(&schema);

    listener.announce("anywhere").unwrap();

    let c = next_change_of(&sub, "anywhere", ChangeKind::Announced);
    assert_eq!((c.sequence, c.table.as_deref()), (0, None), "{c:?}");
    let (_, payload) = common::next_payload(&mut raw);
    assert_eq!(payload["sequenceNumber"], 0, "{payload}");
    assert!(payload.get("table").is_none(), "{payload}");
}

/// The state of an actor changes without its trigger (as a restore, a bulk
/// load or a hand-made fix can), so nothing is announced and the cache
/// keeps the old state, at the same number; an announce makes it reload.
#[test]
fn an_announce_makes_a_cache_reload_an_actor_it_holds_at_the_same_number() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let cache: StateCache<u64> = StateCache::new(&store, &listener).unwrap();
    let probe = listener.subscribe_actor("held");

    assert_eq!(store.save("held", &1u64).unwrap(), 1);
    assert_eq!(store.save("template", &2u64).unwrap(), 1);
    next_change_of(&probe, "held", ChangeKind::Saved);
    assert_eq!(cache.get("held").unwrap().as_deref(), Some(&1));
    assert_eq!(cache.sequence("held"), Some(1));

    let table = format!(
        "{}.{}",
        trebuchet_postgres::quote_identifier(schema.name()),
        trebuchet_postgres::quote_identifier("actor_states")
    );
    schema
        .client()
        .unwrap()
        .batch_execute(&format!(
            "BEGIN; \
             ALTER TABLE {table} DISABLE TRIGGER USER; \
             UPDATE {table} SET state = (SELECT state FROM {table} WHERE actor_id = 'template') \
             WHERE actor_id = 'held'; \
             ALTER TABLE {table} ENABLE TRIGGER USER; \
             COMMIT;"
        ))
        .unwrap();
    assert_eq!(store.load::<u64>("held").unwrap(), Some(2));
    assert_eq!(store.sequence("held").unwrap(), Some(1));
    // Nothing was announced: the cache still serves the old state.
    assert!(matches!(
        probe.recv_timeout(QUIET),
        Err(RecvTimeoutError::Timeout)
    ));
    assert_eq!(cache.get("held").unwrap().as_deref(), Some(&1));

    listener.announce("held").unwrap();
    assert_eq!(
        next_change_of(&probe, "held", ChangeKind::Announced).sequence,
        1
    );
    common::wait_until("the cache reloads the announced actor", WAIT, || {
        cache.get("held").unwrap().as_deref() == Some(&2)
    });
    assert_eq!(cache.sequence("held"), Some(1));

    // And it follows the writes that come after.
    assert_eq!(store.save("held", &3u64).unwrap(), 2);
    common::wait_until("the cache sees the next write", WAIT, || {
        cache.get("held").unwrap().as_deref() == Some(&3)
    });
}

#[test]
fn announcing_an_invalid_actor_id_is_an_error_and_sends_nothing() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let sub = listener.subscribe();
    let mut raw = raw_listener(&schema);

    let long = "é".repeat(256);
    for (id, why) in [
        ("", InvalidActorId::Empty),
        ("a\0b", InvalidActorId::ContainsNul),
        (long.as_str(), InvalidActorId::TooLong { chars: 256 }),
    ] {
        match listener.announce(id) {
            Err(Error::InvalidActorId(got)) => assert_eq!(got, why, "{id:?}"),
            other => panic!("announce({id:?}) gave {other:?}"),
        }
    }

    common::assert_no_notification(&mut raw);
    assert!(matches!(
        sub.recv_timeout(QUIET),
        Err(RecvTimeoutError::Timeout)
    ));
    assert_eq!(listener.health().received, 0);
}
