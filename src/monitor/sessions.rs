//! The sessions listening on a store's channel, as `pg_stat_activity`
//! tells.

use std::sync::LazyLock;
use std::time::SystemTime;

use crate::pool::{Connection, Sql};

/// Every other client session, to find those listening on the channel.
pub(super) static SESSIONS: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT pid, usename::TEXT, application_name, host(client_addr), state_change, query \
         FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        &[],
    )
});

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
