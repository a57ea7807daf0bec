//! The queue's traffic with libblkio: issuing direct requests and job
//! steps, reaping completions, starting waiting requests as buffers come
//! back, and draining at close.
//!
//! libblkio's request calls take raw pointers and enqueue without a system
//! call; `do_io` submits and reaps. Every buffer given to libblkio stays
//! valid until its completion is reaped: a direct request's buffers (and
//! its iovec array) belong to the caller's [`Request`], held in its slot
//! until then, and a job's bounce buffer is held in the slot too.

use blkio::{Blkioq, Errno, ReqFlags};
use qapi::BlockdevDiscardOptions;

use super::{BlkioQueue, Slot, Work, REAP_BATCH};
use crate::blkio::job::{Fill, Job, Step};
use crate::bounce::BounceBuf;
use crate::request::{Completion, Request, RequestError, RequestOp};
use crate::sys;

/// What became of a job's next step.
enum Next {
    Issued,
    Done,
    Failed(RequestError),
}

fn fua(req: &Request) -> ReqFlags {
    match req.flags().fua {
        true => ReqFlags::FUA,
        false => ReqFlags::empty(),
    }
}

/// Issues a discard (or a write-zeroes that may unmap, `as_zeroes`).
fn discard(q: &mut Blkioq, as_zeroes: bool, offset: u64, len: u64, ud: usize) {
    match as_zeroes {
        true => q.write_zeroes(offset, len, ud, ReqFlags::empty()),
        false => q.discard(offset, len, ud, ReqFlags::empty()),
    }
}

/// Whether an errno says the operation is not supported.
fn unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS)
}

/// Checks that `fill` lies inside `buf`; returns its start.
fn part_start(buf: &BounceBuf, fill: Fill) -> Option<*mut u8> {
    if fill.buf_off.checked_add(fill.n)? > buf.len {
        return None;
    }
    // SAFETY: `buf_off + n <= len`: the offset stays inside the buffer.
    Some(unsafe { buf.addr.add(fill.buf_off) })
}

/// The bytes of `buf` that `fill` names, to fill before a write step.
fn part_mut(buf: &mut BounceBuf, fill: Fill) -> Option<&mut [u8]> {
    let p = part_start(buf, fill)?;
    // SAFETY: the range lies inside the bounce buffer (checked by
    // `part_start`), which this request's slot owns, borrowed mutably for
    // the slice's life; no device request on the buffer is in flight
    // between steps, so nothing else touches these bytes meanwhile.
    Some(unsafe { std::slice::from_raw_parts_mut(p, fill.n) })
}

/// The bytes of `buf` that `fill` names, to copy out after a read step.
fn part(buf: &BounceBuf, fill: Fill) -> Option<&[u8]> {
    let p = part_start(buf, fill)?;
    // SAFETY: as for `part_mut`; the read step that filled the bytes has
    // completed, so the device no longer writes them.
    Some(unsafe { std::slice::from_raw_parts(p, fill.n) })
}

impl BlkioQueue {
    fn zero_flags(&self, req: &Request) -> ReqFlags {
        let unmap = req.flags().may_unmap && self.common.discard == BlockdevDiscardOptions::Unmap;
        let flags = match unmap {
            true => fua(req),
            false => fua(req) | ReqFlags::NO_UNMAP,
        };
        match req.flags().no_fallback {
            true => flags | ReqFlags::NO_FALLBACK,
            false => flags,
        }
    }

    /// Hands a request to libblkio on its own buffers.
    pub(super) fn start_direct(&mut self, ix: u32) {
        let Some(slot) = self.slots.get(ix as usize).and_then(Option::as_ref) else {
            return;
        };
        if slot.region.is_some() {
            self.stats.count_registered();
        }
        let req = &slot.req;
        let (off, len, ud) = (req.offset(), req.len(), ix as usize);
        let zero_flags = self.zero_flags(req);
        let iov = req.iovecs();
        // `iov.len()` is at most `max_segments` (at most IOV_MAX): checked
        // when the request was classified.
        let n = iov.len() as u32;
        let q = &mut *self.q;
        match (req.op(), iov) {
            // One buffer takes libblkio's plain read/write (io_uring's
            // READ/WRITE take a 32-bit length; larger ones go vectored).
            (RequestOp::Read, [v]) if v.iov_len <= u32::MAX as usize => {
                q.read(off, v.iov_base.cast(), v.iov_len, ud, ReqFlags::empty())
            }
            (RequestOp::Read, _) => q.readv(off, iov.as_ptr(), n, ud, ReqFlags::empty()),
            (RequestOp::Write, [v]) if v.iov_len <= u32::MAX as usize => {
                q.write(off, v.iov_base.cast(), v.iov_len, ud, fua(req))
            }
            (RequestOp::Write, _) => q.writev(off, iov.as_ptr(), n, ud, fua(req)),
            (RequestOp::Flush, _) => q.flush(ud, ReqFlags::empty()),
            (RequestOp::Discard, _) => discard(q, self.cfg.discard_as_zeroes, off, len, ud),
            (RequestOp::WriteZeroes, _) => q.write_zeroes(off, len, ud, zero_flags),
        }
        self.in_lib += 1;
        self.unsubmitted = true;
    }

    /// Issues the next step of the job in slot `ix`.
    fn step(&mut self, ix: u32) -> Next {
        let geo = self.geo();
        let zero_flags = match self.slots.get(ix as usize).and_then(Option::as_ref) {
            Some(slot) => self.zero_flags(&slot.req),
            None => return Next::Done,
        };
        let Some(Some(Slot {
            req,
            work: Work::Job(job),
            buf,
            ..
        })) = self.slots.get_mut(ix as usize)
        else {
            return Next::Done;
        };
        let Some(step) = job.next(&geo) else {
            return Next::Done;
        };
        let ud = ix as usize;
        let q = &mut *self.q;
        match step {
            Step::Read { offset, len } => {
                let Some(b) = buf.as_ref().filter(|b| len <= b.len) else {
                    return Next::Failed(RequestError::Limits);
                };
                q.read(offset, b.addr, len, ud, ReqFlags::empty());
            }
            Step::Write { offset, len, fill } => {
                let Some(b) = buf.as_mut().filter(|b| len <= b.len) else {
                    return Next::Failed(RequestError::Limits);
                };
                let Some(part) = part_mut(b, fill) else {
                    return Next::Failed(RequestError::Limits);
                };
                match job.op() {
                    RequestOp::Write => sys::copy_from_iovecs(req.iovecs(), fill.skip, part),
                    _ => part.fill(0),
                }
                q.write(offset, b.addr, len, ud, fua(req));
            }
            Step::WriteZeroes { offset, len } => q.write_zeroes(offset, len, ud, zero_flags),
            Step::Discard { offset, len } => {
                discard(q, self.cfg.discard_as_zeroes, offset, len, ud)
            }
        }
        self.in_lib += 1;
        self.unsubmitted = true;
        Next::Issued
    }

    /// Returns the request in slot `ix` with `result`.
    fn finish(&mut self, ix: u32, result: Result<u64, RequestError>, out: &mut Vec<Completion>) {
        let Some(slot) = self.slots.get_mut(ix as usize).and_then(Option::take) else {
            return;
        };
        self.free.push(ix);
        if let Some(b) = slot.buf {
            self.pool.give_back(b);
        }
        if let (Some(i), Some(r)) = (slot.region, &mut self.regions) {
            r.release(i);
        }
        if matches!(&slot.work, Work::Job(j) if j.is_rmw()) {
            self.rmw_running = false;
        }
        self.in_flight -= 1;
        out.push(Completion {
            request: slot.req,
            result,
        });
    }

    /// Moves a job on, or returns its request when it is done.
    fn advance(&mut self, ix: u32, out: &mut Vec<Completion>) {
        match self.step(ix) {
            Next::Issued => {}
            Next::Done => {
                let len = self.slots[ix as usize].as_ref().map_or(0, |s| s.req.len());
                self.finish(ix, Ok(len), out);
            }
            Next::Failed(e) => self.finish(ix, Err(e), out),
        }
    }

    /// Handles one libblkio completion.
    fn on_reaped(&mut self, ud: usize, ret: i32, out: &mut Vec<Completion>) {
        let Some(Some(slot)) = self.slots.get_mut(ud) else {
            return;
        };
        self.in_lib = self.in_lib.saturating_sub(1);
        let ix = ud as u32;
        let (op, len) = (slot.req.op(), slot.req.len());
        if ret < 0 {
            // Discard is advisory; a refused write-zeroes is done by hand
            // (QEMU's fallback), from the start: zeroing twice is harmless.
            // A fast zero (NO_FALLBACK) has no fallback: the device may
            // refuse only the flag, so by-hand zeroing is not learnt.
            let no_fallback = slot.req.flags().no_fallback;
            let result = match op {
                RequestOp::Discard if unsupported(-ret) => Ok(len),
                RequestOp::WriteZeroes if unsupported(-ret) && no_fallback => {
                    Err(RequestError::Unsupported)
                }
                RequestOp::WriteZeroes if unsupported(-ret) && !slot.by_hand => {
                    self.zeroes_by_hand = true;
                    return self.restart_job(ix, out);
                }
                _ => Err(RequestError::Os(-ret)),
            };
            return self.finish(ix, result, out);
        }
        match &mut slot.work {
            Work::Direct if op == RequestOp::Flush => self.finish(ix, Ok(0), out),
            Work::Direct => self.finish(ix, Ok(len), out),
            Work::Job(job) => {
                if let (Some(fill), Some(b)) = (job.take_copy_out(), &slot.buf) {
                    if let Some(part) = part(b, fill) {
                        sys::copy_to_iovecs(slot.req.iovecs(), fill.skip, part);
                    }
                }
                self.advance(ix, out);
            }
        }
    }

    /// Plans the request in slot `ix` again as a job and goes on with it:
    /// at once when it has what it needs (its buffer; a read-modify-write
    /// keeps running alone), else behind the waiting requests.
    fn restart_job(&mut self, ix: u32, out: &mut Vec<Completion>) {
        let geo = self.geo();
        let Some(slot) = self.slots.get_mut(ix as usize).and_then(Option::as_mut) else {
            return;
        };
        let job = Job::new(slot.req.op(), slot.req.offset(), slot.req.len(), &geo);
        let ready = slot.buf.is_some() || !job.needs_buffer(&geo);
        let rmw = job.is_rmw();
        slot.work = Work::Job(job);
        slot.by_hand = true;
        if ready {
            self.advance(ix, out);
        } else {
            // Only a job that was not a read-modify-write lacks a buffer,
            // and the same range planned again is not one either.
            self.rmw_waiting += usize::from(rmw);
            self.waiting.push_back(ix);
        }
    }

    /// Starts waiting requests, oldest first, as far as buffers and the
    /// read-modify-write rule allow.
    pub(super) fn pump(&mut self, out: &mut Vec<Completion>) {
        let geo = self.geo();
        while let Some(&ix) = self.waiting.front() {
            if self.rmw_running {
                break;
            }
            let Some(slot) = self.slots.get_mut(ix as usize).and_then(Option::as_mut) else {
                self.waiting.pop_front();
                continue;
            };
            let Work::Job(job) = &slot.work else {
                self.waiting.pop_front();
                self.start_direct(ix);
                continue;
            };
            let rmw = job.is_rmw();
            if rmw && self.in_lib > 0 {
                break;
            }
            if job.needs_buffer(&geo) && slot.buf.is_none() {
                match self.pool.try_take() {
                    Some(b) => slot.buf = Some(b),
                    None => break,
                }
                self.stats.count_bounced();
            }
            self.waiting.pop_front();
            if rmw {
                self.rmw_waiting -= 1;
                self.rmw_running = true;
            }
            self.advance(ix, out);
        }
    }

    /// Submits what was enqueued, reaping nothing.
    pub(super) fn submit_only(&mut self) {
        loop {
            match self.q.do_io(&mut [], 0, None, None) {
                Err(e) if e.errno() == Errno::INTR => continue,
                // On failure the requests stay queued in libblkio and go
                // with the next call.
                _ => break,
            }
        }
        self.unsubmitted = false;
    }

    /// Submits, reaps and starts waiting requests until libblkio has
    /// nothing more to give; with `wait`, first blocks until at least one
    /// of its requests completes.
    pub(super) fn run_io(&mut self, out: &mut Vec<Completion>, wait: bool) -> Result<(), Errno> {
        let mut min = usize::from(wait && self.in_lib > 0);
        loop {
            let n = match self.q.do_io(&mut self.reaped, min, None, None) {
                Ok(n) => n.min(REAP_BATCH),
                Err(e) if e.errno() == Errno::INTR => continue,
                Err(e) => return Err(e.errno()),
            };
            self.unsubmitted = false;
            min = 0;
            for i in 0..n {
                // SAFETY: `do_io` initialized the first `n` entries.
                let c = unsafe { self.reaped[i].assume_init_read() };
                self.on_reaped(c.user_data, c.ret, out);
            }
            self.pump(out);
            if n < REAP_BATCH && !self.unsubmitted {
                return Ok(());
            }
        }
    }

    /// Waits for every request libblkio holds; false if libblkio failed
    /// first.
    pub(super) fn drain_for_close(&mut self) -> bool {
        while self.in_lib > 0 {
            match self.q.do_io(&mut self.reaped, 1, None, None) {
                Ok(n) => self.in_lib = self.in_lib.saturating_sub(n.min(REAP_BATCH)),
                Err(e) if e.errno() == Errno::INTR => {}
                Err(_) => return false,
            }
        }
        true
    }
}
