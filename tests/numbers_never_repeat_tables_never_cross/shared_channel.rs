//! Two tables announcing on one channel: a store's listener hears only its
//! own table, a listener built on its own hears both and can tell them
//! apart, and a payload that names no table reaches everyone.

use std::time::Duration;

use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{Change, ChangeKind, ChangeListener, Event, StateStore, Subscription};

const WAIT: Duration = Duration::from_secs(30);
const QUIET: Duration = Duration::from_millis(300);

/// A migrated store on `schema.table`, announcing on the schema's channel.
fn store_on(schema: &TestSchema, table: &str) -> StateStore {
    schema
        .store_builder()
        .table(schema.table(table))
        .migrate(true)
        .build()
        .unwrap()
}

#[track_caller]
fn next_change(sub: &Subscription) -> Change {
    match sub.recv_timeout(WAIT).expect("no change arrived") {
        Event::Change(c) => std::sync::Arc::unwrap_or_clone(c),
        other => panic!("expected a change, got {other:?}"),
    }
}

#[track_caller]
fn assert_quiet(sub: &Subscription) {
    if let Ok(event) = sub.recv_timeout(QUIET) {
        panic!("unexpected event {event:?}");
    }
}

#[test]
fn a_stores_listener_hears_only_its_own_table() {
    let schema = TestDatabase::shared().schema();
    let rooms = store_on(&schema, "rooms");
    let players = store_on(&schema, "players");
    assert_eq!(rooms.channel(), players.channel());
    let listener = rooms.listener().unwrap();
    let sub = listener.subscribe();

    // The other table's changes come first on the channel.
    for n in 1..=3u32 {
        players.save("x", &n).unwrap();
    }
    rooms.save("x", &1u32).unwrap();
    assert!(rooms.delete("x").unwrap());

    let saved = next_change(&sub);
    assert_eq!(
        (saved.kind, saved.sequence),
        (ChangeKind::Saved, 1),
        "{saved:?}"
    );
    assert_eq!(saved.table.as_deref(), Some(schema.table("rooms").as_str()));
    let deleted = next_change(&sub);
    assert_eq!(
        (deleted.kind, deleted.sequence),
        (ChangeKind::Deleted, 2),
        "{deleted:?}"
    );
    assert_quiet(&sub);
}

#[test]
fn a_listener_built_on_its_own_hears_every_table_and_names_each() {
    let schema = TestDatabase::shared().schema();
    let rooms = store_on(&schema, "rooms");
    let players = store_on(&schema, "players");
    let listener = ChangeListener::builder()
        .connect_options(schema.connect_options())
        .channel(schema.channel())
        .build()
        .unwrap();
    let sub = listener.subscribe();
    players.save("x", &1u32).unwrap();
    rooms.save("y", &1u32).unwrap();

    let first = next_change(&sub);
    assert_eq!(first.actor_id, "x");
    assert_eq!(
        first.table.as_deref(),
        Some(schema.table("players").as_str())
    );
    let second = next_change(&sub);
    assert_eq!(second.actor_id, "y");
    assert_eq!(
        second.table.as_deref(),
        Some(schema.table("rooms").as_str())
    );
}

#[test]
fn a_payload_that_names_no_table_reaches_every_listener() {
    let schema = TestDatabase::shared().schema();
    let rooms = store_on(&schema, "rooms");
    let listener = rooms.listener().unwrap();
    let sub = listener.subscribe();
    // As the seed's trigger or a hand-written NOTIFY sends it.
    schema
        .client()
        .unwrap()
        .execute(
            "SELECT pg_notify($1, '{\"actorID\":\"z\",\"sequenceNumber\":9,\"timestamp\":1}')",
            &[&schema.channel()],
        )
        .unwrap();
    let change = next_change(&sub);
    assert_eq!((change.actor_id.as_str(), change.sequence), ("z", 9));
    assert_eq!(change.table, None);
}

#[test]
fn a_store_named_without_its_schema_hears_only_its_own_table() {
    let schema = TestDatabase::shared().schema();
    let qualified = store_on(&schema, "rooms");
    let other = store_on(&schema, "players");
    // The same table, found through the search path.
    let url = TestDatabase::shared().url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}options=-c%20search_path%3D{}", schema.name());
    let unqualified = StateStore::builder()
        .url(&url)
        .table("rooms")
        .channel(schema.channel())
        .build()
        .unwrap();
    let listener = unqualified.listener().unwrap();
    let sub = listener.subscribe();
    other.save("x", &1u32).unwrap();
    other.save("x", &2u32).unwrap();
    qualified.save("x", &1u32).unwrap();
    let change = next_change(&sub);
    assert_eq!((change.actor_id.as_str(), change.sequence), ("x", 1));
    assert_eq!(
        change.table.as_deref(),
        Some(schema.table("rooms").as_str())
    );
    assert_quiet(&sub);
}
