//! The NBD server's transmission phase: one connection
//! ([`NbdConnection`]) as a non-blocking state machine an event loop
//! drives: bytes in, requests on the node's queue, replies out. Many
//! requests are in flight per connection; replies go out in the order the
//! node finishes them (the client matches cookies). The handshake before
//! it is [`super::handshake`].
//!
//! Untrusted input: a bad magic, an unknown command with a payload, or a
//! payload over `MAX_PAYLOAD` ends the connection (the stream cannot be
//! resynchronised); a bad request that can be answered gets its error
//! (EINVAL, EPERM, ENOSPC, EOVERFLOW) and the connection goes on.

use std::io::{self, Read, Write};

pub use super::handshake::{handshake, Handshake, NbdExportInfo, Negotiated};
use super::proto::*;
use crate::{Completion, IovecPool, NodeQueue, Request};

/// A page-aligned data buffer: O_DIRECT nodes take it as it is (a plain
/// heap `Vec` would send them to their bounce or thread path).
#[derive(Default)]
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

impl AlignedBuf {
    /// Resizes to `len` bytes (contents unspecified).
    fn set_len(&mut self, len: usize) {
        let pages = len.div_ceil(4096);
        if self.pages.len() < pages {
            self.pages.resize(pages, Page([0; 4096]));
        }
        self.len = len;
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pages.as_mut_ptr().cast()
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `pages` holds at least `len` initialised bytes
        // (`set_len`), contiguous as a Vec's elements are.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast(), self.len) }
    }

    fn capacity(&self) -> usize {
        self.pages.len() * 4096
    }
}

/// Requests started between two flushes of the replies ready.
const REPLY_CHUNK: usize = 8;

/// Bytes of READ data in flight or waiting to be sent before a
/// connection stops reading requests: a client that asks and never reads
/// the answers holds this much of the server's memory, not more.
const MAX_BACKLOG: usize = 64 << 20;

/// Requests in flight per connection before it stops reading.
const MAX_IN_FLIGHT: usize = 256;

struct Pending {
    cookie: u64,
    /// READ's offset (its structured reply chunk carries it).
    offset: u64,
    /// READ's data buffer (its reply carries it).
    read: Option<AlignedBuf>,
    /// WRITE's payload, kept until the node is done with it.
    write: Option<AlignedBuf>,
}

/// What the event loop should watch next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Read the socket.
    pub read: bool,
    /// Write the socket (replies are waiting).
    pub write: bool,
}

/// One connection in the transmission phase.
pub struct NbdConnection {
    info: NbdExportInfo,
    neg: Negotiated,
    queue: Box<dyn NodeQueue>,
    input: Vec<u8>,
    output: Vec<u8>,
    out_pos: usize,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    done: Vec<Completion>,
    /// Bytes of the READs in flight.
    read_bytes: usize,
    /// Where socket reads land, made once (not 64 KiB zeroed per read).
    scratch: Box<[u8]>,
    /// Iovec vectors to reuse.
    iovecs: IovecPool,
    /// READ buffers to reuse (no allocation, no zeroing when warm).
    spare: Vec<AlignedBuf>,
    disconnecting: bool,
    closed: bool,
}

impl NbdConnection {
    /// A connection serving `info` through its own node `queue`.
    pub fn new(info: NbdExportInfo, neg: Negotiated, queue: Box<dyn NodeQueue>) -> Self {
        NbdConnection {
            info,
            neg,
            queue,
            input: Vec::with_capacity(64 << 10),
            output: Vec::with_capacity(64 << 10),
            out_pos: 0,
            slots: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            spare: Vec::new(),
            scratch: vec![0u8; 64 << 10].into_boxed_slice(),
            iovecs: IovecPool::default(),
            read_bytes: 0,
            disconnecting: false,
            closed: false,
        }
    }

    /// The node queue's completion fd.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.queue.completion_fd()
    }

    /// Requests the node has not finished.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether the connection is over (client gone, protocol error, or
    /// NBD_CMD_DISC with everything answered).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// What to watch.
    pub fn interest(&self) -> Interest {
        Interest {
            read: !self.closed
                && !self.disconnecting
                && self.in_flight() < MAX_IN_FLIGHT
                && self.read_bytes + (self.output.len() - self.out_pos) < MAX_BACKLOG,
            write: self.out_pos < self.output.len(),
        }
    }

    /// Reads what the socket has, starts every whole request.
    pub fn on_readable(&mut self, sock: &mut (impl Read + Write)) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            if !self.interest().read {
                break;
            }
            match sock.read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    self.parse(sock);
                    if n < buf.len() {
                        // A short read took what there was: save the
                        // read that would say EAGAIN.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        self.scratch = buf;
        // What the node finished inline (null-co, a cache hit) is taken
        // before the kick, which then has nothing to signal: answered in
        // this round, without a trip through the completion fd.
        self.on_completions();
        self.queue.kick();
    }

    /// Starts the whole requests in the input buffer.
    fn parse(&mut self, sock: &mut impl Write) {
        let mut at = 0;
        let mut started = 0;
        // Stop at the backlog or in-flight limit; the rest waits in
        // `input` until `resume`.
        while self.interest().read {
            if started > 0 && started % REPLY_CHUNK == 0 {
                // Answer what is done before starting more: a client
                // whose whole batch is answered at once waits for the
                // last of it, then refills while the server idles.
                self.on_completions();
                self.queue.kick();
                self.on_writable(sock);
            }
            let rest = &self.input[at..];
            let Some(h) = rest.get(..REQUEST_LEN) else {
                break;
            };
            let mut hb = [0u8; REQUEST_LEN];
            hb.copy_from_slice(h);
            let Ok(h) = RequestHeader::parse(&hb) else {
                self.closed = true;
                break;
            };
            if h.kind == cmd::WRITE && h.length > MAX_PAYLOAD {
                // Too big to buffer: the stream cannot go on.
                self.closed = true;
                break;
            }
            let need = REQUEST_LEN + h.payload_len();
            if rest.len() < need {
                break;
            }
            // Only WRITE has a payload; the rest leave the spares alone.
            let mut payload = if need > REQUEST_LEN {
                self.spare.pop().unwrap_or_default()
            } else {
                AlignedBuf::default()
            };
            payload.set_len(need - REQUEST_LEN);
            payload
                .as_mut_slice()
                .copy_from_slice(&rest[REQUEST_LEN..need]);
            at += need;
            self.start(h, payload);
            started += 1;
        }
        self.input.drain(..at);
    }

    fn reply_error(&mut self, cookie: u64, error: u32) {
        if self.neg.structured {
            error_chunk(&mut self.output, error, cookie);
        } else {
            simple_reply(&mut self.output, error, cookie);
        }
    }

    /// Answers BLOCK_STATUS at once (a blocking query of the node, as
    /// QEMU's is): base:allocation descriptors covering the range, or the
    /// first one with REQ_ONE.
    fn block_status(&mut self, h: RequestHeader) {
        /// Descriptors per reply, at most.
        const MAX_EXTENTS: usize = 2048;
        let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        let (mut at, end) = (h.offset, h.offset + u64::from(h.length));
        let mut n = 0;
        while at < end && n < MAX_EXTENTS {
            let (len, st) = match self.info.node.block_status(at, end - at) {
                Ok(x) => x,
                Err(_) => return self.reply_error(h.cookie, err::EIO),
            };
            let len = len.clamp(1, end - at);
            let flags = match st {
                crate::BlockStatus::Data => 0,
                crate::BlockStatus::Zero => state::ZERO,
                crate::BlockStatus::Hole => state::HOLE | state::ZERO,
            };
            d.extend_from_slice(&(len as u32).to_be_bytes());
            d.extend_from_slice(&flags.to_be_bytes());
            at += len;
            n += 1;
            if h.flags & cflag::REQ_ONE != 0 {
                break;
            }
        }
        chunk_header(
            &mut self.output,
            chunk::FLAG_DONE,
            chunk::BLOCK_STATUS,
            h.cookie,
            d.len() as u32,
        );
        self.output.extend_from_slice(&d);
    }

    fn slot(&mut self, p: Pending) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(p);
                i
            }
            None => {
                self.slots.push(Some(p));
                self.slots.len() - 1
            }
        }
    }

    fn start(&mut self, h: RequestHeader, payload: AlignedBuf) {
        let cap = self.info.node.capacity();
        let writable = self.info.writable && !self.info.node.read_only();
        let end = h.offset.checked_add(u64::from(h.length));
        let modifies = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        match h.kind {
            cmd::DISC => {
                self.disconnecting = true;
                return;
            }
            cmd::FLUSH => {}
            cmd::READ
            | cmd::WRITE
            | cmd::TRIM
            | cmd::WRITE_ZEROES
            | cmd::CACHE
            | cmd::BLOCK_STATUS => {
                if modifies && !writable {
                    return self.reply_error(h.cookie, err::EPERM);
                }
                if end.is_none_or(|e| e > cap) {
                    let e = if modifies { err::ENOSPC } else { err::EINVAL };
                    return self.reply_error(h.cookie, e);
                }
                if h.kind == cmd::READ && h.length > MAX_PAYLOAD {
                    return self.reply_error(h.cookie, err::EOVERFLOW);
                }
            }
            _ => return self.reply_error(h.cookie, err::EINVAL),
        }
        if h.kind == cmd::BLOCK_STATUS {
            if !self.neg.base_allocation || h.length == 0 {
                return self.reply_error(h.cookie, err::EINVAL);
            }
            return self.block_status(h);
        }
        if h.kind == cmd::CACHE || (h.length == 0 && h.kind != cmd::FLUSH) {
            // Nothing to do (CACHE is advisory).
            return simple_reply(&mut self.output, 0, h.cookie);
        }
        let fua = h.flags & cflag::FUA != 0;
        let (req, pending) = match h.kind {
            cmd::READ => {
                let mut buf = self.spare.pop().unwrap_or_default();
                buf.set_len(h.length as usize);
                let mut iov = self.iovecs.take();
                iov.push(libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len,
                });
                // SAFETY: the iovec points at `buf`, which the pending
                // slot keeps (a Vec's heap buffer does not move) until
                // the node completes the request.
                let req = unsafe { Request::read(h.offset, iov) };
                (
                    req,
                    Pending {
                        cookie: h.cookie,
                        offset: h.offset,
                        read: Some(buf),
                        write: None,
                    },
                )
            }
            cmd::WRITE => {
                let mut buf = payload;
                let mut iov = self.iovecs.take();
                iov.push(libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len,
                });
                // SAFETY: as for READ; the slot keeps the payload.
                let req = unsafe { Request::write(h.offset, iov, fua) };
                (
                    req,
                    Pending {
                        cookie: h.cookie,
                        offset: h.offset,
                        read: None,
                        write: Some(buf),
                    },
                )
            }
            cmd::TRIM => (
                Request::discard(h.offset, u64::from(h.length)),
                Pending {
                    cookie: h.cookie,
                    offset: h.offset,
                    read: None,
                    write: None,
                },
            ),
            cmd::WRITE_ZEROES => (
                Request::write_zeroes(h.offset, u64::from(h.length), h.flags & cflag::NO_HOLE == 0),
                Pending {
                    cookie: h.cookie,
                    offset: h.offset,
                    read: None,
                    write: None,
                },
            ),
            _ => (
                Request::flush(),
                Pending {
                    cookie: h.cookie,
                    offset: h.offset,
                    read: None,
                    write: None,
                },
            ),
        };
        let reading = pending.read.as_ref().map_or(0, |b| b.len);
        let idx = self.slot(pending);
        if let Err(mut e) = self.queue.submit(req.with_user_data(idx as u64)) {
            self.iovecs.give(e.request.take_iovecs());
            self.slots[idx] = None;
            self.free.push(idx);
            self.reply_error(h.cookie, err::from_errno(e.error.errno()));
        } else {
            self.read_bytes += reading;
        }
    }

    /// Starts requests left in the input buffer when a limit stopped
    /// them, once replies have drained (the socket may have nothing new
    /// to wake the connection with).
    pub fn resume(&mut self, sock: &mut impl Write) {
        if !self.input.is_empty() && self.interest().read {
            self.parse(sock);
            self.on_completions();
            self.queue.kick();
            self.on_writable(sock);
        }
    }

    /// Takes what the node finished and queues the replies.
    pub fn on_completions(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        self.queue.poll_completions(&mut done);
        for mut c in done.drain(..) {
            self.iovecs.give(c.request.take_iovecs());
            let idx = c.request.user_data as usize;
            let Some(p) = self.slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            self.free.push(idx);
            if let Some(w) = p.write {
                self.recycle(w);
            }
            if let Some(r) = &p.read {
                self.read_bytes -= r.len;
            }
            match (c.result, p.read) {
                (Ok(_), Some(buf)) if self.neg.structured => {
                    chunk_header(
                        &mut self.output,
                        chunk::FLAG_DONE,
                        chunk::OFFSET_DATA,
                        p.cookie,
                        8 + buf.len as u32,
                    );
                    self.output.extend_from_slice(&p.offset.to_be_bytes());
                    self.output.extend_from_slice(buf.as_slice());
                    self.recycle(buf);
                }
                (Ok(_), Some(buf)) => {
                    simple_reply(&mut self.output, 0, p.cookie);
                    self.output.extend_from_slice(buf.as_slice());
                    self.recycle(buf);
                }
                (Ok(_), None) => simple_reply(&mut self.output, 0, p.cookie),
                (Err(e), read) => {
                    if let Some(buf) = read {
                        self.recycle(buf);
                    }
                    self.reply_error(p.cookie, err::from_errno(e.errno()))
                }
            }
        }
        self.done = done;
    }

    /// Keeps a READ buffer for the next READ (a few, of modest size).
    fn recycle(&mut self, buf: AlignedBuf) {
        if self.spare.len() < 64 && buf.capacity() <= 1 << 20 {
            self.spare.push(buf);
        }
    }

    /// Writes queued replies; ends a disconnecting connection once all
    /// is answered.
    pub fn on_writable(&mut self, sock: &mut impl Write) {
        while self.out_pos < self.output.len() {
            match sock.write(&self.output[self.out_pos..]) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        if self.out_pos == self.output.len() {
            self.output.clear();
            self.out_pos = 0;
            if self.disconnecting && self.in_flight() == 0 {
                self.closed = true;
            }
        }
    }

    /// Waits for what is in flight and drops the results (the connection
    /// is going away; the node must not write into freed buffers).
    pub fn abandon(&mut self) {
        let mut done = Vec::new();
        while self.in_flight() > 0 && self.queue.in_flight() > 0 {
            self.queue.wait_completions(1, &mut done);
            for c in done.drain(..) {
                let idx = c.request.user_data as usize;
                if self.slots.get_mut(idx).and_then(Option::take).is_some() {
                    self.free.push(idx);
                }
            }
        }
    }
}

impl Drop for NbdConnection {
    fn drop(&mut self) {
        self.abandon();
    }
}
