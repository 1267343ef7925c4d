//! The sessions listening on a store's channel, as `pg_stat_activity`
//! tells.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::pool::{Connection, Sql};

/// Every other client session, to find those listening on the channel.
pub(super) static SESSIONS: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT pid, usename::TEXT, application_name, host(client_addr), state_change, query \
         FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        &[],
    )
});

/// On Citus, the sessions on each active worker whose last statement was
/// `LISTEN` (the channel is matched here), asked through the coordinator:
/// `host`, `port`, whether the worker answered, and its sessions as a JSON
/// array of `[pid, user, application_name, client_addr, state_change epoch,
/// query]`, or the error.
pub(super) static WORKER_SESSIONS: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT nodename::TEXT, nodeport, success, result FROM run_command_on_workers($$\
         SELECT COALESCE(json_agg(json_build_array(pid, usename, application_name, \
         host(client_addr), extract(epoch FROM state_change), query)), '[]') \
         FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND query ILIKE 'listen%'$$) ORDER BY 1, 2",
        &[],
    )
});

/// On Citus, the sessions listening on the channel on one worker: a
/// [`ChangeListener`](crate::ChangeListener) on the coordinator listens on
/// every worker too, since each worker sends the changes of its shards.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerListeners {
    /// The worker, as `host:port` in the coordinator's node list.
    pub node: String,
    /// Its sessions listening on the channel.
    pub listeners: Vec<ListenerSession>,
    /// Why the coordinator could not ask the worker; `None` when it did.
    pub error: Option<String>,
}

/// A session listening on the store's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerSession {
    /// The server process id (for `pg_terminate_backend`).
    pub pid: i32,
    /// The role it connected as.
    pub user: Option<String>,
    /// Its `application_name`.
    pub application_name: String,
    /// The client's address; `None` for a Unix socket.
    pub client_addr: Option<String>,
    /// Since when it has been waiting (the end of its last statement).
    pub since: Option<SystemTime>,
}

/// Whether `query`, the last statement of a session, is `LISTEN` on
/// `channel`: quoted names match exactly, unquoted ones as PostgreSQL folds
/// them, to lower case.
pub(super) fn is_listen_on(query: &str, channel: &str) -> bool {
    let query = query.trim().trim_end_matches(';').trim_end();
    let Some(keyword) = query.get(..6) else {
        return false;
    };
    if !keyword.eq_ignore_ascii_case("listen") {
        return false;
    }
    let rest = &query[6..];
    if !rest.starts_with(|c: char| c.is_whitespace()) {
        return false;
    }
    let name = rest.trim();
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\"") == channel,
        None => name.to_lowercase() == channel,
    }
}

/// The sessions listening on `channel`, and how many sessions of other roles
/// this role may not see.
pub(super) fn listener_sessions(
    c: &mut Connection,
    channel: &str,
) -> Result<(Vec<ListenerSession>, u64), postgres::Error> {
    let mut listeners = Vec::new();
    let mut hidden_sessions = 0;
    for session in c.prepare(&SESSIONS)?.query(&mut c.client, &[])? {
        let query: Option<String> = session.get(5);
        match query.as_deref() {
            Some(q) if is_listen_on(q, channel) => listeners.push(ListenerSession {
                pid: session.get(0),
                user: session.get(1),
                application_name: session.get::<_, Option<String>>(2).unwrap_or_default(),
                client_addr: session.get(3),
                since: session.get(4),
            }),
            Some("<insufficient privilege>") | None => hidden_sessions += 1,
            Some(_) => {}
        }
    }
    Ok((listeners, hidden_sessions))
}

/// On Citus, the sessions listening on `channel` on each active worker.
pub(super) fn worker_listener_sessions(
    c: &mut Connection,
    channel: &str,
) -> Result<Vec<WorkerListeners>, postgres::Error> {
    type Session = (
        i32,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<f64>,
        Option<String>,
    );
    let rows = c.prepare(&WORKER_SESSIONS)?.query(&mut c.client, &[])?;
    Ok(rows
        .iter()
        .map(|row| {
            let node = format!("{}:{}", row.get::<_, String>(0), row.get::<_, i32>(1));
            let result: String = row.get::<_, Option<String>>(3).unwrap_or_default();
            let sessions = match row.get::<_, bool>(2) {
                true => serde_json::from_str::<Vec<Session>>(&result)
                    .map_err(|e| format!("the worker's sessions could not be read: {e}")),
                false => Err(result),
            };
            match sessions {
                Ok(sessions) => WorkerListeners {
                    node,
                    listeners: sessions
                        .into_iter()
                        .filter(|s| s.5.as_deref().is_some_and(|q| is_listen_on(q, channel)))
                        .map(|(pid, user, application_name, client_addr, since, _)| {
                            ListenerSession {
                                pid,
                                user,
                                application_name: application_name.unwrap_or_default(),
                                client_addr,
                                since: since
                                    .filter(|s| s.is_finite() && *s >= 0.0)
                                    .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s)),
                            }
                        })
                        .collect(),
                    error: None,
                },
                Err(error) => WorkerListeners {
                    node,
                    listeners: Vec::new(),
                    error: Some(error),
                },
            }
        })
        .collect())
}
