//! Guarantee 6 of the design, **Clean shutdown**:
//!
//! > Dropping the last handle (or calling shutdown) stops the listener
//! > thread promptly and joins it; no thread or connection leaks.
//!
//! The tests of this file, against a real PostgreSQL: `shutdown()` and the
//! drop of the last handle stop the listener promptly, idle and busy
//! (`shutdown_stops_promptly_idle_and_busy`,
//! `dropping_the_last_handle_stops_promptly_idle_and_busy`), under a flood
//! of notifications (`shutdown_is_prompt_under_a_flood_of_notifications`)
//! and while a reconnect waits on a server that never answers
//! (`shutdown_is_prompt_while_a_reconnect_waits_on_a_silent_server`), and
//! its backend leaves `pg_stat_activity`; a subscription, a callback or a
//! cache keeps its listener running after every other handle is gone, and
//! the last one to go stops it
//! (`a_subscription_keeps_its_listener_running_after_every_handle_is_dropped`,
//! `a_cache_keeps_a_listener_no_one_else_holds_running`).

mod common;

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use trebuchet_postgres::crossbeam_channel::{self, select, RecvTimeoutError, TryRecvError};
use trebuchet_postgres::postgres::config::Host;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{
    ChangeKind, ConnectOptions, Event, ResyncReason, StateCache, StateStore, Subscription,
};

use common::feed::{
    backends, exclusive, expect_change, listener_backend, named_listener, next, next_change,
    terminate, unique_app_name, Order, WAIT,
};

/// How long a test waits for `shutdown()` (or the drop of the last clone)
/// to return before it fails. The listeners of those tests have nothing
/// else that would end the wait sooner (a heartbeat of an hour, a silent
/// server that never answers), so only a prompt stop returns in time.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// A heartbeat interval longer than any test: the listener then has no
/// periodic duty that would wake it up before [`STOP_WAIT`] is over.
const NO_HEARTBEAT: Duration = Duration::from_secs(3600);

// ----- helpers ---------------------------------------------------------------

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
