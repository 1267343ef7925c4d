//! Listening on a Citus cluster: the trigger fires on the node that holds
//! the actor's shard, so `NOTIFY` is raised there, not on the coordinator.
//! The listener asks the coordinator for the nodes that may hold shards,
//! listens on each (and on the coordinator, where announces are sent and
//! where shards may live too) with a thread per node, and merges what they
//! hear into the same subscriptions. Each actor's changes come from the one
//! node that holds its shard, so per actor they arrive in order.
//!
//! The supervisor asks the coordinator again every heartbeat interval. A
//! node added is listened on; a node removed is let go; shards that moved
//! (a rebalance, a node drained) are a gap: every subscriber catches up or
//! gets a `Resync`, after the new nodes are listened on. A node's lost
//! connection is its own thread's gap, handled as on a single server.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use postgres::Client;

use super::catch_up;
use super::worker::Worker;
use crate::change::{Change, ChangeKind};
use crate::config::ConnectOptions;
use crate::error::{Error, Result};

/// Whether the server is a Citus node: the coordinator's catalog of nodes.
const IS_CITUS: &str = "SELECT to_regclass('pg_catalog.pg_dist_node') IS NOT NULL";

/// The primary nodes, other than the coordinator, that may hold shards, and
/// a fingerprint of where every shard is: a move or a copy makes new
/// placement ids.
const TOPOLOGY: &str = "SELECT ARRAY(SELECT nodename::TEXT || ':' || nodeport::TEXT \
     FROM pg_catalog.pg_dist_node WHERE isactive AND noderole = 'primary' AND groupid <> 0 \
     ORDER BY nodeid), \
     (SELECT count(*)::INT8 FROM pg_catalog.pg_dist_placement), \
     (SELECT COALESCE(sum(placementid), 0)::INT8 FROM pg_catalog.pg_dist_placement)";

/// The newest number heard of each actor, for at most this many actors; past
/// it the record starts again (a change that comes late on another
/// connection is a matter of moments, not of thousands of actors).
const MAX_NEWEST: usize = 100_000;

/// The newest number heard of each actor ([`MAX_NEWEST`] at most).
#[derive(Debug, Default)]
pub(super) struct Newest(HashMap<String, u64>);

impl Newest {
    /// Whether `change` is newer than what was heard of its actor (an
    /// announce always is: it is not a version); records it when it is.
    pub(super) fn admits(&mut self, change: &Change) -> bool {
        if change.kind == ChangeKind::Announced {
            return true;
        }
        // Updated in place: a known actor's id is not copied again.
        if let Some(heard) = self.0.get_mut(&change.actor_id) {
            if *heard >= change.sequence {
                return false;
            }
            *heard = change.sequence;
            return true;
        }
        if self.0.len() >= MAX_NEWEST {
            self.0.clear();
        }
        self.0.insert(change.actor_id.clone(), change.sequence);
        true
    }
}

/// A node by host and port, as the coordinator's catalog names it.
type Node = (String, u16);

/// What the coordinator says of its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Topology {
    nodes: BTreeSet<Node>,
    placements: (i64, i64),
}

impl Topology {
    /// Whether there are nodes besides the coordinator to listen on.
    pub(super) fn has_nodes(&self) -> bool {
        !self.nodes.is_empty()
    }
}

/// The cluster as the coordinator describes it, or `None` on a server
/// that is not a Citus coordinator.
pub(super) fn read(client: &mut Client) -> std::result::Result<Option<Topology>, postgres::Error> {
    if !client.query_one(IS_CITUS, &[])?.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client.query_one(TOPOLOGY, &[])?;
    let nodes = row
        .get::<_, Vec<String>>(0)
        .into_iter()
        .filter_map(|node| {
            let (host, port) = node.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect();
    Ok(Some(Topology {
        nodes,
        placements: (row.get(1), row.get(2)),
    }))
}

/// One node's listening thread and what stops it.
struct Listening {
    /// Dropped to stop the thread.
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// The thread of a listener on a Citus coordinator: it runs a [`Worker`]
/// per node and follows the cluster's changes.
pub(super) struct Supervisor {
    /// The coordinator's worker, the model of every node's.
    coordinator: Worker,
    /// The options the listener connects with; a node's differ only in
    /// host and port.
    options: ConnectOptions,
    topology: Topology,
    listening: HashMap<Node, Listening>,
    /// The supervisor's own connection to the coordinator, for its
    /// questions; opened again when lost.
    client: Option<Client>,
}

impl Supervisor {
    /// Starts listening on every node of `topology` (connecting to each
    /// before it returns, so that changes committed after the listener is
    /// built are heard) and returns the supervisor, whose [`run`](Self::run)
    /// is the listener's thread. A node that cannot be reached now is
    /// connected to by its thread, which catches subscribers up once it is.
    pub(super) fn start(
        coordinator: Worker,
        options: ConnectOptions,
        topology: Topology,
    ) -> Result<Supervisor> {
        let mut supervisor = Supervisor {
            coordinator,
            options,
            topology: topology.clone(),
            listening: HashMap::new(),
            client: None,
        };
        for node in &topology.nodes {
            supervisor.listen_on(node.clone())?;
        }
        Ok(supervisor)
    }

    /// Starts the thread of one node.
    fn listen_on(&mut self, node: Node) -> Result<()> {
        let mut options = self.options.clone();
        options.host(&node.0).port(node.1);
        let conn = self.coordinator.conn.for_node(&options)?;
        let client = match conn.connect_within_timeout() {
            Ok(client) => Some(client),
            Err(e) => {
                log::warn!(
                    "cannot listen on the Citus node {}:{} yet: {e}",
                    node.0,
                    node.1
                );
                None
            }
        };
        let (stop, wake) = crossbeam_channel::bounded(0);
        let worker = self.coordinator.sibling(conn, wake);
        let thread = thread::Builder::new()
            .name(format!("trebuchet-listener-{}:{}", node.0, node.1))
            .spawn(move || worker.run(client))
            .map_err(Error::thread_start("a listener thread for a Citus node"))?;
        self.listening.insert(node, Listening { stop, thread });
        Ok(())
    }

    /// Stops and joins one node's thread.
    fn let_go(&mut self, node: &Node) {
        if let Some(listening) = self.listening.remove(node) {
            drop(listening.stop);
            let _ = listening.thread.join();
        }
    }

    /// The listener's thread: the coordinator's worker on `client` on a
    /// thread of its own, and the cluster's changes followed here until
    /// shutdown; then every node's thread is stopped and joined.
    pub(super) fn run(mut self, client: Client, wake: Receiver<()>, interval: Duration) {
        let (stop, coordinator_wake) = crossbeam_channel::bounded(0);
        let coordinator = self
            .coordinator
            .sibling(self.coordinator.conn.clone(), coordinator_wake);
        let coordinator = thread::Builder::new()
            .name(format!(
                "trebuchet-listener-{}",
                self.coordinator.conn.target
            ))
            .spawn(move || coordinator.run(Some(client)));
        match coordinator {
            Ok(thread) => {
                // Woken only by shutdown (the sender is dropped).
                while let Err(RecvTimeoutError::Timeout) = wake.recv_timeout(interval) {
                    if self.coordinator.shared.shutdown.load(Ordering::Acquire) {
                        break;
                    }
                    self.follow();
                }
                drop(stop);
                let _ = thread.join();
            }
            Err(e) => log::error!("cannot start the listener thread for the coordinator: {e}"),
        }
        let nodes: Vec<Node> = self.listening.keys().cloned().collect();
        for node in &nodes {
            self.let_go(node);
        }
    }

    /// Asks the coordinator for the cluster and follows what changed.
    fn follow(&mut self) {
        let Some(now) = self.ask(read) else { return };
        let Some(now) = now else { return };
        if now == self.topology {
            return;
        }
        let added: Vec<Node> = now
            .nodes
            .difference(&self.topology.nodes)
            .cloned()
            .collect();
        let gone: Vec<Node> = self
            .topology
            .nodes
            .difference(&now.nodes)
            .cloned()
            .collect();
        for node in added {
            log::info!("listening on the new Citus node {}:{}", node.0, node.1);
            if let Err(e) = self.listen_on(node.clone()) {
                log::warn!(
                    "cannot listen on the new Citus node {}:{}: {e}",
                    node.0,
                    node.1
                );
            }
        }
        for node in &gone {
            log::info!("the Citus node {}:{} left the cluster", node.0, node.1);
            self.let_go(node);
        }
        if now.placements != self.topology.placements {
            // Shards moved: changes may have been raised on a node while it
            // was not listened on, or out of order across two nodes.
            log::info!("shards moved between Citus nodes: catching subscribers up");
            let shared = Arc::clone(&self.coordinator.shared);
            let ids = catch_up::ids(&shared);
            let query = self.coordinator.catch_up.clone();
            let table = self.coordinator.conn.table.table();
            let found = self
                .ask(|client| Ok(catch_up::read(client, query.as_ref(), &ids, table.clone())))
                .flatten();
            catch_up::deliver(&shared, found);
        }
        self.topology = now;
    }

    /// Runs `question` on the supervisor's connection to the coordinator,
    /// connecting first when there is none; `None` (logged) when it
    /// fails, and the connection is opened again next time.
    fn ask<T>(
        &mut self,
        question: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error>,
    ) -> Option<T> {
        if self.client.is_none() {
            match self.coordinator.conn.dial(None) {
                Ok(client) => self.client = Some(client),
                Err(e) => {
                    log::warn!("cannot ask the Citus coordinator for its nodes: {e}");
                    return None;
                }
            }
        }
        let client = self.client.as_mut()?;
        match question(client) {
            Ok(answer) => Some(answer),
            Err(e) => {
                log::warn!("cannot ask the Citus coordinator for its nodes: {e}");
                self.client = None;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn change(actor: &str, sequence: u64, kind: ChangeKind) -> Change {
        Change {
            actor_id: actor.to_owned(),
            sequence,
            timestamp: SystemTime::UNIX_EPOCH,
            kind,
            table: None,
        }
    }

    #[test]
    fn per_actor_only_newer_changes_pass_and_announces_always() {
        let mut newest = Newest::default();
        assert!(newest.admits(&change("a", 2, ChangeKind::Saved)));
        // Late on another connection: an older or the same number.
        assert!(!newest.admits(&change("a", 1, ChangeKind::Saved)));
        assert!(!newest.admits(&change("a", 2, ChangeKind::Saved)));
        assert!(newest.admits(&change("a", 3, ChangeKind::Deleted)));
        assert!(newest.admits(&change("a", 3, ChangeKind::Announced)));
        assert!(newest.admits(&change("b", 1, ChangeKind::Saved)));
    }

    #[test]
    fn the_record_starts_again_past_its_bound() {
        let mut newest = Newest::default();
        for i in 0..MAX_NEWEST {
            assert!(newest.admits(&change(&i.to_string(), 5, ChangeKind::Saved)));
        }
        assert!(!newest.admits(&change("0", 5, ChangeKind::Saved)));
        assert!(newest.admits(&change("new", 1, ChangeKind::Saved)));
        assert_eq!(newest.0.len(), 1);
        assert!(newest.admits(&change("0", 5, ChangeKind::Saved)));
    }
}
