//! One data-plane queue of an `nbd` node: one connection, driven without
//! blocking by the thread that owns the queue.
//!
//! - Out: a request becomes a 28-byte header, and a WRITE's payload is
//!   sent with `sendmsg` straight from the caller's iovecs; what the
//!   socket does not take waits for it to become writable.
//! - In: replies (simple, or structured chunks) are parsed from a
//!   receive buffer; READ data is copied from it into the caller's
//!   buffers, or, for large payloads, read straight into them.
//! - The completion fd is an epoll instance watching the socket, an
//!   eventfd (completions made on this thread, a reconnection) and a
//!   timerfd (the end of `reconnect-delay`): one fd, readable whenever
//!   `poll_completions` has something to do.
//!
//! The server is untrusted: a reply for a cookie not in flight, data
//! outside the request, an unknown chunk type or an oversized chunk ends
//! the connection as lost (requests fail with EIO or wait for the
//! reconnection); nothing is written outside the request's buffers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use self::reconnect::Reconnect;
use self::reply::Rx;

use super::transport::Transport;
use super::{lock, request_header, Shared};
use crate::completion::{clear_eventfd, new_eventfd, LocalCompletions};
use crate::nbd::proto::*;
use crate::node::{NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::QueueStats;
use crate::{sys, BlockError};

mod reconnect;
mod reply;

/// NBD_REPLY_TYPE_OFFSET_HOLE.
const CHUNK_OFFSET_HOLE: u16 = 2;
/// NBD_REPLY_TYPE_ERROR_OFFSET.
const CHUNK_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// Largest chunk payload other than READ data taken from a server.
const SMALL_MAX: usize = 64 << 10;
/// The receive buffer (several small replies per system call).
const INBUF: usize = 256 << 10;
/// READ data at least this large is read straight into the caller's
/// buffers rather than copied from the receive buffer.
const DIRECT_MIN: usize = 16 << 10;
/// iovecs per `sendmsg`/`readv`.
const MAX_IOV: usize = 256;

const TOKEN_EVENT: u64 = 0;
const TOKEN_SOCKET: u64 = 1;
const TOKEN_TIMER: u64 = 2;

/// A request on the wire (or waiting for the connection).
struct Slot {
    req: Request,
    /// The command this step sends (a FUA write the server cannot do is
    /// a WRITE, then a FLUSH).
    cmd: u16,
    flags: u16,
    /// Flush once the write is done (FUA without NBD_FLAG_SEND_FUA).
    then_flush: bool,
    /// The first error a chunk reported.
    error: u32,
}

/// A piece of the output: bytes of `out_bytes`, or a WRITE's payload.
enum Seg {
    Own(usize),
    Data(u32),
}

enum Link {
    Up(Transport),
    Down {
        since: Instant,
        reconnect: Arc<Reconnect>,
    },
}

/// A queue of an [`super::NbdNode`].
pub(super) struct NbdQueue {
    shared: Arc<Shared>,
    stats: QueueStats,
    link: Link,
    epoll: OwnedFd,
    eventfd: Arc<EventFd>,
    timer: TimerFd,
    /// When the timer fires (requests stop waiting for the connection).
    timer_due: Option<Instant>,
    local: LocalCompletions,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    used: usize,
    /// Requests waiting for the connection (reconnect-delay).
    waiting: Vec<u32>,
    out_bytes: Vec<u8>,
    own_pos: usize,
    segs: VecDeque<Seg>,
    /// Bytes of the first segment already sent.
    first_off: usize,
    watching_out: bool,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    rx: Rx,
    iov: IovScratch,
    /// TLS: iovec data copied out before rustls encrypts it.
    tls_scratch: Vec<u8>,
}

/// iovecs built for one system call and dropped after it.
struct IovScratch(Vec<libc::iovec>);

// SAFETY: the pointers are only used during the call that built them, on
// the thread that owns the queue; between calls the vector is cleared
// before use.
unsafe impl Send for IovScratch {}

fn epoll_ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: a valid epoll instance and event struct; the kernel copies it.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn os_error(what: &str, e: io::Error) -> BlockError {
    BlockError::Os {
        what: what.into(),
        source: e,
    }
}

/// Appends to `out` iovecs covering `len` bytes of `iovecs` from `skip`.
fn sub_iovecs(iovecs: &[libc::iovec], mut skip: usize, mut len: usize, out: &mut Vec<libc::iovec>) {
    for v in iovecs {
        if len == 0 || out.len() >= MAX_IOV {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len);
        out.push(libc::iovec {
            // SAFETY: `skip` is within this iovec.
            iov_base: unsafe { (v.iov_base as *mut u8).add(skip) }.cast(),
            iov_len: n,
        });
        len -= n;
        skip = 0;
    }
}

/// Zeroes `len` bytes of `iovecs` from `skip`.
fn zero_range(iovecs: &[libc::iovec], skip: usize, len: usize) {
    static ZERO: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO.len());
        sys::copy_to_iovecs(iovecs, skip + done, &ZERO[..n]);
        done += n;
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    u64::from_be_bytes(x)
}

/// The host errno for a protocol error value.
fn errno(e: u32) -> i32 {
    match e {
        err::EPERM
        | err::ENOMEM
        | err::EINVAL
        | err::ENOSPC
        | err::EOVERFLOW
        | err::ENOTSUP
        | err::ESHUTDOWN => e as i32,
        _ => libc::EIO,
    }
}

impl NbdQueue {
    pub fn new(shared: Arc<Shared>, sock: Transport) -> Result<Self, BlockError> {
        sock.set_nonblocking(true)
            .map_err(|e| os_error("make the NBD socket non-blocking", e))?;
        // SAFETY: epoll_create1 returns a new descriptor we own, or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(os_error(
                "create an epoll instance",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let eventfd = Arc::new(new_eventfd()?);
        let timer = TimerFd::new().map_err(|e| os_error("create a timerfd", e.into()))?;
        epoll_ctl(
            &epoll,
            libc::EPOLL_CTL_ADD,
            eventfd.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_EVENT,
        )
        .and_then(|()| {
            epoll_ctl(
                &epoll,
                libc::EPOLL_CTL_ADD,
                timer.as_raw_fd(),
                libc::EPOLLIN as u32,
                TOKEN_TIMER,
            )
        })
        .and_then(|()| {
            epoll_ctl(
                &epoll,
                libc::EPOLL_CTL_ADD,
                sock.fd(),
                libc::EPOLLIN as u32,
                TOKEN_SOCKET,
            )
        })
        .map_err(|e| os_error("watch the NBD socket", e))?;
        Ok(NbdQueue {
            stats: shared.stats.queue(),
            shared,
            link: Link::Up(sock),
            epoll,
            local: LocalCompletions::new(eventfd.clone()),
            eventfd,
            timer,
            timer_due: None,
            slots: Vec::new(),
            free: Vec::new(),
            used: 0,
            waiting: Vec::new(),
            out_bytes: Vec::with_capacity(4096),
            own_pos: 0,
            segs: VecDeque::new(),
            first_off: 0,
            watching_out: false,
            inbuf: vec![0u8; INBUF].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            rx: Rx::Header,
            iov: IovScratch(Vec::with_capacity(MAX_IOV)),
            tls_scratch: Vec::new(),
        })
    }

    fn alloc(&mut self, s: Slot) -> u32 {
        self.used += 1;
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(s);
            i
        } else {
            self.slots.push(Some(s));
            (self.slots.len() - 1) as u32
        }
    }

    fn slot(&self, i: u32) -> &Slot {
        self.slots[i as usize].as_ref().expect("slot in use")
    }

    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        self.slots[i as usize].as_mut().expect("slot in use")
    }

    fn release(&mut self, i: u32) -> Slot {
        let s = self.slots[i as usize].take().expect("slot in use");
        self.free.push(i);
        self.used -= 1;
        s
    }

    /// Queues a slot's request on the output.
    fn send(&mut self, i: u32) {
        let s = self.slot(i);
        let (cmd, flags) = (s.cmd, s.flags);
        let (offset, len) = match cmd {
            cmd::FLUSH => (0, 0),
            _ => (s.req.offset(), s.req.len() as u32),
        };
        request_header(&mut self.out_bytes, flags, cmd, u64::from(i), offset, len);
        self.segs.push_back(Seg::Own(REQUEST_LEN));
        if cmd == cmd::WRITE && len > 0 {
            self.segs.push_back(Seg::Data(i));
        }
    }

    fn socket_fd(&self) -> Option<RawFd> {
        match &self.link {
            Link::Up(t) => Some(t.fd()),
            Link::Down { .. } => None,
        }
    }

    fn watch_out(&mut self, on: bool) {
        if self.watching_out == on {
            return;
        }
        if let Some(fd) = self.socket_fd() {
            let mut ev = libc::EPOLLIN as u32;
            if on {
                ev |= libc::EPOLLOUT as u32;
            }
            let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_MOD, fd, ev, TOKEN_SOCKET);
        }
        self.watching_out = on;
    }

    /// Sends what the socket takes of the output.
    fn flush_output(&mut self) -> Result<(), String> {
        if !matches!(self.link, Link::Up(_)) {
            return Ok(());
        }
        while !self.segs.is_empty() {
            self.iov.0.clear();
            let mut own = self.own_pos;
            let mut skip = self.first_off;
            for seg in self.segs.iter() {
                if self.iov.0.len() >= MAX_IOV {
                    break;
                }
                match *seg {
                    Seg::Own(n) => {
                        self.iov.0.push(libc::iovec {
                            // SAFETY: own + skip < own + n <= out_bytes.len().
                            iov_base: unsafe { self.out_bytes.as_ptr().add(own + skip) } as *mut _,
                            iov_len: n - skip,
                        });
                        own += n;
                    }
                    Seg::Data(i) => {
                        let req = &self.slots[i as usize].as_ref().expect("slot in use").req;
                        let len = req.len() as usize - skip;
                        sub_iovecs(req.iovecs(), skip, len, &mut self.iov.0);
                    }
                }
                skip = 0;
            }
            let Link::Up(t) = &mut self.link else {
                return Ok(());
            };
            match t.send(&self.iov.0, &mut self.tls_scratch) {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("send: {e}")),
            }
        }
        let Link::Up(t) = &mut self.link else {
            return Ok(());
        };
        match t.flush_pending() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("send: {e}")),
        }
        let pending = !self.segs.is_empty() || t.wants_write();
        if self.segs.is_empty() {
            self.out_bytes.clear();
            self.own_pos = 0;
        }
        self.watch_out(pending);
        Ok(())
    }

    /// Drops `n` sent bytes from the front of the output.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(seg) = self.segs.front() else {
                break;
            };
            let seg_len = match *seg {
                Seg::Own(len) => len,
                Seg::Data(i) => self.slot(i).req.len() as usize,
            };
            let rest = seg_len - self.first_off;
            if n < rest {
                self.first_off += n;
                return;
            }
            n -= rest;
            if let Some(Seg::Own(len)) = self.segs.pop_front() {
                self.own_pos += len;
            }
            self.first_off = 0;
        }
    }

    /// Everything `poll_completions` does but the accounting.
    fn run(&mut self, out: &mut Vec<Completion>) {
        if self.local.drain_into(out) {
            clear_eventfd(&self.eventfd);
        }
        if let Link::Down { reconnect, .. } = &self.link {
            if reconnect.ready.load(Ordering::Acquire) {
                clear_eventfd(&self.eventfd);
                self.reconnected();
            }
        }
        if self.timer_due.is_some_and(|d| d <= Instant::now()) {
            self.expire();
        }
        if let Err(why) = self.receive(out).and_then(|()| self.flush_output()) {
            self.lose(&why);
        }
        self.local.drain_into(out);
        clear_eventfd(&self.eventfd);
    }

    fn within_delay(&self) -> bool {
        match &self.link {
            Link::Up(_) => true,
            Link::Down { since, .. } => {
                !self.shared.reconnect_delay.is_zero()
                    && since.elapsed() < self.shared.reconnect_delay
            }
        }
    }
}

impl NodeQueue for NbdQueue {
    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        // A connection made since the last poll serves this request.
        self.reconnected();
        let sh = &self.shared;
        let req = match sh.common.precheck(req, sh.info.size)? {
            Precheck::Done(c) => {
                self.local.push_quiet(c);
                return Ok(());
            }
            Precheck::Forward(r) => r,
        };
        let info = &sh.info;
        let refuse = |req, error| {
            Err(SubmitError {
                request: req,
                error,
            })
        };
        let mut then_flush = false;
        let (cmd, flags) = match req.op() {
            RequestOp::Read | RequestOp::Write if req.len() > u64::from(info.max_block) => {
                return refuse(req, RequestError::Limits)
            }
            RequestOp::Read | RequestOp::Write if req.is_empty() => {
                self.local.push_quiet(Completion {
                    request: req,
                    result: Ok(0),
                });
                return Ok(());
            }
            RequestOp::Read => (cmd::READ, 0),
            RequestOp::Write => {
                let fua = req.flags().fua;
                if fua && info.has(tflag::SEND_FUA) {
                    (cmd::WRITE, cflag::FUA)
                } else {
                    then_flush = fua && info.has(tflag::SEND_FLUSH);
                    (cmd::WRITE, 0)
                }
            }
            RequestOp::Flush if !info.has(tflag::SEND_FLUSH) => {
                // No volatile cache on the server: nothing to flush.
                self.local.push_quiet(Completion {
                    request: req,
                    result: Ok(0),
                });
                return Ok(());
            }
            RequestOp::Flush => (cmd::FLUSH, 0),
            RequestOp::Discard | RequestOp::WriteZeroes if req.len() > u64::from(u32::MAX) => {
                return refuse(req, RequestError::Limits)
            }
            RequestOp::Discard if !info.has(tflag::SEND_TRIM) => {
                // Discard is advisory.
                let len = req.len();
                self.local.push_quiet(Completion {
                    request: req,
                    result: Ok(len),
                });
                return Ok(());
            }
            RequestOp::Discard => (cmd::TRIM, 0),
            RequestOp::WriteZeroes if !info.has(tflag::SEND_WRITE_ZEROES) => {
                return refuse(req, RequestError::Unsupported)
            }
            RequestOp::WriteZeroes => {
                let mut f = 0;
                if !req.flags().may_unmap {
                    f |= cflag::NO_HOLE;
                }
                if req.flags().fua && info.has(tflag::SEND_FUA) {
                    f |= cflag::FUA;
                }
                (cmd::WRITE_ZEROES, f)
            }
        };
        if !self.within_delay() {
            return refuse(req, RequestError::Os(libc::EIO));
        }
        let i = self.alloc(Slot {
            req,
            cmd,
            flags,
            then_flush,
            error: 0,
        });
        match self.link {
            Link::Up(_) => self.send(i),
            Link::Down { .. } => self.waiting.push(i),
        }
        Ok(())
    }

    fn kick(&mut self) {
        if !self.segs.is_empty() {
            if let Err(why) = self.flush_output() {
                self.lose(&why);
            }
        }
        self.local.signal();
    }

    fn completion_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        self.run(out);
        for c in &mut out[start..] {
            self.stats.record_completion(c);
        }
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.used + self.local.len()
    }

    fn complete_now(&mut self, c: Completion) {
        self.local.push(c);
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        // Let what is in flight finish (its buffers are the caller's until
        // then), for a while.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut sink = Vec::new();
        while self.used > 0 && matches!(self.link, Link::Up(_)) && Instant::now() < deadline {
            self.kick();
            let mut p = libc::pollfd {
                fd: self.epoll.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, 100) };
            self.run(&mut sink);
            sink.clear();
        }
        match std::mem::replace(
            &mut self.link,
            Link::Down {
                since: Instant::now(),
                reconnect: Arc::new(Reconnect {
                    socket: Mutex::new(None),
                    ready: AtomicBool::new(false),
                    cancel: AtomicBool::new(true),
                }),
            },
        ) {
            Link::Up(mut sock) => {
                let clean = self.used == 0
                    && self.segs.is_empty()
                    && self.in_start == self.in_end
                    && matches!(self.rx, Rx::Header);
                let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, sock.fd(), 0, 0);
                if clean {
                    self.shared.give_back(sock);
                } else {
                    sock.shutdown();
                }
            }
            Link::Down { reconnect, .. } => {
                reconnect.cancel.store(true, Ordering::Release);
                // A connection made meanwhile is a good idle one.
                if let Some(s) = lock(&reconnect.socket).take() {
                    self.shared.give_back(s);
                }
            }
        }
        self.shared.queue_closed();
    }
}
