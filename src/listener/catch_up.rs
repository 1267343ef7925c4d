//! Catch-up after a reconnect: subscriptions filtered to known actors get
//! the current version of each actor that moved in the gap, read through the
//! store's typed catch-up query; everyone else gets a `Resync`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use postgres::Client;

use super::query::{ActorVersion, CatchUpQuery};
use super::Shared;
use crate::change::{Change, ChangeKind, Event, ResyncReason};

/// Filtered subscriptions with at most this many actors in all get exact
/// catch-up after a reconnect; beyond it they get a `Resync`.
const MAX_CATCH_UP_IDS: usize = 10_000;

/// The actors of all filtered subscriptions, for the catch-up query.
pub(super) fn ids(shared: &Shared) -> Vec<String> {
    let registry = shared.registry();
    let mut ids = HashSet::new();
    for sink in registry.sinks.values() {
        if let Some(filter) = &sink.filter {
            ids.extend(filter.iter().cloned());
        }
    }
    ids.into_iter().collect()
}

/// What the catch-up query found: the ids asked about, and the current
/// version (or tombstone) of those that exist or existed.
pub(super) struct CatchUp {
    queried: HashSet<String>,
    current: HashMap<String, Arc<Change>>,
}

/// Reads the current versions of `ids` through the store's catch-up query,
/// or `None` when catch-up is not possible and subscribers must get a
/// `Resync` instead.
pub(super) fn read(
    client: &mut Client,
    query: Option<&CatchUpQuery>,
    ids: &[String],
    table: Option<String>,
) -> Option<CatchUp> {
    let query = query.filter(|_| (1..=MAX_CATCH_UP_IDS).contains(&ids.len()))?;
    match query.run(client, ids) {
        Ok(found) => Some(CatchUp {
            queried: ids.iter().cloned().collect(),
            current: found
                .into_iter()
                .map(|version| {
                    let id = version.actor_id.clone();
                    (id, Arc::new(change(version, table.clone())))
                })
                .collect(),
        }),
        Err(e) => {
            log::warn!("catch-up query failed, sending resync instead: {e}");
            None
        }
    }
}

/// The change that made `version`, as a subscriber of `table` receives it.
fn change(version: ActorVersion, table: Option<String>) -> Change {
    Change {
        actor_id: version.actor_id,
        sequence: version.sequence,
        timestamp: version.at,
        kind: if version.deleted {
            ChangeKind::Deleted
        } else {
            ChangeKind::Saved
        },
        table,
    }
}

/// The current number of `actor_id` (its tombstone's when deleted, 0 when it
/// never existed), for an announce.
pub(super) fn current_number(
    client: &mut Client,
    query: &CatchUpQuery,
    actor_id: &str,
) -> Result<u64, postgres::Error> {
    Ok(query
        .run(client, &[actor_id.to_owned()])?
        .into_iter()
        .find(|version| version.actor_id == actor_id)
        .map_or(0, |version| version.sequence))
}

/// After a gap: filtered subscribers get the current versions of their
/// actors where that is cheap (`current`); everyone else gets a `Resync`.
pub(super) fn deliver(shared: &Shared, found: Option<CatchUp>) {
    let mut registry = shared.registry();
    registry.sinks.retain(|_, sink| {
        let moved: Option<Vec<Event>> = match (&sink.filter, &found) {
            // A subscription made while the query ran was not asked
            // about: it gets a resync.
            (Some(filter), Some(found)) if filter.iter().all(|id| found.queried.contains(id)) => {
                let current: Vec<Arc<Change>> = filter
                    .iter()
                    .filter_map(|id| found.current.get(id))
                    .cloned()
                    .collect();
                Some(
                    current
                        .into_iter()
                        .filter(|change| sink.takes(change))
                        .map(Event::Change)
                        .collect(),
                )
            }
            _ => None,
        };
        match moved {
            Some(moved) if moved.is_empty() => sink.settle(shared),
            Some(moved) => sink.offer(moved.into(), shared),
            None => {
                sink.owe(ResyncReason::Reconnected);
                sink.settle(shared)
            }
        }
    });
}
