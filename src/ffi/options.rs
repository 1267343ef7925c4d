//! Store options: `trebuchet_store_options`, the C side of
//! `StateStoreBuilder` with its pool and connection settings, and
//! `trebuchet_store_open_with`.

use std::sync::Mutex;

use super::*;
use crate::{ConnectOptions, PoolOptions, StateStoreBuilder};

/// Settings for `trebuchet_store_open_with`: the connection, the table and
/// channel, the pool and the store's behaviour. Make one with
/// `trebuchet_store_options_new` (every setting at its default), change
/// what you need with the `trebuchet_store_options_` setters, open any
/// number of stores from it, and release it with
/// `trebuchet_store_options_free`; a store does not keep it.
///
/// A setter that fails leaves the options as they were. The connection
/// string, table and channel are checked when a store is opened.
/// Thread-safe (a lock inside), though there is rarely a reason to share one.
pub struct trebuchet_store_options {
    _private: [u8; 0],
}

/// What a `trebuchet_store_options` holds; `None` is the builder's default.
#[derive(Default)]
struct StoreOptions {
    url: Option<String>,
    table: Option<String>,
    channel: Option<String>,
    pool_size: Option<u32>,
    connect_timeout: Option<Duration>,
    pool_timeout: Option<Duration>,
    /// `Some(None)`: no limit, set explicitly.
    statement_timeout: Option<Option<Duration>>,
    call_timeout: Option<Option<Duration>>,
    wait_for_server: Option<Duration>,
    group_commit: Option<bool>,
    outcome_timeout: Option<Duration>,
    migrate: bool,
}

impl StoreOptions {
    /// The builder these options describe; fails on a malformed connection
    /// string (nothing is contacted).
    fn builder(&self) -> crate::Result<StateStoreBuilder> {
        let mut builder = StateStore::builder();
        if self.url.is_some() || self.connect_timeout.is_some() {
            let mut connect = match &self.url {
                Some(url) => url.parse::<ConnectOptions>()?,
                None => ConnectOptions::from_env()?,
            };
            if let Some(timeout) = self.connect_timeout {
                connect.connect_timeout(timeout);
            }
            builder = builder.connect_options(connect);
        }
        let mut pool = PoolOptions::default();
        if let Some(size) = self.pool_size {
            pool = pool.max_size(size);
        }
        if let Some(timeout) = self.pool_timeout {
            pool = pool.connection_timeout(timeout);
        }
        if let Some(timeout) = self.statement_timeout {
            pool = pool.statement_timeout(timeout);
        }
        if let Some(timeout) = self.call_timeout {
            pool = pool.call_timeout(timeout);
        }
        builder = builder.pool_options(pool);
        if let Some(wait) = self.wait_for_server {
            builder = builder.wait_for_server(wait);
        }
        if let Some(table) = &self.table {
            builder = builder.table(table);
        }
        if let Some(channel) = &self.channel {
            builder = builder.channel(channel);
        }
        if let Some(enabled) = self.group_commit {
            builder = builder.group_commit(enabled);
        }
        if let Some(timeout) = self.outcome_timeout {
            builder = builder.outcome_timeout(timeout);
        }
        Ok(builder.migrate(self.migrate))
    }
}

/// The longest time any of the settings takes, in milliseconds: the
/// largest `statement_timeout` PostgreSQL accepts (about 24.8 days).
const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;

/// A duration setting in milliseconds, from 1 ms to [`MAX_TIMEOUT_MS`].
fn duration_arg(ms: u64, what: &str) -> Result<Duration, trebuchet_status> {
    if ms == 0 || ms > MAX_TIMEOUT_MS {
        return Err(fail(
            TREBUCHET_INVALID_ARGUMENT,
            format!("{what} is {ms}: give from 1 to {MAX_TIMEOUT_MS} ms"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// A limit in milliseconds where 0 means none.
fn limit_arg(ms: u64, what: &str) -> Result<Option<Duration>, trebuchet_status> {
    match ms {
        0 => Ok(None),
        ms => duration_arg(ms, what).map(Some),
    }
}

/// Runs `change` on the options behind `options`.
///
/// # Safety
///
/// `options` must be NULL or a live handle.
unsafe fn update(
    options: *mut trebuchet_store_options,
    change: impl FnOnce(&mut StoreOptions) -> Result<(), trebuchet_status>,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let options =
            unsafe { borrow::<Mutex<StoreOptions>, _>(options, Kind::StoreOptions, "options") }?;
        let mut options = options.lock().unwrap_or_else(|p| p.into_inner());
        // Every setter checks its argument before it writes: a failed one
        // changes nothing.
        change(&mut options)?;
        Ok(TREBUCHET_OK)
    })
}

/// Makes store options with every setting at its default: the connection
/// from the environment (as `trebuchet_store_open_env`), table
/// `actor_states`, channel `actor_state_changes`, a pool of at most 10
/// connections, a 10 s connect timeout and 10 s wait for a free
/// connection, no statement or call timeout, group commit on, a 10 s
/// outcome timeout, no migration. Release them with
/// `trebuchet_store_options_free`.
///
/// # Safety
///
/// `options_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_new(
    options_out: *mut *mut trebuchet_store_options,
) -> trebuchet_status {
    run(|| {
        out_arg(options_out, "options_out")?;
        let options = Mutex::new(StoreOptions::default());
        // SAFETY: checked non-NULL.
        unsafe { options_out.write(into_handle(Kind::StoreOptions, options)) };
        Ok(TREBUCHET_OK)
    })
}

/// Frees store options and sets `*options` to NULL. NULL and a pointer to
/// NULL are fine. Stores opened from them are not affected.
///
/// # Safety
///
/// `options` NULL or the address of an options pointer; no other thread
/// may be using them.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_free(options: *mut *mut trebuchet_store_options) {
    boundary(|| {
        // SAFETY: forwarded.
        drop(unsafe { take::<Mutex<StoreOptions>, _>(options, Kind::StoreOptions) });
        TREBUCHET_OK
    });
}

/// The connection string (a `postgresql://` URL or libpq `key=value`
/// text), copied; NULL goes back to the environment (`DATABASE_URL`, else
/// `POSTGRES_HOST`, ...). Checked when a store is opened
/// (`TREBUCHET_INVALID_CONFIG`, a message without the password).
///
/// # Safety
///
/// `options` NULL or live; `url` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_url(
    options: *mut trebuchet_store_options,
    url: *const c_char,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.url = opt_str_arg(url, "url")?.map(str::to_owned);
            Ok(())
        })
    }
}

/// The table, optionally schema-qualified (`"game.rooms"`), copied; NULL
/// for the default `actor_states`. Checked when a store is opened.
///
/// # Safety
///
/// `options` NULL or live; `table` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_table(
    options: *mut trebuchet_store_options,
    table: *const c_char,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.table = opt_str_arg(table, "table")?.map(str::to_owned);
            Ok(())
        })
    }
}

/// The notification channel, copied; NULL for the default
/// `actor_state_changes`. Checked when a store is opened.
///
/// # Safety
///
/// `options` NULL or live; `channel` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_channel(
    options: *mut trebuchet_store_options,
    channel: *const c_char,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.channel = opt_str_arg(channel, "channel")?.map(str::to_owned);
            Ok(())
        })
    }
}

/// The most connections the store's pool opens (default 10); each is a
/// server backend. `TREBUCHET_INVALID_ARGUMENT` for 0.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_pool_size(
    options: *mut trebuchet_store_options,
    pool_size: u32,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            if pool_size == 0 {
                return Err(fail(
                    TREBUCHET_INVALID_ARGUMENT,
                    "pool_size is 0: a pool holds at least 1 connection",
                ));
            }
            o.pool_size = Some(pool_size);
            Ok(())
        })
    }
}

/// The time allowed to establish one connection, in milliseconds (default
/// 10 s; from 1 to 2^31 - 1).
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_connect_timeout_ms(
    options: *mut trebuchet_store_options,
    timeout_ms: u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.connect_timeout = Some(duration_arg(timeout_ms, "timeout_ms")?);
            Ok(())
        })
    }
}

/// How long a call waits for a free pooled connection before it fails
/// with `TREBUCHET_POOL_EXHAUSTED`, in milliseconds (default 10 s; from 1
/// to 2^31 - 1).
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_pool_timeout_ms(
    options: *mut trebuchet_store_options,
    timeout_ms: u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.pool_timeout = Some(duration_arg(timeout_ms, "timeout_ms")?);
            Ok(())
        })
    }
}

/// The server-side `statement_timeout` of every pooled connection, in
/// milliseconds; 0 for none (the default). A statement over it fails with
/// `TREBUCHET_STATEMENT_TIMEOUT`. At most 2^31 - 1. Not with a
/// transaction-mode pooler (opening then fails with
/// `TREBUCHET_INVALID_CONFIG`).
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_statement_timeout_ms(
    options: *mut trebuchet_store_options,
    timeout_ms: u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.statement_timeout = Some(limit_arg(timeout_ms, "timeout_ms")?);
            Ok(())
        })
    }
}

/// The longest a call may hold a pooled connection, in milliseconds; 0
/// for no limit (the default). Past it the pool closes the connection and
/// the call fails with a connection status, instead of waiting for a
/// server or network that stopped answering (a write then finds out
/// whether it landed, within the outcome timeout). Enforced on Linux for
/// TCP connections. At most 2^31 - 1.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_call_timeout_ms(
    options: *mut trebuchet_store_options,
    timeout_ms: u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.call_timeout = Some(limit_arg(timeout_ms, "timeout_ms")?);
            Ok(())
        })
    }
}

/// How long opening waits for a server that is not up yet, in
/// milliseconds, retrying a refused connection or a server still starting
/// (default: not at all; from 1 to 2^31 - 1).
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_wait_for_server_ms(
    options: *mut trebuchet_store_options,
    wait_ms: u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.wait_for_server = Some(duration_arg(wait_ms, "wait_ms")?);
            Ok(())
        })
    }
}

/// Group commit (default on): concurrent plain and conditional saves on
/// the store are combined into one statement and one commit, each caller
/// still getting its own result. Off gives every call a commit of its own.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_group_commit(
    options: *mut trebuchet_store_options,
    enabled: bool,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.group_commit = Some(enabled);
            Ok(())
        })
    }
}

/// How long a write whose connection broke keeps trying to find out
/// whether it was applied, in milliseconds (default 10 s; from 1 to
/// 2^31 - 1): within it the write returns its result or
/// `TREBUCHET_NOT_APPLIED`, past it `TREBUCHET_OUTCOME_UNKNOWN`.
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_outcome_timeout_ms(
    options: *mut trebuchet_store_options,
    timeout_ms: u64,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.outcome_timeout = Some(duration_arg(timeout_ms, "timeout_ms")?);
            Ok(())
        })
    }
}

/// Whether opening also creates or upgrades the schema, as
/// `trebuchet_store_migrate` does (default off).
///
/// # Safety
///
/// `options` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_options_migrate(
    options: *mut trebuchet_store_options,
    migrate: bool,
) -> trebuchet_status {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        update(options, |o| {
            o.migrate = migrate;
            Ok(())
        })
    }
}

/// Opens a store as `options` say (NULL: every default, as
/// `trebuchet_store_open_env` with NULL table and channel). The options
/// are read, not kept: free them whenever you like.
///
/// `TREBUCHET_INVALID_CONFIG` for a malformed connection string, a bad
/// table or channel name or settings that do not fit together, before
/// anything is contacted; then the statuses of connecting and, with
/// `trebuchet_store_options_migrate`, of migrating. On success
/// `*store_out` is a new store; release it with `trebuchet_store_free`.
///
/// # Safety
///
/// `options` NULL or live; `store_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_open_with(
    options: *const trebuchet_store_options,
    store_out: *mut *mut trebuchet_store,
) -> trebuchet_status {
    run(|| {
        let builder = if options.is_null() {
            StateStore::builder()
        } else {
            // SAFETY: non-NULL and live per the caller.
            let options = unsafe {
                borrow::<Mutex<StoreOptions>, _>(options, Kind::StoreOptions, "options")
            }?;
            let options = options.lock().unwrap_or_else(|p| p.into_inner());
            check(options.builder())?
        };
        open(builder, store_out)
    })
}
