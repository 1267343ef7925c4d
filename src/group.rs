//! Combining concurrent calls: callers hand their items to a leader, which
//! runs them all in one statement, then hands each caller its own result.
//!
//! Group commit (writes): the change trigger's `NOTIFY` takes a
//! cluster-wide lock at commit and holds it through the WAL flush, so
//! notifying commits cannot be grouped by the server; one commit per row
//! caps saves near the fsync rate however many threads write. One commit for
//! many rows lifts that cap. Coalesced reads: one statement reading many
//! rows costs the server and the driver far less per row than one statement
//! per row.
//!
//! No thread of its own: a caller that finds fewer than `limit` leaders
//! leads a batch of its own item at once, through the same statement as
//! without combining, so a lone caller waits for nobody. Callers that come
//! while `limit` leaders are busy queue; a leader that finishes takes the
//! queue (up to `max_group` items) and hands it, leadership included, to
//! the first caller in it.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::expected::Expected;

/// Items run by one leader at most.
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

/// A batch: each item with its caller's mailbox, in arrival order.
type Batch<I, O> = Vec<(Arc<Waiter<I, O>>, I)>;

/// What a queued caller is waiting for.
enum Turn<I, O> {
    Waiting,
    /// It leads this batch, which holds its own item first.
    Lead(Batch<I, O>),
    /// Its item was run (or failed) in another caller's batch.
    Done(Result<O>),
}

/// One caller's mailbox: only the caller itself and the leader that takes
/// its item touch it, so waking it wakes no one else.
struct Waiter<I, O> {
    turn: Mutex<Turn<I, O>>,
    wake: Condvar,
}

impl<I, O> Waiter<I, O> {
    fn set(&self, turn: Turn<I, O>) {
        *self.turn.lock().unwrap_or_else(|p| p.into_inner()) = turn;
        self.wake.notify_one();
    }
}

struct State<I, O> {
    queue: VecDeque<(Arc<Waiter<I, O>>, I)>,
    /// Leaders at work. Fewer than the limit only when the queue is empty.
    leading: usize,
}

/// The queue and the hand-over of results and leadership.
pub(crate) struct Combiner<I, O> {
    state: Mutex<State<I, O>>,
    limit: usize,
    max_group: usize,
}

impl<I, O> Combiner<I, O> {
    /// At most `limit` batches at work at once, each of at most `max_group`
    /// items.
    pub fn new(limit: usize, max_group: usize) -> Combiner<I, O> {
        Combiner {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                leading: 0,
            }),
            limit: limit.max(1),
            max_group: max_group.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<I, O>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `item` in a batch and returns its result. `run` executes a
    /// batch and returns one result per item, in order; it runs on the
    /// calling thread of whichever caller leads.
    pub fn submit(&self, item: I, run: impl Fn(Vec<I>) -> Vec<Result<O>>) -> Result<O> {
        let me = Arc::new(Waiter {
            turn: Mutex::new(Turn::Waiting),
            wake: Condvar::new(),
        });
        let batch = {
            let mut state = self.lock();
            if state.leading < self.limit {
                state.leading += 1;
                vec![(Arc::clone(&me), item)]
            } else {
                state.queue.push_back((Arc::clone(&me), item));
                drop(state);
                let mut turn = me.turn.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match std::mem::replace(&mut *turn, Turn::Waiting) {
                        Turn::Done(result) => return result,
                        Turn::Lead(batch) => break batch,
                        Turn::Waiting => {
                            turn = me.wake.wait(turn).unwrap_or_else(|p| p.into_inner())
                        }
                    }
                }
            }
        };
        self.lead(&me, batch, run)
    }

    /// Runs `batch`, hands out its results, then hands the queue to its
    /// first caller, or steps down when it is empty.
    fn lead(
        &self,
        me: &Arc<Waiter<I, O>>,
        batch: Batch<I, O>,
        run: impl Fn(Vec<I>) -> Vec<Result<O>>,
    ) -> Result<O> {
        let (waiters, items): (Vec<Arc<Waiter<I, O>>>, Vec<I>) = batch.into_iter().unzip();
        let count = items.len();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(items)));
        // The next batch first: its statement goes out while this one's
        // callers wake.
        {
            let mut state = self.lock();
            if state.queue.is_empty() {
                state.leading -= 1;
            } else {
                let take = state.queue.len().min(self.max_group);
                let next: Batch<I, O> = state.queue.drain(..take).collect();
                let first = Arc::clone(&next[0].0);
                first.set(Turn::Lead(next));
            }
        }
        let (results, panic) = match outcome {
            Ok(results) => (results, None),
            // Release this batch's callers before the panic goes on.
            Err(panic) => (
                (0..count)
                    .map(|_| Err(Error::invalid_config("a combining leader panicked")))
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
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
        mine.expect("the leader's own item is in its batch")
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
        let combiner = Arc::new(Combiner::new(1, MAX_GROUP));
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

    #[test]
    fn at_most_limit_batches_run_at_once_and_each_caller_gets_its_own_result() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let combiner: Arc<Combiner<u64, u64>> = Arc::new(Combiner::new(2, 8));
        let active = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16u64)
            .map(|t| {
                let (combiner, active, most) = (
                    Arc::clone(&combiner),
                    Arc::clone(&active),
                    Arc::clone(&most),
                );
                std::thread::spawn(move || {
                    for i in 0..300u64 {
                        let item = t * 1000 + i;
                        let got = combiner
                            .submit(item, |items| {
                                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                                most.fetch_max(now, Ordering::SeqCst);
                                assert!(items.len() <= 8, "{} items", items.len());
                                std::thread::yield_now();
                                active.fetch_sub(1, Ordering::SeqCst);
                                items.iter().map(|n| Ok(n * 2)).collect()
                            })
                            .unwrap();
                        assert_eq!(got, item * 2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2);
    }
}
