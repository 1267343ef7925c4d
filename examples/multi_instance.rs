//! Two processes, each with its own store, listener and cache: a write in
//! one shows up in the other's cache, through LISTEN/NOTIFY.
//!
//! Run: `cargo run --example multi_instance`
//!
//! It starts a throwaway cluster (unless `DATABASE_URL` is set) and runs a
//! second copy of itself as the other instance. To run the instances by hand
//! in two terminals against one server:
//!
//! ```sh
//! DATABASE_URL=postgresql://postgres@localhost/trebuchet cargo run --example multi_instance -- instance-2
//! DATABASE_URL=postgresql://postgres@localhost/trebuchet cargo run --example multi_instance -- instance-1
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{StateCache, StateStore};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Message {
    from: String,
    text: String,
}

const ROOM: &str = "shared-room";
const TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the cache shows a message from `from`.
fn wait_for(cache: &StateCache<Message>, from: &str) -> Result<Message, String> {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if let Some(message) = cache.get(ROOM).map_err(|e| e.to_string())? {
            if message.from == from {
                return Ok((*message).clone());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("no message from {from} within {TIMEOUT:?}"))
}

fn run_instance(name: &str, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let store = StateStore::builder().url(url).migrate(true).build()?;
    let listener = store.listener()?;
    let cache: StateCache<Message> = StateCache::new(&store, &listener)?;
    let (other, first) = if name == "instance-1" {
        ("instance-2", true)
    } else {
        ("instance-1", false)
    };
    if first {
        // Give the other instance a moment to start listening, then write.
        std::thread::sleep(Duration::from_millis(500));
        store.save(
            ROOM,
            &Message {
                from: name.into(),
                text: "hello from instance-1".into(),
            },
        )?;
        println!("[{name}] wrote its message");
        let reply = wait_for(&cache, other)?;
        println!("[{name}] its cache now shows: {reply:?}");
    } else {
        let message = wait_for(&cache, other)?;
        println!("[{name}] its cache now shows: {message:?}");
        store.save(
            ROOM,
            &Message {
                from: name.into(),
                text: "hello back from instance-2".into(),
            },
        )?;
        println!("[{name}] replied");
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(name) = std::env::args().nth(1) {
        let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
        return run_instance(&name, &url);
    }
    // DATABASE_URL, or a throwaway cluster that lives as long as `db`.
    let db = TestDatabase::from_env_or_start()?;
    let url = db.url().to_owned();
    StateStore::builder()
        .url(&url)
        .migrate(true)
        .build()?
        .delete(ROOM)?;
    let mut second = Command::new(std::env::current_exe()?)
        .arg("instance-2")
        .env("DATABASE_URL", &url)
        .spawn()?;
    run_instance("instance-1", &url)?;
    let status = second.wait()?;
    if !status.success() {
        return Err(format!("instance-2 failed: {status}").into());
    }
    println!("both instances saw each other's writes");
    Ok(())
}
