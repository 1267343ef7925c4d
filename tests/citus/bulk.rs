//! Writes and reads of several actors on Citus: they span the shards in one
//! transaction, announced from the coordinator; sweeps, restores and
//! listings see every shard.

use trebuchet_postgres::{ChangeKind, Event, Expected};

use super::{changes_by_actor, citus, shard_of};
use crate::common;

#[test]
fn bulk_saves_and_deletes_span_the_workers_and_are_announced_from_the_coordinator() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    // Enough actors that both workers hold some.
    let ids: Vec<String> = (0..20).map(|i| format!("bulk-{i}")).collect();
    let items: Vec<(&str, u32)> = ids.iter().map(|id| (id.as_str(), 1)).collect();
    assert_eq!(store.save_many(&items).unwrap(), vec![1; 20]);
    assert_eq!(store.save_many(&items).unwrap(), vec![2; 20]);
    let shards: std::collections::BTreeSet<i64> = ids
        .iter()
        .map(|id| shard_of(db, &mut client, &schema.table("actor_states"), id).0)
        .collect();
    assert!(shards.len() > 1, "the actors live on one shard: {shards:?}");
    let mut gone: Vec<&str> = ids[..10].iter().map(String::as_str).collect();
    gone.push("never-saved");
    let deleted = store.delete_many(&gone).unwrap();
    assert_eq!(deleted, [vec![true; 10], vec![false]].concat());
    // Numbers go on above the deletes, through a bulk save too.
    assert_eq!(store.save_many(&items[..1]).unwrap(), vec![4]);
    assert_eq!(store.save(&ids[10], &9u32).unwrap(), 3);

    // Every change was announced, each actor's in order.
    let seen = changes_by_actor(&changes, 20 + 20 + 10 + 1 + 1);
    assert_eq!(
        seen[&ids[0]],
        [
            (1, ChangeKind::Saved),
            (2, ChangeKind::Saved),
            (3, ChangeKind::Deleted),
            (4, ChangeKind::Saved)
        ]
    );
    assert_eq!(
        seen[&ids[10]],
        [
            (1, ChangeKind::Saved),
            (2, ChangeKind::Saved),
            (3, ChangeKind::Saved)
        ]
    );
    assert_eq!(seen[&ids[19]].len(), 2);
    // A change raised on the coordinator names the table as the trigger does.
    let raw = store.listener().unwrap();
    let one = raw.subscribe();
    store.save_many(&items[..1]).unwrap();
    match one.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Event::Change(c)) => {
            assert_eq!(
                c.table.as_deref(),
                Some(schema.table("actor_states").as_str())
            )
        }
        other => panic!("expected a change, got {other:?}"),
    }
}

#[test]
fn the_sweeper_and_the_tombstone_purge_work_across_the_shards() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    let table = schema.table("actor_states");
    let ids: Vec<String> = (0..12).map(|i| format!("e{i:02}")).collect();
    for id in &ids {
        store
            .save_with(
                id,
                &1u32,
                trebuchet_postgres::WriteOptions::new().ttl(std::time::Duration::from_millis(200)),
            )
            .unwrap();
    }
    store.save("kept", &1u32).unwrap();
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    let expiring: Vec<&str> = ids.iter().map(String::as_str).collect();
    common::wait_expired(&mut client, &table, &expiring);

    let sweep = store.sweep_expired(5).unwrap();
    assert_eq!((sweep.removed, sweep.busy), (12, false), "{sweep:?}");
    assert_eq!(store.count_actors("").unwrap(), 1);
    let seen = changes_by_actor(&changes, 12);
    for id in &ids {
        assert_eq!(seen[id], [(2, ChangeKind::Deleted)], "{id}");
    }
    // The tombstones keep the numbers; purging forgets them.
    assert_eq!(store.save(&ids[0], &1u32).unwrap(), 3);
    assert_eq!(
        store.purge_tombstones(std::time::Duration::ZERO).unwrap(),
        12
    );
}

#[test]
fn restores_reproduce_versions_and_never_go_backwards_across_the_shards() {
    use trebuchet_postgres::RestoreOutcome;

    let Some(db) = citus() else { return };
    let source = db.schema();
    let source = source.store();
    let ids: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        for round in 0..=(i as u32 % 3) {
            source.save(id, &round).unwrap();
        }
    }
    let exported = common::export(&source, "");
    assert_eq!(exported.len(), 10);

    let target_schema = db.schema();
    let target = target_schema.store();
    let listener = target.listener().unwrap();
    let changes = listener.subscribe();
    let outcomes = target.raw().restore_many(&exported).unwrap();
    assert_eq!(outcomes, vec![RestoreOutcome::Written; 10]);
    for (id, v) in &exported {
        assert_eq!(
            &target.raw().load_versioned(id).unwrap().unwrap(),
            v,
            "{id}"
        );
    }
    // Each restored row is announced at its number.
    let seen = changes_by_actor(&changes, 10);
    for (id, v) in &exported {
        assert_eq!(seen[id], [(v.sequence, ChangeKind::Saved)], "{id}");
    }
    // Idempotent; never below a newer version or a tombstone.
    assert_eq!(
        target.raw().restore_many(&exported).unwrap(),
        vec![RestoreOutcome::Unchanged; 10]
    );
    let (newer, deleted) = (&exported[0].0, &exported[1].0);
    let newer_at = target.save(newer, &99u32).unwrap();
    assert!(target.delete(deleted).unwrap());
    let outcomes = target.raw().restore_many(&exported[..2]).unwrap();
    assert_eq!(
        outcomes,
        [
            RestoreOutcome::Superseded { current: newer_at },
            RestoreOutcome::Deleted {
                current: exported[1].1.sequence + 1
            },
        ]
    );
}

#[test]
fn conditional_bulk_saves_give_each_item_its_outcome_across_the_shards() {
    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let changes = listener.subscribe();
    let ids: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    for id in &ids[..4] {
        store.save(id, &1u32).unwrap();
    }
    store.delete(&ids[3]).unwrap();
    let items: Vec<(&str, u32, Expected)> = vec![
        (&ids[0], 2, Expected::Sequence(1)), // right
        (&ids[1], 2, Expected::Sequence(5)), // wrong number
        (&ids[2], 2, Expected::Absent),      // exists
        (&ids[3], 2, Expected::Absent),      // deleted: created above its tombstone
        (&ids[4], 2, Expected::Absent),      // new
        (&ids[5], 2, Expected::Sequence(1)), // absent
        (&ids[6], 2, Expected::Absent),      // new
        (&ids[7], 2, Expected::Absent),      // new
    ];
    let results = store.save_many_if(&items).unwrap();
    let summary: Vec<Result<u64, Option<u64>>> = results
        .iter()
        .map(|r| match r {
            Ok(sequence) => Ok(*sequence),
            Err(e) => {
                assert!(e.is_conflict(), "{e}");
                Err(match e {
                    trebuchet_postgres::Error::Conflict { actual, .. } => *actual,
                    other => panic!("{other}"),
                })
            }
        })
        .collect();
    assert_eq!(
        summary,
        [
            Ok(2),
            Err(Some(1)),
            Err(Some(1)),
            Ok(3),
            Ok(1),
            Err(None),
            Ok(1),
            Ok(1)
        ]
    );
    // The writes were announced, from the coordinator.
    let seen = changes_by_actor(&changes, 4 + 1 + 5);
    assert_eq!(seen[&ids[0]].last(), Some(&(2, ChangeKind::Saved)));
    assert_eq!(seen[&ids[3]].last(), Some(&(3, ChangeKind::Saved)));
    assert_eq!(seen[&ids[7]], [(1, ChangeKind::Saved)]);
}

#[test]
fn listing_counting_and_walking_see_every_shard_in_key_order() {
    use std::ops::ControlFlow;

    let Some(db) = citus() else { return };
    let schema = db.schema();
    let store = schema.store();
    let ids: Vec<String> = (0..30).map(|i| format!("p{i:02}")).collect();
    let items: Vec<(&str, u32)> = ids.iter().map(|id| (id.as_str(), 1)).collect();
    store.save_many(&items).unwrap();
    store.save("other", &1u32).unwrap();

    assert_eq!(store.count_actors("p").unwrap(), 30);
    // Pages of 7, resumed after each page's last id: every id once, in
    // key order, though the rows are spread over the shards.
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_actors("p", after.as_deref(), 7).unwrap();
        listed.extend(page.actors.iter().map(|a| a.actor_id.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(listed, ids);
    // The walk (what export runs) too.
    let mut walked = Vec::new();
    let visited = store
        .raw()
        .for_each("p", |id, v| {
            assert_eq!(v.sequence, 1);
            walked.push(id);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!((visited, walked), (30, ids));
}
