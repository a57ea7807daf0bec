//! One thread's queue on an rbd node: requests go to librbd's `rbd_aio_*`
//! calls, which return at once; librbd finishes them on its own threads
//! and calls [`on_complete`], which records `(slot, result)` and makes the
//! queue's eventfd readable. The owning thread then finishes the request
//! (a FUA write goes on to its flush) and hands it back.
//!
//! Requests never cross threads: they stay in `slots` on the owner's side
//! (their iovec arrays, which librbd reads at completion, stay put there),
//! and librbd's callback only sees the slot's [`Tag`] (the shared
//! completion list and the slot number). Tags are boxed once per slot and
//! reused, so a warm queue allocates nothing of its own per request
//! (librbd allocates its completion).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::ffi::{self, RbdCompletionT, WRITE_ZEROES_FLAG_THICK_PROVISION};
use super::image::RbdImage;
use crate::completion::{clear_eventfd, new_eventfd};
use crate::limits::IOV_MAX;
use crate::node::{NodeCommon, NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::QueueStats;
use crate::BlockError;

/// Bytes of the zero buffer the write-zeroes fallback writes from (every
/// iovec of one write points at it).
const ZERO_BUF_LEN: usize = 64 << 10;
static ZEROES: [u8; ZERO_BUF_LEN] = [0; ZERO_BUF_LEN];

/// What librbd's threads hand to the queue's thread.
struct Done {
    ready: Mutex<Vec<(u32, isize)>>,
    eventfd: EventFd,
    /// The eventfd was written since the owner last cleared it. Only the
    /// owner clears it, right before it takes `ready`, so a result pushed
    /// later always finds the flag down and writes the eventfd again.
    signaled: AtomicBool,
}

impl Done {
    /// Makes the eventfd readable unless it is already.
    fn signal(&self) {
        if !self.signaled.swap(true, Ordering::AcqRel) {
            // A failed write means the counter is saturated: readable anyway.
            let _ = self.eventfd.write(1);
        }
    }
}

/// A slot's callback argument. Boxed, so its address stays put while the
/// slot vector grows.
struct Tag {
    done: *const Done,
    slot: u32,
}

/// librbd's completion callback (on one of librbd's threads).
extern "C" fn on_complete(c: RbdCompletionT, arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the `Tag` this completion was created with; the queue
    // keeps it (and its `Done`) alive until every request it started has
    // called back (see `RbdQueue::drop`).
    let tag = unsafe { &*(arg as *const Tag) };
    // SAFETY: as above, for the `Done` the tag points at.
    let done = unsafe { &*tag.done };
    let ret = match ffi::loaded() {
        Some(lib) => {
            // SAFETY: `c` is the completion librbd calls back with; it is
            // released here, once, and not used after.
            unsafe {
                let r = (lib.rbd_aio_get_return_value)(c);
                (lib.rbd_aio_release)(c);
                r
            }
        }
        // Unreachable: a completion exists only if the library loaded.
        None => -(libc::EIO as isize),
    };
    done.ready
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((tag.slot, ret));
    done.signal();
}

/// Where a request stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The operation itself; `parts` librbd calls outstanding.
    Op { parts: u32 },
    /// A FUA write's flush, after the write succeeded.
    Flush,
}

/// How many librbd calls a request started, and an error that stopped it
/// starting more.
type Started = (u32, Option<RequestError>);

struct InFlight {
    req: Request,
    stage: Stage,
    /// The first error of a multi-part operation.
    error: Option<RequestError>,
}

/// One thread's queue on an [`super::RbdNode`].
pub(crate) struct RbdQueue {
    common: NodeCommon,
    image: Arc<RbdImage>,
    capacity: Arc<AtomicU64>,
    stats: QueueStats,
    /// librbd has `rbd_aio_write_zeroes` (and it is not disabled).
    native_zeroes: bool,
    done: Arc<Done>,
    /// Boxed on purpose: librbd holds a tag's address while the vector
    /// may grow and move its elements.
    #[allow(clippy::vec_box)]
    tags: Vec<Box<Tag>>,
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    in_flight: usize,
    /// Finished on this thread (by the common options, or an empty
    /// request, or a multi-step request's last step): announced at the
    /// next kick through the same eventfd unless reaped before.
    local: Vec<Completion>,
    scratch: Vec<(u32, isize)>,
    /// iovecs of the write-zeroes fallback.
    zero_iovecs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `tags` point at this queue's own `Done`
// (kept alive by `done`); they move with the queue, and librbd's threads
// only read them.
unsafe impl Send for RbdQueue {}

impl RbdQueue {
    pub fn new(
        common: NodeCommon,
        image: Arc<RbdImage>,
        capacity: Arc<AtomicU64>,
        stats: QueueStats,
        native_zeroes: bool,
    ) -> Result<Self, BlockError> {
        Ok(RbdQueue {
            common,
            image,
            capacity,
            stats,
            native_zeroes,
            done: Arc::new(Done {
                ready: Mutex::new(Vec::with_capacity(64)),
                eventfd: new_eventfd()?,
                signaled: AtomicBool::new(false),
            }),
            tags: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            local: Vec::with_capacity(64),
            scratch: Vec::with_capacity(64),
            zero_iovecs: Vec::new(),
        })
    }

    fn take_slot(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            return s;
        }
        let slot = self.slots.len() as u32;
        self.slots.push(None);
        self.tags.push(Box::new(Tag {
            done: Arc::as_ptr(&self.done),
            slot,
        }));
        slot
    }

    /// A librbd completion that calls back with `slot`'s tag.
    fn completion(&self, slot: u32) -> Result<RbdCompletionT, RequestError> {
        let tag: *const Tag = &*self.tags[slot as usize];
        let mut c: RbdCompletionT = std::ptr::null_mut();
        // SAFETY: `tag` outlives the completion (see `on_complete`); `c` is
        // a valid out-pointer.
        let r = unsafe {
            (self.image.lib.rbd_aio_create_completion)(tag as *mut _, on_complete, &mut c)
        };
        if r < 0 {
            return Err(RequestError::Os(-r));
        }
        Ok(c)
    }

    /// Starts one librbd call for the request in `slot`: `op` gets a fresh
    /// completion and returns librbd's result. A refused call releases
    /// the completion (it will never call back).
    fn start(
        &self,
        slot: u32,
        op: impl FnOnce(&RbdImage, RbdCompletionT) -> libc::c_int,
    ) -> Result<(), RequestError> {
        let c = self.completion(slot)?;
        let r = op(&self.image, c);
        if r < 0 {
            // SAFETY: librbd refused the call, so `c` was not queued and
            // will not call back; it is released here, once.
            unsafe { (self.image.lib.rbd_aio_release)(c) };
            return Err(RequestError::Os(-r));
        }
        Ok(())
    }

    /// Starts `req` in `slot`: how many librbd calls will call back, and
    /// an error that stopped a multi-part request half way (the parts
    /// started still call back). On failure nothing is outstanding.
    fn start_request(&mut self, slot: u32, req: &Request) -> Result<Started, RequestError> {
        let (off, len) = (req.offset(), req.len());
        match req.op() {
            RequestOp::Read | RequestOp::Write => {
                let iov = req.iovecs();
                if iov.len() > IOV_MAX as usize {
                    return Err(RequestError::Limits);
                }
                let read = req.op() == RequestOp::Read;
                self.start(slot, |img, c| {
                    let f = if read {
                        img.lib.rbd_aio_readv
                    } else {
                        img.lib.rbd_aio_writev
                    };
                    // SAFETY: the iovecs describe memory the request's
                    // maker keeps valid until it comes back, which is after
                    // this completion called back. librbd keeps the iovec
                    // array itself until then for a read (it copies into it
                    // at completion): the array is the request's own heap
                    // vector, which neither moves nor changes while the
                    // request waits in its slot.
                    unsafe { f(img.handle, iov.as_ptr(), iov.len() as i32, off, c) }
                })?;
                Ok((1, None))
            }
            RequestOp::Flush => {
                // SAFETY: an open image and a fresh completion.
                self.start(slot, |img, c| unsafe {
                    (img.lib.rbd_aio_flush)(img.handle, c)
                })?;
                Ok((1, None))
            }
            RequestOp::Discard => {
                self.start(slot, |img, c| {
                    // SAFETY: an open image and a fresh completion.
                    unsafe { (img.lib.rbd_aio_discard)(img.handle, off, len, c) }
                })?;
                Ok((1, None))
            }
            RequestOp::WriteZeroes => self.start_write_zeroes(slot, req),
        }
    }

    fn start_write_zeroes(&mut self, slot: u32, req: &Request) -> Result<Started, RequestError> {
        let (off, len, flags) = (req.offset(), req.len(), req.flags());
        if let (true, Some(f)) = (self.native_zeroes, self.image.lib.rbd_aio_write_zeroes) {
            // Zeroes stay allocated unless the caller allows unmapping, as
            // QEMU asks librbd.
            let zero_flags = if flags.may_unmap {
                0
            } else {
                WRITE_ZEROES_FLAG_THICK_PROVISION
            };
            let len = usize::try_from(len).map_err(|_| RequestError::Limits)?;
            self.start(slot, |img, c| {
                // SAFETY: an open image and a fresh completion.
                unsafe { f(img.handle, off, len, c, zero_flags, 0) }
            })?;
            return Ok((1, None));
        }
        if flags.no_fallback {
            return Err(RequestError::Unsupported);
        }
        // Old librbd: write from the static zero buffer, in writes of at
        // most IOV_MAX iovecs, all started now.
        let per_write = ZERO_BUF_LEN as u64 * u64::from(IOV_MAX);
        let mut zero_iovecs = std::mem::take(&mut self.zero_iovecs);
        let mut parts = 0;
        let mut pos = off;
        let end = off + len;
        let mut result = Ok(());
        while pos < end {
            let n = (end - pos).min(per_write);
            zero_iovecs.clear();
            let mut left = n;
            while left > 0 {
                let l = left.min(ZERO_BUF_LEN as u64);
                zero_iovecs.push(libc::iovec {
                    iov_base: ZEROES.as_ptr() as *mut _,
                    iov_len: l as usize,
                });
                left -= l;
            }
            let iov = &zero_iovecs;
            let at = pos;
            result = self.start(slot, |img, c| {
                // SAFETY: every iovec points into `ZEROES`, which is static
                // and never written (librbd only reads write buffers). A
                // write's iovec array is turned into librbd's buffer list
                // during the call, so the next part may reuse it.
                unsafe {
                    (img.lib.rbd_aio_writev)(img.handle, iov.as_ptr(), iov.len() as i32, at, c)
                }
            });
            if result.is_err() {
                break;
            }
            parts += 1;
            pos += n;
        }
        self.zero_iovecs = zero_iovecs;
        match (parts, result) {
            (0, Err(e)) => Err(e),
            // Parts already started call back; the error goes with them.
            (p, Err(e)) => Ok((p, Some(e))),
            (p, Ok(())) => Ok((p, None)),
        }
    }

    fn finish(&mut self, mut c: Completion) {
        self.stats.record_completion(&mut c);
        self.local.push(c);
    }

    /// One librbd call of `slot` returned `ret`.
    fn on_result(&mut self, slot: u32, ret: isize) {
        let Some(f) = self.slots[slot as usize].as_mut() else {
            return;
        };
        if ret < 0 && f.error.is_none() {
            f.error = Some(rbd_error(ret));
        }
        match f.stage {
            Stage::Op { parts } if parts > 1 => {
                f.stage = Stage::Op { parts: parts - 1 };
                return;
            }
            Stage::Op { .. } if f.error.is_none() && f.req.op() == RequestOp::Read => {
                // librbd zero-fills reads past the end; a short count is
                // padded as QEMU does.
                let got = ret as u64;
                if got < f.req.len() {
                    crate::sys::zero_iovecs(f.req.iovecs(), got as usize);
                }
            }
            Stage::Op { .. } if f.error.is_none() && f.req.flags().fua && f.req.is_modifying() => {
                // FUA: the write is done, make it durable before reporting.
                f.stage = Stage::Flush;
                let r = self.start(slot, |img, c| {
                    // SAFETY: an open image and a fresh completion.
                    unsafe { (img.lib.rbd_aio_flush)(img.handle, c) }
                });
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        if let Some(f) = self.slots[slot as usize].as_mut() {
                            f.error = Some(e);
                        }
                    }
                }
            }
            _ => {}
        }
        let Some(f) = self.slots[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        self.in_flight -= 1;
        let result = match (f.error, f.req.op()) {
            (Some(e), _) => Err(e),
            (None, RequestOp::Flush) => Ok(0),
            (None, _) => Ok(f.req.len()),
        };
        self.finish(Completion {
            request: f.req,
            result,
        });
    }
}

/// A librbd error as the request's error. A timed-out operation (the
/// cluster did not answer within `rados_osd_op_timeout`) is an I/O error
/// to the guest, as any other failure of the backing store.
fn rbd_error(ret: isize) -> RequestError {
    match (-ret) as i32 {
        libc::ETIMEDOUT => RequestError::Os(libc::EIO),
        e => RequestError::Os(e),
    }
}

impl NodeQueue for RbdQueue {
    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let capacity = self.capacity.load(Ordering::Relaxed);
        let req = match self.common.precheck(req, capacity)? {
            Precheck::Done(c) => {
                self.finish(c);
                return Ok(());
            }
            Precheck::Forward(req) => req,
        };
        if req.is_empty() && req.op() != RequestOp::Flush {
            self.finish(Completion {
                request: req,
                result: Ok(0),
            });
            return Ok(());
        }
        let slot = self.take_slot();
        match self.start_request(slot, &req) {
            Ok((parts, error)) => {
                self.slots[slot as usize] = Some(InFlight {
                    req,
                    stage: Stage::Op { parts },
                    error,
                });
                self.in_flight += 1;
                Ok(())
            }
            Err(error) => {
                self.free.push(slot);
                Err(SubmitError {
                    request: req,
                    error,
                })
            }
        }
    }

    fn kick(&mut self) {
        if !self.local.is_empty() {
            self.done.signal();
        }
    }

    fn completions_ready(&mut self) -> bool {
        !self.local.is_empty() || self.done.signaled.load(Ordering::Acquire)
    }

    fn completion_fd(&self) -> RawFd {
        self.done.eventfd.as_raw_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        if self.done.signaled.swap(false, Ordering::AcqRel) {
            clear_eventfd(&self.done.eventfd);
            {
                let mut ready = self.done.ready.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::swap(&mut *ready, &mut self.scratch);
            }
            let mut results = std::mem::take(&mut self.scratch);
            for &(slot, ret) in &results {
                self.on_result(slot, ret);
            }
            results.clear();
            self.scratch = results;
        }
        out.append(&mut self.local);
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.local.len()
    }

    fn complete_now(&mut self, c: Completion) {
        self.local.push(c);
        self.done.signal();
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        // librbd's callbacks point at `tags` and `done`, and its reads write
        // into the requests' buffers: wait until every call has called back
        // (with a lost cluster, up to `rados_osd_op_timeout`; QEMU drains
        // the same way).
        let mut out = Vec::new();
        while self.in_flight > 0 {
            crate::sys::wait_readable(self.done.eventfd.as_raw_fd());
            self.poll_completions(&mut out);
            out.clear();
        }
    }
}
