//! The `nbd` driver: a node whose data lives behind an NBD server
//! (`--blockdev driver=nbd,server.type=inet,server.host=H,server.port=P,
//! export=NAME` or `server.type=unix,server.path=S`).
//!
//! Shape (DESIGN.md, "Formats and network storage"):
//! - opening the node connects and negotiates once ([`handshake`]), which
//!   gives the size, the flags and the block sizes, and keeps that
//!   connection idle for the first queue;
//! - each data-plane queue ([`queue`]) owns one connection and runs it
//!   as a non-blocking state machine on its thread: requests go out with
//!   `sendmsg` straight from the caller's iovecs, replies land in the
//!   caller's buffers. A second queue of a writable node opens a second
//!   connection only when the server says `NBD_FLAG_CAN_MULTI_CONN` (a
//!   flush must cover every connection's writes); a read-only node opens
//!   as many as it has queues;
//! - a lost connection fails its requests with EIO, or, with
//!   `reconnect-delay=N`, keeps them up to N seconds and sends them again
//!   once a background thread has reconnected (QEMU's semantics).

pub mod handshake;
mod queue;
pub mod transport;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qapi::{BlockdevCommon, BlockdevOptionsNbd};

use self::handshake::{connect_socket, describe, negotiate, ExportInfo, TlsClient};
use self::transport::Transport;
use super::proto::*;
use crate::limits::BlockLimits;
use crate::nbd::tls::{TlsCredsX509, TlsEndpoint};
use crate::node::{BlockNode, BlockStatus, NodeCommon, NodeQueue};
use crate::stats::NodeStats;
use crate::BlockError;

/// What every connection of a node needs to reach its export.
pub(crate) struct Target {
    pub server: qapi::export::SocketAddress,
    pub export: String,
    /// `host:port` or the socket path, for messages.
    pub what: String,
    /// TLS, when `tls-creds` is set.
    pub tls: Option<TlsClient>,
}

impl Target {
    /// Connects and negotiates (blocking).
    pub fn connect(&self) -> io::Result<(Transport, ExportInfo)> {
        let s = connect_socket(&self.server)?;
        negotiate(s, &self.export, self.tls.as_ref())
    }
}

/// State shared by the node and its queues.
pub(crate) struct Shared {
    pub common: NodeCommon,
    pub target: Target,
    pub info: ExportInfo,
    pub reconnect_delay: Duration,
    pub stats: Arc<NodeStats>,
    /// Negotiated connections nobody uses (blocking mode).
    idle: Mutex<Vec<Transport>>,
    /// Queues open now (each holds a connection or is reconnecting).
    queues: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// An idle connection, or a new one.
    fn take_connection(&self) -> io::Result<Transport> {
        if let Some(s) = lock(&self.idle).pop() {
            return Ok(s);
        }
        let (s, info) = self.target.connect()?;
        self.check_same(&info)?;
        Ok(s)
    }

    /// A connection made after the first must reach the same export.
    pub fn check_same(&self, info: &ExportInfo) -> io::Result<()> {
        if info.size != self.info.size {
            return Err(io::Error::other(format!(
                "the export's size changed from {} to {} bytes",
                self.info.size, info.size
            )));
        }
        if info.has(tflag::READ_ONLY) && !self.info.has(tflag::READ_ONLY) {
            return Err(io::Error::other("the export became read-only"));
        }
        Ok(())
    }

    /// Hands back a healthy connection with nothing in flight.
    pub fn give_back(&self, s: Transport) {
        if s.set_nonblocking(false).is_ok() {
            lock(&self.idle).push(s);
        }
    }

    /// A queue went away.
    pub fn queue_closed(&self) {
        self.queues.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Say goodbye (NBD_CMD_DISC) on every idle connection.
        for mut s in lock(&self.idle).drain(..) {
            let mut m = Vec::with_capacity(REQUEST_LEN);
            request_header(&mut m, 0, cmd::DISC, 0, 0, 0);
            let _ = s.set_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(&m);
            s.shutdown();
        }
    }
}

/// Appends a compact request header.
pub(crate) fn request_header(
    out: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// The TLS side of a node from its `tls-creds-x509` object: the server's
/// certificate is checked against `tls-hostname`, or the host of an inet
/// address; over a unix socket without `tls-hostname` only its chain is.
fn tls_client(c: &TlsCredsX509, opts: &BlockdevOptionsNbd) -> Result<TlsClient, BlockError> {
    if c.endpoint != TlsEndpoint::Client {
        return Err(BlockError::Invalid(
            "Expecting TLS credentials with a client endpoint".into(),
        ));
    }
    let host = opts.tls_hostname.clone().or(match &opts.server {
        qapi::export::SocketAddress::Inet { host, .. } => Some(host.clone()),
        qapi::export::SocketAddress::Unix { .. } => None,
    });
    let bad = |e: crate::nbd::tls::NbdTlsError| BlockError::Invalid(format!("nbd: {e}"));
    let config = c.client_config(host.is_some()).map_err(bad)?;
    let name = crate::nbd::tls::server_name(host.as_deref()).map_err(bad)?;
    Ok(TlsClient { config, name })
}

/// The `nbd` node.
pub struct NbdNode {
    shared: Arc<Shared>,
}

impl NbdNode {
    pub(crate) fn open(
        name: String,
        common: &BlockdevCommon,
        opts: &BlockdevOptionsNbd,
        creds: Option<&TlsCredsX509>,
    ) -> Result<Self, BlockError> {
        let tls = match (&opts.tls_creds, creds) {
            (None, _) => None,
            (Some(id), None) => {
                return Err(BlockError::Invalid(format!(
                    "No TLS credentials with id '{id}'"
                )))
            }
            (Some(_), Some(c)) => Some(tls_client(c, opts)?),
        };
        let target = Target {
            what: describe(&opts.server),
            server: opts.server.clone(),
            export: opts.export.clone().unwrap_or_default(),
            tls,
        };
        let deadline = Instant::now() + Duration::from_secs(u64::from(opts.open_timeout));
        let (sock, info) = loop {
            match target.connect() {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(BlockError::Driver {
                        driver: "nbd",
                        path: if target.export.is_empty() {
                            target.what.clone()
                        } else {
                            format!("{} export '{}'", target.what, target.export)
                        },
                        source: e,
                    })
                }
            }
        };
        let mut read_only = common.read_only;
        if info.has(tflag::READ_ONLY) && !read_only {
            if !common.auto_read_only {
                return Err(BlockError::Invalid(format!(
                    "nbd: export '{}' on {} is read-only; open the node with read-only=on \
                     (or auto-read-only=on)",
                    target.export, target.what
                )));
            }
            read_only = true;
        }
        let shared = Shared {
            common: NodeCommon::new(name, common, read_only),
            target,
            info,
            reconnect_delay: Duration::from_secs(u64::from(opts.reconnect_delay)),
            stats: Arc::default(),
            idle: Mutex::new(vec![sock]),
            queues: AtomicUsize::new(0),
        };
        Ok(NbdNode {
            shared: Arc::new(shared),
        })
    }

    /// What the server negotiated (for tests and QMP).
    pub fn export_info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// Queries one extent with NBD_CMD_BLOCK_STATUS on an idle
    /// connection (blocking).
    fn query_status(
        &self,
        s: &mut Transport,
        offset: u64,
        len: u64,
    ) -> io::Result<(u64, BlockStatus)> {
        let id = self.shared.info.meta_id.unwrap_or(0);
        let len32 = len.min(u64::from(u32::MAX) & !4095).max(1) as u32;
        let mut m = Vec::with_capacity(REQUEST_LEN);
        request_header(&mut m, cflag::REQ_ONE, cmd::BLOCK_STATUS, 1, offset, len32);
        s.set_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&m)?;
        let mut found = None;
        let mut failed = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h[..4])?;
            let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            if magic == SIMPLE_REPLY_MAGIC {
                s.read_exact(&mut h[4..16])?;
                let e = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                failed = Some(if e == 0 { err::EIO } else { e });
                break;
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply magic {magic:#x}"),
                ));
            }
            s.read_exact(&mut h[4..20])?;
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let kind = u16::from_be_bytes([h[6], h[7]]);
            let plen = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
            if plen > 1 << 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("block status chunk of {plen} bytes"),
                ));
            }
            let mut p = vec![0u8; plen as usize];
            s.read_exact(&mut p)?;
            if kind == chunk::BLOCK_STATUS && p.len() >= 12 && found.is_none() {
                let be32 = |o: usize| u32::from_be_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
                if be32(0) == id {
                    found = Some((u64::from(be32(4)), be32(8)));
                }
            } else if kind & (1 << 15) != 0 {
                failed = Some(if p.len() >= 4 {
                    u32::from_be_bytes([p[0], p[1], p[2], p[3]])
                } else {
                    err::EIO
                });
            }
            if flags & chunk::FLAG_DONE != 0 {
                break;
            }
        }
        s.set_timeout(None)?;
        if let Some(e) = failed {
            return Err(io::Error::from_raw_os_error(e as i32));
        }
        let (n, st) = found.ok_or_else(|| io::Error::other("no base:allocation extent"))?;
        if n == 0 || n > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("extent of {n} bytes for a query of {len}"),
            ));
        }
        let status = if st & state::ZERO != 0 {
            if st & state::HOLE != 0 {
                BlockStatus::Hole
            } else {
                BlockStatus::Zero
            }
        } else {
            // A hole whose contents are not promised to be zero is data
            // as far as a reader is concerned.
            BlockStatus::Data
        };
        Ok((n, status))
    }
}

impl BlockNode for NbdNode {
    fn node_name(&self) -> &str {
        &self.shared.common.name
    }
    fn driver(&self) -> &'static str {
        "nbd"
    }
    fn capacity(&self) -> u64 {
        self.shared.info.size
    }
    fn filename(&self) -> Option<&str> {
        Some(&self.shared.target.what)
    }
    fn limits(&self) -> BlockLimits {
        let i = &self.shared.info;
        BlockLimits {
            request_alignment: i.min_block.max(1),
            optimal_io_size: i.pref_block,
            max_transfer: i.max_block,
            discard_granularity: if i.has(tflag::SEND_TRIM) {
                i.min_block.max(512)
            } else {
                0
            },
            max_discard: u64::from(u32::MAX) & !4095,
            max_write_zeroes: u64::from(u32::MAX) & !4095,
            ..BlockLimits::default()
        }
    }
    fn read_only(&self) -> bool {
        self.shared.common.read_only
    }
    fn options(&self) -> crate::node::NodeOptions {
        self.shared.common.options()
    }
    fn stats(&self) -> &NodeStats {
        &self.shared.stats
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        let sh = &self.shared;
        let others = sh.queues.fetch_add(1, Ordering::SeqCst);
        // Without multi-conn a flush on one connection need not cover
        // writes made on another: a writable node keeps to one. Readers
        // need no such promise.
        if others > 0 && !sh.info.has(tflag::CAN_MULTI_CONN) && !sh.common.read_only {
            sh.queues.fetch_sub(1, Ordering::SeqCst);
            return Err(BlockError::Invalid(format!(
                "nbd: the server at {} does not allow multiple connections \
                 (no NBD_FLAG_CAN_MULTI_CONN), so writable node '{}' serves one queue",
                sh.target.what, sh.common.name
            )));
        }
        let sock = match sh.take_connection() {
            Ok(s) => s,
            Err(e) => {
                sh.queues.fetch_sub(1, Ordering::SeqCst);
                return Err(BlockError::Driver {
                    driver: "nbd",
                    path: sh.target.what.clone(),
                    source: e,
                });
            }
        };
        match queue::NbdQueue::new(self.shared.clone(), sock) {
            Ok(q) => Ok(Box::new(q)),
            Err(e) => {
                sh.queues.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, BlockStatus), BlockError> {
        let sh = &self.shared;
        let len = len.min(sh.info.size.saturating_sub(offset));
        if sh.info.meta_id.is_none() || len == 0 {
            return Ok((len.max(1), BlockStatus::Data));
        }
        // An idle connection, or (multi-conn) a new one; with neither,
        // the answer is "data", which is always true enough.
        let idle = lock(&sh.idle).pop();
        let sock = match idle {
            Some(s) => Some(s),
            None if sh.info.has(tflag::CAN_MULTI_CONN) || sh.common.read_only => {
                sh.take_connection().ok()
            }
            None => None,
        };
        let Some(mut sock) = sock else {
            return Ok((len, BlockStatus::Data));
        };
        match self.query_status(&mut sock, offset, len) {
            Ok(r) => {
                lock(&sh.idle).push(sock);
                Ok(r)
            }
            Err(e) if e.raw_os_error().is_some() => {
                lock(&sh.idle).push(sock);
                Err(BlockError::Os {
                    what: format!("query block status of '{}'", sh.common.name),
                    source: e,
                })
            }
            // The stream is out of step: drop the connection.
            Err(e) => Err(BlockError::Os {
                what: format!("query block status of '{}'", sh.common.name),
                source: e,
            }),
        }
    }
}
