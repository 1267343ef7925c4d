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
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Expected, Result};

/// Rows written by one leader at most.
pub(crate) const MAX_GROUP: usize = 1000;

/// One queued write.
pub(crate) struct Item {
    pub id: String,
    pub state: Vec<u8>,
    /// `None` for an unconditional save.
    pub expected: Option<Expected>,
}

#[derive(Default)]
struct State {
    next_ticket: u64,
    queue: VecDeque<(u64, Item)>,
    leading: bool,
    results: HashMap<u64, Result<u64>>,
}

/// The queue and the hand-over of results.
#[derive(Default)]
pub(crate) struct Combiner {
    state: Mutex<State>,
    done: Condvar,
}

impl Combiner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` and returns its result once its batch has committed.
    /// `write` executes a batch and returns one result per item, in order;
    /// it runs on the calling thread of whichever writer leads.
    pub fn submit(&self, item: Item, write: impl Fn(Vec<Item>) -> Vec<Result<u64>>) -> Result<u64> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push_back((ticket, item));
        loop {
            if let Some(result) = state.results.remove(&ticket) {
                return result;
            }
            if !state.leading {
                // Our row is still queued (a leader publishes every result
                // of its batch before it steps down), so it is in this batch.
                state.leading = true;
                let take = state.queue.len().min(MAX_GROUP);
                let batch: Vec<(u64, Item)> = state.queue.drain(..take).collect();
                drop(state);
                let (tickets, items): (Vec<u64>, Vec<Item>) = batch.into_iter().unzip();
                let written = std::panic::catch_unwind(AssertUnwindSafe(|| write(items)));
                state = self.lock();
                state.leading = false;
                match written {
                    Ok(results) => state.results.extend(tickets.into_iter().zip(results)),
                    Err(panic) => {
                        // Release the followers of this batch, then let the
                        // panic continue on the leader's thread.
                        for ticket in tickets {
                            state.results.insert(
                                ticket,
                                Err(Error::invalid_config("a group commit leader panicked")),
                            );
                        }
                        self.done.notify_all();
                        drop(state);
                        std::panic::resume_unwind(panic);
                    }
                }
                self.done.notify_all();
                continue;
            }
            state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
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
