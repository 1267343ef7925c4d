//! Client-side group commit: concurrent writers hand their rows to one
//! leader, which writes them all in one statement (one commit), then hands
//! each writer its own result.
//!
//! Why: the change trigger's `NOTIFY` takes a cluster-wide lock at commit
//! and holds it through the WAL flush, so notifying commits cannot be
//! grouped by the server; one commit per row caps saves near the fsync rate
//! however many threads write. One commit for many rows lifts that cap.
//!
//! No thread of its own: the first writer to find no leader becomes the
//! leader for one batch (including its own row), publishes every result,
//! and steps down; a waiting writer whose row is still queued then leads the
//! next batch. A lone writer leads a batch of one, through the same
//! statement as without grouping.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::expected::Expected;

/// Rows written by one leader at most.
pub(crate) const MAX_GROUP: usize = 1000;

/// One queued write.
pub(crate) struct Item {
    pub id: String,
    pub state: Vec<u8>,
    /// `None` for an unconditional save.
    pub expected: Option<Expected>,
    /// Tags the row, to find out whether it landed if the connection breaks.
    pub write_id: i64,
}

/// What a queued writer is waiting for.
enum Turn {
    Waiting,
    /// It leads the next batch.
    Lead,
    /// Its row was written (or failed) in another writer's batch.
    Done(Result<u64>),
}

/// One writer's mailbox: only the writer itself and the leader that takes
/// its row touch it, so waking it wakes no one else.
struct Waiter {
    turn: Mutex<Turn>,
    wake: Condvar,
}

impl Waiter {
    fn set(&self, turn: Turn) {
        *self.turn.lock().unwrap_or_else(|p| p.into_inner()) = turn;
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<(Arc<Waiter>, Item)>,
    leading: bool,
}

/// The queue and the hand-over of results and leadership.
#[derive(Default)]
pub(crate) struct Combiner {
    state: Mutex<State>,
}

impl Combiner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` and returns its result once its batch has committed.
    /// `write` executes a batch and returns one result per item, in order;
    /// it runs on the calling thread of whichever writer leads.
    pub fn submit(&self, item: Item, write: impl Fn(Vec<Item>) -> Vec<Result<u64>>) -> Result<u64> {
        let me = Arc::new(Waiter {
            turn: Mutex::new(Turn::Waiting),
            wake: Condvar::new(),
        });
        {
            let mut state = self.lock();
            state.queue.push_back((Arc::clone(&me), item));
            if state.leading {
                drop(state);
                let mut turn = me.turn.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match std::mem::replace(&mut *turn, Turn::Waiting) {
                        Turn::Done(result) => return result,
                        Turn::Lead => break,
                        Turn::Waiting => {
                            turn = me.wake.wait(turn).unwrap_or_else(|p| p.into_inner())
                        }
                    }
                }
            } else {
                state.leading = true;
            }
        }
        // Leading: our own row is still queued, at the front (rows queue in
        // order and every batch takes from the front).
        self.lead(&me, write)
    }

    /// Writes one batch from the front of the queue, hands out its results,
    /// then passes leadership to the next queued writer, if any.
    fn lead(&self, me: &Arc<Waiter>, write: impl Fn(Vec<Item>) -> Vec<Result<u64>>) -> Result<u64> {
        let batch: Vec<(Arc<Waiter>, Item)> = {
            let mut state = self.lock();
            let take = state.queue.len().min(MAX_GROUP);
            state.queue.drain(..take).collect()
        };
        let (waiters, items): (Vec<Arc<Waiter>>, Vec<Item>) = batch.into_iter().unzip();
        let count = items.len();
        let (results, panic) = match std::panic::catch_unwind(AssertUnwindSafe(|| write(items))) {
            Ok(results) => (results, None),
            // Release this batch's writers before the panic goes on.
            Err(panic) => (
                (0..count)
                    .map(|_| Err(Error::invalid_config("a group commit leader panicked")))
                    .collect(),
                Some(panic),
            ),
        };
        let mut mine = None;
        for (waiter, result) in waiters.iter().zip(results) {
            if Arc::ptr_eq(waiter, me) {
                mine = Some(result);
            } else {
                waiter.set(Turn::Done(result));
            }
        }
        {
            let mut state = self.lock();
            match state.queue.front() {
                Some((next, _)) => next.set(Turn::Lead),
                None => state.leading = false,
            }
        }
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
        mine.expect("the leader's own row is in its batch")
    }
}

/// Splits a batch into rounds in which each actor appears once, keeping
/// each actor's writes in submission order. Returns, per round, the indexes
/// into `items`.
pub(crate) fn rounds(items: &[Item]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut next_round: HashMap<&str, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let round = next_round.entry(item.id.as_str()).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(index);
        *round += 1;
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn item(id: &str) -> Item {
        Item {
            id: id.into(),
            state: vec![],
            expected: None,
            write_id: 1,
        }
    }

    #[test]
    fn rounds_keep_each_actor_once_and_in_order() {
        let items = vec![item("a"), item("b"), item("a"), item("a"), item("c")];
        assert_eq!(rounds(&items), vec![vec![0, 1, 4], vec![2], vec![3]]);
    }

    #[test]
    fn every_writer_gets_its_own_result() {
        let combiner = Arc::new(Combiner::default());
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let combiner = Arc::clone(&combiner);
                std::thread::spawn(move || {
                    (0..200)
                        .map(|i| {
                            let id = format!("{t}-{i}");
                            let got = combiner
                                .submit(item(&id), |items| {
                                    items.iter().map(|it| Ok(it.id.len() as u64)).collect()
                                })
                                .unwrap();
                            assert_eq!(got, id.len() as u64);
                        })
                        .count()
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 3200);
    }
}
