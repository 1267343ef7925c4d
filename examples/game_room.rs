//! The seed's GameRoom as a blocking program: scores are updated atomically
//! with `transform` from several player threads, the state persists in
//! PostgreSQL, and a watcher thread prints the changes as they stream in.
//!
//! Run: `cargo run --example game_room`
//!
//! Uses `DATABASE_URL` when set; otherwise a throwaway local cluster.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

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

    // The watcher: every change to the room, as it is committed. A change
    // announces a number; by the time the watcher reads the room, later
    // changes may have landed, so it prints the state with its own number.
    let listener = store.listener()?;
    let changes = listener.subscribe_actor("game-room-1");
    let watcher_store = store.clone();
    // The room's last number, once the players are done (0 until then).
    let last = Arc::new(AtomicU64::new(0));
    let watcher_last = Arc::clone(&last);
    let watcher = thread::spawn(move || {
        let mut seen = 0;
        loop {
            match changes.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Change(change)) => {
                    seen = change.sequence;
                    let now: Option<Versioned<GameState>> = watcher_store
                        .load_versioned(&change.actor_id)
                        .ok()
                        .flatten();
                    match now {
                        Some(v) => println!(
                            "  watcher: {} changed ({:?}) at #{}; read at #{}: {:?}",
                            change.actor_id,
                            change.kind,
                            change.sequence,
                            v.sequence,
                            v.value.scores
                        ),
                        None => println!(
                            "  watcher: {} changed ({:?}) at #{}; now absent",
                            change.actor_id, change.kind, change.sequence
                        ),
                    }
                }
                Ok(Event::Resync(reason)) => println!("  watcher: resync ({reason})"),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let last = watcher_last.load(Ordering::Acquire);
            if last != 0 && seen >= last {
                break;
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

    // The watcher ends once it has seen the last change.
    last.store(
        store.sequence("game-room-1")?.expect("the room exists"),
        Ordering::Release,
    );
    watcher.join().expect("watcher thread");
    listener.shutdown();
    Ok(())
}
