//! The call timeout ([`PoolOptions::call_timeout`](super::PoolOptions::call_timeout)):
//! a thread per pool that cuts the socket of a connection held by one call
//! for longer than the timeout, so that the call fails at once instead of
//! waiting on a peer that stopped answering.
//!
//! Why cut the socket: kernel keepalives and `TCP_USER_TIMEOUT` notice a
//! peer that is gone, but not one whose kernel still acknowledges while
//! nothing answers (a frozen server, a hung proxy or pooler, a stalled
//! path); a server-side `statement_timeout` never fires for a request the
//! server never received; and a cancel request travels the same dead path.
//! Closing the socket is what drivers that own their socket do on a
//! deadline. The `postgres` crate does not expose its socket, so the pool
//! finds it when it opens the connection: the one TCP socket of this
//! process that appeared during the connect and leads to the server's port
//! (read from `/proc`; the pool's connects take turns while this runs).
//! When that is not one socket (another part of the program connected to
//! the same port at the same moment) or not Linux, the connection is
//! opened anyway, without the bound. The cut itself shuts down a duplicate
//! of the descriptor taken through this process's pidfd (Linux 5.6+), with
//! no `unsafe`; where that is refused (an old kernel, a seccomp profile), the
//! cut is logged and the call waits for the kernel's own timeouts.
//!
//! The normal path costs an uncontended lock at check-out and check-in; no
//! thread hop, no round trip.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

/// A connection's socket as this process sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Socket {
    fd: i32,
    inode: u64,
}

/// One pooled connection's entry: its socket and whether a call holds it.
#[derive(Debug)]
struct Slot {
    socket: Socket,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Idle,
    /// A call holds the connection until this instant.
    Busy(Instant),
    /// The deadline passed and the socket was shut down.
    Cut,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Held by a watched connection.
#[derive(Debug)]
pub(crate) struct Watch {
    slot: Arc<Slot>,
}

impl Watch {
    /// A call takes the connection until `deadline`.
    pub fn arm(&self, deadline: Instant) {
        *self.slot.state() = State::Busy(deadline);
    }

    /// The call gives the connection back. Returns true when its socket
    /// was cut, so the connection must not be reused.
    pub fn release(&self) -> bool {
        let mut state = self.slot.state();
        let cut = matches!(*state, State::Cut);
        *state = State::Idle;
        cut
    }
}

/// The pool's watchdog: every watched connection's slot.
#[derive(Debug)]
pub(crate) struct Watchdog {
    timeout: Duration,
    target: String,
    slots: Mutex<Vec<Weak<Slot>>>,
    /// Held while a connection is opened, so that the pool's own connects
    /// cannot be mistaken for one another.
    connecting: Mutex<()>,
}

impl Watchdog {
    /// Starts the watchdog thread of a pool; it ends once the pool (the
    /// last `Arc`) is gone.
    pub fn start(timeout: Duration, target: String) -> std::io::Result<Arc<Watchdog>> {
        let watchdog = Arc::new(Watchdog {
            timeout,
            target,
            slots: Mutex::new(Vec::new()),
            connecting: Mutex::new(()),
        });
        let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let weak = Arc::downgrade(&watchdog);
        thread::Builder::new()
            .name("trebuchet-call-timeout".into())
            .spawn(move || loop {
                thread::sleep(tick);
                match weak.upgrade() {
                    Some(watchdog) => watchdog.sweep(Instant::now()),
                    None => break,
                }
            })?;
        Ok(watchdog)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `connect`, which opens a connection to `ports`, and finds the
    /// socket it opened. The connection is watched when that socket could
    /// be told apart.
    pub fn open<T, E>(
        &self,
        ports: &[u16],
        connect: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Option<Watch>), E> {
        let _turn = self.connecting.lock().unwrap_or_else(|p| p.into_inner());
        let before = sockets();
        let opened = connect()?;
        let found = before.and_then(|before| {
            let after = sockets()?;
            let leading = tcp_inodes_to(ports);
            let mut new = after
                .difference(&before)
                .filter(|s| leading.contains(&s.inode));
            match (new.next(), new.next()) {
                (Some(&socket), None) => Some(socket),
                _ => None,
            }
        });
        let Some(socket) = found else {
            log::debug!(
                "cannot tell this connection's socket apart: calls on it are not bounded \
                 by call_timeout ({})",
                self.target
            );
            return Ok((opened, None));
        };
        let slot = Arc::new(Slot {
            socket,
            state: Mutex::new(State::Idle),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        Ok((opened, Some(Watch { slot })))
    }

    /// Cuts the socket of every call past its deadline.
    fn sweep(&self, now: Instant) {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for slot in slots {
            let mut state = slot.state();
            if let State::Busy(deadline) = *state {
                if now >= deadline {
                    log::warn!(
                        "a call held its connection to {} longer than the call timeout ({:?}): \
                         closing the connection",
                        self.target,
                        self.timeout
                    );
                    if let Err(e) = cut(slot.socket.fd) {
                        log::warn!("could not close the connection's socket: {e}");
                    }
                    *state = State::Cut;
                }
            }
        }
    }
}

/// Shuts a connection's socket down in both directions, which wakes the
/// call blocked on it with an error.
///
/// Only called with the connection's slot locked in the `Busy` state: the
/// call holding the connection cannot return it (let alone let the pool
/// close it) before it takes that lock, so `fd` is still the connection's
/// socket and still open.
#[cfg(target_os = "linux")]
fn cut(fd: i32) -> std::io::Result<()> {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    // A duplicate of the connection's descriptor, taken through this
    // process's pidfd (safe, unlike borrowing a raw descriptor); shutting
    // down the duplicate shuts down the socket itself, and dropping it
    // closes only the duplicate.
    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    let socket = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty())?;
    rustix::net::shutdown(&socket, rustix::net::Shutdown::Both)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn cut(_fd: i32) -> std::io::Result<()> {
    Ok(())
}

/// Every socket this process has open (`/proc/self/fd`), or `None` where
/// that cannot be read.
#[cfg(target_os = "linux")]
fn sockets() -> Option<HashSet<Socket>> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        entries
            .flatten()
            .filter_map(|entry| {
                let fd = entry.file_name().to_str()?.parse().ok()?;
                let link = std::fs::read_link(entry.path()).ok()?;
                let inode = link
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()?;
                Some(Socket { fd, inode })
            })
            .collect(),
    )
}

#[cfg(not(target_os = "linux"))]
fn sockets() -> Option<HashSet<Socket>> {
    None
}

/// The inodes of established TCP sockets whose remote port is one of
/// `ports` (`/proc/self/net/tcp` and `tcp6`).
fn tcp_inodes_to(ports: &[u16]) -> HashSet<u64> {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| established_to(line, ports))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The inode of one line of `/proc/net/tcp` when it is an established
/// connection to one of `ports`.
fn established_to(line: &str, ports: &[u16]) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let remote = fields.get(2)?;
    let port = u16::from_str_radix(remote.rsplit_once(':')?.1, 16).ok()?;
    let established = *fields.get(3)? == "01";
    (established && ports.contains(&port))
        .then(|| fields.get(9)?.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_established_connections_from_proc_net_tcp() {
        let line = "   3: 0100007F:A1B2 0100007F:1538 01 00000000:00000000 00:00000000 \
                    00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(established_to(line, &[5432]), Some(123_456));
        assert_eq!(established_to(line, &[5433]), None);
        let listening = line.replace(" 01 ", " 0A ");
        assert_eq!(established_to(&listening, &[5432]), None);
        assert_eq!(established_to("garbage", &[5432]), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn finds_the_socket_a_connect_opens() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let watchdog = Watchdog::start(Duration::from_secs(60), "test".into()).unwrap();
        let (client, watch) = watchdog
            .open(&[port], || {
                std::net::TcpStream::connect(("127.0.0.1", port))
            })
            .unwrap();
        let watch = watch.expect("the one new socket to the port");
        let (mut accepted, _) = server.accept().unwrap();
        // Cutting it wakes a reader on the other end with end-of-file.
        watch.arm(Instant::now());
        watchdog.sweep(Instant::now());
        assert!(watch.release(), "the socket was cut");
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut accepted, &mut buf).unwrap(), 0);
        drop(client);
    }
}
