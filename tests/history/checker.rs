//! Checks a recorded history against a sequential model of the store.
//!
//! The store numbers each actor's writes: a save takes the next number, a
//! delete the one after the last save (kept in the tombstone), a create the
//! one after that. Numbers are dense, so a successful write's number *is*
//! its place in the actor's linearization, and the checker needs no search:
//!
//! - **Versions.** Every number some write returned, some subscriber was
//!   told of, or some load read, is a version: a save (of a known value or
//!   not) or a delete. Two writes returning one number, or two sources
//!   disagreeing about a number's kind or value, is a violation.
//! - **Sequential model.** Walking the versions in order, each write must be
//!   legal in the state its predecessor left: a conditional save expecting
//!   `n` lands at `n + 1` over a save; a create (`Expected::Absent`) lands
//!   over a delete or nothing; a transform's step was given the value of
//!   the version below its own; a delete follows a save.
//! - **Real time.** An operation that returned before another was invoked
//!   is ordered before it: its number is below the later write's, and not
//!   above the later load's.
//! - **Operations without a number** (a conflict, a delete, a load of an
//!   absent actor) need a version they could have met: one that is not
//!   superseded before they were invoked and not created after they
//!   returned, of the right kind (the conflict's actual version, which is
//!   not the expected one; an absent version for a failed delete).
//! - **Batches.** A batch's steps on one actor run in order at numbers that
//!   follow one another: when it committed, each save is one above the step
//!   before it, a delete after a save takes the number between (which the
//!   checker learns as a delete), and a delete finds the actor exactly when
//!   an earlier step left it saved. A failed condition after earlier steps
//!   on its actor reports the version those steps made (rolled back with
//!   the batch): absent after a delete, even one that found nothing; after
//!   saves, a number that, counted back over them, lands on a version the
//!   actor could have been in.
//! - **Outcomes.** A write reported not applied (or failed on a conflict)
//!   never shows up as a value anyone reads; an unknown outcome may fill
//!   any number not otherwise accounted for.
//! - **Subscribers** see each actor's numbers only grow between `Resync`s,
//!   and only their own table's changes.
//!
//! Why not a general linearizability checker such as `stateright`'s
//! `LinearizabilityTester`: it searches the interleavings of concurrent
//! operations without memoisation, which is exponential in the number of
//! operations in flight at once (here dozens, for a hundred thousand
//! operations), and it has no way to say that an operation may or may not
//! have taken effect (`OutcomeUnknown`, a write cut by a lost connection),
//! which is the case the store's lost-write protocol is about. The
//! sequence numbers the store returns are witnesses of the linearization,
//! which turns the search into the linear checks above.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::record::{Call, History, Op, Outcome, Seen};

/// Every violation found, each a sentence naming the operations involved.
/// `table` is the history's table as payloads name it (`schema.table`).
pub fn check(history: &History, table: &str) -> Vec<String> {
    let origin = history.ops.iter().map(|op| op.invoked).min().unwrap_or(0);
    let mut out = Violations::new(origin);
    check_feeds(history, table, &mut out);
    let writers: HashMap<u64, &Op> = history
        .ops
        .iter()
        .filter_map(|op| op.call.value().map(|value| (value, op)))
        .collect();
    let actors: BTreeSet<&str> = history.ops.iter().map(|op| op.actor.as_str()).collect();
    for actor in actors {
        Actor::new(history, actor, table, &writers, &mut out).check();
    }
    for problem in &history.problems {
        out.push(problem.clone());
    }
    out.list
}

/// Collects violations once each, and describes operations for them.
struct Violations {
    origin: u64,
    list: Vec<String>,
    seen: HashSet<String>,
}

impl Violations {
    fn new(origin: u64) -> Violations {
        Violations {
            origin,
            list: Vec::new(),
            seen: HashSet::new(),
        }
    }

    fn push(&mut self, message: String) {
        if self.seen.insert(message.clone()) {
            self.list.push(message);
        }
    }

    /// `process 1 thread 2 save_if(SaveIf { .. }) → Conflict { .. } at 0.120–0.125 s`
    fn op(&self, op: &Op) -> String {
        let at = |t: u64| t.saturating_sub(self.origin) as f64 / 1e9;
        format!(
            "[process {} thread {} {} {:?} → {:?} at {:.6}–{:.6} s]",
            op.process,
            op.thread,
            op.via,
            op.call,
            op.outcome,
            at(op.invoked),
            at(op.returned)
        )
    }
}

/// Each subscriber sees only its table, and each actor's numbers grow
/// between resyncs.
fn check_feeds(history: &History, table: &str, out: &mut Violations) {
    for feed in &history.feeds {
        let mut last: HashMap<&str, u64> = HashMap::new();
        for event in &feed.events {
            match event {
                Seen::Resync => last.clear(),
                Seen::Change {
                    actor,
                    sequence,
                    table: other,
                    ..
                } => {
                    if let Some(other) = other.as_deref().filter(|t| *t != table) {
                        out.push(format!(
                            "subscriber {} received a change of table {other} \
                             (actor {actor}, number {sequence})",
                            feed.name
                        ));
                        continue;
                    }
                    if let Some(before) = last.insert(actor, *sequence) {
                        if *sequence <= before {
                            out.push(format!(
                                "subscriber {} saw actor {actor} at number {before}, then at \
                                 {sequence}, with no resync between",
                                feed.name
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// What a number holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// A save, of this value when known.
    Saved(Option<u64>),
    Deleted,
}

/// What the version below a write was.
enum Below {
    Absent,
    Present(Option<u64>),
    Unknown,
}

/// One actor's part of the history.
struct Actor<'h, 'o> {
    actor: &'h str,
    ops: Vec<&'h Op>,
    writers: &'h HashMap<u64, &'h Op>,
    /// Each known number: its kind and the write that returned it.
    versions: BTreeMap<u64, (Kind, Option<&'h Op>)>,
    /// The highest number any version could have.
    top: u64,
    /// (returned, number) of operations with a number, by `returned`, with
    /// the running maximum of the number.
    finished: Vec<(u64, u64)>,
    /// This actor's steps of each batch, in order.
    batches: BTreeMap<u64, Vec<&'h Op>>,
    /// (invoked, bound) by `invoked`, with the running minimum from the end:
    /// no version created after `invoked` is at or below `bound`... the
    /// highest number a version existing before `invoked` can have.
    started: Vec<(u64, u64)>,
    out: &'o mut Violations,
}

impl<'h, 'o> Actor<'h, 'o> {
    fn new(
        history: &'h History,
        actor: &'h str,
        table: &str,
        writers: &'h HashMap<u64, &'h Op>,
        out: &'o mut Violations,
    ) -> Actor<'h, 'o> {
        let ops: Vec<&Op> = history.ops.iter().filter(|op| op.actor == actor).collect();
        let mut batches: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for op in &ops {
            if let Some(at) = op.batch {
                batches.entry(at.batch).or_default().push(op);
            }
        }
        for steps in batches.values_mut() {
            steps.sort_by_key(|op| op.batch.map(|at| at.step));
        }
        let mut this = Actor {
            actor,
            ops,
            batches,
            writers,
            versions: BTreeMap::new(),
            top: 0,
            finished: Vec::new(),
            started: Vec::new(),
            out,
        };
        this.collect_writes();
        this.collect_batches();
        this.collect_feeds(history, table);
        this.collect_reads();
        this.index_times();
        this
    }

    fn check(mut self) {
        self.check_sequence();
        self.check_real_time();
        self.check_unnumbered();
    }

    /// Numbers the store returned for writes.
    fn collect_writes(&mut self) {
        for op in self.ops.clone() {
            if let Outcome::Written { sequence, .. } = op.outcome {
                if let Some((_, Some(first))) = self.versions.get(&sequence) {
                    let what = format!(
                        "two successful writes returned number {sequence}: {} and {}",
                        self.out.op(first),
                        self.out.op(op)
                    );
                    self.flag(what);
                    continue;
                }
                self.versions
                    .insert(sequence, (Kind::Saved(op.call.value()), Some(op)));
            }
        }
    }

    /// What the batches that committed say: each actor's steps follow one
    /// another, and a delete that found the actor sits at the number between
    /// the steps around it.
    fn collect_batches(&mut self) {
        /// What the steps so far left the actor in.
        #[derive(Clone, Copy)]
        enum Left {
            /// Nothing yet: as before the batch.
            Nothing,
            Saved(u64),
            Deleted(u64),
            /// Deleted by a first step that found it, at a number not known.
            DeletedHere,
            /// Absent at a number not known: a first step did not find it.
            Absent,
        }
        let batches: Vec<Vec<&Op>> = self.batches.values().cloned().collect();
        for steps in batches {
            let committed = steps
                .iter()
                .all(|op| matches!(op.outcome, Outcome::Written { .. } | Outcome::Deleted(_)));
            if !committed {
                continue;
            }
            let mut left = Left::Nothing;
            for op in steps {
                let wrong = match (&op.outcome, left) {
                    (Outcome::Written { sequence, .. }, before) => {
                        let wrong = match before {
                            Left::Saved(p) | Left::Deleted(p) if *sequence != p + 1 => {
                                Some(format!(
                                    "a step wrote number {sequence} after its batch's step at {p}"
                                ))
                            }
                            Left::DeletedHere if *sequence < 2 => Some(format!(
                                "a step wrote number {sequence} after a delete of its batch \
                                 that found the actor"
                            )),
                            Left::DeletedHere => {
                                let description = self.out.op(op);
                                self.learn(sequence - 1, Kind::Deleted, || {
                                    format!("the batch of {description} deleted it")
                                });
                                None
                            }
                            _ => None,
                        };
                        left = Left::Saved(*sequence);
                        wrong
                    }
                    (Outcome::Deleted(true), Left::Saved(p)) => {
                        let description = self.out.op(op);
                        self.learn(p + 1, Kind::Deleted, || format!("{description} took it"));
                        left = Left::Deleted(p + 1);
                        None
                    }
                    (Outcome::Deleted(true), Left::Nothing) => {
                        left = Left::DeletedHere;
                        None
                    }
                    (Outcome::Deleted(true), _) => Some(
                        "a delete found the actor an earlier step of its batch had deleted"
                            .to_owned(),
                    ),
                    (Outcome::Deleted(false), Left::Saved(p)) => Some(format!(
                        "a delete did not find the actor an earlier step of its batch saved at {p}"
                    )),
                    (Outcome::Deleted(false), Left::Nothing) => {
                        left = Left::Absent;
                        None
                    }
                    _ => None,
                };
                if let Some(wrong) = wrong {
                    let what = format!("{wrong} {}", self.out.op(op));
                    self.flag(what);
                }
            }
        }
    }

    /// The steps of `op`'s batch on this actor before it.
    fn earlier_steps(&self, op: &Op) -> Vec<&'h Op> {
        let Some(at) = op.batch else {
            return Vec::new();
        };
        self.batches[&at.batch]
            .iter()
            .filter(|other| other.batch.is_some_and(|o| o.step < at.step))
            .copied()
            .collect()
    }

    /// A conflict after earlier steps of its batch on the actor: the version
    /// it reports is the one they made, which was rolled back with the
    /// batch. Says what is wrong with it, if anything.
    fn conflict_after(
        &self,
        earlier: &[&Op],
        actual: Option<u64>,
        from: u64,
        to: u64,
    ) -> Option<String> {
        let absent = |k: u64, kind: Option<Kind>| k == 0 || !matches!(kind, Some(Kind::Saved(_)));
        let after_delete = earlier
            .last()
            .is_some_and(|op| matches!(op.call, Call::Delete));
        let first_save = earlier
            .iter()
            .position(|op| !matches!(op.call, Call::Delete));
        match (first_save, actual) {
            // After a delete the actor is absent for the rest of its batch.
            (_, None) if after_delete => None,
            (_, Some(k)) if after_delete => Some(format!(
                "a conflict after a delete of its batch reported number {k}"
            )),
            // Deletes only: covered above.
            (None, _) => None,
            (Some(_), None) => {
                Some("a conflict after a save of its batch reported the actor absent".to_owned())
            }
            (Some(p), Some(k)) => {
                // From the first save on, each save wrote, and each delete
                // right after a save; at numbers that follow one another.
                let writes: Vec<bool> = earlier
                    .iter()
                    .enumerate()
                    .map(|(q, op)| {
                        q >= p
                            && (!matches!(op.call, Call::Delete)
                                || !matches!(earlier[q - 1].call, Call::Delete))
                    })
                    .collect();
                let wrote = writes.iter().filter(|w| **w).count() as u64;
                if k < wrote {
                    return Some(format!(
                        "a conflict reported number {k} after {wrote} writes of its batch"
                    ));
                }
                for (q, op) in earlier.iter().enumerate().skip(p) {
                    if let Call::SaveIf {
                        expected: Some(e), ..
                    } = op.call
                    {
                        let later = writes[q + 1..].iter().filter(|w| **w).count() as u64;
                        let at = e + 1 + later;
                        if at != k {
                            return Some(format!(
                                "a conflict reported number {k}, but an earlier step of its \
                                 batch expecting {e} puts it at {at}"
                            ));
                        }
                    }
                }
                let first = k + 1 - wrote;
                let met = if p > 0 {
                    // Before the batch: absent just below its first save
                    // (its deletes found nothing), or saved two below (the
                    // first delete took the number between).
                    self.any_version(from, to, |n, kind| {
                        (n + 1 == first && absent(n, kind))
                            || (n + 2 == first && n > 0 && !matches!(kind, Some(Kind::Deleted)))
                    })
                } else {
                    self.any_version(from, to, |n, _| n + 1 == first)
                };
                (!met).then(|| {
                    format!(
                        "a conflict reported number {k}, but its batch's first save at {first} \
                         is not above a version in {from}..={to}"
                    )
                })
            }
        }
    }

    /// Numbers the subscribers were told of.
    fn collect_feeds(&mut self, history: &History, table: &str) {
        for feed in &history.feeds {
            for event in &feed.events {
                let Seen::Change {
                    actor,
                    sequence,
                    deleted,
                    table: from,
                } = event
                else {
                    continue;
                };
                if actor != self.actor || from.as_deref().is_some_and(|t| t != table) {
                    continue;
                }
                let kind = if *deleted {
                    Kind::Deleted
                } else {
                    Kind::Saved(None)
                };
                self.learn(*sequence, kind, || {
                    format!("subscriber {} was told of it", feed.name)
                });
            }
        }
    }

    /// Values the loads read.
    fn collect_reads(&mut self) {
        for op in self.ops.clone() {
            let Outcome::Read(Some(((value, read), sequence))) = op.outcome else {
                continue;
            };
            match self.writers.get(&value).map(|w| (w, &w.outcome)) {
                Some((w, _)) if w.actor != op.actor => {
                    let what = format!(
                        "{} read the value that {} wrote to another actor",
                        self.out.op(op),
                        self.out.op(w)
                    );
                    self.flag(what);
                }
                None => {
                    let what = format!(
                        "{} read a value no operation of this table wrote",
                        self.out.op(op)
                    );
                    self.flag(what);
                }
                Some((w, Outcome::NotApplied | Outcome::Conflict { .. })) => {
                    let what = format!(
                        "{} read the value of {}, which was reported not applied",
                        self.out.op(op),
                        self.out.op(w)
                    );
                    self.flag(what);
                }
                Some((
                    w,
                    Outcome::Written {
                        sequence: at,
                        read: r,
                    },
                )) => {
                    if *at != sequence || *r != read {
                        let what = format!(
                            "{} read at number {sequence} the value that {} wrote",
                            self.out.op(op),
                            self.out.op(w)
                        );
                        self.flag(what);
                    }
                }
                Some(_) => {}
            }
            let description = self.out.op(op);
            self.learn(sequence, Kind::Saved(Some(value)), || {
                format!("{description} read it")
            });
        }
    }

    /// Records what `sequence` holds, reporting a disagreement with what
    /// was known.
    fn learn(&mut self, sequence: u64, kind: Kind, source: impl FnOnce() -> String) {
        match self.versions.get_mut(&sequence) {
            None => {
                self.versions.insert(sequence, (kind, None));
            }
            Some((known, _)) => match (*known, kind) {
                (Kind::Deleted, Kind::Deleted) => {}
                (Kind::Saved(None), Kind::Saved(v)) => *known = Kind::Saved(v),
                (Kind::Saved(Some(_)), Kind::Saved(None)) => {}
                (Kind::Saved(Some(a)), Kind::Saved(Some(b))) if a == b => {}
                (was, now) => {
                    let what = format!(
                        "number {sequence} was known as {was:?}, but {} as {now:?}",
                        source()
                    );
                    self.flag(what);
                }
            },
        }
    }

    /// Reports a violation on this actor.
    fn flag(&mut self, what: String) {
        let message = format!("actor {}: {what}", self.actor);
        self.out.push(message);
    }

    fn below(&self, sequence: u64) -> Below {
        if sequence <= 1 {
            return Below::Absent;
        }
        match self.versions.get(&(sequence - 1)) {
            Some((Kind::Deleted, _)) => Below::Absent,
            Some((Kind::Saved(value), _)) => Below::Present(*value),
            None => Below::Unknown,
        }
    }

    /// Each version is legal over the one below it.
    fn check_sequence(&mut self) {
        let versions: Vec<(u64, Kind, Option<&Op>)> = self
            .versions
            .iter()
            .map(|(n, (kind, op))| (*n, *kind, *op))
            .collect();
        for (n, kind, op) in versions {
            let below = self.below(n);
            let wrong = match (kind, op.map(|op| (&op.call, &op.outcome))) {
                (Kind::Deleted, _) => matches!(below, Below::Absent)
                    .then(|| format!("a delete at number {n} over an absent version")),
                (
                    _,
                    Some((
                        Call::SaveIf {
                            expected: Some(e), ..
                        },
                        _,
                    )),
                ) if n != e + 1 => Some(format!("a save expecting {e} was written at {n}")),
                (
                    _,
                    Some((
                        Call::SaveIf {
                            expected: Some(e), ..
                        },
                        _,
                    )),
                ) => matches!(below, Below::Absent)
                    .then(|| format!("a save expecting {e} was written over an absent version")),
                (_, Some((Call::SaveIf { expected: None, .. }, _))) => {
                    matches!(below, Below::Present(_))
                        .then(|| format!("a create was written at {n} over a saved version"))
                }
                (_, Some((Call::Transform { .. }, Outcome::Written { read, .. }))) => {
                    match (&below, read) {
                        (Below::Absent, Some(r)) => Some(format!(
                            "a transform at {n} was given value {r} though the actor was absent"
                        )),
                        (Below::Present(None), None) => Some(format!(
                            "a transform at {n} was given no value though {} was saved",
                            n - 1
                        )),
                        (Below::Present(Some(w)), r) if Some(*w) != *r => Some(format!(
                            "a transform at {n} was given {r:?}, but number {} holds {w}",
                            n - 1
                        )),
                        (_, Some(r)) => match self.writers.get(r).map(|w| &w.outcome) {
                            Some(Outcome::Written { sequence, .. }) if *sequence + 1 != n => {
                                Some(format!(
                                    "a transform at {n} was given the value written at {sequence}"
                                ))
                            }
                            _ => None,
                        },
                        _ => None,
                    }
                }
                _ => None,
            };
            if let Some(wrong) = wrong {
                let by = op.map(|op| self.out.op(op)).unwrap_or_default();
                let what = format!("{wrong} {by}");
                self.flag(what);
            }
        }
    }

    /// Sorts the numbered operations for the real-time queries.
    fn index_times(&mut self) {
        // Numbers nothing told of: writes of unknown outcome, and deletes
        // (which return no number) that no subscriber heard of.
        let untold = self
            .ops
            .iter()
            .filter(|op| matches!(op.outcome, Outcome::Unknown | Outcome::Deleted(true)))
            .count() as u64;
        let known_top = self.versions.keys().next_back().copied().unwrap_or(0);
        self.top = known_top + untold;
        for op in &self.ops {
            match op.outcome {
                Outcome::Written { sequence, .. } => {
                    self.finished.push((op.returned, sequence));
                    self.started.push((op.invoked, sequence - 1));
                }
                Outcome::Read(Some((_, sequence))) => {
                    self.finished.push((op.returned, sequence));
                    self.started.push((op.invoked, sequence));
                }
                _ => {}
            }
        }
        self.finished.sort_unstable();
        let mut max = 0;
        for entry in &mut self.finished {
            max = max.max(entry.1);
            entry.1 = max;
        }
        self.started.sort_unstable();
        let mut min = u64::MAX;
        for entry in self.started.iter_mut().rev() {
            min = min.min(entry.1);
            entry.1 = min;
        }
    }

    /// The highest number of an operation that returned before `t`: every
    /// version below it was superseded by then.
    fn superseded_before(&self, t: u64) -> u64 {
        let i = self.finished.partition_point(|(returned, _)| *returned < t);
        if i == 0 {
            0
        } else {
            self.finished[i - 1].1
        }
    }

    /// The highest number a version created by `t` can have: operations
    /// invoked after `t` write above it or read at or above it.
    fn created_by(&self, t: u64) -> u64 {
        let i = self.started.partition_point(|(invoked, _)| *invoked <= t);
        self.started
            .get(i)
            .map_or(self.top, |(_, bound)| (*bound).min(self.top))
    }

    /// An operation that returned before another was invoked is ordered
    /// before it.
    fn check_real_time(&mut self) {
        for op in self.ops.clone() {
            let (number, strict) = match op.outcome {
                Outcome::Written { sequence, .. } => (sequence, true),
                Outcome::Read(Some((_, sequence))) => (sequence, false),
                _ => continue,
            };
            let before = self.superseded_before(op.invoked);
            if before > number || (strict && before == number) {
                let what = format!(
                    "{} got number {number}, but an operation that returned before it \
                     was invoked had number {before}",
                    self.out.op(op)
                );
                self.flag(what);
            }
        }
    }

    /// Whether some version in `from..=to` could be what `wanted` accepts.
    fn any_version(&self, from: u64, to: u64, wanted: impl Fn(u64, Option<Kind>) -> bool) -> bool {
        (from..=to.min(self.top)).any(|k| wanted(k, self.versions.get(&k).map(|(kind, _)| *kind)))
    }

    /// Conflicts, deletes and loads of an absent actor met a version that
    /// existed while they ran.
    fn check_unnumbered(&mut self) {
        let absent = |k: u64, kind: Option<Kind>| k == 0 || !matches!(kind, Some(Kind::Saved(_)));
        for op in self.ops.clone() {
            let from = self.superseded_before(op.invoked);
            let to = self.created_by(op.returned);
            let expected = match op.call {
                Call::SaveIf { expected, .. } => Some(expected),
                _ => None,
            };
            let earlier = self.earlier_steps(op);
            let wrong = match &op.outcome {
                Outcome::Conflict { actual } if expected == Some(*actual) => {
                    Some("a conflict reported the expected version".to_owned())
                }
                Outcome::Conflict { actual } if !earlier.is_empty() => {
                    self.conflict_after(&earlier, *actual, from, to)
                }
                Outcome::Conflict { actual: Some(k) } => {
                    (!self.any_version(from, to, |n, kind| {
                        n == *k && n > 0 && !matches!(kind, Some(Kind::Deleted))
                    }))
                    .then(|| {
                        format!(
                            "a conflict reported number {k}, not a saved version in {from}..={to}"
                        )
                    })
                }
                Outcome::Conflict { actual: None }
                | Outcome::Deleted(false)
                | Outcome::Read(None) => (!self.any_version(from, to, absent)).then(|| {
                    format!("the actor was reported absent, but versions {from}..={to} are saves")
                }),
                Outcome::Deleted(true) => (!self.any_version(from + 1, to, |n, kind| {
                    n > 0 && !matches!(kind, Some(Kind::Saved(_)))
                }))
                .then(|| {
                    format!(
                        "a delete succeeded, but no number in {}..={to} is a delete",
                        from + 1
                    )
                }),
                _ => None,
            };
            if let Some(wrong) = wrong {
                let what = format!("{wrong} {}", self.out.op(op));
                self.flag(what);
            }
            if let Outcome::Written {
                read: Some(read), ..
            } = op.outcome
            {
                if let Some(w) = self.writers.get(&read) {
                    if matches!(w.outcome, Outcome::NotApplied | Outcome::Conflict { .. }) {
                        let what = format!(
                            "{} was given the value of {}, which was reported not applied",
                            self.out.op(op),
                            self.out.op(w)
                        );
                        self.flag(what);
                    }
                }
            }
        }
    }
}
