//! `aio=io_uring`: one ring per queue, registered memory as fixed buffers
//! (see `super::fixed`), the ring's completions signalled on the queue's
//! eventfd. Requests are batched until [`NodeQueue::kick`] (at most
//! `MAX_SUBMIT_BATCH` SQEs per `io_uring_enter`).
//! Reads, writes (FUA as `RWF_DSYNC`) and flushes go through the ring;
//! discard and write-zeroes, and reads or writes that O_DIRECT cannot take
//! as they are, go to a small worker pool that shares the eventfd.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::fixed::FixedBuffers;
use super::threads::{check_segments, WorkerPool};
use super::QueueContext;
use crate::completion::{clear_eventfd, new_eventfd, LocalCompletions};
use crate::node::{NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::QueueStats;
use crate::{sys, BlockError};

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 256;
/// Most requests in the kernel at once (the CQ is twice the SQ).
const MAX_IN_RING: usize = 2 * RING_ENTRIES as usize;
/// Most SQEs handed to the kernel in one `io_uring_enter`. The kernel
/// plugs a multi-request submission and notifies the device only at its
/// end, so one large batch leaves the device idle while the rest is
/// prepared; measured here at iodepth 32, unlimited batches gave ~8% fewer
/// IOPS than batches of 1 to 4 (QEMU caps its batches too: `aio-max-batch`).
const MAX_SUBMIT_BATCH: usize = 4;
/// Worker threads for the slow path.
const SLOW_THREADS: usize = 2;

/// One thread's queue on a `file,aio=io_uring` node.
pub(super) struct UringQueue {
    ctx: QueueContext,
    ring: IoUring,
    fixed: FixedBuffers,
    /// Requests in the ring, indexed by their SQE's user_data.
    slots: Vec<Option<Request>>,
    free: Vec<u32>,
    /// Accepted but waiting for room in the ring.
    waiting: VecDeque<Request>,
    unsubmitted: usize,
    in_ring: usize,
    local: LocalCompletions,
    slow: WorkerPool,
    slow_batch: Vec<Request>,
    /// Requests handed to the slow path and not yet reaped: the pool's
    /// lock is taken only when there is something to collect.
    in_slow: usize,
    eventfd: Arc<EventFd>,
    in_flight: usize,
    stats: QueueStats,
}

/// A ring whose completions do not interrupt the thread (COOP_TASKRUN)
/// but say when they wait for it to enter the kernel (TASKRUN_FLAG), so a
/// poller that reads the CQ without system calls can tell (kernel 5.19;
/// older kernels get fewer flags).
fn build_ring() -> std::io::Result<IoUring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES))
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

impl UringQueue {
    pub fn new(ctx: QueueContext) -> Result<Self, BlockError> {
        let os = |what: &str| {
            let what = what.to_string();
            move |source| BlockError::Os { what, source }
        };
        let ring = build_ring().map_err(os("set up io_uring"))?;
        let eventfd = Arc::new(new_eventfd()?);
        let sub = ring.submitter();
        sub.register_eventfd(eventfd.as_raw_fd())
            .map_err(os("register the eventfd with io_uring"))?;
        Ok(UringQueue {
            slow: WorkerPool::new(ctx.clone(), SLOW_THREADS, eventfd.clone())?,
            fixed: FixedBuffers::new(&ring, &ctx.registrar),
            stats: ctx.stats.queue(),
            ctx,
            ring,
            slots: Vec::with_capacity(MAX_IN_RING),
            free: Vec::with_capacity(MAX_IN_RING),
            waiting: VecDeque::new(),
            unsubmitted: 0,
            in_ring: 0,
            local: LocalCompletions::new(eventfd.clone()),
            slow_batch: Vec::new(),
            in_slow: 0,
            eventfd,
            in_flight: 0,
        })
    }

    fn sqe_for(inner_fd: RawFd, req: &Request, slot: u32, fixed: Option<u16>) -> squeue::Entry {
        // Not a fixed file: the kernel frees a ring asynchronously, and a
        // file registered with it would keep the image's OFD locks alive
        // after the process exits, so a restarted daemon (or QEMU) would
        // find the image locked.
        let fd = types::Fd(inner_fd);
        let fua = if req.flags().fua { libc::RWF_DSYNC } else { 0 };
        let iov = req.iovecs();
        let (off, n) = (req.offset(), iov.len() as u32);
        let (base, len) = iov.first().map_or((std::ptr::null_mut(), 0), |v| {
            (v.iov_base.cast(), v.iov_len as u32)
        });
        let entry = match (req.op(), n, fixed) {
            (RequestOp::Read, 1, Some(i)) => {
                opcode::ReadFixed::new(fd, base, len, i).offset(off).build()
            }
            (RequestOp::Read, _, Some(i)) => opcode::ReadvFixed::new(fd, iov.as_ptr(), n, i)
                .offset(off)
                .build(),
            (RequestOp::Read, 1, None) => opcode::Read::new(fd, base, len).offset(off).build(),
            (RequestOp::Read, _, None) => {
                opcode::Readv::new(fd, iov.as_ptr(), n).offset(off).build()
            }
            (RequestOp::Write, 1, Some(i)) => opcode::WriteFixed::new(fd, base, len, i)
                .offset(off)
                .rw_flags(fua)
                .build(),
            (RequestOp::Write, _, Some(i)) => opcode::WritevFixed::new(fd, iov.as_ptr(), n, i)
                .offset(off)
                .rw_flags(fua)
                .build(),
            (RequestOp::Write, 1, None) => opcode::Write::new(fd, base, len)
                .offset(off)
                .rw_flags(fua)
                .build(),
            (RequestOp::Write, _, None) => opcode::Writev::new(fd, iov.as_ptr(), n)
                .offset(off)
                .rw_flags(fua)
                .build(),
            _ => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(u64::from(slot))
    }

    /// Puts `req` in the ring if there is room, else keeps it waiting.
    fn enqueue(&mut self, req: Request) {
        if self.in_ring >= MAX_IN_RING || self.ring.submission().is_full() && !self.flush_sq() {
            self.waiting.push_back(req);
            return;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let fixed = match req.op() {
            RequestOp::Read | RequestOp::Write => self.fixed.lookup(req.iovecs()),
            _ => None,
        };
        if fixed.is_some() {
            self.stats.count_registered();
        }
        let sqe = Self::sqe_for(self.ctx.inner.file.as_raw_fd(), &req, slot, fixed);
        self.slots[slot as usize] = Some(req);
        // SAFETY: the SQE points at the request's buffers (valid until
        // completion by the request's contract) and at its iovec array,
        // which lives in `self.slots` unmoved until the CQE arrives. The
        // queue is not full (checked above).
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        debug_assert!(pushed.is_ok());
        self.unsubmitted += 1;
        self.in_ring += 1;
        if self.unsubmitted >= MAX_SUBMIT_BATCH {
            self.flush_sq();
        }
    }

    /// Submits queued SQEs; false when the kernel would not take them now.
    fn flush_sq(&mut self) -> bool {
        if self.unsubmitted == 0 {
            return true;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return true;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: completions must be reaped first; the SQEs
                // stay queued and go with the next kick.
                Err(_) => return false,
            }
        }
    }

    fn refill(&mut self) {
        while self.in_ring < MAX_IN_RING {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            self.enqueue(req);
        }
    }

    /// Moves finished requests to `out`: ring completions first, then the
    /// slow path and immediate ones.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let mut redo = Vec::new();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(req) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot as u32);
            self.in_ring -= 1;
            let res = cqe.result();
            let result = if res < 0 {
                Err(RequestError::Os(-res))
            } else if (res as u64) < req.len() {
                // A short transfer (end of file, or the kernel split it):
                // redo it whole on the synchronous path, which loops.
                redo.push(req);
                continue;
            } else {
                Ok(res as u64)
            };
            out.push(Completion {
                request: req,
                result,
            });
        }
        if !redo.is_empty() {
            self.in_slow += redo.len();
            self.slow.submit_batch(&mut redo);
        }
        if self.in_slow > 0 {
            self.in_slow -= self.slow.drain_into(out);
        }
        self.local.drain_into(out);
        for c in &mut out[start..] {
            self.stats.record_completion(c);
        }
        let n = out.len() - start;
        self.in_flight -= n;
        if !self.waiting.is_empty() {
            self.refill();
            self.flush_sq();
        }
        n
    }
}

impl NodeQueue for UringQueue {
    fn sync_memory(&mut self) {
        self.fixed.sync(&self.ring, &self.stats);
    }

    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let cap = self.ctx.inner.capacity_for(&req);
        let req = match self.ctx.common.precheck(req, cap)? {
            Precheck::Done(c) => {
                self.local.push(c);
                self.in_flight += 1;
                return Ok(());
            }
            Precheck::Forward(req) => req,
        };
        let req = check_segments(req, self.ctx.inner.limits.max_segments)?;
        self.fixed.sync(&self.ring, &self.stats);
        let inner = &self.ctx.inner;
        let fast = match req.op() {
            RequestOp::Read | RequestOp::Write => {
                !inner.direct
                    || inner
                        .limits
                        .is_aligned(req.offset(), req.len(), req.iovecs())
            }
            RequestOp::Flush => true,
            RequestOp::Discard | RequestOp::WriteZeroes => false,
        };
        self.in_flight += 1;
        if fast {
            self.enqueue(req);
        } else {
            self.in_slow += 1;
            self.slow_batch.push(req);
        }
        Ok(())
    }

    fn kick(&mut self) {
        self.slow.submit_batch(&mut self.slow_batch);
        self.flush_sq();
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn completions_ready(&mut self) -> bool {
        self.in_slow > 0
            || !self.local.is_empty()
            || self.ring.submission().taskrun()
            || !self.ring.completion().is_empty()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        // Nothing to reap: leave the eventfd alone. Every reap below is
        // preceded by a clear, so a signal left set here belongs to a
        // completion not yet reaped (or costs one spurious wake-up); a
        // read that can only fail is one system call per request saved
        // (the handler looks right after submitting, before anything can
        // have finished).
        if !self.completions_ready() {
            return 0;
        }
        clear_eventfd(&self.eventfd);
        // With COOP_TASKRUN a finished request may wait for this thread to
        // enter the kernel before its CQE is posted; a busy poller that
        // never makes a system call would otherwise see it only when it
        // stops polling. submit() enters with GETEVENTS when the kernel
        // says so, and sends what was queued with it.
        if self.ring.submission().taskrun() && self.ring.submit().is_ok() {
            self.unsubmitted = 0;
        }
        self.reap(out)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn complete_now(&mut self, c: Completion) {
        self.in_flight += 1;
        self.local.push(c);
    }

    fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
        self.slow.submit_batch(&mut self.slow_batch);
        let mut got = self.reap(out);
        while got < min && self.in_flight > 0 {
            if self.in_ring > 0 && self.in_ring == self.in_flight {
                // Only the ring has work: submit and sleep in one system call.
                match self.ring.submit_and_wait(1) {
                    Ok(_) => self.unsubmitted = 0,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(_) => sys::wait_readable(self.eventfd.as_raw_fd()),
                }
            } else {
                self.flush_sq();
                sys::wait_readable(self.eventfd.as_raw_fd());
                clear_eventfd(&self.eventfd);
            }
            got += self.reap(out);
        }
        self.flush_sq();
        got
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still write into request buffers: wait for every
        // request in the ring before the slots (and their iovecs) go away.
        self.kick();
        let mut sink = Vec::new();
        while self.in_ring > 0 || !self.waiting.is_empty() {
            self.refill();
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(&mut sink);
        }
    }
}
