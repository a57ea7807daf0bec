//! The NBD server's transmission phase: one connection
//! ([`NbdConnection`]) as a non-blocking state machine an event loop
//! drives: bytes in, requests on the node's queue, replies out. Many
//! requests are in flight per connection; replies go out in the order the
//! node finishes them (the client matches cookies). The handshake before
//! it is [`super::handshake`].
//!
//! Replies take the negotiated shape: simple replies; structured chunks
//! for data, errors and block status (NBD_OPT_STRUCTURED_REPLY); or with
//! NBD_OPT_EXTENDED_HEADERS 32-byte requests with 64-bit lengths and
//! extended chunks for every reply (a success without data is a final
//! NBD_REPLY_TYPE_NONE, block status is NBD_REPLY_TYPE_BLOCK_STATUS_EXT).
//!
//! Untrusted input: a bad magic, an unknown command with a payload, or a
//! payload over `MAX_PAYLOAD` ends the connection (the stream cannot be
//! resynchronised); a bad request that can be answered gets its error
//! (EINVAL, EPERM, ENOSPC, EOVERFLOW, ENOTSUP) and the connection goes on.
//! With extended headers, a payload on a command that takes none
//! (NBD_CMD_FLAG_PAYLOAD_LEN) is skipped and refused with EINVAL, as QEMU
//! does.

use std::io::{self, Read, Write};

pub use super::handshake::{handshake, Handshake, NbdExportInfo, NbdSession, Negotiated};
use super::proto::*;
use crate::bounce::{BounceBuf, BouncePool};
use crate::{Completion, IovecPool, NodeQueue, RamRegistrar, RegionId, Request, RequestFlags};

/// A page-aligned data buffer: O_DIRECT nodes take it as it is (a plain
/// heap `Vec` would send them to their bounce or thread path).
#[derive(Default)]
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
    /// A buffer of the connection's registered pool, used instead of
    /// `pages` when set.
    pooled: Option<BounceBuf>,
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
        match &self.pooled {
            Some(b) => b.addr,
            None => self.pages.as_mut_ptr().cast(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        let p: *const u8 = match &self.pooled {
            Some(b) => b.addr,
            None => self.pages.as_ptr().cast(),
        };
        // SAFETY: `pages` holds at least `len` initialised bytes
        // (`set_len`), contiguous as a Vec's elements are; a pooled
        // buffer is `b.len >= len` bytes of the pool's mapping, which the
        // connection owns, and memfd pages read as zeroes until written.
        unsafe { std::slice::from_raw_parts(p, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let p = self.as_mut_ptr();
        // SAFETY: as in `as_slice`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(p, self.len) }
    }

    fn capacity(&self) -> usize {
        match &self.pooled {
            Some(b) => b.len,
            None => self.pages.len() * 4096,
        }
    }
}

/// Whether `b` holds only zeroes (64 bytes at a time: the OR of a block
/// vectorises, and data that is not zero usually says so at once).
fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    blocks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Buffers of a connection's registered pool, and their size: requests
/// up to this size use registered memory (io_uring fixed buffers, libblkio
/// regions); larger ones take heap buffers.
const POOL_BUFS: usize = 16;
const POOL_BUF_SIZE: usize = 128 << 10;

/// A connection's buffer pool, registered with the graph's RAM registrar
/// for as long as the connection lives.
struct Registered {
    pool: BouncePool,
    registrar: RamRegistrar,
    id: RegionId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registrar.remove(self.id);
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
    /// The request's offset (READ's data chunk and extended reply
    /// headers carry it).
    offset: u64,
    /// READ's data buffer (its reply carries it).
    read: Option<AlignedBuf>,
    /// WRITE's payload, kept until the node is done with it.
    write: Option<AlignedBuf>,
    /// A READ whose zeroes may be answered as a hole (structured replies
    /// and no NBD_CMD_FLAG_DF).
    sparse: bool,
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
    /// Requests taken off the wire so far (a poller's sign of progress).
    requests: u64,
    /// Registered buffers, when the server has a registrar. Declared
    /// after `queue`: dropped after it (and after `Drop` waited for what
    /// was in flight).
    registered: Option<Registered>,
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
            requests: 0,
            registered: None,
        }
    }

    /// The node queue's completion fd.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.queue.completion_fd()
    }

    /// Serves READ and WRITE data of up to 128 KiB from a pool registered
    /// with `registrar` (the graph's), so nodes that register memory (io_uring
    /// fixed buffers, libblkio regions) take it without a bounce; the pool
    /// is unregistered when the connection ends.
    pub fn use_registered_buffers(
        &mut self,
        registrar: &RamRegistrar,
    ) -> Result<(), crate::BlockError> {
        let pool = BouncePool::new(POOL_BUFS, POOL_BUF_SIZE, 4096)?;
        let id = registrar.add(pool.region());
        self.registered = Some(Registered {
            pool,
            registrar: registrar.clone(),
            id,
        });
        Ok(())
    }

    /// A data buffer of `len` bytes: from the registered pool when it fits
    /// and one is free, else a heap buffer.
    fn take_buf(&mut self, len: usize) -> AlignedBuf {
        if let Some(r) = &mut self.registered {
            if len <= r.pool.buf_size() {
                if let Some(b) = r.pool.try_take() {
                    return AlignedBuf {
                        pages: Vec::new(),
                        len,
                        pooled: Some(b),
                    };
                }
            }
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.set_len(len);
        buf
    }

    /// Whether the node has completions to take, found without a system
    /// call where the engine allows (a busy poller asks first).
    pub fn completions_ready(&mut self) -> bool {
        self.queue.completions_ready()
    }

    /// Requests taken off the wire since the connection began.
    pub fn requests(&self) -> u64 {
        self.requests
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
            let extended = self.neg.extended;
            let h = match RequestHeader::parse_prefix(rest, extended) {
                None => break,
                Some(Ok(h)) => h,
                Some(Err(_)) => {
                    self.closed = true;
                    break;
                }
            };
            let payload = h.payload_len(extended);
            if payload > u64::from(MAX_PAYLOAD) {
                // Too big to buffer: the stream cannot go on.
                self.closed = true;
                break;
            }
            let hlen = RequestHeader::wire_len(extended);
            let need = hlen + payload as usize;
            if rest.len() < need {
                break;
            }
            at += need;
            started += 1;
            self.requests += 1;
            if h.kind != cmd::WRITE && payload > 0 {
                // A payload the command does not take (PAYLOAD_LEN):
                // skipped, and the request refused.
                self.reply_error(h.cookie, h.offset, err::EINVAL);
                continue;
            }
            // Only WRITE has a payload; the rest leave the spares alone.
            let mut buf = if payload > 0 {
                self.take_buf(payload as usize)
            } else {
                AlignedBuf::default()
            };
            buf.as_mut_slice()
                .copy_from_slice(&self.input[at - payload as usize..at]);
            self.start(h, buf);
        }
        self.input.drain(..at);
    }

    /// A reply chunk's header in the negotiated shape (structured or
    /// extended).
    fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) {
        if self.neg.extended {
            extended_chunk_header(&mut self.output, flags, kind, cookie, offset, len);
        } else {
            chunk_header(&mut self.output, flags, kind, cookie, len as u32);
        }
    }

    /// A success without data: a simple reply, or a final NONE chunk
    /// where a simple one may not answer (extended headers; a READ with
    /// structured replies).
    fn reply_ok(&mut self, cookie: u64, offset: u64, read: bool) {
        if self.neg.extended || (self.neg.structured && read) {
            self.chunk(chunk::FLAG_DONE, chunk::NONE, cookie, offset, 0);
        } else {
            simple_reply(&mut self.output, 0, cookie);
        }
    }

    fn reply_error(&mut self, cookie: u64, offset: u64, error: u32) {
        if self.neg.structured {
            self.chunk(chunk::FLAG_DONE, chunk::ERROR, cookie, offset, 6);
            self.output.extend_from_slice(&error.to_be_bytes());
            self.output.extend_from_slice(&0u16.to_be_bytes());
        } else {
            simple_reply(&mut self.output, error, cookie);
        }
    }

    /// Answers BLOCK_STATUS at once (a blocking query of the node, as
    /// QEMU's is): base:allocation descriptors covering the range, or the
    /// first one with REQ_ONE; 64-bit ones with extended headers.
    fn block_status(&mut self, h: RequestHeader) {
        /// Descriptors per reply, at most.
        const MAX_EXTENTS: usize = 2048;
        let mut extents = Vec::new();
        let (mut at, end) = (h.offset, h.offset + h.length);
        while at < end && extents.len() < MAX_EXTENTS {
            let (len, st) = match self.info.node.block_status(at, end - at) {
                Ok(x) => x,
                Err(_) => return self.reply_error(h.cookie, h.offset, err::EIO),
            };
            // Without extended headers `end - at` fits in 32 bits.
            let len = len.clamp(1, end - at);
            let flags = match st {
                crate::BlockStatus::Data => 0,
                crate::BlockStatus::Zero => state::ZERO,
                crate::BlockStatus::Hole => state::HOLE | state::ZERO,
            };
            extents.push((len, flags));
            at += len;
            if h.flags & cflag::REQ_ONE != 0 {
                break;
            }
        }
        let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        let kind = if self.neg.extended {
            d.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for (len, flags) in extents {
                d.extend_from_slice(&len.to_be_bytes());
                d.extend_from_slice(&u64::from(flags).to_be_bytes());
            }
            chunk::BLOCK_STATUS_EXT
        } else {
            for (len, flags) in extents {
                d.extend_from_slice(&(len as u32).to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
            }
            chunk::BLOCK_STATUS
        };
        self.chunk(chunk::FLAG_DONE, kind, h.cookie, h.offset, d.len() as u64);
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

    /// The command flags `kind` takes in the negotiated mode; `None` for
    /// an unknown command.
    fn valid_flags(&self, kind: u16) -> Option<u16> {
        let extra = match kind {
            cmd::READ if self.neg.structured => cflag::DF,
            cmd::WRITE if self.neg.extended => cflag::PAYLOAD_LEN,
            cmd::WRITE_ZEROES => cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            cmd::READ | cmd::WRITE | cmd::DISC | cmd::FLUSH | cmd::TRIM | cmd::CACHE => 0,
            _ => return None,
        };
        Some(cflag::FUA | extra)
    }

    fn start(&mut self, h: RequestHeader, payload: AlignedBuf) {
        // A WRITE payload the request does not take goes back to its pool.
        if let Some(unused) = self.start_checked(h, payload) {
            self.recycle(unused);
        }
    }

    /// Checks and starts one request; returns the payload if unused.
    fn start_checked(&mut self, h: RequestHeader, payload: AlignedBuf) -> Option<AlignedBuf> {
        let mut payload = Some(payload);
        let cap = self.info.node.capacity();
        let writable = self.info.writable && !self.info.node.read_only();
        let end = h.offset.checked_add(h.length);
        let modifies = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        let (cookie, offset) = (h.cookie, h.offset);
        let Some(valid) = self.valid_flags(h.kind) else {
            {
                self.reply_error(cookie, offset, err::EINVAL);
                return payload;
            }
        };
        match h.kind {
            cmd::DISC => {
                self.disconnecting = true;
                return payload;
            }
            cmd::FLUSH => {}
            _ => {
                if modifies && !writable {
                    {
                        self.reply_error(cookie, offset, err::EPERM);
                        return payload;
                    }
                }
                if end.is_none_or(|e| e > cap) {
                    let e = if modifies { err::ENOSPC } else { err::EINVAL };
                    {
                        self.reply_error(cookie, offset, e);
                        return payload;
                    }
                }
            }
        }
        if h.flags & !valid != 0 {
            {
                self.reply_error(cookie, offset, err::EINVAL);
                return payload;
            }
        }
        if h.kind == cmd::READ && h.length > u64::from(MAX_PAYLOAD) {
            {
                self.reply_error(cookie, offset, err::EOVERFLOW);
                return payload;
            }
        }
        if h.kind == cmd::BLOCK_STATUS {
            if !self.neg.base_allocation || h.length == 0 {
                {
                    self.reply_error(cookie, offset, err::EINVAL);
                    return payload;
                }
            }
            {
                self.block_status(h);
                return payload;
            }
        }
        if h.kind == cmd::CACHE || (h.length == 0 && h.kind != cmd::FLUSH) {
            // Nothing to do (CACHE is advisory).
            {
                self.reply_ok(cookie, offset, h.kind == cmd::READ);
                return payload;
            }
        }
        let fua = h.flags & cflag::FUA != 0;
        let (req, pending) = match h.kind {
            cmd::READ => {
                let mut buf = self.take_buf(h.length as usize);
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
                        sparse: self.neg.structured && h.flags & cflag::DF == 0,
                    },
                )
            }
            cmd::WRITE => {
                let mut buf = payload.take().unwrap_or_default();
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
                        sparse: false,
                    },
                )
            }
            cmd::TRIM => (
                Request::discard(h.offset, h.length),
                Pending {
                    cookie: h.cookie,
                    offset: h.offset,
                    read: None,
                    write: None,
                    sparse: false,
                },
            ),
            // FAST_ZERO: the node refuses what it would zero by hand
            // (ENOTSUP at once, as QEMU's BDRV_REQ_NO_FALLBACK).
            cmd::WRITE_ZEROES => (
                Request::write_zeroes_with(
                    h.offset,
                    h.length,
                    RequestFlags {
                        fua,
                        may_unmap: h.flags & cflag::NO_HOLE == 0,
                        no_fallback: h.flags & cflag::FAST_ZERO != 0,
                    },
                ),
                Pending {
                    cookie: h.cookie,
                    offset: h.offset,
                    read: None,
                    write: None,
                    sparse: false,
                },
            ),
            _ => (
                Request::flush(),
                Pending {
                    cookie: h.cookie,
                    offset: h.offset,
                    read: None,
                    write: None,
                    sparse: false,
                },
            ),
        };
        let reading = pending.read.as_ref().map_or(0, |b| b.len);
        let idx = self.slot(pending);
        if let Err(mut e) = self.queue.submit(req.with_user_data(idx as u64)) {
            self.iovecs.give(e.request.take_iovecs());
            if let Some(p) = self.slots[idx].take() {
                for buf in [p.read, p.write].into_iter().flatten() {
                    self.recycle(buf);
                }
            }
            self.free.push(idx);
            self.reply_error(h.cookie, h.offset, err::from_errno(e.error.errno()));
        } else {
            self.read_bytes += reading;
        }
        payload
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
                // Zeroes go back as a hole, as QEMU's server answers what
                // its block status calls zero: 12 bytes on the wire
                // instead of the data, found by looking at the data (no
                // block-status query per READ).
                (Ok(_), Some(buf)) if p.sparse && is_zero(buf.as_slice()) => {
                    self.chunk(chunk::FLAG_DONE, chunk::OFFSET_HOLE, p.cookie, p.offset, 12);
                    self.output.extend_from_slice(&p.offset.to_be_bytes());
                    self.output
                        .extend_from_slice(&(buf.len as u32).to_be_bytes());
                    self.recycle(buf);
                }
                (Ok(_), Some(buf)) if self.neg.structured => {
                    self.chunk(
                        chunk::FLAG_DONE,
                        chunk::OFFSET_DATA,
                        p.cookie,
                        p.offset,
                        8 + buf.len as u64,
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
                (Ok(_), None) => self.reply_ok(p.cookie, p.offset, false),
                (Err(e), read) => {
                    if let Some(buf) = read {
                        self.recycle(buf);
                    }
                    self.reply_error(p.cookie, p.offset, err::from_errno(e.errno()))
                }
            }
        }
        self.done = done;
    }

    /// Keeps a READ buffer for the next READ (a few, of modest size).
    fn recycle(&mut self, mut buf: AlignedBuf) {
        if let Some(b) = buf.pooled.take() {
            if let Some(r) = &mut self.registered {
                r.pool.give_back(b);
            }
            return;
        }
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

#[cfg(test)]
mod tests;
