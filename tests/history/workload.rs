//! One thread's share of a history: random calls of every kind of write on a
//! handful of actors, each recorded with its outcome and times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use trebuchet_postgres::{BatchResult, Error, Expected, StateCache, StateStore};

use crate::record::{now, BatchStep, Call, Op, Outcome, Value};

/// The actors every process writes.
pub fn actors() -> Vec<String> {
    (0..4).map(|i| format!("h{i}")).collect()
}

/// The calls a workload makes, as `Op::via` names them.
pub const CALLS: [&str; 9] = [
    "save",
    "save_if",
    "delete",
    "transform",
    "save_many",
    "save_many_if",
    "delete_many",
    "batch",
    "load",
];

/// A thread running random operations.
pub struct Workload<'a> {
    store: &'a StateStore,
    /// Read now and then, so that it holds every actor.
    cache: &'a StateCache<Value>,
    actors: &'a [String],
    process: u32,
    thread: u32,
    rng: fastrand::Rng,
    /// The next value id: process and thread in the high bits.
    next_value: u64,
    /// The last number this thread saw of each actor, for conditions that
    /// are sometimes right.
    known: HashMap<String, u64>,
    pub ops: Vec<Op>,
    pub errors: BTreeMap<String, u64>,
}

impl<'a> Workload<'a> {
    pub fn new(
        store: &'a StateStore,
        cache: &'a StateCache<Value>,
        actors: &'a [String],
        process: u32,
        thread: u32,
        seed: u64,
    ) -> Workload<'a> {
        Workload {
            store,
            cache,
            actors,
            process,
            thread,
            rng: fastrand::Rng::with_seed(seed),
            next_value: (u64::from(process) << 48) | (u64::from(thread) << 40),
            known: HashMap::new(),
            ops: Vec::new(),
            errors: BTreeMap::new(),
        }
    }

    /// Runs operations until `until` (nanoseconds since the epoch).
    pub fn run(&mut self, until: u64) {
        while now() < until {
            self.step();
        }
    }

    fn value(&mut self) -> u64 {
        self.next_value += 1;
        self.next_value
    }

    fn actor(&mut self) -> String {
        self.actors[self.rng.usize(..self.actors.len())].clone()
    }

    /// Two or three distinct actors.
    fn some_actors(&mut self) -> Vec<String> {
        let mut ids = self.actors.to_vec();
        self.rng.shuffle(&mut ids);
        ids.truncate(self.rng.usize(2..=3));
        ids
    }

    /// A condition: usually the version this thread last saw, sometimes
    /// absence or a near miss.
    fn expected(&mut self, id: &str) -> Expected {
        match (self.known.get(id).copied(), self.rng.u8(..10)) {
            (_, 0..=1) | (None, _) => Expected::Absent,
            (Some(n), 2) => Expected::Sequence(n.saturating_sub(1).max(1)),
            (Some(n), _) => Expected::Sequence(n),
        }
    }

    fn step(&mut self) {
        let invoked = now();
        let via = match self.rng.u8(..100) {
            0..=17 => self.save(invoked),
            18..=34 => self.save_if(invoked),
            35..=44 => self.delete(invoked),
            45..=57 => self.transform(invoked),
            58..=64 => self.save_many(invoked),
            65..=71 => self.save_many_if(invoked),
            72..=76 => self.delete_many(invoked),
            77..=86 => self.batch(invoked),
            _ => self.load(invoked),
        };
        if self.rng.u8(..4) == 0 {
            let id = self.actor();
            // What it returns is checked once the writers stop.
            let _ = self.cache.get(&id);
        }
        if via.is_err() {
            // The server is away (a cut, a restart): do not spin.
            std::thread::sleep(Duration::from_millis(self.rng.u64(1..10)));
        }
    }

    fn record(&mut self, via: &str, actor: &str, call: Call, outcome: Outcome, invoked: u64) {
        self.record_step(via, actor, call, outcome, invoked, None);
    }

    /// [`record`](Self::record) for a step of a batch.
    fn record_step(
        &mut self,
        via: &str,
        actor: &str,
        call: Call,
        outcome: Outcome,
        invoked: u64,
        batch: Option<BatchStep>,
    ) {
        match &outcome {
            Outcome::Written { sequence, .. } => {
                self.known.insert(actor.to_owned(), *sequence);
            }
            Outcome::Conflict { actual: Some(n) } | Outcome::Read(Some((_, n))) => {
                self.known.insert(actor.to_owned(), *n);
            }
            Outcome::Conflict { actual: None } | Outcome::Deleted(_) | Outcome::Read(None) => {
                self.known.remove(actor);
            }
            _ => {}
        }
        self.ops.push(Op {
            process: self.process,
            thread: self.thread,
            via: via.to_owned(),
            actor: actor.to_owned(),
            call,
            outcome,
            invoked,
            returned: now(),
            batch,
        });
    }

    /// The outcome an error reports; counts the ones that leave it unknown.
    fn failed(&mut self, e: &Error) -> Outcome {
        match e {
            Error::Conflict { actual, .. } => Outcome::Conflict { actual: *actual },
            // A transform that kept losing races wrote nothing.
            Error::TooManyConflicts { .. } => Outcome::NotApplied,
            e if e.is_not_applied() => Outcome::NotApplied,
            e => {
                let kind = if e.is_outcome_unknown() {
                    "outcome unknown".to_owned()
                } else {
                    let debug = format!("{e:?}");
                    debug
                        .split(|c: char| !c.is_alphanumeric())
                        .next()
                        .unwrap_or("other")
                        .to_owned()
                };
                *self.errors.entry(kind).or_default() += 1;
                Outcome::Unknown
            }
        }
    }

    fn written(&mut self, result: &Result<u64, Error>) -> Outcome {
        match result {
            Ok(sequence) => Outcome::Written {
                sequence: *sequence,
                read: None,
            },
            Err(e) => self.failed(e),
        }
    }

    fn save(&mut self, invoked: u64) -> Result<(), ()> {
        let (id, value) = (self.actor(), self.value());
        let result = self.store.save(&id, &(value, None::<u64>));
        let outcome = self.written(&result);
        self.record("save", &id, Call::Save { value }, outcome, invoked);
        result.map(drop).map_err(drop)
    }

    fn save_if(&mut self, invoked: u64) -> Result<(), ()> {
        let (id, value) = (self.actor(), self.value());
        let expected = self.expected(&id);
        let result = self.store.save_if(&id, &(value, None::<u64>), expected);
        let outcome = self.written(&result);
        let call = Call::SaveIf {
            value,
            expected: condition(expected),
        };
        self.record("save_if", &id, call, outcome, invoked);
        result.map(drop).map_err(drop)
    }

    fn delete(&mut self, invoked: u64) -> Result<(), ()> {
        let id = self.actor();
        let result = self.store.delete(&id);
        let outcome = match &result {
            Ok(found) => Outcome::Deleted(*found),
            Err(e) => self.failed(e),
        };
        self.record("delete", &id, Call::Delete, outcome, invoked);
        result.map(drop).map_err(drop)
    }

    fn transform(&mut self, invoked: u64) -> Result<(), ()> {
        let (id, value) = (self.actor(), self.value());
        let result = self
            .store
            .transform(&id, |old: Option<Value>| (value, old.map(|(v, _)| v)));
        let outcome = match &result {
            Ok(v) => Outcome::Written {
                sequence: v.sequence,
                read: v.value.1,
            },
            Err(e) => self.failed(e),
        };
        self.record(
            "transform",
            &id,
            Call::Transform { value },
            outcome,
            invoked,
        );
        result.map(drop).map_err(drop)
    }

    fn save_many(&mut self, invoked: u64) -> Result<(), ()> {
        let items: Vec<(String, Value)> = self
            .some_actors()
            .into_iter()
            .map(|id| (id, (self.value(), None)))
            .collect();
        let result = self.store.save_many(&items);
        for (i, (id, (value, _))) in items.iter().enumerate() {
            let outcome = match &result {
                Ok(numbers) => self.written(&Ok(numbers[i])),
                Err(e) => self.failed(e),
            };
            self.record(
                "save_many",
                id,
                Call::Save { value: *value },
                outcome,
                invoked,
            );
        }
        result.map(drop).map_err(drop)
    }

    fn save_many_if(&mut self, invoked: u64) -> Result<(), ()> {
        let items: Vec<(String, Value, Expected)> = self
            .some_actors()
            .into_iter()
            .map(|id| {
                let expected = self.expected(&id);
                (id, (self.value(), None), expected)
            })
            .collect();
        let result = self.store.save_many_if(&items);
        for (i, (id, (value, _), expected)) in items.iter().enumerate() {
            let outcome = match &result {
                Ok(each) => self.written(&each[i]),
                Err(e) => self.failed(e),
            };
            let call = Call::SaveIf {
                value: *value,
                expected: condition(*expected),
            };
            self.record("save_many_if", id, call, outcome, invoked);
        }
        result.map(drop).map_err(drop)
    }

    fn delete_many(&mut self, invoked: u64) -> Result<(), ()> {
        let ids = self.some_actors();
        let result = self.store.delete_many(&ids);
        for (i, id) in ids.iter().enumerate() {
            let outcome = match &result {
                Ok(found) => Outcome::Deleted(found[i]),
                Err(e) => self.failed(e),
            };
            self.record("delete_many", id, Call::Delete, outcome, invoked);
        }
        result.map(drop).map_err(drop)
    }

    /// A batch of saves, conditional saves and deletes on two or three
    /// actors: usually with some of them named more than once, sometimes
    /// each once. A condition is mostly the version the earlier steps
    /// should have left (as this thread last saw the actor), sometimes a
    /// near miss.
    fn batch(&mut self, invoked: u64) -> Result<(), ()> {
        let actors = self.some_actors();
        let once = self.rng.u8(..3) == 0;
        let steps = if once {
            actors.len()
        } else {
            self.rng.usize(2..=6)
        };
        // What the earlier steps should have left: saved at a number,
        // absent, or not known.
        let mut predicted: HashMap<&str, Option<Option<u64>>> = actors
            .iter()
            .map(|id| (id.as_str(), self.known.get(id).map(|n| Some(*n))))
            .collect();
        // A conflict names its actor and condition: each pair once, so that
        // it names one step.
        let mut conditions = HashSet::new();
        let mut calls = Vec::new();
        let mut batch = self.store.batch();
        for step in 0..steps {
            let id = if once {
                &actors[step]
            } else {
                &actors[self.rng.usize(..actors.len())]
            };
            let value = self.value();
            let state: Value = (value, None);
            let before = predicted[id.as_str()];
            let mut kind = self.rng.u8(..3);
            let expected = match before {
                Some(Some(n)) if self.rng.u8(..5) == 0 => {
                    Expected::Sequence(n.saturating_sub(1).max(1))
                }
                Some(Some(n)) => Expected::Sequence(n),
                Some(None) => Expected::Absent,
                None => self.expected(id),
            };
            if kind == 1 && !conditions.insert((id.clone(), condition(expected))) {
                kind = 0;
            }
            let (call, after) = match kind {
                0 => {
                    batch = batch.save(id, &state);
                    (Call::Save { value }, before.flatten().map(|n| Some(n + 1)))
                }
                1 => {
                    batch = batch.save_if(id, &state, expected);
                    let after = match expected {
                        Expected::Sequence(n) => Some(Some(n + 1)),
                        Expected::Absent => None,
                    };
                    let call = Call::SaveIf {
                        value,
                        expected: condition(expected),
                    };
                    (call, after)
                }
                _ => {
                    batch = batch.delete(id);
                    (Call::Delete, Some(None))
                }
            };
            predicted.insert(id.as_str(), after);
            calls.push((id.clone(), call));
        }
        let result = batch.commit();
        // The step a conflict is about.
        let conflicted = match &result {
            Err(Error::Conflict {
                actor_id, expected, ..
            }) => Some(
                calls
                    .iter()
                    .position(|(id, call)| {
                        id == actor_id
                            && matches!(call, Call::SaveIf { expected: e, .. } if *e == condition(*expected))
                    })
                    .expect("a conflict names a conditional step of its batch"),
            ),
            _ => None,
        };
        let id_of_batch = self.value();
        for (i, (id, call)) in calls.iter().enumerate() {
            let outcome = match &result {
                Ok(results) => match results[i] {
                    BatchResult::Saved(sequence) => Outcome::Written {
                        sequence,
                        read: None,
                    },
                    BatchResult::Deleted(found) => Outcome::Deleted(found),
                    ref other => panic!("unexpected batch result {other:?}"),
                },
                // The conflict is this step's; the others were rolled back.
                Err(Error::Conflict { actual, .. }) if conflicted == Some(i) => {
                    Outcome::Conflict { actual: *actual }
                }
                Err(Error::Conflict { .. }) => Outcome::NotApplied,
                Err(e) => self.failed(e),
            };
            let step = BatchStep {
                batch: id_of_batch,
                step: i as u32,
            };
            let in_batch = matches!(outcome, Outcome::Conflict { .. })
                && calls[..i].iter().any(|(other, _)| other == id);
            self.record_step("batch", id, call.clone(), outcome, invoked, Some(step));
            if in_batch {
                // It found a version an earlier step made, which was rolled back.
                self.known.remove(id);
            }
        }
        result.map(drop).map_err(drop)
    }

    fn load(&mut self, invoked: u64) -> Result<(), ()> {
        let id = self.actor();
        match self.store.load_versioned::<Value>(&id) {
            Ok(found) => {
                let outcome = Outcome::Read(found.map(|v| (v.value, v.sequence)));
                self.record("load", &id, Call::Load, outcome, invoked);
                Ok(())
            }
            // A load that failed says nothing about the history.
            Err(_) => Err(()),
        }
    }
}

fn condition(expected: Expected) -> Option<u64> {
    match expected {
        Expected::Absent => None,
        Expected::Sequence(n) => Some(n),
    }
}
