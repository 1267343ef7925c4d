//! A TCP proxy that holds back what a client sends, on the one connection
//! where a marker first passes, from that point on: for the tests of what a
//! server does with work that reaches it after its sender is gone (a Citus
//! coordinator's process, stopped while its worker still waits for the
//! statement it sent, or the `COMMIT PREPARED` that never came).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// What becomes of the held bytes once the client has closed its side.
#[derive(Debug, Clone, Copy)]
pub enum Release {
    /// They reach the server after this pause, then the server sees the
    /// connection end: work sent just before its sender died, arriving late.
    Deliver(Duration),
    /// They never reach the server: the connection is closed on both sides
    /// at once, as a network that fails would.
    Sever,
}

#[derive(Debug)]
struct Shared {
    marker: Vec<u8>,
    release: Release,
    armed: AtomicBool,
    held: AtomicBool,
    /// The local port of the held connection's side towards the server.
    held_port: AtomicU16,
    released: AtomicBool,
}

/// Forwards `127.0.0.1:port()` to a server on loopback, both ways, until the
/// marker passes from a client, once.
#[derive(Debug)]
pub struct HoldProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl HoldProxy {
    pub fn start(target_port: u16, marker: &str, release: Release) -> io::Result<HoldProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let target = SocketAddr::from(([127, 0, 0, 1], target_port));
        let shared = Arc::new(Shared {
            marker: marker.as_bytes().to_vec(),
            release,
            armed: AtomicBool::new(true),
            held: AtomicBool::new(false),
            held_port: AtomicU16::new(0),
            released: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("test-hold-accept".into())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let shared = Arc::clone(&accept_shared);
                    let _ = thread::Builder::new()
                        .name("test-hold-link".into())
                        .spawn(move || link(client, server, &shared));
                }
            })?;
        Ok(HoldProxy { port, shared })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the marker, passing next, is held (it is from the start).
    pub fn arm(&self, armed: bool) {
        self.shared.armed.store(armed, Ordering::SeqCst);
    }

    /// The marker has passed and its connection is being held.
    pub fn held(&self) -> bool {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// The client port the server sees for the held connection
    /// (`pg_stat_activity.client_port`), once one is held.
    pub fn held_port(&self) -> u16 {
        self.shared.held_port.load(Ordering::SeqCst)
    }

    /// The held bytes were delivered or dropped, and the connection closed.
    pub fn released(&self) -> bool {
        self.shared.released.load(Ordering::SeqCst)
    }
}

fn link(client: TcpStream, server: TcpStream, shared: &Shared) {
    let (Ok(mut from_server), Ok(mut to_client)) = (server.try_clone(), client.try_clone()) else {
        return;
    };
    thread::spawn(move || {
        let _ = io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Write);
    });
    let (mut client, mut server) = (client, server);
    let mut buffer = [0u8; 16 * 1024];
    // The end of the last chunk, so that a marker split between two reads is
    // still seen.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match client.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buffer[..n];
        tail.extend_from_slice(chunk);
        let found = tail
            .windows(shared.marker.len())
            .any(|window| window == shared.marker.as_slice());
        if found && shared.armed.swap(false, Ordering::SeqCst) {
            let port = server.local_addr().map_or(0, |a| a.port());
            shared.held_port.store(port, Ordering::SeqCst);
            shared.held.store(true, Ordering::SeqCst);
            hold(chunk.to_vec(), &mut client, &mut server, shared);
            return;
        }
        let keep = tail.len().min(shared.marker.len());
        tail.drain(..tail.len() - keep);
        if server.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}

/// Releases `held` and what follows it as the proxy was told.
fn hold(mut held: Vec<u8>, client: &mut TcpStream, server: &mut TcpStream, shared: &Shared) {
    match shared.release {
        Release::Deliver(pause) => {
            // Everything until the client closes its side.
            let _ = client.read_to_end(&mut held);
            thread::sleep(pause);
            let _ = server.write_all(&held);
            let _ = server.shutdown(Shutdown::Write);
        }
        Release::Sever => {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
    shared.released.store(true, Ordering::SeqCst);
}
