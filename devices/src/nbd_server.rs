//! The NBD server of `blkvm storage-daemon` (qemu-storage-daemon's
//! `--nbd-server`): a listener on a unix or TCP socket, the handshake of
//! each new client on a short-lived thread of its own (so a slow client
//! holds up nobody), then the connection's transmission phase on an
//! IOThread: its socket and its node queue's completion fd in the
//! thread's epoll, requests on the data plane, many in flight. The
//! protocol itself is `block::nbd`.
//!
//! Each connection opens its own node queue; when it ends, its queue and
//! socket are dropped on the IOThread and the server takes the spent
//! subscriber off the thread at the next accept (fds stay flat over
//! connects).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use block::nbd::server::{handshake, Handshake, Interest, NbdConnection, NbdExportInfo};
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberId};
use vmm_sys_util::epoll::EventSet;

use crate::iothread::{IoSubscriber, IoThread, IoThreadConfig};

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix socket.
    Unix(String),
    /// TCP `host:port`.
    Tcp(String, u16),
}

/// An export the server offers.
pub struct NbdServerExport {
    /// The export's name for clients.
    pub name: String,
    /// What it serves.
    pub info: NbdExportInfo,
    /// The IOThread its connections run on (`None`: the server's own).
    pub iothread: Option<Arc<IoThread>>,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Stream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// A connection's thread, subscriber and "ended" flag.
type LiveConn = (Arc<IoThread>, SubscriberId, Arc<AtomicBool>);

struct Shared {
    exports: Mutex<HashMap<String, NbdServerExport>>,
    own_thread: Arc<IoThread>,
    /// Live connections.
    conns: Mutex<Vec<LiveConn>>,
    /// Connections in their handshake or transmission phase.
    count: AtomicUsize,
    max_connections: Option<usize>,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running NBD server.
pub struct NbdServer {
    shared: Arc<Shared>,
    addr: NbdAddr,
    listen_fd: RawFd,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Listens on `addr` (a stale unix socket file is replaced) and
    /// starts accepting. `max_connections` limits clients at once.
    pub fn start(addr: NbdAddr, max_connections: Option<usize>) -> io::Result<Self> {
        let listener = match &addr {
            NbdAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Listener::Unix(UnixListener::bind(p)?)
            }
            NbdAddr::Tcp(h, port) => Listener::Tcp(TcpListener::bind((h.as_str(), *port))?),
        };
        let listen_fd = match &listener {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        let own_thread =
            IoThread::new("nbd-server", IoThreadConfig::default()).map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            exports: Mutex::new(HashMap::new()),
            own_thread,
            conns: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            max_connections,
            stopping: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&s, listener))?;
        Ok(NbdServer {
            shared,
            addr,
            listen_fd,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> &NbdAddr {
        &self.addr
    }

    /// Offers `e` to new clients; an export of that name is refused.
    pub fn add_export(&self, e: NbdServerExport) -> Result<(), String> {
        let mut ex = lock(&self.shared.exports);
        if ex.contains_key(&e.name) {
            return Err(format!("NBD export '{}' already exists", e.name));
        }
        ex.insert(e.name.clone(), e);
        Ok(())
    }

    /// Stops offering export `name` (connections already on it go on
    /// until they end).
    pub fn remove_export(&self, name: &str) -> bool {
        lock(&self.shared.exports).remove(name).is_some()
    }

    /// Connections now (handshaking or transmitting).
    pub fn connections(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Stops listening, ends every connection (what is in flight
    /// completes first) and the server's own IOThread.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on our own listening socket wakes accept();
        // it does not close the fd, which the accept thread still owns.
        unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (thread, id, _) in lock(&self.shared.conns).drain(..) {
            // Dropping the worker drops its connection: in-flight
            // requests complete, the socket closes.
            let _ = thread.remove(id);
        }
        self.shared.own_thread.stop();
        if let NbdAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// Takes ended connections off their threads.
fn reap(shared: &Shared) {
    let mut conns = lock(&shared.conns);
    conns.retain(|(thread, id, ended)| {
        if ended.load(Ordering::SeqCst) {
            let _ = thread.remove(*id);
            false
        } else {
            true
        }
    });
}

fn accept_loop(shared: &Arc<Shared>, listener: Listener) {
    loop {
        let stream = match &listener {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        reap(shared);
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("nbd-server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let n = shared.count.fetch_add(1, Ordering::SeqCst);
        if shared.max_connections.is_some_and(|m| n >= m) {
            shared.count.fetch_sub(1, Ordering::SeqCst);
            // Dropped: the client sees the connection close.
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-handshake".into())
            .spawn(move || {
                if !serve(&s, stream) {
                    s.count.fetch_sub(1, Ordering::SeqCst);
                }
            });
        if spawned.is_err() {
            shared.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Negotiates with a new client and hands it to an IOThread; returns
/// whether it was.
fn serve(shared: &Arc<Shared>, mut stream: Stream) -> bool {
    if stream.set_timeout(Some(HANDSHAKE_TIMEOUT)).is_err() {
        return false;
    }
    let offered: HashMap<String, NbdExportInfo> = lock(&shared.exports)
        .iter()
        .map(|(k, v)| (k.clone(), v.info.clone()))
        .collect();
    let (name, info, neg) = match handshake(&mut stream, &offered) {
        Ok(Handshake::Export(name, info, neg)) => (name, info, neg),
        Ok(Handshake::Closed) => return false,
        Err(e) => {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                eprintln!("nbd-server: handshake: {e}");
            }
            return false;
        }
    };
    let thread = lock(&shared.exports)
        .get(&name)
        .and_then(|e| e.iothread.clone())
        .unwrap_or_else(|| shared.own_thread.clone());
    if stream.set_timeout(None).is_err() || stream.set_nonblocking().is_err() {
        return false;
    }
    let queue = match info.node.open_queue() {
        Ok(q) => q,
        Err(e) => {
            eprintln!("nbd-server: export '{name}': could not open a node queue: {e}");
            return false;
        }
    };
    let ended = Arc::new(AtomicBool::new(false));
    let worker = NbdWorker {
        conn: Some(NbdConnection::new(info, neg, queue)),
        stream,
        watching: Interest {
            read: true,
            write: false,
        },
        ended: ended.clone(),
        shared: shared.clone(),
    };
    match thread.add(Box::new(worker)) {
        Ok(id) => {
            lock(&shared.conns).push((thread, id, ended));
            true
        }
        Err(e) => {
            eprintln!("nbd-server: {e}");
            false
        }
    }
}

const SOCKET: u32 = 0;
const COMPLETION: u32 = 1;

/// One connection on its IOThread.
struct NbdWorker {
    conn: Option<NbdConnection>,
    stream: Stream,
    /// What the socket is registered for.
    watching: Interest,
    ended: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

fn socket_events(i: Interest) -> EventSet {
    let mut e = EventSet::empty();
    if i.read {
        e |= EventSet::IN;
    }
    if i.write {
        e |= EventSet::OUT;
    }
    e
}

impl NbdWorker {
    fn end(&mut self, ops: &mut EventOps) {
        if let Some(conn) = self.conn.take() {
            let fd = conn.completion_fd();
            let _ = ops.remove(Events::with_data_raw(fd, COMPLETION, EventSet::IN));
            let _ = ops.remove(Events::with_data(
                &self.stream,
                SOCKET,
                socket_events(self.watching),
            ));
            // Waits for what is in flight, then frees the queue.
            drop(conn);
            self.stream.shutdown();
            self.shared.count.fetch_sub(1, Ordering::SeqCst);
            self.ended.store(true, Ordering::SeqCst);
        }
    }
}

impl MutEventSubscriber for NbdWorker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let set = events.event_set();
        match events.data() {
            SOCKET if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) => {
                conn.on_readable(&mut self.stream);
            }
            COMPLETION => conn.on_completions(),
            _ => {}
        }
        // Answer at once; what the socket does not take waits for OUT.
        conn.on_writable(&mut self.stream);
        conn.resume(&mut self.stream);
        if conn.is_closed() {
            self.end(ops);
            return;
        }
        let want = conn.interest();
        if want != self.watching {
            let _ = ops.modify(Events::with_data(&self.stream, SOCKET, socket_events(want)));
            self.watching = want;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let fd = conn.completion_fd();
        let r = ops
            .add(Events::with_data(&self.stream, SOCKET, EventSet::IN))
            .and_then(|()| ops.add(Events::with_data_raw(fd, COMPLETION, EventSet::IN)));
        if let Err(e) = r {
            eprintln!("nbd-server: cannot watch a connection: {e:?}");
            self.end(ops);
        }
    }
}

impl IoSubscriber for NbdWorker {
    // Sockets are not polled (nor are they in QEMU's NBD server).
    fn pollable(&self) -> bool {
        false
    }
}

impl Drop for NbdWorker {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.stream.shutdown();
            self.shared.count.fetch_sub(1, Ordering::SeqCst);
            self.ended.store(true, Ordering::SeqCst);
        }
    }
}
