//! A batch's steps, and the statements that run them.
//!
//! Steps of one actor run in the order given; steps of distinct actors have
//! no order between them, so those of one kind share a statement. The plan
//! goes round the three kinds (conditional saves, saves, deletes) and puts
//! into each statement the next step of every actor whose next step is of
//! that kind, until every step is placed. A batch that names each actor
//! once thus takes at most one statement of each kind, as a batch always
//! did; an actor named `k` times takes at most `k` rounds.
//!
//! After a delete the actor is absent for the rest of the batch until a
//! save creates it again, and the batch sees it so even when the delete
//! found nothing (and so holds no lock that would keep another writer from
//! creating it meanwhile): a delete right after a delete finds nothing and
//! is not sent; a save right after a delete is sent as a create (expecting
//! the actor absent), so that a writer that created it meanwhile makes the
//! batch run again instead of being written over; a save expecting a
//! sequence number right after a delete fails without being sent.

use std::collections::HashMap;

use crate::expected::Expected;

/// One step of a batch.
pub(crate) struct Step {
    pub id: String,
    pub op: Op,
}

/// What a step does.
pub(crate) enum Op {
    /// Saves `state`, when the actor is as `condition` says (`None`: always).
    Save {
        state: Vec<u8>,
        condition: Option<Expected>,
    },
    Delete,
}

impl Step {
    /// The statement the step goes to, given whether the step before it on
    /// the same actor is a delete; `None` for a delete right after a delete,
    /// which finds nothing.
    pub fn kind(&self, after_delete: bool) -> Option<Kind> {
        match (&self.op, after_delete) {
            (Op::Delete, true) => None,
            (Op::Delete, false) => Some(Kind::Delete),
            (
                Op::Save {
                    condition: None, ..
                },
                false,
            ) => Some(Kind::Plain),
            (Op::Save { .. }, _) => Some(Kind::Conditional),
        }
    }

    /// Whether the step writes the actor whatever state it finds: a save.
    /// A delete writes only an actor that exists.
    pub fn always_writes(&self) -> bool {
        matches!(self.op, Op::Save { .. })
    }

    /// The state a save writes (empty for a delete).
    pub fn state(&self) -> &[u8] {
        match &self.op {
            Op::Save { state, .. } => state,
            Op::Delete => &[],
        }
    }

    /// The condition of a conditional save.
    pub fn condition(&self) -> Option<Expected> {
        match self.op {
            Op::Save { condition, .. } => condition,
            Op::Delete => None,
        }
    }
}

/// The statement a step goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `save_many_if`: one outcome per actor, the first failed one rolls
    /// the batch back.
    Conditional,
    /// `save_many`.
    Plain,
    /// `delete_many`.
    Delete,
}

/// The order in which the plan goes round the kinds: conditions first, so
/// that a batch that fails on one has written as little as possible.
const ROUND: [Kind; 3] = [Kind::Conditional, Kind::Plain, Kind::Delete];

/// One statement: its kind and the indexes of its steps, in the order
/// added, each of a distinct actor.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Statement {
    pub kind: Kind,
    pub steps: Vec<usize>,
}

/// How a batch runs.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The statements, in the order they are to run.
    pub statements: Vec<Statement>,
    /// Per step: whether the step before it on the same actor is a delete.
    pub after_delete: Vec<bool>,
}

/// The plan that runs `steps`.
pub(crate) fn plan(steps: &[Step]) -> Plan {
    let mut last_deleted: HashMap<&str, bool> = HashMap::new();
    let after_delete: Vec<bool> = steps
        .iter()
        .map(|s| {
            let deletes = matches!(s.op, Op::Delete);
            last_deleted.insert(s.id.as_str(), deletes).unwrap_or(false)
        })
        .collect();
    let kinds: Vec<(&str, Option<Kind>)> = steps
        .iter()
        .zip(&after_delete)
        .map(|(s, after)| (s.id.as_str(), s.kind(*after)))
        .collect();
    Plan {
        statements: plan_kinds(&kinds),
        after_delete,
    }
}

/// The statements for steps of these actors and kinds (`None`: not sent).
fn plan_kinds(steps: &[(&str, Option<Kind>)]) -> Vec<Statement> {
    // Each actor's steps to send, in order, and how many of them are placed.
    let mut actors: Vec<(Vec<usize>, usize)> = Vec::new();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut left = 0;
    for (index, (id, kind)) in steps.iter().enumerate() {
        if kind.is_none() {
            continue;
        }
        let actor = *by_id.entry(id).or_insert_with(|| {
            actors.push((Vec::new(), 0));
            actors.len() - 1
        });
        actors[actor].0.push(index);
        left += 1;
    }
    let mut statements = Vec::new();
    for kind in ROUND.iter().cycle() {
        if left == 0 {
            break;
        }
        let mut taken = Vec::new();
        for (own, placed) in &mut actors {
            if let Some(&next) = own.get(*placed) {
                if steps[next].1 == Some(*kind) {
                    taken.push(next);
                    *placed += 1;
                }
            }
        }
        if !taken.is_empty() {
            left -= taken.len();
            taken.sort_unstable();
            statements.push(Statement {
                kind: *kind,
                steps: taken,
            });
        }
    }
    statements
}

#[cfg(test)]
mod tests {
    use super::*;
    use Kind::{Conditional as C, Delete as D, Plain as P};

    fn kinds(plan: &[Statement]) -> Vec<(Kind, Vec<usize>)> {
        plan.iter().map(|s| (s.kind, s.steps.clone())).collect()
    }

    /// [`plan_kinds`] for steps that are all sent.
    fn plan_sent(steps: &[(&str, Kind)]) -> Vec<Statement> {
        let steps: Vec<(&str, Option<Kind>)> =
            steps.iter().map(|(id, kind)| (*id, Some(*kind))).collect();
        plan_kinds(&steps)
    }

    fn step(id: &str, op: Op) -> Step {
        Step { id: id.into(), op }
    }

    fn save(id: &str, condition: Option<Expected>) -> Step {
        step(
            id,
            Op::Save {
                state: vec![],
                condition,
            },
        )
    }

    #[test]
    fn after_a_delete_a_delete_is_not_sent_and_a_save_creates() {
        let steps = [
            save("a", None),
            step("a", Op::Delete),
            step("a", Op::Delete),
            save("a", None),
            step("b", Op::Delete),
            save("b", Some(Expected::Sequence(3))),
        ];
        let plan = plan(&steps);
        assert_eq!(
            plan.after_delete,
            vec![false, false, true, true, false, true]
        );
        assert_eq!(
            kinds(&plan.statements),
            vec![(P, vec![0]), (D, vec![1, 4]), (C, vec![3, 5])]
        );
    }

    #[test]
    fn distinct_actors_take_one_statement_of_each_kind_as_before() {
        let steps = [("a", P), ("b", D), ("c", C), ("d", P), ("e", C), ("f", D)];
        assert_eq!(
            kinds(&plan_sent(&steps)),
            vec![(C, vec![2, 4]), (P, vec![0, 3]), (D, vec![1, 5])]
        );
        assert_eq!(kinds(&plan_sent(&[("a", D)])), vec![(D, vec![0])]);
        assert!(plan_sent(&[]).is_empty());
    }

    #[test]
    fn each_actor_keeps_its_order_and_appears_once_per_statement() {
        // Dapr's example: delete k1, save k2, delete k2, save k3.
        let steps = [("k1", D), ("k2", P), ("k2", D), ("k3", P)];
        assert_eq!(
            kinds(&plan_sent(&steps)),
            vec![(P, vec![1, 3]), (D, vec![0, 2])]
        );
        let steps = [("a", P), ("a", P), ("a", C), ("a", D), ("a", P)];
        assert_eq!(
            kinds(&plan_sent(&steps)),
            vec![
                (P, vec![0]),
                (P, vec![1]),
                (C, vec![2]),
                (D, vec![3]),
                (P, vec![4]),
            ]
        );
        // Another actor's steps go along where their kinds allow.
        let steps = [("a", C), ("b", D), ("a", P), ("b", P), ("a", D), ("b", C)];
        assert_eq!(
            kinds(&plan_sent(&steps)),
            vec![
                (C, vec![0]),
                (P, vec![2]),
                (D, vec![1, 4]),
                (P, vec![3]),
                (C, vec![5])
            ]
        );
    }

    #[test]
    fn every_step_is_placed_once_after_its_actors_earlier_steps() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let ids = ["a", "b", "c", "d"];
            let steps: Vec<(&str, Kind)> = (0..rng.usize(0..12))
                .map(|_| (ids[rng.usize(..ids.len())], ROUND[rng.usize(..3)]))
                .collect();
            let plan = plan_sent(&steps);
            let mut at = vec![usize::MAX; steps.len()];
            for (n, statement) in plan.iter().enumerate() {
                assert!(!statement.steps.is_empty());
                let mut seen = std::collections::HashSet::new();
                for &i in &statement.steps {
                    assert_eq!(steps[i].1, statement.kind, "{steps:?}");
                    assert!(seen.insert(steps[i].0), "an actor twice: {steps:?}");
                    assert_eq!(at[i], usize::MAX, "placed twice: {steps:?}");
                    at[i] = n;
                }
            }
            for (i, step) in steps.iter().enumerate() {
                assert_ne!(at[i], usize::MAX, "not placed: {steps:?}");
                for (j, later) in steps.iter().enumerate().skip(i + 1) {
                    if later.0 == step.0 {
                        assert!(at[i] < at[j], "out of order: {steps:?}");
                    }
                }
            }
            // At most one round of the three kinds per step of the most
            // named actor.
            let most = ids
                .iter()
                .map(|id| steps.iter().filter(|s| s.0 == *id).count())
                .max()
                .unwrap_or(0);
            assert!(plan.len() <= 3 * most, "{steps:?}: {plan:?}");
        }
    }
}
