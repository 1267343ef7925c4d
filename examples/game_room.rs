//! The seed's GameRoom as a blocking program: scores are updated atomically
//! with `transform` from several player threads, the state persists in
//! PostgreSQL, and a watcher thread prints the changes as they stream in.
//!
//! Run: `cargo run --example game_room`
//!
//! Uses `DATABASE_URL` when set; otherwise a throwaway local cluster.

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Event, StateStore, Versioned};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct GameState {
    scores: BTreeMap<String, i64>,
}

/// An actor whose state lives in PostgreSQL.
struct GameRoom {
    id: String,
    store: StateStore,
}

impl GameRoom {
    fn new(id: &str, store: StateStore) -> Self {
        GameRoom {
            id: id.to_owned(),
            store,
        }
    }

    /// Adds points atomically: concurrent updates from any thread or
    /// process are never lost.
    fn update_score(
        &self,
        player: &str,
        points: i64,
    ) -> trebuchet_postgres::Result<Versioned<GameState>> {
        self.store.transform(&self.id, |state: Option<GameState>| {
            let mut state = state.unwrap_or_default();
            *state.scores.entry(player.to_owned()).or_default() += points;
            state
        })
    }

    fn state(&self) -> trebuchet_postgres::Result<GameState> {
        Ok(self.store.load(&self.id)?.unwrap_or_default())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // DATABASE_URL, or a throwaway cluster that lives as long as `db`.
    let db = TestDatabase::from_env_or_start()?;
    let url = db.url().to_owned();
    let store = StateStore::builder().url(&url).migrate(true).build()?;
    store.delete("game-room-1")?;

    // The watcher: every change to the room, as it is committed.
    let listener = store.listener()?;
    let changes = listener.subscribe_actor("game-room-1");
    let watcher_store = store.clone();
    let watcher = thread::spawn(move || {
        for event in changes.iter() {
            match event {
                Event::Change(change) => {
                    let state: Option<GameState> =
                        watcher_store.load(&change.actor_id).ok().flatten();
                    println!(
                        "  watcher: {} is at sequence {} ({:?}): {:?}",
                        change.actor_id,
                        change.sequence,
                        change.kind,
                        state.map(|s| s.scores)
                    );
                }
                Event::Resync(reason) => println!("  watcher: resync ({reason})"),
                _ => {}
            }
        }
    });

    // Three players score at the same time.
    let players: Vec<_> = ["alice", "bob", "carol"]
        .into_iter()
        .map(|player| {
            let room = GameRoom::new("game-room-1", store.clone());
            thread::spawn(move || {
                for _ in 0..5 {
                    room.update_score(player, 10).expect("update_score");
                }
            })
        })
        .collect();
    for player in players {
        player.join().expect("player thread");
    }

    let room = GameRoom::new("game-room-1", store.clone());
    let state = room.state()?;
    println!("final scores: {:?}", state.scores);
    assert!(state.scores.values().all(|&s| s == 50), "no update lost");

    thread::sleep(Duration::from_millis(200));
    listener.shutdown(); // ends the watcher's iteration
    watcher.join().expect("watcher thread");
    Ok(())
}
