//! Change-feed throughput and latency, beside a bare connection on the same
//! server in the same run.
//!
//! Run: `cargo run --release --example notify_bench`
//!
//! Uses `DATABASE_URL` when set; otherwise a throwaway local cluster. Each
//! run queues the notifications with one statement and times from its
//! commit to the last one received. Prints a table of:
//! - the rate at which one bare `postgres::Client` drains queued
//!   notifications through `notifications().blocking_iter()`;
//! - the rate at which a `ChangeListener` parses and delivers the same
//!   notifications to 1, 10 and 100 subscribers, each drained by its own
//!   thread, and its ratio to the bare rate, beside the target ratio; the
//!   subscribers either take one event at a time (`recv_timeout`) or read
//!   the batches of `receiver()` in place (`EventBatch::as_slice`), which
//!   spares each subscriber an atomic increment per change;
//! - commit-to-subscriber latency p50/p99 for single saves.
//!
//! Rates on a small machine swing by tens of percent from one run to the
//! next, so every configuration runs `ROUNDS` times, alternating, and the
//! table shows medians: the ratios compare figures taken side by side.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{quote_identifier, ChangeListener, Event, StateStore, Subscription};

const NOTIFICATIONS: usize = 100_000;
const LATENCY_SAMPLES: usize = 2_000;
const ROUNDS: usize = 3;

/// Subscriber counts, with the lowest acceptable ratio to the bare rate
/// where there is one.
const FAN_OUT: [(usize, Option<f64>); 3] = [(1, None), (10, Some(0.5)), (100, Some(0.2))];

/// How the subscribers read.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// `Subscription::recv_timeout`: one owned event at a time.
    EachEvent,
    /// `Subscription::receiver()`: batches, read in place.
    Batches,
}

impl Reader {
    const ALL: [Reader; 2] = [Reader::EachEvent, Reader::Batches];

    fn name(self) -> &'static str {
        match self {
            Reader::EachEvent => "recv_timeout()",
            Reader::Batches => "receiver() batches",
        }
    }
}

/// Takes `NOTIFICATIONS` changes from `sub` as `reader` says, checking that
/// each actor's numbers grow, and returns when it had the last.
fn drain(sub: &Subscription, reader: Reader) -> Instant {
    let wait = Duration::from_secs(60);
    let mut last = vec![0u64; 1000];
    let mut see = |event: &Event| match event {
        Event::Change(c) => {
            let actor = &mut last[(c.sequence % 1000) as usize];
            assert!(c.sequence > *actor, "{c:?} after {actor}");
            *actor = c.sequence;
        }
        other => panic!("unexpected {other:?}"),
    };
    let mut got = 0;
    while got < NOTIFICATIONS {
        match reader {
            Reader::EachEvent => match sub.recv_timeout(wait) {
                Ok(event) => {
                    see(&event);
                    got += 1;
                }
                Err(e) => panic!("subscriber stalled after {got}: {e}"),
            },
            Reader::Batches => match sub.receiver().recv_timeout(wait) {
                Ok(batch) => {
                    batch.as_slice().iter().for_each(&mut see);
                    got += batch.len();
                }
                Err(e) => panic!("subscriber stalled after {got}: {e}"),
            },
        }
    }
    Instant::now()
}

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

fn listener_rate(url: &str, channel: &str, subscribers: usize, reader: Reader) -> f64 {
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
                drain(&sub, reader)
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

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
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

    println!(
        "{NOTIFICATIONS} notifications per run, queued by one statement; \
         medians of {ROUNDS} alternating rounds"
    );
    let configs: Vec<(usize, Option<f64>, Reader)> = FAN_OUT
        .into_iter()
        .flat_map(|(n, target)| Reader::ALL.map(|reader| (n, target, reader)))
        .collect();
    let mut bare = Vec::new();
    let mut fan_out = vec![Vec::new(); configs.len()];
    for round in 0..ROUNDS {
        bare.push(bare_rate(&url, &format!("bench_bare_{round}")));
        for (i, (n, _, reader)) in configs.iter().enumerate() {
            let channel = format!("bench_fanout_{i}_{round}");
            fan_out[i].push(listener_rate(&url, &channel, *n, *reader));
        }
    }
    let bare = median(bare);
    println!();
    println!(
        "| {:<42} | {:>15} | {:>13} | {:>7} | {:>6} |",
        "drained by", "notifications/s", "deliveries/s", "vs bare", "target"
    );
    println!(
        "|{:-<44}|{:->17}|{:->15}|{:->9}|{:->8}|",
        "", "", "", "", ""
    );
    println!(
        "| {:<42} | {bare:>15.0} | {bare:>13.0} | {:>7} | {:>6} |",
        "bare connection, blocking_iter()", "1.00x", ""
    );
    for (rates, (subscribers, target, reader)) in fan_out.into_iter().zip(configs) {
        let rate = median(rates);
        let ratio = rate / bare;
        let target = target.map_or(String::new(), |t| format!("{t:.1}x"));
        let missed = target_missed(ratio, &target);
        println!(
            "| {:<42} | {rate:>15.0} | {:>13.0} | {ratio:>6.2}x | {target:>6} |{missed}",
            format!("ChangeListener, {subscribers:>3} x {}", reader.name()),
            rate * subscribers as f64,
        );
    }
    println!();
    let (p50, p99) = latency(&store);
    println!(
        "commit acknowledged -> subscriber: p50 {p50:?}, p99 {p99:?} ({LATENCY_SAMPLES} saves)"
    );
    Ok(())
}

/// `" below target"` when `ratio`, shown to two places, is below `target`
/// (`"0.5x"`, or empty for none).
fn target_missed(ratio: f64, target: &str) -> &'static str {
    match target.trim_end_matches('x').parse::<f64>() {
        Ok(target) if (ratio * 100.0).round() < (target * 100.0).round() => " below target",
        _ => "",
    }
}
