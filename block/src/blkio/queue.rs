//! One data-plane thread's libblkio queue.
//!
//! Completions: libblkio announces them on the queue's completion fd, an
//! eventfd (libblkio itself writes it for completions it makes without
//! the device). Requests finished before reaching libblkio (the common
//! options, empty requests) must wake the same fd, since a queue has one
//! completion fd: the queue keeps a duplicate of libblkio's eventfd and
//! writes it, as libblkio does. [`NodeQueue::poll_completions`] clears it,
//! then reaps with `do_io(min_completions = 0)`.
//!
//! Requests: those libblkio can take as they are go straight to it;
//! others become a [`Job`] that runs through a bounce buffer step by step
//! (`io.rs`). Requests waiting for a buffer (or behind a read-modify-write,
//! which runs alone) wait in FIFO order, in a ring of slot numbers that
//! grows only to the caller's own number of requests in flight.

mod io;
mod setup;

use std::collections::VecDeque;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blkio::Blkioq;
use vmm_sys_util::eventfd::EventFd;

pub(in crate::blkio) use self::setup::{QueueConfig, QueueContext};
use super::control::{Control, MapKey};
use super::job::{Geometry, Job};
use super::regions::QueueRegions;
use crate::bounce::{BounceBuf, BouncePool};
use crate::completion::{clear_eventfd, LocalCompletions};
use crate::node::{NodeCommon, NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::QueueStats;

/// libblkio completions reaped per `do_io` call.
const REAP_BATCH: usize = 64;

/// How a request is carried out.
enum Work {
    /// One libblkio request on the caller's buffers.
    Direct,
    /// Steps through a bounce buffer.
    Job(Job),
}

/// A request the queue accepted and has not returned.
struct Slot {
    req: Request,
    work: Work,
    buf: Option<BounceBuf>,
    /// The mapped region its buffers lie in.
    region: Option<usize>,
    /// Planned with zeroes written by hand.
    by_hand: bool,
}

/// What to do with a new request.
enum Class {
    Now(Result<u64, crate::RequestError>),
    Direct(Option<usize>),
    Job(Job),
}

/// One thread's queue on a libblkio node.
pub(in crate::blkio) struct BlkioQueue {
    q: ManuallyDrop<Blkioq>,
    ctl: Arc<Control>,
    cfg: Arc<QueueConfig>,
    common: NodeCommon,
    capacity: Arc<AtomicU64>,
    stats: QueueStats,
    /// A duplicate of libblkio's completion eventfd.
    eventfd: Arc<EventFd>,
    local: LocalCompletions,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    waiting: VecDeque<u32>,
    rmw_waiting: usize,
    rmw_running: bool,
    pool: BouncePool,
    pool_key: Option<MapKey>,
    regions: Option<QueueRegions>,
    /// Requests (or job steps) handed to libblkio and not reaped.
    in_lib: usize,
    /// Requests accepted and not returned.
    in_flight: usize,
    /// Something was enqueued in libblkio since the last `do_io`.
    unsubmitted: bool,
    /// The device refused a write-zeroes: zeroes are written by hand.
    zeroes_by_hand: bool,
    reaped: Vec<MaybeUninit<blkio::Completion>>,
    spill: Vec<Completion>,
}

impl BlkioQueue {
    /// What the device takes, as learnt so far.
    fn geo(&self) -> Geometry {
        let mut geo = self.cfg.geo;
        if self.zeroes_by_hand {
            geo.max_write_zeroes = 0;
        }
        geo
    }

    /// The capacity to check `req` against, read again from the device
    /// when the request looks out of range (it may have grown).
    fn capacity_for(&self, req: &Request) -> u64 {
        let cap = self.capacity.load(Ordering::Relaxed);
        if req.check_range(cap).is_ok() {
            return cap;
        }
        match self.ctl.capacity() {
            Ok(c) => {
                self.capacity.store(c, Ordering::Relaxed);
                c
            }
            Err(_) => cap,
        }
    }

    fn classify(&mut self, req: &Request) -> Class {
        let geo = self.geo();
        let (off, len) = (req.offset(), req.len());
        match req.op() {
            RequestOp::Flush => return Class::Direct(None),
            _ if len == 0 => return Class::Now(Ok(0)),
            RequestOp::Read | RequestOp::Write if self.cfg.takes_as_is(req) => {
                match &mut self.regions {
                    None => return Class::Direct(None),
                    Some(r) => {
                        if let Some(region) = r.acquire(req.iovecs()) {
                            return Class::Direct(Some(region));
                        }
                    }
                }
            }
            // Discard is advisory: a device without it completes at once.
            RequestOp::Discard if geo.max_discard == 0 => return Class::Now(Ok(len)),
            RequestOp::Discard if geo.is_aligned(off, len) && len <= geo.max_discard => {
                return Class::Direct(None)
            }
            RequestOp::WriteZeroes
                if geo.max_write_zeroes > 0
                    && geo.is_aligned(off, len)
                    && len <= geo.max_write_zeroes =>
            {
                return Class::Direct(None)
            }
            // Only the device's own write-zeroes is fast: not zero
            // buffers, nor the read-modify-write of unaligned edges.
            RequestOp::WriteZeroes
                if req.flags().no_fallback
                    && (geo.max_write_zeroes == 0 || !geo.is_aligned(off, len)) =>
            {
                return Class::Now(Err(RequestError::Unsupported))
            }
            _ => {}
        }
        let job = Job::new(req.op(), off, len, &geo);
        if job.is_empty() {
            return Class::Now(Ok(len));
        }
        Class::Job(job)
    }

    fn alloc(&mut self, slot: Slot) -> u32 {
        match self.free.pop() {
            Some(ix) => {
                self.slots[ix as usize] = Some(slot);
                ix
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Starts waiting requests; results of any that finish at once go to
    /// the local completions.
    fn pump_local(&mut self) {
        let mut spill = std::mem::take(&mut self.spill);
        self.pump(&mut spill);
        for c in spill.drain(..) {
            self.local.push(c);
        }
        self.spill = spill;
    }

    fn record(&self, done: &mut [Completion]) {
        for c in done {
            self.stats.record_completion(c);
        }
    }

    fn drain_local(&mut self, out: &mut Vec<Completion>) {
        let n = self.local.len();
        self.local.drain_into(out);
        self.in_flight -= n;
    }
}

impl NodeQueue for BlkioQueue {
    fn sync_memory(&mut self) {
        if let Some(r) = &mut self.regions {
            r.sync(&self.stats);
        }
    }

    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let cap = self.capacity_for(&req);
        let req = match self.common.precheck(req, cap)? {
            Precheck::Done(c) => {
                self.complete_now(c);
                return Ok(());
            }
            Precheck::Forward(req) => req,
        };
        if let Some(r) = &mut self.regions {
            r.sync(&self.stats);
        }
        let (work, region) = match self.classify(&req) {
            Class::Now(result) => {
                self.complete_now(Completion {
                    request: req,
                    result,
                });
                return Ok(());
            }
            Class::Direct(region) => (Work::Direct, region),
            Class::Job(job) => (Work::Job(job), None),
        };
        let rmw = matches!(&work, Work::Job(j) if j.is_rmw());
        let direct = matches!(work, Work::Direct);
        let ix = self.alloc(Slot {
            req,
            work,
            buf: None,
            region,
            by_hand: self.zeroes_by_hand,
        });
        self.in_flight += 1;
        if direct && !self.rmw_running && self.rmw_waiting == 0 {
            self.start_direct(ix);
        } else {
            self.rmw_waiting += usize::from(rmw);
            self.waiting.push_back(ix);
            self.pump_local();
        }
        Ok(())
    }

    fn kick(&mut self) {
        if self.unsubmitted {
            self.submit_only();
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        clear_eventfd(&self.eventfd);
        let _ = self.run_io(out, false);
        self.drain_local(out);
        self.record(&mut out[start..]);
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn complete_now(&mut self, c: Completion) {
        self.in_flight += 1;
        self.local.push(c);
    }

    fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        loop {
            clear_eventfd(&self.eventfd);
            let short = out.len() - start + self.local.len() < min;
            let ran = self.run_io(out, short && self.in_lib > 0);
            self.drain_local(out);
            if out.len() - start >= min || self.in_flight == 0 || ran.is_err() {
                break;
            }
            if self.in_lib == 0 {
                // Everything left is waiting: start it, or give up if
                // nothing can start (the caller sees fewer than `min`).
                self.pump_local();
                if self.in_lib == 0 && self.local.is_empty() {
                    break;
                }
            }
        }
        self.record(&mut out[start..]);
        out.len() - start
    }
}

impl Drop for BlkioQueue {
    fn drop(&mut self) {
        // The device may still read or write the buffers of requests it
        // holds: wait for all of them before memory is unmapped.
        let drained = self.drain_for_close();
        if let Some(r) = &mut self.regions {
            r.clear();
        }
        if let Some(key) = self.pool_key.take() {
            self.ctl.unmap(key);
        }
        // SAFETY: `q` is taken once, here, and not used afterwards.
        let q = unsafe { ManuallyDrop::take(&mut self.q) };
        if drained {
            self.ctl.give_back(q);
        }
        // Otherwise libblkio failed with requests outstanding: dropping the
        // queue tears it down rather than hand stale completions to the
        // next thread.
    }
}
