//! Guarantee 5 of the design, **A slow subscriber hurts only itself**:
//!
//! > Queues are bounded; the listener thread never blocks on a subscriber;
//! > memory stays bounded.
//!
//! The tests of this file, against a real PostgreSQL: a subscriber that does
//! not read lags alone while another one receives every change, then gets a
//! lagged `Resync` (`slow_subscriber_lags_alone_then_gets_a_lagged_resync`);
//! a burst larger than a subscriber's queue keeps the queue's worth of
//! changes, drops the rest and says so with a `Resync`
//! (`a_burst_beyond_the_queue_keeps_its_head_and_then_resyncs`).

mod common;

use std::thread;

use trebuchet_postgres::crossbeam_channel;
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{ChangeKind, Event, ResyncReason};

use common::feed::{burst, expect_change, expect_quiet, next, Order, WAIT};

#[test]
fn slow_subscriber_lags_alone_then_gets_a_lagged_resync() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener_builder().queue_capacity(4).build().unwrap();
    let slow = listener.subscribe();
    let fast = listener.subscribe();

    // The fast subscriber reads on its own thread and acknowledges each
    // change, so that the writer never outruns its queue of 4.
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
    let reader = thread::spawn(move || {
        let mut order = Order::new("fast");
        let mut sequences = Vec::new();
        while sequences.len() < 52 {
            match fast.recv_timeout(WAIT) {
                Ok(event) => {
                    order.see(&event);
                    match event {
                        Event::Change(c) => {
                            sequences.push(c.sequence);
                            let _ = ack_tx.send(c.sequence);
                        }
                        other => panic!("the fast subscriber got {other:?}"),
                    }
                }
                Err(e) => panic!("the fast subscriber waited in vain: {e:?}"),
            }
        }
        sequences
    });

    for n in 1..=50u64 {
        assert_eq!(store.save("hot", &n).unwrap(), n);
        assert_eq!(
            ack_rx.recv_timeout(WAIT),
            Ok(n),
            "the fast subscriber did not get change {n}"
        );
    }
    let dropped = listener.health().dropped;
    assert!(dropped > 0, "{:?}", listener.health());

    // The slow subscriber starts reading; one more change comes after that.
    // Its queue may not have room for that change yet (the resync takes a
    // slot too): then the change is dropped as well, and announced by
    // another resync. Either way nothing newer comes before a resync.
    let mut order = Order::new("slow");
    let mut events = vec![next(&slow, &mut order)];
    assert_eq!(store.save("hot", &51u64).unwrap(), 51);
    assert_eq!(ack_rx.recv_timeout(WAIT), Ok(51));
    let mut resyncs = 0;
    while events.len() < 10 {
        let event = next(&slow, &mut order);
        resyncs += usize::from(matches!(event, Event::Resync(_)));
        let newest = matches!(&event, Event::Change(c) if c.sequence == 51);
        events.push(event);
        if newest || resyncs == 2 {
            break;
        }
    }
    let resync = events
        .iter()
        .position(|e| matches!(e, Event::Resync(_)))
        .unwrap_or_else(|| panic!("no resync for the slow subscriber: {events:?}"));
    assert!(resync <= 4, "more changes than the queue holds: {events:?}");
    assert!(
        events[..resync]
            .iter()
            .all(|e| matches!(e, Event::Change(c) if c.sequence <= 50)),
        "a change newer than the lost ones came before the resync: {events:?}"
    );
    let after = &events[resync..];
    assert_eq!(after.len(), 2, "{events:?}");
    assert_eq!(after[0], Event::Resync(ResyncReason::Lagged), "{events:?}");
    assert!(
        matches!(&after[1], Event::Resync(ResyncReason::Lagged))
            || matches!(&after[1], Event::Change(c) if c.sequence == 51
            ),
        "after the lost changes: one lagged resync, then the newer change \
         or (when it was lost too) another lagged resync: {events:?}"
    );

    // Once it keeps up, it gets changes again.
    assert_eq!(store.save("hot", &52u64).unwrap(), 52);
    assert_eq!(ack_rx.recv_timeout(WAIT), Ok(52));
    expect_change(&slow, &mut order, "hot", 52, ChangeKind::Saved);
    expect_quiet(&slow, "slow");

    assert_eq!(
        reader.join().expect("fast reader"),
        (1..=52).collect::<Vec<_>>()
    );
    assert!(listener.health().dropped >= dropped);
}

/// A burst larger than the queue: the first changes up to its capacity,
/// then a lagged resync, then the changes that came after.
#[test]
fn a_burst_beyond_the_queue_keeps_its_head_and_then_resyncs() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener_builder().queue_capacity(10).build().unwrap();
    let sub = listener.subscribe();
    let probe = listener.subscribe_actor("after");

    burst(&schema, "burst", 500);
    store.save("after", &1u32).unwrap();
    // The save comes after the burst: once the probe has it, the listener
    // has dealt with the whole burst.
    expect_change(
        &probe,
        &mut Order::new("probe"),
        "after",
        1,
        ChangeKind::Saved,
    );
    // The probe may get the save before the listener has counted it as
    // dropped for the full subscriber (the fan-out visits one subscriber
    // after another): wait for the count, then check it is exact.
    common::wait_until("the drops are counted", WAIT, || {
        listener.health().dropped > 490
    });
    let health = listener.health();
    assert_eq!(health.dropped, 490 + 1, "{health:?}");

    let mut order = Order::new("subscriber");
    for n in 1..=10 {
        expect_change(&sub, &mut order, "burst", n, ChangeKind::Saved);
    }
    assert_eq!(next(&sub, &mut order), Event::Resync(ResyncReason::Lagged));
    expect_quiet(&sub, "subscriber");
    store.save("after", &2u32).unwrap();
    expect_change(&sub, &mut order, "after", 2, ChangeKind::Saved);
}
