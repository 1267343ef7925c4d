//! The checker on small hand-written histories: each violation it exists
//! to find is found, and legal histories pass.

use crate::checker::check;
use crate::record::{BatchStep, Call, Feed, History, Op, Outcome, Seen};

const T: &str = "public.t";

/// Builds a history one operation at a time; each takes the next time slot
/// unless told to overlap.
#[derive(Default)]
struct H {
    history: History,
    clock: u64,
}

impl H {
    fn op(&mut self, actor: &str, call: Call, outcome: Outcome) -> &mut Self {
        self.clock += 10;
        self.at(self.clock, self.clock + 5, actor, call, outcome)
    }

    fn at(
        &mut self,
        invoked: u64,
        returned: u64,
        actor: &str,
        call: Call,
        outcome: Outcome,
    ) -> &mut Self {
        self.history.ops.push(Op {
            process: 0,
            thread: 0,
            via: "test".into(),
            actor: actor.into(),
            call,
            outcome,
            invoked,
            returned,
            batch: None,
        });
        self
    }

    fn save(&mut self, value: u64, sequence: u64) -> &mut Self {
        self.op("a", Call::Save { value }, written(sequence))
    }

    /// A batch of steps on actor `a`, sharing one time slot.
    fn batch(&mut self, steps: Vec<(Call, Outcome)>) -> &mut Self {
        self.clock += 10;
        let (invoked, id) = (self.clock, self.clock);
        for (step, (call, outcome)) in steps.into_iter().enumerate() {
            self.at(invoked, invoked + 5, "a", call, outcome);
            self.history.ops.last_mut().unwrap().batch = Some(BatchStep {
                batch: id,
                step: step as u32,
            });
        }
        self
    }

    fn feed(&mut self, events: Vec<Seen>) -> &mut Self {
        self.history.feeds.push(Feed {
            name: "sub".into(),
            events,
        });
        self
    }

    fn violations(&self) -> Vec<String> {
        check(&self.history, T)
    }

    #[track_caller]
    fn passes(&self) {
        let v = self.violations();
        assert!(v.is_empty(), "{v:#?}");
    }

    #[track_caller]
    fn fails(&self, needle: &str) {
        let v = self.violations();
        assert!(
            v.iter().any(|m| m.contains(needle)),
            "expected a violation containing {needle:?}, got {v:#?}"
        );
    }
}

fn written(sequence: u64) -> Outcome {
    Outcome::Written {
        sequence,
        read: None,
    }
}

fn change(sequence: u64, deleted: bool) -> Seen {
    Seen::Change {
        actor: "a".into(),
        sequence,
        deleted,
        table: Some(T.into()),
    }
}

#[test]
fn a_legal_history_passes() {
    let mut h = H::default();
    h.save(1, 1)
        .op(
            "a",
            Call::SaveIf {
                value: 2,
                expected: Some(1),
            },
            written(2),
        )
        .op(
            "a",
            Call::SaveIf {
                value: 3,
                expected: Some(1),
            },
            Outcome::Conflict { actual: Some(2) },
        )
        .op("a", Call::Delete, Outcome::Deleted(true))
        .op("a", Call::Delete, Outcome::Deleted(false))
        .op("a", Call::Load, Outcome::Read(None))
        .op(
            "a",
            Call::SaveIf {
                value: 4,
                expected: None,
            },
            written(4),
        )
        .op(
            "a",
            Call::Transform { value: 5 },
            Outcome::Written {
                sequence: 5,
                read: Some(4),
            },
        )
        .op("a", Call::Load, Outcome::Read(Some(((5, Some(4)), 5))))
        .op("a", Call::Save { value: 6 }, Outcome::Unknown)
        .op("a", Call::Save { value: 7 }, Outcome::NotApplied)
        .save(8, 7)
        .feed(vec![
            change(1, false),
            change(2, false),
            change(3, true),
            Seen::Resync,
            change(7, false),
        ]);
    h.passes();
}

#[test]
fn a_repeated_number_is_found() {
    let mut h = H::default();
    h.save(1, 1).save(2, 2).save(3, 2);
    h.fails("two successful writes returned number 2");
}

#[test]
fn a_create_below_the_tombstone_is_found() {
    // Defect 1's shape: saved to 5, deleted at 6, re-created at 1.
    let mut h = H::default();
    for n in 1..=5 {
        h.save(n, n);
    }
    h.op("a", Call::Delete, Outcome::Deleted(true))
        .op(
            "a",
            Call::SaveIf {
                value: 9,
                expected: None,
            },
            written(1),
        )
        .feed(vec![change(5, false), change(6, true), change(1, false)]);
    h.fails("two successful writes returned number 1");
    h.fails("saw actor a at number 6, then at 1");
}

#[test]
fn another_tables_change_is_found() {
    let mut h = H::default();
    h.save(1, 1).feed(vec![
        change(1, false),
        Seen::Change {
            actor: "a".into(),
            sequence: 40,
            deleted: false,
            table: Some("public.other".into()),
        },
    ]);
    h.fails("received a change of table public.other");
}

#[test]
fn numbers_that_go_down_without_a_resync_are_found() {
    let mut h = H::default();
    h.save(1, 1).save(2, 2);
    h.feed(vec![change(2, false), change(1, false)]);
    h.fails("with no resync between");
    // After a resync they may start anywhere.
    let mut h = H::default();
    h.save(1, 1).save(2, 2);
    h.feed(vec![change(2, false), Seen::Resync, change(1, false)]);
    h.passes();
}

#[test]
fn a_conflict_that_names_the_expected_version_is_found() {
    let mut h = H::default();
    h.save(1, 1).op(
        "a",
        Call::SaveIf {
            value: 2,
            expected: Some(1),
        },
        Outcome::Conflict { actual: Some(1) },
    );
    h.fails("a conflict reported the expected version");
}

#[test]
fn a_conflict_on_a_version_already_superseded_is_found() {
    let mut h = H::default();
    h.save(1, 1).save(2, 2).save(3, 3).op(
        "a",
        Call::SaveIf {
            value: 4,
            expected: Some(2),
        },
        Outcome::Conflict { actual: Some(1) },
    );
    h.fails("a conflict reported number 1");
}

#[test]
fn a_conflict_with_a_concurrent_version_passes() {
    let mut h = H::default();
    h.save(1, 1);
    // The conditional write runs from 100 to 200; the save at 2 lands meanwhile.
    h.at(
        100,
        200,
        "a",
        Call::SaveIf {
            value: 3,
            expected: Some(2),
        },
        Outcome::Conflict { actual: Some(1) },
    )
    .at(120, 130, "a", Call::Save { value: 2 }, written(2));
    h.passes();
}

#[test]
fn an_absent_report_while_the_actor_was_saved_throughout_is_found() {
    let mut h = H::default();
    h.save(1, 1)
        .op("a", Call::Delete, Outcome::Deleted(false))
        .save(2, 2);
    h.fails("the actor was reported absent");
}

#[test]
fn a_value_of_a_write_not_applied_that_is_read_is_found() {
    let mut h = H::default();
    h.save(1, 1)
        .op("a", Call::Save { value: 2 }, Outcome::NotApplied)
        .op("a", Call::Load, Outcome::Read(Some(((2, None), 2))));
    h.fails("which was reported not applied");
}

#[test]
fn a_transform_given_a_stale_value_is_found() {
    let mut h = H::default();
    h.save(1, 1).save(2, 2).op(
        "a",
        Call::Transform { value: 3 },
        Outcome::Written {
            sequence: 3,
            read: Some(1),
        },
    );
    h.fails("a transform at 3 was given Some(1), but number 2 holds 2");
}

#[test]
fn a_number_below_one_already_returned_is_found() {
    let mut h = H::default();
    h.save(1, 1).save(3, 3).save(2, 2);
    h.fails("an operation that returned before it was invoked had number 3");
}

#[test]
fn a_create_over_a_saved_version_is_found() {
    let mut h = H::default();
    h.save(1, 1).op(
        "a",
        Call::SaveIf {
            value: 2,
            expected: None,
        },
        written(2),
    );
    h.fails("a create was written at 2 over a saved version");
}

#[test]
fn a_save_expecting_one_version_that_lands_elsewhere_is_found() {
    let mut h = H::default();
    h.save(1, 1).save(2, 2).op(
        "a",
        Call::SaveIf {
            value: 3,
            expected: Some(1),
        },
        written(3),
    );
    h.fails("a save expecting 1 was written at 3");
}

#[test]
fn a_feed_that_calls_a_save_a_delete_is_found() {
    let mut h = H::default();
    h.save(1, 1)
        .save(2, 2)
        .feed(vec![change(1, false), change(2, true)]);
    h.fails("number 2 was known as Saved");
}

#[test]
fn an_unknown_outcome_may_fill_a_gap() {
    let mut h = H::default();
    h.save(1, 1)
        .op("a", Call::Save { value: 2 }, Outcome::Unknown)
        .op(
            "a",
            Call::SaveIf {
                value: 3,
                expected: Some(2),
            },
            written(3),
        )
        .op("a", Call::Load, Outcome::Read(Some(((3, None), 3))));
    h.passes();
}

#[test]
fn a_value_read_from_another_actor_is_found() {
    let mut h = H::default();
    h.save(1, 1)
        .op("b", Call::Load, Outcome::Read(Some(((1, None), 1))));
    h.fails("wrote to another actor");
}

fn save_if(value: u64, expected: Option<u64>) -> Call {
    Call::SaveIf { value, expected }
}

#[test]
fn a_batch_that_writes_an_actor_several_times_passes() {
    let mut h = H::default();
    h.save(1, 1)
        .batch(vec![
            (Call::Save { value: 2 }, written(2)),
            (Call::Delete, Outcome::Deleted(true)),
            (Call::Delete, Outcome::Deleted(false)),
            (save_if(3, None), written(4)),
            (save_if(4, Some(4)), written(5)),
        ])
        .batch(vec![
            (Call::Delete, Outcome::Deleted(true)),
            (Call::Save { value: 5 }, written(7)),
        ])
        .op("a", Call::Load, Outcome::Read(Some(((5, None), 7))))
        .feed(vec![
            change(1, false),
            change(2, false),
            change(3, true),
            change(4, false),
            change(5, false),
            change(6, true),
            change(7, false),
        ]);
    h.passes();
}

#[test]
fn a_batch_whose_steps_skip_a_number_is_found() {
    let mut h = H::default();
    h.save(1, 1).batch(vec![
        (Call::Save { value: 2 }, written(2)),
        (Call::Save { value: 3 }, written(4)),
    ]);
    h.fails("a step wrote number 4 after its batch's step at 2");
}

#[test]
fn a_batch_delete_that_misses_its_batchs_save_is_found() {
    let mut h = H::default();
    h.save(1, 1).batch(vec![
        (Call::Save { value: 2 }, written(2)),
        (Call::Delete, Outcome::Deleted(false)),
    ]);
    h.fails("a delete did not find the actor an earlier step of its batch saved at 2");
    let mut h = H::default();
    h.save(1, 1).batch(vec![
        (Call::Delete, Outcome::Deleted(true)),
        (Call::Delete, Outcome::Deleted(true)),
    ]);
    h.fails("a delete found the actor an earlier step of its batch had deleted");
}

#[test]
fn the_number_a_batch_delete_took_is_known() {
    // Saved at 2 and then deleted: 3 is a delete, which a feed cannot call
    // a save, and a leading delete sits just below the save after it.
    let mut h = H::default();
    h.save(1, 1)
        .batch(vec![
            (Call::Save { value: 2 }, written(2)),
            (Call::Delete, Outcome::Deleted(true)),
        ])
        .feed(vec![change(3, false)]);
    h.fails("number 3 was known as Deleted");
    let mut h = H::default();
    h.save(1, 1)
        .batch(vec![
            (Call::Delete, Outcome::Deleted(true)),
            (Call::Save { value: 2 }, written(3)),
        ])
        .feed(vec![change(2, false)]);
    h.fails("number 2 was known as Deleted");
}

#[test]
fn a_conflict_on_what_its_batch_made_passes() {
    let mut h = H::default();
    // The earlier save would have written 2; the condition expected 1.
    h.save(1, 1)
        .batch(vec![
            (Call::Save { value: 2 }, Outcome::NotApplied),
            (save_if(3, Some(1)), Outcome::Conflict { actual: Some(2) }),
        ])
        // After a delete the actor is absent, though it was saved throughout.
        .batch(vec![
            (Call::Delete, Outcome::NotApplied),
            (save_if(4, Some(1)), Outcome::Conflict { actual: None }),
        ])
        // A delete that found it, then a save two above.
        .batch(vec![
            (Call::Delete, Outcome::NotApplied),
            (Call::Save { value: 5 }, Outcome::NotApplied),
            (save_if(6, None), Outcome::Conflict { actual: Some(3) }),
        ])
        .op("a", Call::Load, Outcome::Read(Some(((1, None), 1))));
    h.passes();
}

#[test]
fn a_conflict_that_does_not_fit_its_batch_is_found() {
    let conflict = |steps: Vec<(Call, Outcome)>, needle: &str| {
        let mut h = H::default();
        h.save(1, 1).batch(steps);
        h.fails(needle);
    };
    conflict(
        vec![
            (Call::Save { value: 2 }, Outcome::NotApplied),
            (save_if(3, Some(1)), Outcome::Conflict { actual: Some(5) }),
        ],
        "its batch's first save at 5 is not above a version",
    );
    conflict(
        vec![
            (Call::Save { value: 2 }, Outcome::NotApplied),
            (save_if(3, Some(1)), Outcome::Conflict { actual: None }),
        ],
        "a conflict after a save of its batch reported the actor absent",
    );
    conflict(
        vec![
            (Call::Save { value: 2 }, Outcome::NotApplied),
            (Call::Delete, Outcome::NotApplied),
            (save_if(3, Some(1)), Outcome::Conflict { actual: Some(3) }),
        ],
        "a conflict after a delete of its batch reported number 3",
    );
    conflict(
        vec![
            (Call::Delete, Outcome::NotApplied),
            (save_if(3, None), Outcome::Conflict { actual: Some(1) }),
        ],
        "a conflict after a delete of its batch reported number 1",
    );
    conflict(
        vec![
            (save_if(2, Some(1)), Outcome::NotApplied),
            (save_if(3, Some(7)), Outcome::Conflict { actual: Some(3) }),
        ],
        "an earlier step of its batch expecting 1 puts it at 2",
    );
}
