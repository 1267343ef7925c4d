//! A TCP proxy between a client and PostgreSQL that can stall, sever and cut
//! connections at exact points of the protocol.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How often a stalled or idle pump looks at the proxy's switches.
const TICK: Duration = Duration::from_millis(10);

/// Which client request a cut waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The next request that runs a statement: an extended-protocol
    /// `Execute` or a simple-protocol `Query`. A statement that has not been
    /// prepared on the connection yet is preceded by a `Parse` request, which
    /// does not count: run the operation once before arming the cut so that
    /// its statement is cached.
    Statement,
    /// The next simple-protocol `COMMIT` (how a transaction is committed).
    Commit,
}

/// Where a cut happens relative to the matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The request never reaches the server; the connection is severed.
    Before(Request),
    /// The request reaches the server and runs to completion (for a commit,
    /// the transaction is committed); its reply, up to and including
    /// `ReadyForQuery`, is discarded and the connection severed.
    After(Request),
}

#[derive(Debug, Default)]
struct Shared {
    stalled: AtomicBool,
    refusing: AtomicBool,
    closing: AtomicBool,
    cut: Mutex<Option<Cut>>,
    /// Matching requests to let through before the armed cut happens.
    skip: AtomicUsize,
    cuts_done: AtomicUsize,
    accepted: AtomicUsize,
    connections: Mutex<Vec<Arc<Link>>>,
}

/// One proxied connection.
#[derive(Debug)]
struct Link {
    client: TcpStream,
    server: TcpStream,
    /// Set once the client has sent an `SSLRequest`, until the server's
    /// one-byte answer has passed.
    ssl_answer_pending: AtomicBool,
    /// When a cut after a request is armed on this link: which reply ends
    /// the cut request's answer, counting the server's `ReadyForQuery`
    /// messages after the one that ends the start-up (1 is the first). The
    /// answer is swallowed and the link severed once it has come; 0 is none.
    cut_reply: AtomicUsize,
    /// TLS was negotiated: the bytes cannot be read and cuts never match.
    opaque: AtomicBool,
    closed: AtomicBool,
}

impl Link {
    fn sever(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

/// A TCP proxy on `127.0.0.1` in front of a PostgreSQL server, for tests of
/// faults: it forwards bytes both ways until told to stall (stop forwarding
/// without closing), sever every connection, refuse new ones, or cut one
/// connection exactly before or after a request reaches the server.
///
/// Connect through it by pointing a client at [`port`](Self::port) on
/// `127.0.0.1` with TLS off (`sslmode=disable`): the cuts read the protocol.
///
/// ```no_run
/// use trebuchet_postgres::testing::{ProxyRequest, TcpProxy, TestCluster};
///
/// let cluster = TestCluster::start()?;
/// let proxy = TcpProxy::start(cluster.port())?;
/// let mut options = cluster.connect_options();
/// options.port(proxy.port());
/// // ... build a store on `options`, run an operation once, then:
/// proxy.cut_after(ProxyRequest::Statement);
/// // the next statement commits, but its caller never hears back.
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy on a free loopback port forwarding to
    /// `127.0.0.1:target_port`.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub fn start(target_port: u16) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let target = SocketAddr::from(([127, 0, 0, 1], target_port));
        let shared = Arc::new(Shared::default());
        let accept_shared = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("test-proxy-accept".into())
            .spawn(move || accept_loop(&listener, target, &accept_shared))?;
        Ok(TcpProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The proxy's port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding in both directions without closing anything, as a
    /// network that drops packets would: callers wait on their timeouts.
    pub fn stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }

    /// Forwards again after [`stall`](Self::stall); bytes held meanwhile are
    /// delivered.
    pub fn resume(&self) {
        self.shared.stalled.store(false, Ordering::SeqCst);
    }

    /// Closes every open connection at once (both sides see a reset or EOF).
    pub fn sever_all(&self) {
        for link in self
            .shared
            .connections
            .lock()
            .expect("proxy lock")
            .drain(..)
        {
            link.sever();
        }
    }

    /// While `true`, new connections are closed as soon as they are accepted,
    /// as if the server were unreachable.
    pub fn refuse(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Arms a cut: the next matching request on any connection is dropped
    /// and its connection severed, so the server never sees it.
    pub fn cut_before(&self, request: Request) {
        self.cut_before_nth(request, 1);
    }

    /// Arms a cut: the next matching request on any connection reaches the
    /// server and completes there, then its reply is discarded and its
    /// connection severed, so the client never learns the outcome.
    pub fn cut_after(&self, request: Request) {
        self.cut_after_nth(request, 1);
    }

    /// [`cut_before`](Self::cut_before) at the `nth` matching request
    /// (1 is the next one).
    pub fn cut_before_nth(&self, request: Request, nth: usize) {
        let mut cut = self.shared.cut.lock().expect("proxy lock");
        self.shared
            .skip
            .store(nth.saturating_sub(1), Ordering::SeqCst);
        *cut = Some(Cut::Before(request));
    }

    /// [`cut_after`](Self::cut_after) at the `nth` matching request (1 is
    /// the next one): for an operation of several statements, such as a
    /// read followed by a write.
    pub fn cut_after_nth(&self, request: Request, nth: usize) {
        let mut cut = self.shared.cut.lock().expect("proxy lock");
        self.shared
            .skip
            .store(nth.saturating_sub(1), Ordering::SeqCst);
        *cut = Some(Cut::After(request));
    }

    /// Disarms a cut that has not happened yet.
    pub fn disarm(&self) {
        *self.shared.cut.lock().expect("proxy lock") = None;
    }

    /// How many armed cuts have happened.
    pub fn cuts(&self) -> usize {
        self.shared.cuts_done.load(Ordering::SeqCst)
    }

    /// How many connections the proxy has accepted in all.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// How many proxied connections are open now.
    pub fn open_connections(&self) -> usize {
        let mut links = self.shared.connections.lock().expect("proxy lock");
        links.retain(|link| !link.closed.load(Ordering::SeqCst));
        links.len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.stalled.store(false, Ordering::SeqCst);
        self.sever_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, shared: &Arc<Shared>) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !shared.closing.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(TICK);
                continue;
            }
            Err(_) => continue,
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refusing.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        if spawn_link(client, server, shared).is_err() {
            continue;
        }
    }
}

fn spawn_link(client: TcpStream, server: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    client.set_read_timeout(Some(TICK))?;
    server.set_read_timeout(Some(TICK))?;
    let link = Arc::new(Link {
        client,
        server,
        ssl_answer_pending: AtomicBool::new(false),
        cut_reply: AtomicUsize::new(0),
        opaque: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    shared
        .connections
        .lock()
        .expect("proxy lock")
        .push(Arc::clone(&link));
    let (up_link, up_shared) = (Arc::clone(&link), Arc::clone(shared));
    thread::Builder::new()
        .name("test-proxy-up".into())
        .spawn(move || pump_up(&up_link, &up_shared))?;
    let down_shared = Arc::clone(shared);
    thread::Builder::new()
        .name("test-proxy-down".into())
        .spawn(move || pump_down(&link, &down_shared))?;
    Ok(())
}

/// Reads what is available from `from`, honouring stalls; `None` when the
/// link is over.
fn read_chunk(link: &Link, shared: &Shared, mut from: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    loop {
        if link.closed.load(Ordering::SeqCst) || shared.closing.load(Ordering::SeqCst) {
            return None;
        }
        if shared.stalled.load(Ordering::SeqCst) {
            thread::sleep(TICK);
            continue;
        }
        match from.read(buf) {
            Ok(0) => return None,
            Ok(n) => {
                // A stall that began while this read waited holds what it
                // read, so that nothing passes once `stall` has returned.
                while shared.stalled.load(Ordering::SeqCst) {
                    if link.closed.load(Ordering::SeqCst) || shared.closing.load(Ordering::SeqCst) {
                        return None;
                    }
                    thread::sleep(TICK);
                }
                return Some(n);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Splits a byte stream into protocol messages across reads.
#[derive(Debug, Default)]
struct Framer {
    /// Messages before the startup message carry no type byte.
    untyped: bool,
    header: Vec<u8>,
    remaining: usize,
    kind: u8,
    /// The first bytes of the current message's body.
    body: Vec<u8>,
}

/// A message seen whole (or at least its type and the start of its body).
struct Seen {
    kind: u8,
    /// Where the message ends in the bytes it ended in.
    end: usize,
    body_start: Vec<u8>,
    untyped_code: Option<u32>,
}

impl Framer {
    fn untyped() -> Framer {
        Framer {
            untyped: true,
            ..Framer::default()
        }
    }

    /// Feeds `bytes`, returning the messages that ended in them.
    fn feed(&mut self, bytes: &[u8]) -> Vec<Seen> {
        const KEEP: usize = 16;
        let mut seen = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if self.remaining == 0 {
                let header_len = if self.untyped { 4 } else { 5 };
                self.header.push(bytes[i]);
                i += 1;
                if self.header.len() < header_len {
                    continue;
                }
                let (kind, len_bytes) = if self.untyped {
                    (0, &self.header[..4])
                } else {
                    (self.header[0], &self.header[1..5])
                };
                let len = u32::from_be_bytes(len_bytes.try_into().expect("four bytes")) as usize;
                self.kind = kind;
                self.remaining = len.saturating_sub(4);
                self.header.clear();
                self.body.clear();
                if self.remaining == 0 {
                    seen.push(self.finish(i));
                }
                continue;
            }
            let take = self.remaining.min(bytes.len() - i);
            let room = KEEP.saturating_sub(self.body.len()).min(take);
            self.body.extend_from_slice(&bytes[i..i + room]);
            self.remaining -= take;
            i += take;
            if self.remaining == 0 {
                seen.push(self.finish(i));
            }
        }
        seen
    }

    fn finish(&mut self, end: usize) -> Seen {
        let untyped_code = if self.untyped && self.body.len() >= 4 {
            Some(u32::from_be_bytes(
                self.body[..4].try_into().expect("four bytes"),
            ))
        } else {
            None
        };
        Seen {
            kind: self.kind,
            end,
            body_start: std::mem::take(&mut self.body),
            untyped_code,
        }
    }
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const PROTOCOL_3: u32 = 196_608;

fn matches(request: Request, message: &Seen) -> bool {
    match request {
        Request::Statement => message.kind == b'E' || message.kind == b'Q',
        Request::Commit => {
            message.kind == b'Q'
                && message
                    .body_start
                    .get(..6)
                    .is_some_and(|start| start.eq_ignore_ascii_case(b"COMMIT"))
        }
    }
}

/// Whether a client message asks the server for a `ReadyForQuery`: each
/// `Sync`, simple `Query` and `FunctionCall` is answered by exactly one.
fn ends_request(kind: u8) -> bool {
    matches!(kind, b'S' | b'Q' | b'F')
}

/// Client to server.
fn pump_up(link: &Link, shared: &Shared) {
    let mut framer = Framer::untyped();
    let mut buf = vec![0u8; 64 * 1024];
    let mut server = &link.server;
    // Requests sent that the server answers with a `ReadyForQuery`.
    let mut requests = 0usize;
    while let Some(n) = read_chunk(link, shared, &link.client, &mut buf) {
        let chunk = &buf[..n];
        let mut cut_here = None;
        if !link.opaque.load(Ordering::SeqCst) {
            for message in framer.feed(chunk) {
                if framer.untyped {
                    match message.untyped_code {
                        Some(SSL_REQUEST | GSSENC_REQUEST) => {
                            link.ssl_answer_pending.store(true, Ordering::SeqCst);
                        }
                        Some(PROTOCOL_3) => framer.untyped = false,
                        _ => {}
                    }
                    continue;
                }
                let mut armed = shared.cut.lock().expect("proxy lock");
                let hit = match *armed {
                    Some(Cut::Before(request) | Cut::After(request)) => matches(request, &message),
                    None => false,
                };
                if hit && shared.skip.load(Ordering::SeqCst) > 0 {
                    shared.skip.fetch_sub(1, Ordering::SeqCst);
                } else if hit {
                    cut_here = armed.take();
                    // The cut request is answered by the next
                    // `ReadyForQuery`: its own (a query) or that of the
                    // `Sync` after it (an `Execute`).
                    link.cut_reply.store(requests + 1, Ordering::SeqCst);
                    break;
                }
                if ends_request(message.kind) {
                    requests += 1;
                }
            }
        }
        if let Some(Cut::Before(_)) = cut_here {
            shared.cuts_done.fetch_add(1, Ordering::SeqCst);
            link.sever();
            return;
        }
        if server.write_all(chunk).is_err() {
            break;
        }
    }
    link.sever();
}

/// Server to client.
fn pump_down(link: &Link, shared: &Shared) {
    let mut framer = Framer::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut client = &link.client;
    // `ReadyForQuery` messages seen, the start-up's included.
    let mut ready = 0usize;
    while let Some(n) = read_chunk(link, shared, &link.server, &mut buf) {
        let mut chunk = &buf[..n];
        if link.ssl_answer_pending.swap(false, Ordering::SeqCst) {
            if chunk[0] == b'S' || chunk[0] == b'G' {
                link.opaque.store(true, Ordering::SeqCst);
            }
            if client.write_all(&chunk[..1]).is_err() {
                break;
            }
            chunk = &chunk[1..];
        }
        if link.opaque.load(Ordering::SeqCst) {
            if client.write_all(chunk).is_err() {
                break;
            }
            continue;
        }
        // Set before the cut request is sent, so before its answer is read.
        let cut_reply = link.cut_reply.load(Ordering::SeqCst);
        // Answers to earlier requests pass; the cut request's is swallowed.
        let mut pass = if cut_reply == 0 || ready < cut_reply {
            chunk.len()
        } else {
            0
        };
        let mut answered = false;
        for message in framer.feed(chunk) {
            if message.kind != b'Z' {
                continue;
            }
            ready += 1;
            if cut_reply != 0 && ready == cut_reply {
                pass = message.end;
            }
            if cut_reply != 0 && ready > cut_reply {
                answered = true;
                break;
            }
        }
        if client.write_all(&chunk[..pass]).is_err() {
            break;
        }
        if answered {
            shared.cuts_done.fetch_add(1, Ordering::SeqCst);
            link.sever();
            return;
        }
    }
    link.sever();
}
