//! What a history is made of: the operations each process ran, with their
//! outcomes and times, and the events each subscriber received. Processes
//! write theirs as JSON for the parent to check.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What the history's writes store: the id of the writing operation, and
/// for a transform the id of the value it read (`None` when the actor was
/// absent). Ids are unique across processes, so a value read back names
/// the one write that produced it.
pub type Value = (u64, Option<u64>);

/// One call on one actor. A bulk write is recorded as one `Op` per actor,
/// a batch as one per step, all with the call's times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Call {
    /// An unconditional save of the value with this id.
    Save { value: u64 },
    /// A save on condition: `expected` is `None` for `Expected::Absent`.
    SaveIf { value: u64, expected: Option<u64> },
    /// A delete.
    Delete,
    /// A transform writing the value with this id.
    Transform { value: u64 },
    /// A versioned load.
    Load,
}

impl Call {
    /// The id of the value the call writes, if it writes one.
    pub fn value(&self) -> Option<u64> {
        match self {
            Call::Save { value } | Call::SaveIf { value, .. } | Call::Transform { value } => {
                Some(*value)
            }
            Call::Delete | Call::Load => None,
        }
    }
}

/// What the caller was told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The value was written at this sequence number; for a transform,
    /// `read` is the id of the value its step was given.
    Written { sequence: u64, read: Option<u64> },
    /// A delete that found the actor (`true`) or did not (`false`).
    Deleted(bool),
    /// A load: the value and its sequence number, or `None` when absent.
    Read(Option<(Value, u64)>),
    /// A conditional write found this version instead of the expected one.
    Conflict { actual: Option<u64> },
    /// The store said the write did not happen.
    NotApplied,
    /// Anything else: the write may or may not have happened.
    Unknown,
}

/// Where a step of a batch stands in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStep {
    /// The batch, unique across processes (a value id).
    pub batch: u64,
    /// The step's place in the batch, from 0.
    pub step: u32,
}

/// One recorded operation on one actor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub process: u32,
    pub thread: u32,
    /// The API call that ran it: `save`, `save_many_if`, `batch`, ...
    pub via: String,
    pub actor: String,
    pub call: Call,
    pub outcome: Outcome,
    /// Nanoseconds since the Unix epoch, taken just before the call.
    pub invoked: u64,
    /// Nanoseconds since the Unix epoch, taken just after it returned.
    pub returned: u64,
    /// For a step of a batch, which one: a batch's steps share its times,
    /// and each actor's run in the order of the steps.
    #[serde(default)]
    pub batch: Option<BatchStep>,
}

/// What a subscriber received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Seen {
    Change {
        actor: String,
        sequence: u64,
        deleted: bool,
        table: Option<String>,
    },
    Resync,
}

/// Everything one subscriber received, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Feed {
    /// `process/name`, for messages.
    pub name: String,
    pub events: Vec<Seen>,
}

/// A history, of one process or merged from all of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
    pub feeds: Vec<Feed>,
    /// What a process found wrong by itself (a cache that never caught up).
    pub problems: Vec<String>,
    /// Errors reported as `Unknown`, by kind, for the summary.
    pub errors: BTreeMap<String, u64>,
}

impl History {
    pub fn merge(&mut self, other: History) {
        self.ops.extend(other.ops);
        self.feeds.extend(other.feeds);
        self.problems.extend(other.problems);
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }

    /// Batches: in all, those that named an actor more than once, and of
    /// those the ones that committed.
    pub fn batch_counts(&self) -> (usize, usize, usize) {
        let mut batches: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            if let Some(at) = op.batch {
                batches.entry(at.batch).or_default().push(op);
            }
        }
        let repeated: Vec<&Vec<&Op>> = batches
            .values()
            .filter(|steps| {
                let actors: std::collections::BTreeSet<&str> =
                    steps.iter().map(|op| op.actor.as_str()).collect();
                actors.len() < steps.len()
            })
            .collect();
        let committed = repeated
            .iter()
            .filter(|steps| {
                steps
                    .iter()
                    .all(|op| matches!(op.outcome, Outcome::Written { .. } | Outcome::Deleted(_)))
            })
            .count();
        (batches.len(), repeated.len(), committed)
    }

    /// Operations by outcome kind, for the summary line.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for op in &self.ops {
            let kind = match op.outcome {
                Outcome::Written { .. } => "written",
                Outcome::Deleted(true) => "deleted",
                Outcome::Deleted(false) => "delete of absent",
                Outcome::Read(_) => "read",
                Outcome::Conflict { .. } => "conflict",
                Outcome::NotApplied => "not applied",
                Outcome::Unknown => "unknown",
            };
            *counts.entry(kind).or_default() += 1;
        }
        counts
    }
}

/// Nanoseconds since the Unix epoch: comparable across the processes of one
/// machine.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}
