//! What a process's subscribers and cache saw: a subscription recorded on a
//! thread of its own, and the cache compared with the table once every
//! writer has stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use trebuchet_postgres::{Event, StateCache, StateStore, Subscription};

use crate::record::{Feed, Seen, Value};

/// How long a cache may take to catch up once the writers have stopped: a
/// bound on a wait for an event, not a measured time.
const CATCH_UP: Duration = Duration::from_secs(60);

/// Records every event of a subscription until stopped.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Feed>,
}

impl Recorder {
    pub fn start(name: String, subscription: Subscription) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut feed = Feed {
                name,
                events: Vec::new(),
            };
            loop {
                match subscription.recv_timeout(Duration::from_millis(50)) {
                    Ok(Event::Change(c)) => feed.events.push(Seen::Change {
                        actor: c.actor_id.clone(),
                        sequence: c.sequence,
                        deleted: c.kind == trebuchet_postgres::ChangeKind::Deleted,
                        table: c.table.clone(),
                    }),
                    Ok(Event::Resync(_)) => feed.events.push(Seen::Resync),
                    Ok(_) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if stopping.load(Ordering::Acquire) {
                            break;
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
            }
            feed
        });
        Recorder { stop, thread }
    }

    /// Stops once the queue is empty and returns what was received.
    pub fn finish(self) -> Feed {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the recorder panicked")
    }
}

/// Waits until the cache holds what the table holds for every actor; a
/// problem for each actor it never catches up on.
pub fn compare_cache(
    name: &str,
    cache: &StateCache<Value>,
    store: &StateStore,
    actors: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    for id in actors {
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let cached = cache.get(id).map(|v| v.map(|v| *v));
            let stored = store.load::<Value>(id);
            match (&cached, &stored) {
                (Ok(c), Ok(s)) if c == s => break,
                _ if Instant::now() > deadline => {
                    problems.push(format!(
                        "cache {name}: actor {id} holds {cached:?} after the writers stopped, \
                         the table {stored:?}"
                    ));
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    problems
}
