//! Change-feed throughput and latency, beside a bare connection on the same
//! server in the same run.
//!
//! Run: `cargo run --release --example notify_bench`
//!
//! Uses `DATABASE_URL` when set; otherwise a throwaway local cluster. Each
//! run queues the notifications with one statement and times from its
//! commit to the last one received. Prints:
//! - the rate at which one bare `postgres::Client` drains queued
//!   notifications through `notifications().blocking_iter()`;
//! - the rate at which a `ChangeListener` parses and delivers the same
//!   notifications to 1, 10 and 100 subscribers (each drained by its own
//!   thread), and its ratio to the bare rate;
//! - commit-to-subscriber latency p50/p99 for single saves.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{quote_identifier, ChangeListener, Event, StateStore};

const NOTIFICATIONS: usize = 100_000;
const LATENCY_SAMPLES: usize = 2_000;

fn burst(client: &mut postgres::Client, channel: &str, n: usize) {
    client
        .execute(
            "SELECT pg_notify($1, json_build_object('actorID', 'actor-' || (i % 1000), \
             'sequenceNumber', i, 'timestamp', EXTRACT(EPOCH FROM now()), 'op', 'save')::text) \
             FROM generate_series(1, $2::int) i",
            &[&channel, &(n as i32)],
        )
        .expect("notify burst");
}

fn bare_rate(url: &str, channel: &str) -> f64 {
    let mut listener = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    listener
        .batch_execute(&format!("LISTEN {}", quote_identifier(channel)))
        .expect("listen");
    let mut writer = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    burst(&mut writer, channel, NOTIFICATIONS);
    let start = Instant::now();
    let mut notifications = listener.notifications();
    let mut iter = notifications.blocking_iter();
    for _ in 0..NOTIFICATIONS {
        iter.next().expect("notification").expect("open");
    }
    NOTIFICATIONS as f64 / start.elapsed().as_secs_f64()
}

fn listener_rate(url: &str, channel: &str, subscribers: usize) -> f64 {
    let listener = ChangeListener::builder()
        .url(url)
        .channel(channel)
        .queue_capacity(NOTIFICATIONS)
        .build()
        .expect("listener");
    let barrier = Arc::new(Barrier::new(subscribers + 1));
    let threads: Vec<_> = (0..subscribers)
        .map(|_| {
            let sub = listener.subscribe();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let mut got = 0;
                while got < NOTIFICATIONS {
                    match sub.recv_timeout(Duration::from_secs(60)) {
                        Ok(Event::Change(_)) => got += 1,
                        Ok(other) => panic!("unexpected {other:?}"),
                        Err(e) => panic!("subscriber stalled after {got}: {e}"),
                    }
                }
                Instant::now()
            })
        })
        .collect();
    let mut writer = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    barrier.wait();
    // Nothing is delivered before the burst commits: time from the commit,
    // as for the bare connection.
    burst(&mut writer, channel, NOTIFICATIONS);
    let start = Instant::now();
    let end = threads
        .into_iter()
        .map(|t| t.join().expect("subscriber"))
        .max()
        .expect("one subscriber");
    let health = listener.health();
    assert_eq!(health.dropped, 0, "no event may be dropped: {health:?}");
    NOTIFICATIONS as f64 / end.duration_since(start).as_secs_f64()
}

fn latency(store: &StateStore) -> (Duration, Duration) {
    let listener = store.listener().expect("listener");
    let sub = listener.subscribe_actor("latency");
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        store.save("latency", &(i as u64)).expect("save");
        let acked = Instant::now();
        match sub.recv_timeout(Duration::from_secs(10)).expect("change") {
            Event::Change(_) => samples.push(Instant::now().saturating_duration_since(acked)),
            other => panic!("unexpected {other:?}"),
        }
    }
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // DATABASE_URL, or a throwaway cluster that lives as long as `db`.
    let db = TestDatabase::from_env_or_start()?;
    let url = db.url().to_owned();
    let store = StateStore::builder()
        .url(&url)
        .channel("bench_changes")
        .table("bench_states")
        .migrate(true)
        .build()?;

    println!("{NOTIFICATIONS} notifications per run, queued by one statement");
    let bare = bare_rate(&url, "bench_bare");
    println!("bare connection, notifications().blocking_iter(): {bare:>12.0} /s");
    for subscribers in [1, 10, 100] {
        let rate = listener_rate(&url, &format!("bench_fanout_{subscribers}"), subscribers);
        println!(
            "ChangeListener, {subscribers:>3} subscriber(s): {rate:>12.0} notifications/s, \
             {:>12.0} deliveries/s, {:.2}x bare",
            rate * subscribers as f64,
            rate / bare
        );
    }
    let (p50, p99) = latency(&store);
    println!(
        "commit acknowledged -> subscriber: p50 {p50:?}, p99 {p99:?} ({LATENCY_SAMPLES} saves)"
    );
    Ok(())
}
