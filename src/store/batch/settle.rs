//! What a batch did when its connection broke before the reply to its
//! commit arrived, from the write tags its rows kept.
//!
//! Every step of a batch tags what it writes with the batch's one write id:
//! a save tags the row at the number it produced, a delete that found the
//! actor tags the tombstone at the number it took. A delete carries the
//! row's tags into the tombstone and a save after it carries the
//! tombstone's into the new row, so an actor written several times keeps
//! one tag per write, at numbers that follow one another (each step
//! continues from the one before it while the batch holds the actor).
//!
//! Tags are only ever pushed out oldest first, by later writes. Which steps
//! of an actor wrote follows from the steps alone, but for its first one:
//! a save always writes, a delete right after a save too, a delete after a
//! delete never, and a first delete when the actor existed. So, when the
//! batch committed, each actor holds one tag per step that surely wrote,
//! and one more when its first delete found it; or the oldest were pushed
//! out, and then the outcome is unknown. A first delete whose tag is not
//! there found nothing when its tag could not have been pushed out;
//! otherwise the outcome is unknown.
//!
//! Every number reported is one read from a tag: nothing is guessed.

use std::collections::HashMap;

use super::plan::Step;
use super::BatchResult;
use crate::error::Result;
use crate::expected::Expected;
use crate::outcome::{Landed, Trace, Traces};
use crate::schema::WRITE_TAGS;

/// The batch's result from the traces of its actors: per step, in order,
/// or why not ([`Error::NotApplied`](crate::Error::NotApplied),
/// [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown)).
pub(super) fn settle(t: &Traces, steps: &[Step], write_id: i64) -> Result<Vec<BatchResult>> {
    let actors = by_actor(steps);
    if !committed(t, steps, &actors, write_id)? {
        return Err(t.not_applied());
    }
    let mut results: Vec<Option<BatchResult>> = vec![None; steps.len()];
    for (id, own) in &actors {
        let saves: Vec<bool> = own.iter().map(|&i| steps[i].always_writes()).collect();
        let Some(each) = settle_actor(&t.of(id), write_id, &saves) else {
            return Err(t.unknown());
        };
        for (&i, result) in own.iter().zip(each) {
            results[i] = Some(result);
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every step belongs to its actor"))
        .collect())
}

/// Each actor with the indexes of its steps, in order of first appearance.
fn by_actor(steps: &[Step]) -> Vec<(&str, Vec<usize>)> {
    let mut actors: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        let a = *at.entry(step.id.as_str()).or_insert_with(|| {
            actors.push((step.id.as_str(), Vec::new()));
            actors.len() - 1
        });
        actors[a].1.push(i);
    }
    actors
}

/// Whether the batch committed: yes when any of its tags is there; no when
/// an actor it saved has no tag and cannot have lost one (the batch is all
/// or nothing), or when no actor can hold one; else the unknown-outcome
/// error.
fn committed(
    t: &Traces,
    steps: &[Step],
    actors: &[(&str, Vec<usize>)],
    write_id: i64,
) -> Result<bool> {
    let (mut landed, mut refuted, mut unknown) = (false, false, false);
    for (id, own) in actors {
        // A save expecting `n` that committed wrote `n + 1`; the highest
        // such number of the actor lets the most later writes by.
        let target = own
            .iter()
            .filter_map(|&i| match steps[i].condition() {
                Some(Expected::Sequence(n)) => Some(n.saturating_add(1)),
                _ => None,
            })
            .max();
        match t.landed(id, write_id, target) {
            Landed::Yes(_) => landed = true,
            Landed::No if own.iter().any(|&i| steps[i].always_writes()) => refuted = true,
            Landed::No => {}
            Landed::Unknown => unknown = true,
        }
    }
    match (landed, refuted) {
        (true, false) => Ok(true),
        // Tags that say both cannot be read as either.
        (true, true) => Err(t.unknown()),
        (false, true) => Ok(false),
        (false, false) if unknown => Err(t.unknown()),
        (false, false) => Ok(false),
    }
}

/// Whether a step of an actor wrote, from the steps before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrote {
    /// A save, or a delete right after a save.
    Yes,
    /// A delete after a delete: the actor was absent.
    No,
    /// The actor's first step, a delete: it wrote if the actor existed.
    Maybe,
}

/// Per step of one actor, in order (`saves` says which are saves), whether
/// it wrote.
fn wrote(saves: &[bool]) -> impl Iterator<Item = Wrote> + '_ {
    saves.iter().enumerate().map(|(i, save)| match (i, save) {
        (_, true) => Wrote::Yes,
        (0, false) => Wrote::Maybe,
        (i, false) if saves[i - 1] => Wrote::Yes,
        _ => Wrote::No,
    })
}

/// One actor's results in a batch that committed, from its trace: `saves`
/// says, per step in order, whether it is a save (else a delete). `None`
/// when the tags cannot say.
fn settle_actor(trace: &Trace, write_id: i64, saves: &[bool]) -> Option<Vec<BatchResult>> {
    let newest = trace
        .row_sequence
        .unwrap_or(0)
        .max(trace.tomb_sequence.unwrap_or(0));
    // The numbers this batch's tags decode to. The row and the tombstone
    // may hold the same tags (each carries the other's on).
    let mut numbers: Vec<i64> = trace
        .row_tags
        .iter()
        .chain(&trace.tomb_tags)
        .map(|tag| tag ^ write_id)
        .filter(|n| (1..=newest).contains(n))
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    if numbers.windows(2).any(|w| w[1] != w[0] + 1) {
        return None;
    }
    let certain = wrote(saves).filter(|w| *w == Wrote::Yes).count();
    let maybe = wrote(saves).any(|w| w == Wrote::Maybe);
    let first_found = if !maybe {
        false
    } else if numbers.len() == certain + 1 {
        true
    } else if numbers.len() == certain {
        // Its tag would be just below the first number of the later steps;
        // with none, at a number not known.
        let complete = trace.row_tags.len() < WRITE_TAGS && trace.tomb_tags.len() < WRITE_TAGS;
        let kept = numbers
            .first()
            .is_some_and(|first| newest < first - 1 + WRITE_TAGS as i64);
        if !complete && !kept {
            return None;
        }
        false
    } else {
        return None;
    };
    if numbers.len() != certain + usize::from(first_found) {
        return None;
    }
    let mut numbers = numbers.into_iter().map(i64::unsigned_abs);
    let mut results = Vec::with_capacity(saves.len());
    for (save, wrote) in saves.iter().zip(wrote(saves)) {
        let found = match wrote {
            Wrote::Yes => true,
            Wrote::No => false,
            Wrote::Maybe => first_found,
        };
        if !found {
            results.push(BatchResult::Deleted(false));
            continue;
        }
        let number = numbers.next()?;
        results.push(if *save {
            BatchResult::Saved(number)
        } else {
            BatchResult::Deleted(true)
        });
    }
    Some(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BatchResult::{Deleted, Saved};

    const W: i64 = 0x5eed_1234_abcd_0042;

    /// A trace whose row is at `row` with tags of this batch at `ours`
    /// (newest first) after `others` foreign tags, and no tombstone.
    fn trace(row: i64, ours: &[i64], others: usize) -> Trace {
        let mut tags: Vec<i64> = (0..others as i64)
            .map(|i| (7_000 + i) ^ (row - i))
            .collect();
        tags.extend(ours.iter().map(|n| W ^ n));
        tags.truncate(WRITE_TAGS);
        Trace {
            row_sequence: Some(row),
            row_tags: tags,
            ..Trace::default()
        }
    }

    const SAVE: bool = true;
    const DELETE: bool = false;

    #[test]
    fn saves_of_one_actor_read_their_numbers_in_order() {
        let t = trace(12, &[12, 11, 10], 0);
        assert_eq!(
            settle_actor(&t, W, &[SAVE, SAVE, SAVE]),
            Some(vec![Saved(10), Saved(11), Saved(12)])
        );
        // Later writes by others do not matter while the tags are there.
        let t = trace(40, &[12, 11], 28);
        assert_eq!(
            settle_actor(&t, W, &[SAVE, SAVE]),
            Some(vec![Saved(11), Saved(12)])
        );
    }

    #[test]
    fn a_save_delete_save_reads_the_delete_from_its_tag() {
        // Saved at 5, deleted at 6, created again at 7: the new row carries
        // the tombstone's tags on.
        let t = Trace {
            row_sequence: Some(7),
            row_tags: vec![W ^ 7, W ^ 6, W ^ 5, 99 ^ 4],
            tomb_sequence: Some(6),
            tomb_tags: vec![W ^ 6, W ^ 5, 99 ^ 4],
            ..Trace::default()
        };
        assert_eq!(
            settle_actor(&t, W, &[SAVE, DELETE, SAVE]),
            Some(vec![Saved(5), Deleted(true), Saved(7)])
        );
    }

    #[test]
    fn a_delete_after_a_delete_found_nothing_and_left_no_tag() {
        // Saved at 5, deleted at 6; the second delete found nothing; saved
        // again at 7.
        let t = Trace {
            row_sequence: Some(7),
            row_tags: vec![W ^ 7, W ^ 6, W ^ 5],
            tomb_sequence: Some(6),
            tomb_tags: vec![W ^ 6, W ^ 5],
            ..Trace::default()
        };
        assert_eq!(
            settle_actor(&t, W, &[SAVE, DELETE, DELETE, SAVE]),
            Some(vec![Saved(5), Deleted(true), Deleted(false), Saved(7)])
        );
        let t = Trace {
            tomb_sequence: Some(6),
            tomb_tags: vec![W ^ 6, W ^ 5],
            ..Trace::default()
        };
        assert_eq!(
            settle_actor(&t, W, &[SAVE, DELETE, DELETE]),
            Some(vec![Saved(5), Deleted(true), Deleted(false)])
        );
    }

    #[test]
    fn a_leading_delete_found_the_actor_when_one_tag_more_is_there() {
        // Existed at 3: deleted at 4, created at 5.
        let t = trace(5, &[5, 4], 1);
        assert_eq!(
            settle_actor(&t, W, &[DELETE, DELETE, SAVE]),
            Some(vec![Deleted(true), Deleted(false), Saved(5)])
        );
        // Absent (a tombstone at 3): created at 4.
        let t = trace(4, &[4], 1);
        assert_eq!(
            settle_actor(&t, W, &[DELETE, SAVE]),
            Some(vec![Deleted(false), Saved(4)])
        );
    }

    #[test]
    fn a_leading_delete_whose_tag_may_be_pushed_out_is_unknown() {
        // 64 tags, ours the two oldest kept: the delete's, below them,
        // may have been pushed out.
        let t = trace(70, &[8, 7], 62);
        assert_eq!(t.row_tags.len(), WRITE_TAGS);
        assert_eq!(settle_actor(&t, W, &[DELETE, SAVE, SAVE]), None);
        // With few enough numbers since, it would still be there.
        let t = trace(69, &[8, 7], 62);
        assert_eq!(
            settle_actor(&t, W, &[DELETE, SAVE, SAVE]),
            Some(vec![Deleted(false), Saved(7), Saved(8)])
        );
    }

    #[test]
    fn deletes_only_found_the_actor_by_their_tag() {
        let t = Trace {
            tomb_sequence: Some(9),
            tomb_tags: vec![W ^ 9, 5 ^ 8],
            ..Trace::default()
        };
        assert_eq!(
            settle_actor(&t, W, &[DELETE, DELETE]),
            Some(vec![Deleted(true), Deleted(false)])
        );
        let t = trace(3, &[], 3);
        assert_eq!(settle_actor(&t, W, &[DELETE]), Some(vec![Deleted(false)]));
        // A full set without our tag: it may have been pushed out.
        let t = trace(100, &[], WRITE_TAGS);
        assert_eq!(settle_actor(&t, W, &[DELETE]), None);
    }

    #[test]
    fn pushed_out_saves_are_unknown_not_guessed() {
        // The oldest of three saves is gone.
        let t = trace(80, &[12, 11], 62);
        assert_eq!(settle_actor(&t, W, &[SAVE, SAVE, SAVE]), None);
        let t = trace(80, &[], WRITE_TAGS);
        assert_eq!(settle_actor(&t, W, &[SAVE]), None);
    }

    #[test]
    fn tags_that_do_not_fit_the_steps_are_unknown() {
        // Numbers with a gap, or more tags than steps.
        assert_eq!(settle_actor(&trace(9, &[9, 7], 0), W, &[SAVE, SAVE]), None);
        assert_eq!(
            settle_actor(&trace(9, &[9, 8, 7], 0), W, &[SAVE, SAVE]),
            None
        );
    }
}
