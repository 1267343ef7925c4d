//! Save, load, update atomically, detect a conflict, delete.
//!
//! Run: `cargo run --example quickstart`
//!
//! Uses `DATABASE_URL` when set; otherwise starts a throwaway PostgreSQL
//! cluster from the system's `initdb` (removed when the program exits).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Expected, StateStore};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct GameState {
    scores: BTreeMap<String, i64>,
    round: u32,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the cluster alive for the whole program.
    if std::env::var_os("DATABASE_URL").is_none() {
        println!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster");
    }
    // DATABASE_URL, or a throwaway cluster that lives as long as `db`.
    let db = TestDatabase::from_env_or_start()?;
    let url = db.url().to_owned();

    let store = StateStore::connect(&url)?;
    let applied = store.migrate()?;
    println!("schema ready (migrations applied now: {applied:?})");

    // Save and load.
    let room = "game-room-42";
    store.delete(room)?;
    let seq = store.save(room, &GameState::default())?;
    println!("saved {room} at sequence {seq}");

    // Atomic read-modify-write: concurrent updates are never lost.
    let updated = store.transform(room, |state: Option<GameState>| {
        let mut state = state.unwrap_or_default();
        *state.scores.entry("alice".into()).or_default() += 10;
        state.round += 1;
        state
    })?;
    println!(
        "alice scored; {room} is at sequence {} with {:?}",
        updated.sequence, updated.value.scores
    );

    // Optimistic locking: a write based on an old version is refused.
    match store.save_if(room, &GameState::default(), Expected::Sequence(seq)) {
        Err(e) if e.is_conflict() => println!("stale write refused: {e}"),
        other => println!("unexpected: {other:?}"),
    }

    let loaded: Option<GameState> = store.load(room)?;
    println!("loaded: {loaded:?}");

    let report = store.verify()?;
    println!("verify: {report}");

    println!("deleted: {}", store.delete(room)?);
    Ok(())
}
