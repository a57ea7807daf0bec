//! QMP, the QEMU Machine Protocol, on a unix socket: what `qemu.qmp`,
//! `qmp-shell` and libvirt-style scripts speak to QEMU and
//! qemu-storage-daemon, so they can drive blkvm unchanged.
//!
//! The server here owns the protocol: the greeting, capabilities
//! negotiation, framing, `id` echo, QEMU's error shapes and classes, and
//! events with timestamps, for any number of clients at once. What the
//! commands do is a [`Monitor`]'s business (`storage-daemon`, `run`).
//!
//! Each client has a reader thread, which parses and executes its
//! commands in order, and a writer thread fed by a bounded queue, so an
//! event emitted from an I/O thread never blocks on a slow client.

pub mod block;
mod stream;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use qapi::qmp::{ChardevSocketOptions, MonitorOptions, QmpCapabilitiesArgs};
use serde_json::{json, Map, Value};

use stream::{Piece, Splitter};

/// Largest message a client may send (QEMU's parser limits tokens, not
/// messages; a QMP command of ours is a few hundred bytes).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest bracket nesting in a message (QEMU's MAX_NESTING).
const MAX_DEPTH: usize = 1024;
/// Replies and events queued for one client before events are dropped.
const CLIENT_QUEUE: usize = 1024;

/// QEMU's error classes (qapi/error.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything without a class of its own.
    GenericError,
    /// The command does not exist, or is not allowed yet.
    CommandNotFound,
    /// A device or node named in the arguments does not exist.
    DeviceNotFound,
}

impl ErrorClass {
    fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// A command's failure, as QMP reports it.
#[derive(Debug)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }
}

impl From<qapi::QapiError> for QmpError {
    fn from(e: qapi::QapiError) -> Self {
        match e {
            // QMP words an unknown member as QEMU's QObject input visitor does.
            qapi::QapiError::InvalidParameter { key } => {
                QmpError::generic(format!("Parameter '{key}' is unexpected"))
            }
            e => QmpError::generic(e.to_string()),
        }
    }
}

/// Reads a command's arguments into a typed struct, with QEMU's wording for
/// missing, unexpected and wrong-typed members.
pub fn args<T: serde::de::DeserializeOwned>(args: &Map<String, Value>) -> Result<T, QmpError> {
    let v = qapi::Value::from(&Value::Object(args.clone()));
    qapi::de::from_value(&v).map_err(QmpError::from)
}

/// What a QMP server serves: the commands beyond the protocol's own
/// (`qmp_capabilities`, `query-version`, `query-commands`).
pub trait Monitor: Send + Sync + 'static {
    /// The names of the commands [`Monitor::execute`] knows.
    fn commands(&self) -> Vec<&'static str>;
    /// Runs one command. Unknown names are answered by the server.
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;
}

/// Sends events to every client that has finished negotiation.
#[derive(Clone, Default)]
pub struct Events {
    clients: Arc<Mutex<Vec<SyncSender<Value>>>>,
}

impl Events {
    /// Emits event `name` with `data` (QEMU omits `data` when empty).
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut ev = json!({
            "event": name,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let Some(d) = data {
            ev["data"] = d;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain(|c| match c.try_send(ev.clone()) {
            Ok(()) => true,
            // A client that does not read its socket loses events, not the
            // daemon its progress.
            Err(TrySendError::Full(_)) => {
                eprintln!("blkvm: QMP client is not reading; dropped event {name}");
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    fn subscribe(&self, tx: SyncSender<Value>) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
    }
}

/// Where a QMP server listens, from `--qmp unix:PATH,server=on,wait=off` or
/// from `--chardev socket,id=ID,path=PATH,server=on,wait=off` plus
/// `--monitor chardev=ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpAddr {
    /// The unix socket's path.
    pub path: PathBuf,
}

/// Parses `--qmp unix:PATH[,server=on][,wait=off]`.
pub fn parse_qmp_arg(arg: &str) -> Result<QmpAddr> {
    let Some(rest) = arg.strip_prefix("unix:") else {
        bail!("--qmp {arg}: only 'unix:PATH,server=on,wait=off' is supported");
    };
    // The path may itself contain commas written as ',,'.
    let (path, opts) = split_escaped(rest);
    for o in opts {
        match o.as_str() {
            "server" | "server=on" => {}
            "wait=off" | "nowait" => {}
            "server=off" => bail!("--qmp {arg}: blkvm only listens (server=on)"),
            "wait=on" => bail!("--qmp {arg}: wait=on is not supported; use wait=off"),
            other => bail!("--qmp {arg}: Invalid parameter '{other}'"),
        }
    }
    if path.is_empty() {
        bail!("--qmp {arg}: the socket path is empty");
    }
    Ok(QmpAddr {
        path: PathBuf::from(path),
    })
}

/// Splits `a,,b,c=d` into `a,b` and `[c=d]`.
fn split_escaped(s: &str) -> (String, Vec<String>) {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    let first = parts.remove(0);
    (first, parts)
}

/// Parses `--chardev` options (unix sockets only), refusing duplicate ids.
pub fn parse_chardevs(chardevs: &[String]) -> Result<Vec<ChardevSocketOptions>> {
    let mut defs = Vec::new();
    for c in chardevs {
        let d: ChardevSocketOptions =
            qapi::parse_option_as(c, Some("backend")).with_context(|| format!("--chardev {c}"))?;
        if d.backend != "socket" {
            bail!(
                "--chardev {c}: only the 'socket' backend is supported, not '{}'",
                d.backend
            );
        }
        if d.wait == Some(true) {
            bail!("--chardev {c}: wait=on is not supported; use wait=off");
        }
        if d.server == Some(true) && d.reconnect_ms.is_some() {
            bail!("--chardev {c}: 'reconnect-ms' option is incompatible with 'server'");
        }
        if defs.iter().any(|x: &ChardevSocketOptions| x.id == d.id) {
            bail!("--chardev {c}: duplicate chardev id '{}'", d.id);
        }
        defs.push(d);
    }
    Ok(defs)
}

/// Resolves qemu-storage-daemon's `--chardev` and `--monitor` options into
/// the sockets to serve.
pub fn monitors_from_chardevs(chardevs: &[String], monitors: &[String]) -> Result<Vec<QmpAddr>> {
    let defs = parse_chardevs(chardevs)?;
    let mut out = Vec::new();
    for m in monitors {
        let o: MonitorOptions =
            qapi::parse_option_as(m, Some("chardev")).with_context(|| format!("--monitor {m}"))?;
        let _ = (&o.id, o.pretty);
        if o.mode.as_deref().is_some_and(|x| x != "control") {
            bail!("--monitor {m}: only mode=control (QMP) is supported");
        }
        let d = defs
            .iter()
            .find(|d| d.id == o.chardev)
            .with_context(|| format!("--monitor {m}: chardev '{}' not found", o.chardev))?;
        if d.server != Some(true) {
            bail!(
                "--monitor {m}: chardev '{}' is not a server socket (server=on)",
                d.id
            );
        }
        out.push(QmpAddr {
            path: PathBuf::from(&d.path),
        });
    }
    Ok(out)
}

/// A listening QMP server.
pub struct QmpServer {
    path: PathBuf,
    /// The listening socket, to wake the accept thread on shutdown.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    clients: Arc<Mutex<Vec<Client>>>,
}

struct Client {
    /// The connection, for shutdown to stop the reader. The writer, which
    /// ends last, closes it, so a finished session holds no fd until the
    /// next client connects.
    stream: Arc<Mutex<Option<UnixStream>>>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl QmpServer {
    /// Listens on `addr` and serves `monitor` to every client that connects.
    pub fn start(addr: &QmpAddr, monitor: Arc<dyn Monitor>, events: Events) -> Result<Self> {
        let _ = std::fs::remove_file(&addr.path);
        let listener = UnixListener::bind(&addr.path)
            .with_context(|| format!("could not listen on '{}'", addr.path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Arc<Mutex<Vec<Client>>> = Arc::default();
        let (t_stop, t_clients) = (stop.clone(), clients.clone());
        let waker = listener
            .try_clone()
            .context("could not keep a handle on the QMP socket")?;
        let accept = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                sandbox::enter(sandbox::ThreadKind::Monitor);
                for conn in listener.incoming() {
                    if t_stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let stream = match conn {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("blkvm: QMP accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    match spawn_client(stream, monitor.clone(), events.clone()) {
                        Ok(c) => {
                            let mut cs = t_clients.lock().unwrap_or_else(|p| p.into_inner());
                            cs.retain_mut(|c| !c.finished());
                            cs.push(c);
                        }
                        Err(e) => eprintln!("blkvm: QMP client: {e:#}"),
                    }
                }
            })
            .context("could not start the QMP thread")?;
        Ok(QmpServer {
            path: addr.path.clone(),
            listener: waker,
            stop,
            accept: Some(accept),
            clients,
        })
    }

    /// Stops accepting, lets every client's queued replies and events go
    /// out (for a moment at most), closes the connections and the socket.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread: shutdown() of a listening socket makes
        // accept() fail at once on Linux (a connect() to the path would
        // miss if another process has taken the path since).
        // SAFETY: shutdown on a socket fd this server owns; no memory is
        // passed.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let clients = std::mem::take(&mut *self.clients.lock().unwrap_or_else(|p| p.into_inner()));
        for mut c in clients {
            // The reader stops when its socket is shut for reading; the
            // writer then drains its queue and ends.
            if let Some(s) = lock_stream(&c.stream).as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
            if let Some(t) = c.reader.take() {
                let _ = t.join();
            }
            if let Some(t) = c.writer.take() {
                let _ = t.join();
            }
            if let Some(s) = lock_stream(&c.stream).take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

impl Client {
    fn finished(&mut self) -> bool {
        self.reader.as_ref().is_some_and(|t| t.is_finished())
            && self.writer.as_ref().is_some_and(|t| t.is_finished())
    }
}

fn spawn_client(stream: UnixStream, monitor: Arc<dyn Monitor>, events: Events) -> Result<Client> {
    let (tx, rx) = sync_channel::<Value>(CLIENT_QUEUE);
    let w_stream = stream.try_clone()?;
    // A client that stops reading must not hold its writer forever.
    w_stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let r_stream = stream.try_clone()?;
    let stream = Arc::new(Mutex::new(Some(stream)));
    let own = stream.clone();
    let writer = std::thread::Builder::new()
        .name("qmp-writer".into())
        .spawn(move || {
            sandbox::enter(sandbox::ThreadKind::Monitor);
            write_loop(w_stream, rx);
            // The session is over: its last fd goes now.
            drop(lock_stream(&own).take());
        })?;
    let reader = std::thread::Builder::new()
        .name("qmp-client".into())
        .spawn(move || {
            sandbox::enter(sandbox::ThreadKind::Monitor);
            let mut session = Session::new(monitor, events, tx);
            session.run(r_stream);
            // The event list may still hold a sender: tell the writer.
            let _ = session.tx.send(Value::Null);
        })?;
    Ok(Client {
        stream,
        reader: Some(reader),
        writer: Some(writer),
    })
}

fn lock_stream(s: &Mutex<Option<UnixStream>>) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_loop(mut stream: UnixStream, rx: Receiver<Value>) {
    for msg in rx {
        // The reader's last word: everything before it has been written.
        if msg.is_null() {
            return;
        }
        let mut line = msg.to_string();
        line.push_str("\r\n");
        if stream.write_all(line.as_bytes()).is_err() {
            // The client went away; the reader notices on its side.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// The protocol's version as QEMU reports it in the greeting and in
/// `query-version`: blkvm's own version, and the QEMU release whose QMP
/// it follows in the package string.
fn version() -> Value {
    let v = env!("CARGO_PKG_VERSION");
    let mut it = v.split('.').map(|x| x.parse::<u64>().unwrap_or(0));
    json!({
        "qemu": {
            "major": it.next().unwrap_or(0),
            "minor": it.next().unwrap_or(0),
            "micro": it.next().unwrap_or(0),
        },
        "package": format!("blkvm {v}"),
    })
}

/// One client's side of the protocol, apart from its socket: bytes in
/// (any split), one reply per message out through the writer's queue,
/// in order. The reader thread feeds it what it reads; the fuzz target
/// feeds it directly.
pub struct Session {
    monitor: Arc<dyn Monitor>,
    events: Events,
    tx: SyncSender<Value>,
    negotiated: bool,
    splitter: Splitter,
    pieces: Vec<Piece>,
}

impl Session {
    /// A session before the greeting: replies and (after negotiation)
    /// events go to `tx`, which must be drained, as a client's writer
    /// thread does, or replies wait for room.
    pub fn new(monitor: Arc<dyn Monitor>, events: Events, tx: SyncSender<Value>) -> Self {
        Session {
            monitor,
            events,
            tx,
            negotiated: false,
            splitter: Splitter::new(MAX_MESSAGE, MAX_DEPTH),
            pieces: Vec::new(),
        }
    }

    /// Sends the greeting, the first thing a client reads.
    pub fn greet(&self) {
        self.send(json!({"QMP": {"version": version(), "capabilities": []}}));
    }

    /// Takes `bytes` from the client and answers every message they
    /// complete.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.splitter.feed(bytes, &mut self.pieces);
        let mut pieces = std::mem::take(&mut self.pieces);
        for p in pieces.drain(..) {
            let reply = match p {
                Piece::Message(m) => self.handle(&m),
                Piece::TooLarge => Some(error_reply(
                    None,
                    &QmpError::generic(format!(
                        "JSON parse error, message too large (the limit is {MAX_MESSAGE} bytes)"
                    )),
                )),
                Piece::TooDeep => Some(error_reply(
                    None,
                    &QmpError::generic(format!(
                        "JSON parse error, nesting too deep (the limit is {MAX_DEPTH})"
                    )),
                )),
            };
            if let Some(r) = reply {
                self.send(r);
            }
        }
        // Keep the allocation for the next read.
        self.pieces = pieces;
    }

    fn run(&mut self, mut stream: UnixStream) {
        self.greet();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            self.feed(&buf[..n]);
        }
    }

    fn send(&self, v: Value) {
        // Replies wait for room: they are answers the client asked for.
        let _ = self.tx.send(v);
    }

    fn handle(&mut self, text: &[u8]) -> Option<Value> {
        let v: Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(e) => {
                return Some(error_reply(
                    None,
                    &QmpError::generic(format!("JSON parse error, {e}")),
                ))
            }
        };
        let Value::Object(mut msg) = v else {
            return Some(error_reply(
                None,
                &QmpError::generic("QMP input must be a JSON object"),
            ));
        };
        let id = msg.remove("id");
        let (name, args) = match parse_command(msg) {
            Ok(x) => x,
            Err(e) => return Some(error_reply(id, &e)),
        };
        let result = self.dispatch(&name, &args);
        Some(match result {
            Ok(ret) => {
                let mut r = json!({"return": ret});
                if let Some(id) = id {
                    r["id"] = id;
                }
                r
            }
            Err(e) => error_reply(id, &e),
        })
    }

    fn dispatch(&mut self, name: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
        if name == "qmp_capabilities" {
            if self.negotiated {
                return Err(QmpError {
                    class: ErrorClass::CommandNotFound,
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                });
            }
            let caps: QmpCapabilitiesArgs = args(a)?;
            if let Some(c) = caps.enable.first() {
                return Err(QmpError::generic(format!("Capability '{c}' not available")));
            }
            self.negotiated = true;
            // Events flow once negotiation is complete, as in QEMU.
            self.events.subscribe(self.tx.clone());
            return Ok(json!({}));
        }
        if !self.negotiated {
            return Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            });
        }
        match name {
            "query-version" => {
                no_args(a)?;
                Ok(version())
            }
            "query-commands" => {
                no_args(a)?;
                let mut names = vec!["qmp_capabilities", "query-version", "query-commands"];
                names.extend(self.monitor.commands());
                Ok(Value::Array(
                    names.into_iter().map(|n| json!({"name": n})).collect(),
                ))
            }
            _ if self.monitor.commands().contains(&name) => self.monitor.execute(name, a),
            _ => Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: format!("The command {name} has not been found"),
            }),
        }
    }
}

/// Checks a command that takes no arguments.
pub fn no_args(a: &Map<String, Value>) -> Result<(), QmpError> {
    match a.keys().next() {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// The command name and arguments of a QMP input object.
fn parse_command(msg: Map<String, Value>) -> Result<(String, Map<String, Value>), QmpError> {
    let mut name = None;
    let mut args = Map::new();
    for (k, v) in msg {
        match k.as_str() {
            "execute" => match v {
                Value::String(s) => name = Some(s),
                _ => {
                    return Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
            },
            "arguments" => match v {
                Value::Object(m) => args = m,
                _ => {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
            },
            "exec-oob" => {
                return Err(QmpError::generic(
                    "QMP input member 'exec-oob' is unexpected: out-of-band execution was not negotiated",
                ))
            }
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    let name = name.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok((name, args))
}

fn error_reply(id: Option<Value>, e: &QmpError) -> Value {
    let mut r = json!({"error": {"class": e.class.as_str(), "desc": e.desc}});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

/// Whether a socket path is usable: used by callers to give a clear error
/// before threads start.
pub fn check_path(path: &Path) -> Result<()> {
    if path.as_os_str().len() >= 108 {
        bail!(
            "QMP socket path '{}' is too long for a unix socket (108 bytes at most)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
