//! The vhost-user-blk export: a node of the block graph served to a
//! vhost-user frontend (QEMU's `vhost-user-blk-pci`, libblkio, a VMM) on a
//! unix socket, on the same data plane as the VMM's virtio-blk devices.
//!
//! Two kinds of thread, as in the VMM:
//! - the export's control thread accepts one frontend at a time and runs
//!   its vhost-user requests ([`session`], on the `vhost` crate's request
//!   parser), like a vCPU thread writing a device's registers;
//! - each started vring is a [`QueueWorker`] on an [`IoThread`]: the
//!   frontend's kick fd in, its call fd out, the same worker, handler and
//!   busy-poll policy as a VMM device's queue. An export without
//!   `iothread=` gets one IOThread per queue of its own.
//!
//! The frontend's memory table feeds the RAM registrar, so guest RAM is
//! registered memory for every node that can use it. Node queues are
//! opened once per export and handed from worker to worker, so frontends
//! that come and go cost no fds. SIGTERM's [`VhostUserBlkExport::stop`]
//! completes in-flight requests into the rings, flushes the node and
//! closes the socket.

pub mod device;
mod memory;
mod session;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use block::{BlockBackend, BlockNode, RamRegistrar};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::iothread::{IoThread, IoThreadConfig, IoThreadError};
use crate::virtio_blk::config::{self, BlkOptions};
use crate::virtio_blk::{BlkQueueHandler, IoErrorHook, WorkerCounters};
use session::{Session, Stop};

/// Setting up an export failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// An option is out of range.
    #[error("invalid export options")]
    Options(#[from] config::BlkOptionsError),
    /// The node could not give a queue.
    #[error("could not open a node queue")]
    Queue(#[source] block::BlockError),
    /// The export's own IOThread could not start.
    #[error("could not start the export's iothread")]
    IoThread(#[source] IoThreadError),
    /// The socket could not be bound.
    #[error("could not listen on '{0}'")]
    Listen(String, #[source] io::Error),
    /// The control thread could not start.
    #[error("could not start the export thread")]
    Thread(#[source] io::Error),
}

/// What an export is made of.
pub struct VhostUserBlkExportConfig {
    /// Export id (QMP's `id`).
    pub id: String,
    /// The node served.
    pub node: Arc<dyn BlockNode>,
    /// What the frontend sees (queues, sizes, read-only, serial).
    pub opts: BlkOptions,
    /// Guest RAM goes here for the nodes that register memory.
    pub registrar: RamRegistrar,
    /// The IOThread serving every queue; `None`: one of its own per queue.
    pub iothread: Option<Arc<IoThread>>,
    /// The unix socket path to listen on (replaced if it exists).
    pub path: String,
    /// Start in write-through mode (`writethrough=on`).
    pub writethrough: bool,
    /// Host I/O errors are reported here (QMP `BLOCK_IO_ERROR`).
    pub io_error: Option<IoErrorHook>,
}

/// What the control thread and the sessions share.
struct ExportShared {
    id: String,
    node: Arc<dyn BlockNode>,
    /// The export's attachment to the node (its own statistics).
    backend: Arc<BlockBackend>,
    opts: BlkOptions,
    features: u64,
    registrar: RamRegistrar,
    iothreads: Vec<Arc<IoThread>>,
    /// IOThreads the export started itself (stopped with it).
    own_iothreads: bool,
    writethrough: Arc<AtomicBool>,
    counters: Arc<WorkerCounters>,
    /// Each queue's handler while no worker holds it.
    handlers: Mutex<Vec<Option<BlkQueueHandler>>>,
    /// Set on stop: no vring starts again.
    stopping: AtomicBool,
    /// The connected frontend: its session and a handle on its socket.
    current: Mutex<Option<(Arc<Mutex<Session>>, UnixStream)>>,
}

/// A running vhost-user-blk export.
pub struct VhostUserBlkExport {
    shared: Arc<ExportShared>,
    path: String,
    /// The listening socket, to wake the control thread's accept().
    listener: UnixListener,
    /// The socket file's inode, so stop removes only our own.
    socket_ino: Option<u64>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VhostUserBlkExport {
    /// Opens the node's queues, listens on the socket and serves frontends
    /// one at a time until [`VhostUserBlkExport::stop`].
    pub fn start(cfg: VhostUserBlkExportConfig) -> Result<Self, VhostUserBlkError> {
        let opts = cfg.opts;
        opts.check()?;
        let read_only = opts.read_only || cfg.node.read_only();
        let n = usize::from(opts.num_queues.max(1));
        let backend = Arc::new(BlockBackend::new(
            cfg.id.clone(),
            cfg.node.clone(),
            opts.backend_options(),
        ));
        let mut handlers = Vec::with_capacity(n);
        for _ in 0..n {
            let mut h =
                BlkQueueHandler::new(backend.clone(), &opts).map_err(VhostUserBlkError::Queue)?;
            h.set_io_error_hook(cfg.io_error.clone());
            handlers.push(Some(h));
        }
        let (iothreads, own_iothreads) = match cfg.iothread {
            Some(t) => (vec![t], false),
            None => {
                let mut v = Vec::with_capacity(n);
                for q in 0..n {
                    let name = format!("export-{}-q{q}", cfg.id);
                    let t = IoThread::new(&name, IoThreadConfig::default())
                        .map_err(VhostUserBlkError::IoThread)?;
                    v.push(t);
                }
                (v, true)
            }
        };
        let features =
            config::features(&opts, read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let _ = std::fs::remove_file(&cfg.path);
        let listener = UnixListener::bind(&cfg.path)
            .map_err(|e| VhostUserBlkError::Listen(cfg.path.clone(), e))?;
        let shared = Arc::new(ExportShared {
            id: cfg.id,
            node: cfg.node,
            backend,
            opts,
            features,
            registrar: cfg.registrar,
            iothreads,
            own_iothreads,
            writethrough: Arc::new(AtomicBool::new(cfg.writethrough)),
            counters: Arc::default(),
            handlers: Mutex::new(handlers),
            stopping: AtomicBool::new(false),
            current: Mutex::new(None),
        });
        let socket_ino = std::fs::metadata(&cfg.path).ok().map(|m| m.ino());
        let s = shared.clone();
        let waker = listener
            .try_clone()
            .map_err(|e| VhostUserBlkError::Listen(cfg.path.clone(), e))?;
        let thread = std::thread::Builder::new()
            .name(format!("export-{}", shared.id))
            .spawn(move || {
                sandbox::enter(sandbox::ThreadKind::Export);
                serve(&s, &listener)
            })
            .map_err(VhostUserBlkError::Thread)?;
        Ok(VhostUserBlkExport {
            shared,
            path: cfg.path,
            listener: waker,
            socket_ino,
            thread: Some(thread),
        })
    }

    /// The export's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The node served.
    pub fn node(&self) -> &Arc<dyn BlockNode> {
        &self.shared.node
    }

    /// The export's attachment to the node (its own statistics).
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.shared.backend
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        lock(&self.shared.current).is_some()
    }

    /// The IOThreads serving the queues.
    pub fn iothreads(&self) -> &[Arc<IoThread>] {
        &self.shared.iothreads
    }

    /// What the queue workers did, over all queues and frontends.
    pub fn counters(&self) -> &WorkerCounters {
        &self.shared.counters
    }

    /// Chains started over all queues and frontends (queues being served
    /// right now are counted when they stop).
    pub fn requests(&self) -> u64 {
        lock(&self.shared.handlers)
            .iter()
            .flatten()
            .map(|h| h.counters().requests)
            .sum()
    }

    /// Serves a frontend that is already connected (a socket accepted by
    /// someone else, or one end of a socketpair) on the calling thread,
    /// until it disconnects, breaks the protocol or the export stops.
    /// Frontends are served one at a time, so this fails with
    /// `ResourceBusy` while another one is connected.
    pub fn serve_connection(&self, stream: UnixStream) -> io::Result<()> {
        serve_frontend(&self.shared, stream)
    }

    /// Stops the export: completes every in-flight request into its ring,
    /// disconnects the frontend, flushes the node through the export's
    /// own queue and removes the socket. Idempotent.
    pub fn stop(&mut self) -> Result<(), block::RequestError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some((session, conn)) = lock(&self.shared.current).as_ref() {
            lock(session).stop_all(Stop::Drain);
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        // Wake an accept() that is waiting for a frontend: on Linux,
        // shutdown() of a listening socket makes it fail with EINVAL. (A
        // connect() to the path would miss if the path was unlinked or
        // taken by another process.)
        // SAFETY: shutdown on a socket fd this export owns; no memory is
        // passed.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = thread.join();
        // Remove the socket only if it is still ours.
        if let Ok(m) = std::fs::metadata(&self.path) {
            if self.socket_ino == Some(m.ino()) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        let flushed = match lock(&self.shared.handlers).first_mut() {
            Some(Some(h)) => h.flush_node(),
            _ => Ok(()),
        };
        if self.shared.own_iothreads {
            for t in &self.shared.iothreads {
                t.stop();
            }
        }
        flushed
    }
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The control thread: one frontend at a time until the export stops.
fn serve(shared: &Arc<ExportShared>, listener: &UnixListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("export '{}': could not accept a frontend: {e}", shared.id);
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if let Err(e) = serve_frontend(shared, stream) {
            eprintln!("export '{}': {e}", shared.id);
        }
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
    }
}

/// Serves the frontend connected on `stream` until it goes away, breaks
/// the protocol or the export stops.
fn serve_frontend(shared: &Arc<ExportShared>, stream: UnixStream) -> io::Result<()> {
    let conn = stream.try_clone()?;
    let session = Arc::new(Mutex::new(Session::new(shared.clone())));
    {
        let mut current = lock(&shared.current);
        if current.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "another frontend is connected",
            ));
        }
        *current = Some((session.clone(), conn));
    }
    // The frontend may have connected while stop() looked: recheck.
    if !shared.stopping.load(Ordering::SeqCst) {
        run_session(
            shared,
            BackendReqHandler::from_stream(stream, session.clone()),
        );
    }
    let stopping = shared.stopping.load(Ordering::SeqCst);
    // A frontend that went away leaves its requests' results behind;
    // on stop they were completed into the rings already.
    lock(&session).close(if stopping { Stop::Drain } else { Stop::Abandon });
    *lock(&shared.current) = None;
    Ok(())
}

/// Runs one frontend's requests until it disconnects. A request the
/// session refuses is answered (with REPLY_ACK) and logged, and the
/// session goes on. A request the `vhost` crate rejects before it reaches
/// the session (a feature that was not negotiated, a bad parameter, a
/// broken message) has had no answer, and a frontend that asked for one
/// would wait forever: those, and a broken socket, end the connection.
fn run_session(shared: &ExportShared, mut handler: BackendReqHandler<Mutex<Session>>) {
    loop {
        match handler.handle_request() {
            Ok(()) => {}
            Err(e) if session::refused(&e) => {
                eprintln!("export '{}': frontend request refused: {e}", shared.id);
            }
            Err(VuError::Disconnected | VuError::PartialMessage) => return,
            Err(e) => {
                if !shared.stopping.load(Ordering::SeqCst) {
                    eprintln!("export '{}': frontend connection ended: {e}", shared.id);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod message_tests;
#[cfg(test)]
mod tests;
