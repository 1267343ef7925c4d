//! The change feed against a real PostgreSQL: malformed payloads, filters,
//! many subscribers, callbacks, `select!`, and the errors of building a
//! listener.
//!
//! Every test that receives changes checks that no subscriber ever sees an
//! actor's sequence number go backwards (or repeat).
//!
//! The listener's guarantees have files of their own: delivery in order,
//! lost connections, server restarts and the state cache after a gap in
//! tests/no_silent_gap_in_the_change_stream.rs; slow subscribers in
//! tests/a_slow_subscriber_hurts_only_itself.rs; shutdown in
//! tests/clean_shutdown.rs; the seed's payload in
//! tests/wire_compatible_with_the_seed.rs.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::thread;

use trebuchet_postgres::crossbeam_channel::{self, select, TryRecvError};
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{
    ChangeKind, ChangeListener, ConnectFailure, Error, Event, EventBatch, Subscription,
};

use common::feed::{burst, expect_change, expect_quiet, next_change, Order, WAIT};

// ----- helpers ---------------------------------------------------------------

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

// ----- 1. malformed payloads -------------------------------------------------

#[test]
fn malformed_payloads_are_counted_and_skipped() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let sub = listener.subscribe();
    let mut order = Order::new("subscriber");
    let channel = schema.channel();

    let mut client = schema.client().unwrap();
    client
        .batch_execute(&format!(
            "NOTIFY \"{channel}\", 'not json'; \
             NOTIFY \"{channel}\", '{{}}'; \
             NOTIFY \"{channel}\", '{{\"actorID\":\"neg\",\"sequenceNumber\":-1,\"timestamp\":1}}';"
        ))
        .unwrap();
    // In a transaction of its own, after the bad ones.
    store.save("fine", &1u32).unwrap();

    // The first event is the valid change: nothing was made of the bad ones.
    expect_change(&sub, &mut order, "fine", 1, ChangeKind::Saved);
    let health = listener.health();
    assert_eq!(health.malformed, 3, "{health:?}");
    assert_eq!(health.received, 4, "{health:?}");
    assert!(health.connected, "{health:?}");

    // The thread is alive and still listening.
    store.save("fine", &2u32).unwrap();
    expect_change(&sub, &mut order, "fine", 2, ChangeKind::Saved);
    assert_eq!(listener.health().reconnects, 0);
}

// ----- 2. filters ------------------------------------------------------------

#[test]
fn filters_deliver_only_their_actors_and_dropping_unsubscribes() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let only_a = listener.subscribe_actor("a");
    let a_and_b = listener.subscribe_actors(["a", "b"]);
    let all = listener.subscribe();
    assert_eq!(listener.health().subscribers, 3);
    let (mut oa, mut oab, mut oall) = (
        Order::new("only a"),
        Order::new("a and b"),
        Order::new("everything"),
    );

    // Ends with a change of "a", so a filtered subscriber that received
    // anything else would see it before that last change.
    let writes = ["a", "b", "c", "a", "c", "b", "a"];
    let mut written = Vec::new();
    for id in writes {
        let seq = store.save(id, &0u32).unwrap();
        written.push((id, seq));
    }

    for &(id, seq) in &written {
        expect_change(&all, &mut oall, id, seq, ChangeKind::Saved);
    }
    for &(id, seq) in written.iter().filter(|(id, _)| *id == "a" || *id == "b") {
        expect_change(&a_and_b, &mut oab, id, seq, ChangeKind::Saved);
    }
    for &(id, seq) in written.iter().filter(|(id, _)| *id == "a") {
        expect_change(&only_a, &mut oa, id, seq, ChangeKind::Saved);
    }
    expect_quiet(&all, "everything");
    assert_eq!(only_a.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(a_and_b.try_recv(), Err(TryRecvError::Empty));

    // Dropping unsubscribes; the others go on.
    drop(only_a);
    assert_eq!(listener.health().subscribers, 2);
    store.save("b", &0u32).unwrap();
    expect_change(&a_and_b, &mut oab, "b", 3, ChangeKind::Saved);
    expect_change(&all, &mut oall, "b", 3, ChangeKind::Saved);
    drop(a_and_b);
    assert_eq!(listener.health().subscribers, 1);
    drop(all);
    assert_eq!(listener.health().subscribers, 0);
    assert_eq!(listener.health().dropped, 0);
}

// ----- 3. many subscribers ---------------------------------------------------

#[test]
fn a_thousand_subscribers_all_receive_and_unsubscribe() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener_builder().queue_capacity(16).build().unwrap();
    // Every other one filtered to the actor.
    let subs: Vec<Subscription> = (0..1000)
        .map(|i| {
            if i % 2 == 0 {
                listener.subscribe()
            } else {
                listener.subscribe_actor("many")
            }
        })
        .collect();
    assert_eq!(listener.health().subscribers, 1000);

    for n in 1..=6u64 {
        assert_eq!(store.save("many", &n).unwrap(), n);
    }
    for (i, sub) in subs.iter().enumerate() {
        let mut order = Order::new("one of many");
        for n in 1..=6 {
            let c = next_change(sub, &mut order);
            assert_eq!(
                (c.actor_id.as_str(), c.sequence),
                ("many", n),
                "subscriber {i}"
            );
        }
        assert_eq!(sub.try_recv(), Err(TryRecvError::Empty), "subscriber {i}");
    }
    let health = listener.health();
    assert_eq!((health.dropped, health.received), (0, 6), "{health:?}");

    drop(subs);
    assert_eq!(listener.health().subscribers, 0);
    // The listener carries on without them.
    let last = listener.subscribe();
    store.save("many", &7u64).unwrap();
    expect_change(&last, &mut Order::new("last"), "many", 7, ChangeKind::Saved);
}

#[test]
fn subscribers_share_each_change_and_get_bursts_in_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    // Queues that hold the whole burst: this test reads the subscribers one
    // event at a time, in turn, and on a busy machine the listener may fill
    // a smaller queue before the reader comes back to it (the lag and its
    // resync are `a_slow_subscriber_hurts_only_itself`'s subject).
    let listener = store
        .listener_builder()
        .queue_capacity(4_096)
        .build()
        .unwrap();
    let first = listener.subscribe();
    let second = listener.subscribe();
    let burst_only = listener.subscribe_actor("burst");
    let other_only = listener.subscribe_actor("other");

    burst(&schema, "burst", 2_000);
    store.save("other", &1u32).unwrap();
    let (mut o1, mut o2, mut ob) = (
        Order::new("first"),
        Order::new("second"),
        Order::new("burst only"),
    );
    for n in 1..=2_000 {
        let a = expect_change(&first, &mut o1, "burst", n, ChangeKind::Saved);
        let b = expect_change(&second, &mut o2, "burst", n, ChangeKind::Saved);
        expect_change(&burst_only, &mut ob, "burst", n, ChangeKind::Saved);
        // One allocation per change, whoever receives it.
        assert!(Arc::ptr_eq(&a, &b), "change {n} was copied per subscriber");
    }
    for (sub, order) in [(&first, &mut o1), (&second, &mut o2)] {
        expect_change(sub, order, "other", 1, ChangeKind::Saved);
    }
    expect_change(
        &other_only,
        &mut Order::new("other only"),
        "other",
        1,
        ChangeKind::Saved,
    );
    assert_eq!(burst_only.try_recv(), Err(TryRecvError::Empty));
    let health = listener.health();
    assert_eq!((health.received, health.dropped), (2_001, 0), "{health:?}");
}

/// Read through `receiver()`: batches of at most a quarter of the queue,
/// in order, whose events can be read in place.
#[test]
fn batches_are_at_most_a_quarter_of_the_queue_and_read_in_place() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store
        .listener_builder()
        .queue_capacity(400)
        .build()
        .unwrap();
    let sub = listener.subscribe();

    burst(&schema, "burst", 300);
    let mut order = Order::new("batch reader");
    let mut sizes = Vec::new();
    let mut next = 1;
    while next <= 300 {
        let mut batch = sub.receiver().recv_timeout(WAIT).expect("a batch");
        sizes.push(batch.len());
        assert!((1..=100).contains(&batch.len()), "{sizes:?}");
        let rest = batch.len() - 1;
        let first = batch.next().expect("one event");
        assert_eq!(batch.as_slice().len(), rest);
        for event in std::iter::once(&first).chain(batch.as_slice()) {
            order.see(event);
            match event {
                Event::Change(c) => assert_eq!((c.actor_id.as_str(), c.sequence), ("burst", next)),
                other => panic!("unexpected {other:?}"),
            }
            next += 1;
        }
    }
    expect_quiet(&sub, "batch reader");
    assert_eq!(listener.health().dropped, 0);
    eprintln!("batch sizes: {sizes:?}");
}

// ----- 4. callbacks ----------------------------------------------------------

#[test]
fn on_change_runs_off_the_listener_thread_and_stops_with_its_handle() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let listener_thread = format!("trebuchet-listener-{}", schema.channel());
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = listener
        .on_change(move |event| {
            let name = thread::current().name().map(str::to_owned);
            let _ = tx.send((name, event));
        })
        .unwrap();
    assert_eq!(listener.health().subscribers, 1);
    let probe = listener.subscribe();
    let mut probe_order = Order::new("probe");
    let mut order = Order::new("callback");

    for n in 1..=3u64 {
        store.save("cb", &n).unwrap();
    }
    for n in 1..=3u64 {
        let (name, event) = rx.recv_timeout(WAIT).expect("the callback ran");
        order.see(&event);
        assert!(
            matches!(&event, Event::Change(c) if c.actor_id == "cb" && c.sequence == n),
            "{event:?}"
        );
        assert_ne!(name.as_deref(), Some(listener_thread.as_str()));
        assert_ne!(name, thread::current().name().map(str::to_owned));
        expect_change(&probe, &mut probe_order, "cb", n, ChangeKind::Saved);
    }

    drop(handle);
    assert_eq!(listener.health().subscribers, 1); // the probe
    store.save("cb", &4u64).unwrap();
    expect_change(&probe, &mut probe_order, "cb", 4, ChangeKind::Saved);
    // The callback's thread has ended and dropped the callback.
    assert_eq!(
        rx.try_recv().map(|(_, e)| e),
        Err(TryRecvError::Disconnected)
    );
}

// ----- 5. select! ------------------------------------------------------------

#[test]
fn select_works_with_a_subscription_and_another_channel() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let sub = listener.subscribe();
    let (tx, rx) = crossbeam_channel::unbounded::<&'static str>();
    let mut order = Order::new("subscriber");

    /// The one event of a batch received through `select!`.
    #[track_caller]
    fn only(batch: Result<EventBatch, crossbeam_channel::RecvError>) -> Event {
        let events: Vec<Event> = batch.expect("listener alive").collect();
        assert_eq!(events.len(), 1, "{events:?}");
        events.into_iter().next().unwrap()
    }

    tx.send("other").unwrap();
    select! {
        recv(sub.receiver()) -> batch => panic!("unexpected events {batch:?}"),
        recv(rx) -> message => assert_eq!(message, Ok("other")),
        default(WAIT) => panic!("select! saw nothing"),
    }

    store.save("sel", &1u32).unwrap();
    select! {
        recv(sub.receiver()) -> batch => {
            let event = only(batch);
            order.see(&event);
            assert!(
                matches!(&event, Event::Change(c) if c.actor_id == "sel" && c.sequence == 1),
                "{event:?}"
            );
        }
        recv(rx) -> message => panic!("unexpected message {message:?}"),
        default(WAIT) => panic!("select! saw no change"),
    }

    // Both ready: both are eventually taken, in any order.
    store.save("sel", &2u32).unwrap();
    tx.send("again").unwrap();
    let (mut got_change, mut got_message) = (false, false);
    for _ in 0..2 {
        select! {
            recv(sub.receiver()) -> batch => {
                let event = only(batch);
                order.see(&event);
                assert!(matches!(&event, Event::Change(c) if c.sequence == 2), "{event:?}");
                got_change = true;
            }
            recv(rx) -> message => {
                assert_eq!(message, Ok("again"));
                got_message = true;
            }
            default(WAIT) => panic!("select! saw nothing"),
        }
    }
    assert!(got_change && got_message);

    // After shutdown the subscription's arm reports disconnection.
    listener.shutdown();
    select! {
        recv(sub.receiver()) -> batch => assert!(batch.is_err(), "{batch:?}"),
        default(WAIT) => panic!("select! did not see the shutdown"),
    }
}

// ----- 6. errors of building a listener --------------------------------------

#[test]
fn invalid_channel_and_refused_connection_are_reported() {
    let port = closed_port();
    let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable");

    // The channel is checked before connecting: the port would refuse.
    let err = ChangeListener::builder()
        .url(&url)
        .channel("bad;name")
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidIdentifier {
                what: "channel",
                ..
            }
        ),
        "{err:?}"
    );
    let schema = TestDatabase::shared().schema();
    let err = schema
        .store()
        .listener_builder()
        .channel("bad;name")
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidIdentifier { .. }), "{err:?}");

    let err = ChangeListener::connect(&url).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect {
                failure: ConnectFailure::Refused,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&port.to_string()), "{message}");
}
