//! `watch`: the change feed as JSON lines.

use std::io::{self, Write};
use std::time::Duration;

use serde::Serialize;
use trebuchet_postgres::crossbeam_channel::RecvTimeoutError;
use trebuchet_postgres::{ChangeKind, Event};

use crate::args::Watch;
use crate::fail::Failure;
use crate::output::{escape, json_line, timestamp};
use crate::settings::Settings;

/// How often the listener's health is looked at while no event comes.
const HEALTH_TICK: Duration = Duration::from_millis(500);

/// One line of output.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line {
    /// An actor changed.
    Change {
        actor_id: String,
        sequence: u64,
        op: &'static str,
        timestamp: String,
    },
    /// Changes may have been missed: reload what you keep.
    Resync { reason: String },
}

pub fn watch(settings: &Settings, args: &Watch) -> Result<(), Failure> {
    for id in &args.actors {
        trebuchet_postgres::validate_actor_id(id)?;
    }
    let connected = settings.store()?;
    let store = &connected.store;
    let listener = store.listener().map_err(|e| connected.fail(e))?;
    let events = if args.actors.is_empty() {
        listener.subscribe()
    } else {
        listener.subscribe_actors(args.actors.iter().cloned())
    };
    let which = if args.actors.is_empty() {
        "every actor".to_owned()
    } else {
        format!("{} actor(s)", args.actors.len())
    };
    eprintln!(
        "watching {:?} on {} for {which}; stop with Ctrl-C",
        store.channel(),
        escape(store.pool().target())
    );
    let mut out = io::stdout().lock();
    let mut changes = 0;
    let mut connected_now = true;
    loop {
        if args.count.is_some_and(|n| changes >= n) {
            return Ok(());
        }
        let event = match events.recv_timeout(HEALTH_TICK) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                let health = listener.health();
                if health.connected != connected_now {
                    connected_now = health.connected;
                    if connected_now {
                        eprintln!("reconnected");
                    } else {
                        eprintln!(
                            "connection lost ({}); reconnecting",
                            escape(health.last_error.as_deref().unwrap_or("no reason given"))
                        );
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Failure::error(
                    "the change feed ended: the listener stopped",
                ))
            }
        };
        match event {
            Event::Change(change) => {
                changes += 1;
                let op = match change.kind {
                    ChangeKind::Deleted => "delete",
                    ChangeKind::Announced => "announce",
                    _ => "save",
                };
                json_line(
                    &mut out,
                    &Line::Change {
                        actor_id: change.actor_id.clone(),
                        sequence: change.sequence,
                        op,
                        timestamp: timestamp(change.timestamp),
                    },
                )?;
            }
            Event::Resync(reason) => {
                json_line(
                    &mut out,
                    &Line::Resync {
                        reason: reason.to_string(),
                    },
                )?;
            }
            _ => {}
        }
        out.flush()?;
    }
}
