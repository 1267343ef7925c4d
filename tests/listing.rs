//! `list_actors`: pages of actors with a prefix, resumable from the last id
//! of a page, consistent under concurrent inserts and deletes.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Error, StateStore};

/// Every id with `prefix`, page by page, checking each page's size.
fn walk(store: &StateStore, prefix: &str, limit: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_actors(prefix, after.as_deref(), limit).unwrap();
        assert!(page.actors.len() <= limit as usize);
        if page.next.is_some() {
            assert_eq!(
                page.actors.len(),
                limit as usize,
                "only the last page is short"
            );
        }
        ids.extend(page.actors.into_iter().map(|a| a.actor_id));
        match page.next {
            Some(next) => after = Some(next),
            None => return ids,
        }
    }
}

#[test]
fn pages_cover_every_id_with_the_prefix_once_in_key_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let rooms: Vec<(String, u32)> = (0..23).map(|i| (format!("room-{i:03}"), i)).collect();
    let players: Vec<(String, u32)> = (0..7).map(|i| (format!("player-{i}"), i)).collect();
    store.save_many(&rooms).unwrap();
    store.save_many(&players).unwrap();

    let expected: Vec<String> = rooms.iter().map(|(id, _)| id.clone()).collect();
    for limit in [1, 5, 23, 24, 1000] {
        assert_eq!(walk(&store, "room-", limit), expected, "limit {limit}");
    }
    assert_eq!(walk(&store, "", 4).len(), 30);
    assert!(walk(&store, "nobody-", 10).is_empty());
    // A page that ends exactly at the last id still says whether more follow.
    let page = store.list_actors("player-", None, 7).unwrap();
    assert_eq!((page.actors.len(), page.next), (7, None));
}

#[test]
fn a_page_resumes_later_from_another_store() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let items: Vec<(String, u32)> = (0..10).map(|i| (format!("a{i}"), i)).collect();
    store.save_many(&items).unwrap();
    let first = store.list_actors("a", None, 4).unwrap();
    let after = first.next.clone().unwrap();
    drop(store);

    // Later, elsewhere: the last id holds the place, not a server cursor.
    let other = schema.store();
    other.delete("a5").unwrap();
    other.save("a45", &1u32).unwrap();
    let second = other.list_actors("a", Some(&after), 4).unwrap();
    let ids: Vec<&str> = second.actors.iter().map(|a| a.actor_id.as_str()).collect();
    assert_eq!(ids, vec!["a4", "a45", "a6", "a7"]);
    // The same place gives the same page again.
    assert_eq!(other.list_actors("a", Some(&after), 4).unwrap(), second);
}

#[test]
fn a_zero_limit_is_rejected_before_anything_is_sent() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let err = store.list_actors("r", None, 0).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { what: "limit", .. }),
        "{err}"
    );
    assert!(err.is_invalid_input());
}

#[test]
fn pages_carry_each_actors_sequence_and_size() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    store.raw().save("s1", b"abc").unwrap();
    store.raw().save("s1", b"abcd").unwrap();
    store.raw().save("s2", b"").unwrap();
    let page = store.list_actors("s", None, 10).unwrap();
    let summary: Vec<(&str, u64, u64)> = page
        .actors
        .iter()
        .map(|a| (a.actor_id.as_str(), a.sequence, a.size))
        .collect();
    assert_eq!(summary, vec![("s1", 2, 4), ("s2", 1, 0)]);
    assert_eq!(page.next, None);
}

/// While pages are read, other threads keep inserting and deleting ids in
/// between and around the ones that stay: every id that exists throughout
/// is listed exactly once, in order.
#[test]
fn paging_is_consistent_under_concurrent_inserts_and_deletes() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    // Stable ids "k0000", "k0010", ...; churn ids fall between them.
    let stable: Vec<(String, u32)> = (0..400).map(|i| (format!("k{:04}", i * 10), i)).collect();
    store.save_many(&stable).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..2)
        .map(|t| {
            let store = store.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut rounds = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<(String, u32)> = (0..20)
                        .map(|_| {
                            let n = fastrand::u32(0..4000);
                            // Never a multiple of 10: never a stable id.
                            let n = if n % 10 == 0 { n + 1 + t } else { n };
                            (format!("k{n:04}"), n)
                        })
                        .collect::<std::collections::BTreeMap<_, _>>()
                        .into_iter()
                        .collect();
                    store.save_many(&batch).unwrap();
                    let gone: Vec<&str> =
                        batch.iter().step_by(2).map(|(id, _)| id.as_str()).collect();
                    store.delete_many(&gone).unwrap();
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();

    let started = Instant::now();
    let mut walks = 0;
    while walks < 3 || started.elapsed() < Duration::from_secs(2) {
        let listed = walk(&store, "k", 7);
        assert!(
            listed.windows(2).all(|w| w[0] < w[1]),
            "ids must come in key order, each once"
        );
        let listed: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
        for (id, _) in &stable {
            assert!(listed.contains(id.as_str()), "{id} was skipped");
        }
        walks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds: u32 = churners.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(rounds > 10, "the churn ran ({rounds} rounds)");
}

/// The ids of `prefix` the three prefix reads find: a listing, a count and
/// a walk.
fn found(store: &StateStore, prefix: &str) -> (Vec<String>, u64, Vec<String>) {
    let mut walked = Vec::new();
    store
        .raw()
        .for_each(prefix, |id, _| {
            walked.push(id);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    (
        walk(store, prefix, 2),
        store.count_actors(prefix).unwrap(),
        walked,
    )
}

#[test]
fn prefixes_ending_anywhere_in_the_code_space_find_exactly_their_ids() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    // Around the characters whose successor skips the surrogates or does
    // not exist, and a letter whose successor is punctuation.
    let ids = [
        "p",
        "p-",
        "p-\u{D7FF}",
        "p-\u{D7FF}x",
        "p-\u{E000}",
        "p-\u{10FFFF}",
        "p-\u{10FFFF}a",
        "p-\u{10FFFF}\u{10FFFF}",
        "p-z",
        "p-za",
        "p-{",
        "p.",
        "q",
    ];
    let items: Vec<(String, u32)> = ids.iter().map(|id| (id.to_string(), 1)).collect();
    store.save_many(&items).unwrap();
    for prefix in [
        "p",
        "p-",
        "p-\u{D7FF}",
        "p-\u{10FFFF}",
        "p-\u{10FFFF}\u{10FFFF}",
        "p-z",
        "p-{",
        "\u{10FFFF}",
    ] {
        let mut expected: Vec<String> = ids
            .iter()
            .filter(|id| id.starts_with(prefix))
            .map(|id| id.to_string())
            .collect();
        expected.sort();
        let (listed, counted, walked) = found(&store, prefix);
        assert_eq!(listed, expected, "listing {prefix:?}");
        assert_eq!(counted, expected.len() as u64, "count of {prefix:?}");
        assert_eq!(walked, expected, "walk of {prefix:?}");
    }
}

#[test]
fn prefixes_are_found_under_a_collation_that_is_not_code_point_order() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let mut client = schema.client().unwrap();
    let icu = client
        .query_opt(
            "SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'",
            &[],
        )
        .unwrap();
    if !common::tool_found(
        icu.is_some(),
        "the ICU collation und-x-icu on the test server",
        "a PostgreSQL built with ICU, such as Debian's postgresql, which pulls in libicu",
    ) {
        return;
    }
    // ICU sorts punctuation before letters: "user-{", the code point
    // successor of "user-z", sorts before "user-za", so bounds taken from
    // code point order would hold no id of "user-z".
    client
        .batch_execute(&format!(
            "ALTER TABLE {} ALTER COLUMN actor_id TYPE VARCHAR(255) COLLATE \"und-x-icu\"",
            schema.table("actor_states")
        ))
        .unwrap();
    let items: Vec<(String, u32)> = ["user-a", "user-za", "user-zb", "user-{", "user-Z"]
        .iter()
        .map(|id| (id.to_string(), 1))
        .collect();
    store.save_many(&items).unwrap();
    let (mut listed, counted, mut walked) = found(&store, "user-z");
    listed.sort();
    walked.sort();
    assert_eq!(listed, ["user-za", "user-zb"]);
    assert_eq!(counted, 2);
    assert_eq!(walked, ["user-za", "user-zb"]);
    assert_eq!(store.count_actors("user-").unwrap(), 5);
}

#[test]
fn a_key_column_given_the_c_collation_still_verifies() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    schema
        .client()
        .unwrap()
        .batch_execute(&format!(
            "ALTER TABLE {} ALTER COLUMN actor_id TYPE VARCHAR(255) COLLATE \"C\"",
            schema.table("actor_states")
        ))
        .unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    store.save("room-b", &1u32).unwrap();
    store.save("room-a", &1u32).unwrap();
    assert_eq!(walk(&store, "room-", 1), ["room-a", "room-b"]);
}
