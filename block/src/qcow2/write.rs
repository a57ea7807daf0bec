//! The write side of a [`Qcow2Queue`]: writes, write-zeroes and discards
//! planned under the metadata lock ([`super::alloc`], [`super::plan`]),
//! deferred while a guest cluster they touch is being allocated, and
//! launched as sub-requests on the data queue.

use super::alloc::{run_iovecs, CowSource, WritePlan};
use super::plan::Clear;
use super::queue::{defer, ranges, Parent, Qcow2Queue};
use super::Qcow2Error;
use crate::request::{Request, RequestError, RequestOp};

impl Qcow2Queue {
    /// A guest write: planned (clusters written in place, runs to
    /// allocate) unless a cluster of it is busy, then launched.
    pub(super) fn write(&mut self, req: Request) {
        let (off, len) = (req.offset(), req.len());
        let mut plan = WritePlan::default();
        let mut meta = self.shared.lock();
        if meta.any_busy(off, off + len) {
            defer(&mut meta, &self.waker, &mut self.deferred, req);
            return;
        }
        let planned = meta.plan_write(self.meta_io.as_mut(), off, len, 0, &mut plan);
        drop(meta);
        let data = req.iovecs().to_vec();
        self.start_write(req, plan, planned, &data);
    }

    /// Step 2 of [`super::alloc`] for a planned write whose bytes are
    /// `data`: the copy-on-write read, then every write launched.
    fn start_write(
        &mut self,
        req: Request,
        plan: WritePlan,
        planned: Result<(), Qcow2Error>,
        data: &[libc::iovec],
    ) {
        let mut parent = Parent::new(req);
        let mut subs = ranges(&plan.direct, data);
        let mut bufs = Vec::new();
        let built = planned.and_then(|()| {
            let meta_io = self.meta_io.as_mut();
            let mut src = CowSource {
                g: self.shared.g,
                child: self.shared.child.as_ref(),
                io: meta_io,
                backing: self.backing.as_mut(),
                zeroes: &self.shared.zeroes,
            };
            for run in &plan.runs {
                subs.push(run_iovecs(&mut src, run, data, &mut bufs)?);
            }
            Ok(())
        });
        parent.runs = plan.runs;
        parent.bufs = bufs;
        if let Err(e) = built {
            // The parent completes at once: its runs are released.
            parent.error = Some(e.request_error());
            subs.clear();
        }
        self.launch(parent, subs);
    }

    /// Discard and write-zeroes: full clusters become zero (or
    /// unallocated) clusters; write-zeroes writes zeroes to partial ones.
    pub(super) fn clear(&mut self, req: Request) {
        let zeroes = req.op() == RequestOp::WriteZeroes;
        let has_backing = self.backing.is_some();
        let (off, end) = (req.offset(), req.offset() + req.len());
        let mut meta = self.shared.lock();
        if meta.any_busy(off, end) {
            defer(&mut meta, &self.waker, &mut self.deferred, req);
            return;
        }
        let cs = meta.g.cluster_size();
        let (first, last) = (off.div_ceil(cs), end / cs);
        // Version 2 cannot mark clusters zero over a backing file.
        let by_cluster = !(zeroes && meta.g.version < 3 && has_backing);
        let (mid_start, mid_end) = if by_cluster && first < last {
            (first * cs, last * cs)
        } else {
            (end, end)
        };
        if zeroes && req.flags().no_fallback && (mid_start != off || mid_end != end) {
            drop(meta);
            self.finish(req, Err(RequestError::Unsupported));
            return;
        }
        let mut done = Ok(());
        if mid_start < mid_end {
            let how = if zeroes {
                Clear::Zeroes
            } else {
                Clear::Discard {
                    keep: self.shared.discard_keep,
                }
            };
            done = meta.clear(self.meta_io.as_mut(), first, last - first, how, has_backing);
        }
        // Partial clusters of a discard are left alone (as QEMU does).
        if !zeroes || done.is_err() {
            drop(meta);
            self.finish(req, done.map_err(|e| e.request_error()));
            return;
        }
        // Zeroes written to the partial clusters, as a write would.
        let mut plan = WritePlan::default();
        let mut widest = 0;
        for (a, b) in [(off, mid_start.min(end)), (mid_end.max(off), end)] {
            if a < b && done.is_ok() {
                widest = widest.max(b - a);
                done = meta.plan_write(self.meta_io.as_mut(), a, b - a, 0, &mut plan);
            }
        }
        drop(meta);
        let data = self.shared.zero_iovecs(widest as usize);
        self.start_write(req, plan, done, &data);
    }
}
