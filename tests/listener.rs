//! The change feed against a real PostgreSQL: delivery, the seed's payload,
//! malformed payloads, filters, lost connections and server restarts,
//! slow subscribers, shutdown, many subscribers, the state cache, callbacks,
//! `select!`, and the errors of building a listener.
//!
//! Every test that receives changes checks that no subscriber ever sees an
//! actor's sequence number go backwards (or repeat).

mod common;

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use trebuchet_postgres::crossbeam_channel::{self, select, RecvTimeoutError, TryRecvError};
use trebuchet_postgres::postgres::config::Host;
use trebuchet_postgres::testing::{StopMode, TestCluster, TestDatabase, TestSchema};
use trebuchet_postgres::{
    ChangeKind, ChangeListener, ConnectFailure, ConnectOptions, Error, Event, EventBatch,
    PoolOptions, ResyncReason, StateCache, StateStore, Subscription,
};

use common::assert_recent;
use common::feed::{
    backends, burst, exclusive, expect_change, expect_quiet, listener_backend, named_listener,
    next, next_change, next_within, terminate, unique_app_name, Order, WAIT,
};

/// How long a test waits for a listener to come back after a server restart.
const RESTART_WAIT: Duration = Duration::from_secs(60);

/// How long a test waits for `shutdown()` (or the drop of the last clone)
/// to return before it fails. The listeners of those tests have nothing
/// else that would end the wait sooner (a heartbeat of an hour, a silent
/// server that never answers), so only a prompt stop returns in time.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// A heartbeat interval longer than any test: the listener then has no
/// periodic duty that would wake it up before [`STOP_WAIT`] is over.
const NO_HEARTBEAT: Duration = Duration::from_secs(3600);

// ----- helpers ---------------------------------------------------------------

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// A store on a cluster of the test's own (default table and channel),
/// whose calls give up after 2 s while the server is down.
fn cluster_store(cluster: &TestCluster, migrate: bool) -> StateStore {
    StateStore::builder()
        .connect_options(cluster.connect_options())
        .pool_options(PoolOptions::default().connection_timeout(Duration::from_secs(2)))
        .migrate(migrate)
        .build()
        .expect("connect to the test's own cluster")
}

/// A TCP relay on 127.0.0.1 to the test server. It can cut every connection
/// it carries, and then go silent: accept new connections and never answer,
/// as a hung server or proxy does after the TCP handshake.
struct Relay {
    port: u16,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Every socket it holds (both ends of relayed connections, and the
    /// silent ones), to cut them.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    silent_count: Arc<AtomicU64>,
    threads: Arc<Mutex<Vec<thread::JoinHandle<()>>>>,
}

impl Relay {
    fn start(server: &ConnectOptions) -> Relay {
        let host = match server.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            other => panic!("the relay needs a TCP test server, not {other:?}"),
        };
        let upstream = (host, server.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        listener.set_nonblocking(true).unwrap();
        let relay = Relay {
            port: listener.local_addr().unwrap().port(),
            silent: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            sockets: Arc::new(Mutex::new(Vec::new())),
            silent_count: Arc::new(AtomicU64::new(0)),
            threads: Arc::new(Mutex::new(Vec::new())),
        };
        let (silent, stop, sockets, silent_count, threads) = (
            Arc::clone(&relay.silent),
            Arc::clone(&relay.stop),
            Arc::clone(&relay.sockets),
            Arc::clone(&relay.silent_count),
            Arc::clone(&relay.threads),
        );
        let acceptor = thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    // A failing relay shows as a listener that cannot connect.
                    Err(_) => break,
                };
                client.set_nonblocking(false).unwrap();
                if silent.load(Ordering::Relaxed) {
                    silent_count.fetch_add(1, Ordering::Relaxed);
                    sockets.lock().unwrap().push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)) else {
                    continue; // drops the client's connection
                };
                let mut held = sockets.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                drop(held);
                let mut threads = threads.lock().unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    threads.push(thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    }));
                }
            }
        });
        relay.threads.lock().unwrap().push(acceptor);
        relay
    }

    fn go_silent(&self) {
        self.silent.store(true, Ordering::Relaxed);
    }

    fn silent_connections(&self) -> u64 {
        self.silent_count.load(Ordering::Relaxed)
    }

    /// Closes every connection it holds.
    fn cut(&self) {
        for socket in self.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
        let threads: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

// ----- 1. delivery -----------------------------------------------------------

#[test]
fn delivers_inserts_updates_and_deletes_in_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    assert_eq!(listener.channel(), schema.channel());
    let sub = listener.subscribe();
    let mut order = Order::new("subscriber");

    assert_eq!(store.save("room-1", &1u32).unwrap(), 1); // insert
    assert_eq!(store.save("room-1", &2u32).unwrap(), 2); // update
    assert!(store.delete("room-1").unwrap());
    assert_eq!(store.save("room-1", &3u32).unwrap(), 4); // created again

    for (sequence, kind) in [
        (1, ChangeKind::Saved),
        (2, ChangeKind::Saved),
        (3, ChangeKind::Deleted),
        (4, ChangeKind::Saved),
    ] {
        let c = expect_change(&sub, &mut order, "room-1", sequence, kind);
        assert_recent("change timestamp", c.timestamp);
    }
    expect_quiet(&sub, "subscriber");

    let health = listener.health();
    assert!(health.connected, "{health:?}");
    assert_eq!(health.received, 4, "{health:?}");
    assert_eq!(
        (health.malformed, health.dropped, health.reconnects),
        (0, 0, 0),
        "{health:?}"
    );
    assert_eq!(health.subscribers, 1, "{health:?}");
}

// ----- 2. the seed's payload -------------------------------------------------

#[test]
fn receives_the_seeds_payload_without_op_as_a_save() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let sub = listener.subscribe();
    let mut order = Order::new("subscriber");

    schema
        .client()
        .unwrap()
        .execute(
            "SELECT pg_notify($1, $2)",
            &[
                &schema.channel(),
                &r#"{"actorID":"x","sequenceNumber":7,"timestamp":1764000000.5}"#,
            ],
        )
        .unwrap();

    let c = expect_change(&sub, &mut order, "x", 7, ChangeKind::Saved);
    assert_eq!(
        c.timestamp,
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_764_000_000.5)
    );
    assert_eq!(listener.health().malformed, 0);
}

// ----- 3. malformed payloads -------------------------------------------------

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

// ----- 4. filters --------------------------------------------------------------

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

// ----- 5. a terminated backend ------------------------------------------------

#[test]
fn terminated_backend_reconnects_with_resync_and_exact_catch_up() {
    let _alone = exclusive();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let app = unique_app_name("terminate");
    let listener = named_listener(
        &schema,
        &store,
        &app,
        (Duration::from_millis(500), Duration::from_secs(1)),
    );
    let all = listener.subscribe();
    let some = listener.subscribe_actors(["a", "b", "c", "e"]);
    let (mut oall, mut osome) = (Order::new("everything"), Order::new("a, b, c, e"));

    for id in ["a", "b", "c"] {
        assert_eq!(store.save(id, &1u32).unwrap(), 1);
    }
    for id in ["a", "b", "c"] {
        expect_change(&all, &mut oall, id, 1, ChangeKind::Saved);
        expect_change(&some, &mut osome, id, 1, ChangeKind::Saved);
    }

    let mut admin = schema.client().unwrap();
    let pid = listener_backend(&mut admin, &app);
    terminate(&mut admin, pid);

    // While the listener is away: a moves, b is deleted, e is created,
    // d (not in the filter) is created, c stays.
    assert_eq!(store.save("a", &2u32).unwrap(), 2);
    assert!(store.delete("b").unwrap());
    assert_eq!(store.save("e", &1u32).unwrap(), 1);
    assert_eq!(store.save("d", &1u32).unwrap(), 1);
    assert!(
        backends(&mut admin, &app).is_empty(),
        "the listener came back before the writes of the gap were done: \
         the test did not test a gap"
    );

    // The unfiltered subscriber: a resync first.
    match next(&all, &mut oall) {
        Event::Resync(ResyncReason::Reconnected) => {}
        other => panic!("expected a resync after the reconnect, got {other:?}"),
    }
    // New changes flow again, after the resync and nothing else.
    assert_eq!(store.save("c", &2u32).unwrap(), 2);
    expect_change(&all, &mut oall, "c", 2, ChangeKind::Saved);

    // The filtered subscriber: exactly the current versions of the actors
    // that moved, no resync, then the new change.
    let mut caught_up = HashMap::new();
    loop {
        match next(&some, &mut osome) {
            Event::Change(c) if c.actor_id == "c" => {
                assert_eq!((c.sequence, c.kind), (2, ChangeKind::Saved), "{c:?}");
                break;
            }
            Event::Change(c) => {
                assert_recent("catch-up timestamp", c.timestamp);
                let previous = caught_up.insert(c.actor_id.clone(), (c.sequence, c.kind));
                assert!(previous.is_none(), "caught up twice on {c:?}");
            }
            other => panic!("a filtered subscriber got {other:?} instead of catch-up"),
        }
    }
    let expected: HashMap<String, (u64, ChangeKind)> = [
        ("a".to_owned(), (2, ChangeKind::Saved)),
        ("b".to_owned(), (2, ChangeKind::Deleted)),
        ("e".to_owned(), (1, ChangeKind::Saved)),
    ]
    .into_iter()
    .collect();
    assert_eq!(caught_up, expected);

    expect_quiet(&all, "everything");
    assert_eq!(some.try_recv(), Err(TryRecvError::Empty));

    let health = listener.health();
    assert!(health.connected, "{health:?}");
    assert!(health.reconnects >= 1, "{health:?}");
    assert!(health.last_error.is_some(), "{health:?}");
    assert_eq!(health.subscribers, 2, "{health:?}");
}

// ----- 6. server restarts --------------------------------------------------

/// A listener on a cluster of the test's own survives `pg_ctl stop -m
/// <mode>` and a restart on the same port.
fn survives_a_restart(mode: StopMode) {
    let cluster = TestCluster::start().expect("start a cluster of the test's own");
    let store = cluster_store(&cluster, true);
    let listener = store
        .listener_builder()
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(250))
        .build()
        .unwrap();
    let all = listener.subscribe();
    let one = listener.subscribe_actor("r");
    let (mut oall, mut oone) = (Order::new("everything"), Order::new("r"));

    assert_eq!(store.save("r", &1u32).unwrap(), 1);
    expect_change(&all, &mut oall, "r", 1, ChangeKind::Saved);
    expect_change(&one, &mut oone, "r", 1, ChangeKind::Saved);

    cluster.stop(mode).expect("stop the cluster");
    common::wait_until("the listener notices the server is gone", WAIT, || {
        !listener.health().connected
    });
    // At least one reconnect fails on the stopped server.
    common::wait_until("a reconnect to the stopped server fails", WAIT, || {
        listener
            .health()
            .last_error
            .is_some_and(|e| e.contains("connection refused"))
    });
    assert!(!listener.health().connected);
    cluster.restart().expect("restart the cluster");

    match next_within(&all, &mut oall, RESTART_WAIT) {
        Event::Resync(ResyncReason::Reconnected) => {}
        other => panic!("expected a resync after the restart, got {other:?}"),
    }
    // The store's pooled connections died with the server; a fresh store
    // writes without first spending an error on each of them.
    let writer = cluster_store(&cluster, false);
    assert_eq!(writer.save("r", &2u32).unwrap(), 2);
    assert_eq!(writer.save("s", &1u32).unwrap(), 1);
    expect_change(&all, &mut oall, "r", 2, ChangeKind::Saved);
    expect_change(&all, &mut oall, "s", 1, ChangeKind::Saved);
    // Nothing of r moved in the gap: no catch-up, just the new change.
    expect_change(&one, &mut oone, "r", 2, ChangeKind::Saved);
    assert_eq!(one.try_recv(), Err(TryRecvError::Empty));

    let health = listener.health();
    assert!(health.connected, "{health:?}");
    assert!(health.reconnects >= 1, "{health:?}");
}

#[test]
fn reconnects_after_a_fast_server_restart() {
    survives_a_restart(StopMode::Fast);
}

#[test]
fn reconnects_after_an_immediate_server_restart() {
    survives_a_restart(StopMode::Immediate);
}

// ----- 7. a slow subscriber ------------------------------------------------

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

// ----- 8. shutdown ---------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Stop {
    Shutdown,
    /// Drop every clone of the listener, then its last subscription.
    DropLastHandle,
}

/// Runs `stop` on a thread of its own and waits for it to return, failing
/// after [`STOP_WAIT`]. Prints how long it took.
#[track_caller]
fn stops_within_bound(what: &str, stop: impl FnOnce() + Send + 'static) {
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let stopper = thread::spawn(move || {
        let started = Instant::now();
        stop();
        let _ = done_tx.send(started.elapsed());
    });
    let took = done_rx
        .recv_timeout(STOP_WAIT)
        .unwrap_or_else(|_| panic!("{what} did not return within {STOP_WAIT:?}"));
    stopper.join().expect("stopper");
    eprintln!("{what} returned after {took:?}");
}

/// Stops a listener as `how` says, idle or while a writer saves in a loop,
/// and checks that it stops (the call returns with the thread joined while
/// nothing else would wake the listener: no heartbeat, and a writer that
/// keeps saving until then), ends its subscriptions (or drops the last one)
/// and closes its connection.
fn stops_promptly(schema: &TestSchema, store: &StateStore, how: Stop, busy: bool) {
    let app = unique_app_name("stop");
    let mut options = schema.connect_options();
    options.application_name(&app);
    let listener = store
        .listener_builder()
        .connect_options(options)
        .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5))
        .heartbeat(NO_HEARTBEAT, NO_HEARTBEAT)
        .build()
        .expect("start the listener");
    let mut admin = schema.client().unwrap();
    listener_backend(&mut admin, &app);
    let sub = listener.subscribe();
    let warm = format!("warm-{app}");
    store.save(&warm, &0u32).unwrap();
    let mut order = Order::new("subscriber");
    expect_change(&sub, &mut order, &warm, 1, ChangeKind::Saved);

    // Saves until told to stop (or, should the stop never come back, for a
    // while after the test gave up on it).
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = busy.then(|| {
        let store = store.clone();
        let stop = Arc::clone(&stop_writer);
        let id = format!("busy-{app}");
        thread::spawn(move || {
            let give_up = Instant::now() + STOP_WAIT * 2;
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                store.save(&id, &n).unwrap();
                n += 1;
            }
            n
        })
    });
    if busy {
        // Busy for real: changes are flowing.
        for _ in 0..3 {
            next_change(&sub, &mut order);
        }
    }

    // Another thread waits on the subscription: it drains what is queued,
    // then sees the disconnection, or, told to, drops the subscription.
    let what = format!("{how:?} (busy: {busy})");
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let (drop_tx, drop_rx) = crossbeam_channel::bounded::<()>(1);
    let waiter = {
        let what = what.clone();
        thread::spawn(move || {
            let mut drained = 0u64;
            loop {
                select! {
                    recv(sub.receiver()) -> batch => match batch {
                        Ok(batch) => {
                            for event in batch {
                                order.see(&event);
                                drained += 1;
                            }
                        }
                        Err(_) => break,
                    },
                    recv(drop_rx) -> _ => {
                        stops_within_bound(&what, move || drop(sub));
                        break;
                    }
                }
            }
            let _ = done_tx.send(drained);
        })
    };

    let clone = listener.clone();
    match how {
        Stop::Shutdown => {
            stops_within_bound(&what, move || listener.shutdown());
            clone.shutdown(); // idempotent
            let health = clone.health();
            assert!(!health.connected, "{health:?}");
            assert_eq!(health.subscribers, 0, "{health:?}");
            // A subscription made after shutdown ends at once.
            assert_eq!(
                clone.subscribe().try_recv(),
                Err(TryRecvError::Disconnected)
            );
        }
        Stop::DropLastHandle => {
            drop(listener);
            // Another clone keeps it running.
            let health = clone.health();
            assert!(health.connected, "{health:?}");
            assert_eq!(health.subscribers, 1, "{health:?}");
            // So does the subscription, once the clones are gone.
            drop(clone);
            listener_backend(&mut admin, &app);
            // Dropping it, the last handle, stops the listener.
            drop_tx.send(()).unwrap();
        }
    }

    done_rx
        .recv_timeout(STOP_WAIT + WAIT)
        .unwrap_or_else(|_| panic!("the subscription did not end after {what}"));
    waiter.join().expect("waiter");
    stop_writer.store(true, Ordering::Relaxed);
    if let Some(writer) = writer {
        assert!(writer.join().expect("writer") > 0);
    }
    common::wait_until(
        "the listener's backend leaves pg_stat_activity",
        WAIT,
        || backends(&mut admin, &app).is_empty(),
    );
}

#[test]
fn shutdown_stops_promptly_idle_and_busy() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    stops_promptly(&schema, &store, Stop::Shutdown, false);
    stops_promptly(&schema, &store, Stop::Shutdown, true);
}

#[test]
fn dropping_the_last_handle_stops_promptly_idle_and_busy() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    stops_promptly(&schema, &store, Stop::DropLastHandle, false);
    stops_promptly(&schema, &store, Stop::DropLastHandle, true);
}

/// Shutdown while the listener works through a flood of notifications.
///
/// The driver hands the listener whatever the socket holds (here the
/// kernel's 128 KiB receive buffer, about 1,400 notifications); the listener
/// then handles them one by one. With 10,000 subscribers each takes a few
/// milliseconds, so one such batch takes several seconds. A first
/// transaction of 200 notifications keeps the listener busy while a second
/// of 1,700 fills the socket; shutdown is requested as soon as the listener
/// starts on the second, that is at the start of a full batch. The listener
/// must stop after the notification it is handling: it handles only a few
/// more after the call, not the rest of the batch.
#[test]
fn shutdown_is_prompt_under_a_flood_of_notifications() {
    let _alone = exclusive();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let app = unique_app_name("flood");
    let mut options = schema.connect_options();
    options.application_name(&app);
    let listener = store
        .listener_builder()
        .connect_options(options)
        .queue_capacity(1)
        .build()
        .unwrap();
    let subs: Vec<Subscription> = (0..10_000).map(|_| listener.subscribe()).collect();

    let mut client = schema.client().unwrap();
    let announce = "SELECT count(pg_notify($1, format( \
                    '{\"actorID\":\"flood\",\"sequenceNumber\":%s}', g))) \
                    FROM generate_series($2::BIGINT, $3::BIGINT) g";
    let channel = schema.channel();
    client
        .execute(announce, &[&channel, &1i64, &200i64])
        .unwrap();
    // Once the listener has taken in the first, the second fills the socket.
    common::wait_until("the listener starts on the first transaction", WAIT, || {
        listener.health().received > 0
    });
    client
        .execute(announce, &[&channel, &201i64, &1_900i64])
        .unwrap();
    common::wait_until(
        "the listener gets to the flood",
        Duration::from_secs(30),
        || listener.health().received > 200,
    );

    let probe = listener.clone();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let stopper = thread::spawn(move || {
        let at_call = listener.health().received;
        let started = Instant::now();
        listener.shutdown();
        let _ = done_tx.send((at_call, started.elapsed()));
    });
    let (at_call, took) = done_rx.recv_timeout(STOP_WAIT).unwrap_or_else(|_| {
        panic!(
            "shutdown() did not return within {STOP_WAIT:?} while the listener worked \
             through a batch of notifications ({} of 1,900 received)",
            probe.health().received
        )
    });
    stopper.join().expect("stopper");
    // The thread is joined: the count is final.
    let handled_after = probe.health().received - at_call;
    eprintln!(
        "shutdown returned after {took:?}; {handled_after} notifications handled after the call"
    );
    assert!(
        handled_after < 500,
        "{handled_after} notifications were handled after shutdown() was called \
         ({at_call} before): the listener finishes every batch the driver hands it \
         before it looks at the shutdown flag"
    );
    // Queued events drain, then every subscription ends.
    for sub in &subs {
        let mut drained = 0;
        while sub.recv_timeout(WAIT).is_ok() {
            drained += 1;
            assert!(drained <= 1, "more events than the queue holds");
        }
        assert_eq!(sub.try_recv(), Err(TryRecvError::Disconnected));
    }
    let mut admin = schema.client().unwrap();
    common::wait_until(
        "the listener's backend leaves pg_stat_activity",
        WAIT,
        || backends(&mut admin, &app).is_empty(),
    );
}

/// A subscription keeps its listener running after every handle of the
/// listener is gone: it still receives changes, and the listener still
/// reconnects for it. Dropping it, the last of them, stops the thread and
/// closes the connection.
#[test]
fn a_subscription_keeps_its_listener_running_after_every_handle_is_dropped() {
    let _alone = exclusive();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let app = unique_app_name("owned");
    let listener = named_listener(
        &schema,
        &store,
        &app,
        (Duration::from_millis(50), Duration::from_millis(250)),
    );
    let sub = listener.subscribe();
    let callback_seen = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&callback_seen);
    let callback = listener
        .on_change(move |event| {
            if let Event::Change(c) = event {
                seen.store(c.sequence, Ordering::Release);
            }
        })
        .unwrap();
    let clone = listener.clone();
    drop(listener);
    drop(clone);

    let mut order = Order::new("subscriber");
    store.save("owned", &1u32).unwrap();
    expect_change(&sub, &mut order, "owned", 1, ChangeKind::Saved);
    let mut admin = schema.client().unwrap();
    let pid = listener_backend(&mut admin, &app);

    // It still reconnects, for the subscription alone.
    terminate(&mut admin, pid);
    match next(&sub, &mut order) {
        Event::Resync(ResyncReason::Reconnected) => {}
        other => panic!("expected a resync after the reconnect, got {other:?}"),
    }
    store.save("owned", &2u32).unwrap();
    expect_change(&sub, &mut order, "owned", 2, ChangeKind::Saved);
    common::wait_until("the callback sees the second change", WAIT, || {
        callback_seen.load(Ordering::Acquire) == 2
    });

    // The callback's subscription keeps it running too.
    stops_within_bound("dropping a subscription while a callback runs", move || {
        drop(sub)
    });
    listener_backend(&mut admin, &app);
    store.save("owned", &3u32).unwrap();
    common::wait_until("the callback sees the third change", WAIT, || {
        callback_seen.load(Ordering::Acquire) == 3
    });

    // The last one: dropping it stops and joins the thread, which closes
    // the connection.
    stops_within_bound("dropping the last subscription", move || drop(callback));
    common::wait_until(
        "the listener's backend leaves pg_stat_activity",
        WAIT,
        || backends(&mut admin, &app).is_empty(),
    );
}

/// A cache made from a listener that is dropped at once keeps following
/// writes: its subscription keeps the listener running.
#[test]
fn a_cache_keeps_a_listener_no_one_else_holds_running() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let cache: StateCache<u64> = StateCache::new(&store, &store.listener().unwrap()).unwrap();
    store.save("followed", &1u64).unwrap();
    assert_eq!(cache.get("followed").unwrap().as_deref(), Some(&1));
    store.save("followed", &2u64).unwrap();
    common::wait_until("the cache sees the second write", WAIT, || {
        cache.sequence("followed") == Some(2)
    });
    assert_eq!(cache.get("followed").unwrap().as_deref(), Some(&2));
}

/// Shutdown while a reconnect waits on a server that accepted the TCP
/// connection but never answers (a hung server or proxy).
#[test]
fn shutdown_is_prompt_while_a_reconnect_waits_on_a_silent_server() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let relay = Relay::start(&schema.connect_options());
    let mut options = schema.connect_options();
    options.host("127.0.0.1").port(relay.port);
    let listener = store
        .listener_builder()
        .connect_options(options)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    let sub = listener.subscribe();
    let mut order = Order::new("subscriber");
    store.save("relayed", &1u32).unwrap();
    expect_change(&sub, &mut order, "relayed", 1, ChangeKind::Saved);

    // From now on the "server" accepts connections and says nothing.
    relay.go_silent();
    relay.cut();
    common::wait_until("the listener waits on the silent server", WAIT, || {
        !listener.health().connected && relay.silent_connections() >= 1
    });

    // The silent connection stays open until shutdown() has returned: only
    // a stop that does not wait on the connect returns.
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let stopper = thread::spawn(move || {
        let started = Instant::now();
        listener.shutdown();
        let _ = done_tx.send(started.elapsed());
    });
    let prompt = done_rx.recv_timeout(STOP_WAIT);
    // Closing the silent connection releases a connect that still waits.
    relay.cut();
    let late = done_rx.recv_timeout(WAIT);
    stopper.join().expect("stopper");
    let took = prompt.unwrap_or_else(|_| {
        panic!(
            "shutdown() did not return within {STOP_WAIT:?} while a reconnect waited on a \
             server that accepted the connection but never answered; it returned {late:?} \
             after the test closed that connection"
        )
    });
    eprintln!("shutdown returned after {took:?} while a reconnect waited");
    assert_eq!(sub.recv_timeout(WAIT), Err(RecvTimeoutError::Disconnected));
}

// ----- 9. many subscribers -------------------------------------------------

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
    let listener = store.listener().unwrap();
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

// ----- 10. the state cache -------------------------------------------------

#[test]
fn cache_converges_after_writes_deletes_and_a_lost_connection() {
    let _alone = exclusive();
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let app = unique_app_name("cache");
    let listener = named_listener(
        &schema,
        &store,
        &app,
        (Duration::from_millis(500), Duration::from_secs(1)),
    );
    let cache: StateCache<u64> = StateCache::new(&store, &listener).unwrap();
    // Another store (its own pool) on the same table.
    let other = schema.store_builder().build().unwrap();

    store.save("p1", &10u64).unwrap();
    store.save("p2", &20u64).unwrap();
    assert_eq!(cache.get("p1").unwrap().as_deref(), Some(&10));
    assert_eq!(cache.get("p2").unwrap().as_deref(), Some(&20));
    assert_eq!(cache.get("p3").unwrap(), None);
    assert_eq!(cache.len(), 3);
    assert!(cache.contains("p3"));

    // A write from another store.
    other.save("p1", &11u64).unwrap();
    common::wait_until("the cache sees p1 = 11", WAIT, || {
        cache.get("p1").unwrap().as_deref() == Some(&11)
    });
    assert_eq!(cache.sequence("p1"), Some(2));

    // A delete, and a creation of an actor held as absent.
    other.delete("p2").unwrap();
    other.save("p3", &30u64).unwrap();
    common::wait_until("the cache sees p2 deleted and p3 created", WAIT, || {
        cache.get("p2").unwrap().is_none() && cache.get("p3").unwrap().as_deref() == Some(&30)
    });
    assert_eq!(cache.sequence("p2"), None);

    // The listener's connection is killed; writes in the gap are not
    // announced, and the resync after the reconnect reloads everything.
    let mut admin = schema.client().unwrap();
    let pid = listener_backend(&mut admin, &app);
    terminate(&mut admin, pid);
    other.save("p1", &12u64).unwrap();
    other.save("p2", &21u64).unwrap();
    other.delete("p3").unwrap();
    assert!(
        backends(&mut admin, &app).is_empty(),
        "the listener came back before the writes of the gap were done"
    );
    common::wait_until("the cache reloads after the reconnect", WAIT, || {
        cache.get("p1").unwrap().as_deref() == Some(&12)
            && cache.get("p2").unwrap().as_deref() == Some(&21)
            && cache.get("p3").unwrap().is_none()
    });
    assert!(listener.health().reconnects >= 1);

    // And it keeps following.
    other.save("p1", &13u64).unwrap();
    common::wait_until("the cache sees p1 = 13", WAIT, || {
        cache.get("p1").unwrap().as_deref() == Some(&13)
    });
}

#[test]
fn cache_serves_held_actors_while_the_server_is_down_and_converges_after_a_restart() {
    let cluster = TestCluster::start().expect("start a cluster of the test's own");
    let store = cluster_store(&cluster, true);
    let listener = store
        .listener_builder()
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(250))
        .build()
        .unwrap();
    let cache: StateCache<u64> = StateCache::new(&store, &listener).unwrap();

    store.save("held", &1u64).unwrap();
    store.save("absent-later", &5u64).unwrap();
    assert_eq!(cache.get("held").unwrap().as_deref(), Some(&1));
    assert_eq!(cache.get("absent-later").unwrap().as_deref(), Some(&5));
    assert_eq!(cache.get("missing").unwrap(), None);

    cluster.stop(StopMode::Fast).expect("stop the cluster");
    common::wait_until("the listener notices the server is gone", WAIT, || {
        !listener.health().connected
    });
    // Held entries, present or absent, come from memory: no server needed.
    assert_eq!(cache.get("held").unwrap().as_deref(), Some(&1));
    assert_eq!(cache.get("missing").unwrap(), None);
    // An actor not held needs the server, which is down.
    let err = cache.get("not-held").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect { .. } | Error::ConnectionLost(_) | Error::PoolExhausted { .. }
        ),
        "{err:?}"
    );
    assert!(!cache.contains("not-held"));

    cluster.restart().expect("restart the cluster");
    // Written as soon as the server is back, likely before the listener is:
    // either announced or reloaded after the resync.
    let writer = cluster_store(&cluster, false);
    writer.save("held", &2u64).unwrap();
    writer.delete("absent-later").unwrap();
    writer.save("missing", &7u64).unwrap();
    common::wait_until(
        "the cache converges after the restart",
        RESTART_WAIT,
        || {
            cache.get("held").ok().flatten().as_deref() == Some(&2)
                && cache.get("absent-later").ok().flatten().is_none()
                && cache.get("missing").ok().flatten().as_deref() == Some(&7)
        },
    );
    assert!(listener.health().connected);

    writer.save("held", &3u64).unwrap();
    common::wait_until("the cache follows after the restart", WAIT, || {
        cache.get("held").ok().flatten().as_deref() == Some(&3)
    });
}

// ----- 11. callbacks ---------------------------------------------------------

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

// ----- 12. select! -----------------------------------------------------------

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

// ----- 13. errors of building a listener -------------------------------------

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
