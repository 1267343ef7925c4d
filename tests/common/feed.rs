//! The change feed as the listener's tests see it (tests/listener.rs and the
//! guarantee files about the change stream): waiting for events while
//! checking that no actor's sequence number goes backwards, finding and
//! terminating a listener's backend, and bursts of notifications.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use trebuchet_postgres::crossbeam_channel::RecvTimeoutError;
use trebuchet_postgres::testing::TestSchema;
use trebuchet_postgres::{Change, ChangeKind, ChangeListener, Event, StateStore, Subscription};

/// How long a test waits for an event that should come.
pub const WAIT: Duration = Duration::from_secs(30);

/// A short wait for something that should not come.
pub const QUIET: Duration = Duration::from_millis(300);

/// Per actor, the last sequence number one subscriber saw.
#[derive(Debug)]
pub struct Order {
    who: &'static str,
    last: HashMap<String, u64>,
}

impl Order {
    pub fn new(who: &'static str) -> Self {
        Order {
            who,
            last: HashMap::new(),
        }
    }

    #[track_caller]
    pub fn see(&mut self, event: &Event) {
        if let Event::Change(c) = event {
            if let Some(&prev) = self.last.get(&c.actor_id) {
                assert!(
                    c.sequence > prev,
                    "{}: actor {:?} went from sequence {prev} to {} ({c:?})",
                    self.who,
                    c.actor_id,
                    c.sequence
                );
            }
            self.last.insert(c.actor_id.clone(), c.sequence);
        }
    }
}

/// The next event, failing after `wait`.
#[track_caller]
pub fn next_within(sub: &Subscription, order: &mut Order, wait: Duration) -> Event {
    let event = sub
        .recv_timeout(wait)
        .unwrap_or_else(|e| panic!("{}: no event within {wait:?}: {e:?}", order.who));
    order.see(&event);
    event
}

/// The next event, failing after [`WAIT`].
#[track_caller]
pub fn next(sub: &Subscription, order: &mut Order) -> Event {
    next_within(sub, order, WAIT)
}

/// The next event, which must be a change.
#[track_caller]
pub fn next_change(sub: &Subscription, order: &mut Order) -> Arc<Change> {
    match next(sub, order) {
        Event::Change(c) => c,
        other => panic!("{}: expected a change, got {other:?}", order.who),
    }
}

/// Asserts the next event is a change of `actor` to `sequence` of `kind`.
#[track_caller]
pub fn expect_change(
    sub: &Subscription,
    order: &mut Order,
    actor: &str,
    sequence: u64,
    kind: ChangeKind,
) -> Arc<Change> {
    let c = next_change(sub, order);
    assert_eq!(
        (c.actor_id.as_str(), c.sequence, c.kind),
        (actor, sequence, kind),
        "{}: unexpected change {c:?}",
        order.who
    );
    c
}

/// Asserts that nothing is delivered within [`QUIET`].
#[track_caller]
pub fn expect_quiet(sub: &Subscription, who: &str) {
    match sub.recv_timeout(QUIET) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("{who}: expected nothing, got {other:?}"),
    }
}

/// An `application_name` no other connection uses, to find the listener's
/// backend in `pg_stat_activity`.
pub fn unique_app_name(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "tl-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A listener on `store`'s channel (with exact catch-up) whose connection
/// carries `app` as its `application_name`.
pub fn named_listener(
    schema: &TestSchema,
    store: &StateStore,
    app: &str,
    backoff: (Duration, Duration),
) -> ChangeListener {
    let mut options = schema.connect_options();
    options.application_name(app);
    store
        .listener_builder()
        .connect_options(options)
        .reconnect_backoff(backoff.0, backoff.1)
        .build()
        .expect("start the listener")
}

/// The pids of the backends whose `application_name` is `app`.
pub fn backends(admin: &mut postgres::Client, app: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .expect("query pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The one backend of the listener named `app`, which must be listening.
#[track_caller]
pub fn listener_backend(admin: &mut postgres::Client, app: &str) -> i32 {
    let rows = admin
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            &[&app],
        )
        .expect("query pg_stat_activity");
    assert_eq!(rows.len(), 1, "expected one listening backend named {app}");
    rows[0].get(0)
}

/// Terminates a backend and waits (up to 5 s) until it is gone.
#[track_caller]
pub fn terminate(admin: &mut postgres::Client, pid: i32) {
    let done: bool = admin
        .query_one("SELECT pg_terminate_backend($1, 5000)", &[&pid])
        .expect("pg_terminate_backend")
        .get(0);
    assert!(done, "backend {pid} did not terminate within 5 s");
}

/// Serialises the test that loads both cores (a notification flood) with the
/// tests whose gap must stay open for a few hundred milliseconds, within one
/// test binary (`cargo test` runs the binaries one after another).
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queues `count` notifications of actor `actor` (numbers `1..=count`) on
/// `schema`'s channel with one statement: they reach the listener together.
pub fn burst(schema: &TestSchema, actor: &str, count: i64) {
    schema
        .client()
        .unwrap()
        .execute(
            "SELECT count(pg_notify($1, json_build_object('actorID', $2::TEXT, \
             'sequenceNumber', g, 'timestamp', 1764000000, 'op', 'save')::TEXT)) \
             FROM generate_series(1, $3::BIGINT) g",
            &[&schema.channel(), &actor, &count],
        )
        .unwrap();
}
