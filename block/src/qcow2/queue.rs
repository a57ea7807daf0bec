//! One thread's queue of a qcow2 node. A guest request is planned under
//! the metadata lock ([`super::plan`], [`super::alloc`]); its host ranges
//! go to the child's data queue as sub-requests over the guest's own
//! iovecs, and the guest request completes when the last of them does.
//! Allocating writes are sub-requests too (their data with the
//! copy-on-write around it); when they complete, their L2 entries are
//! linked under the lock ([`Meta::commit_runs`]) before the guest request
//! completes. Requests finished here (zero clusters, discard) complete
//! through a local list.
//!
//! A write or clear ([`super::write`]) that touches a guest cluster
//! another request is allocating is deferred, never waited for (a queue that blocked would
//! not reap the allocation it may be waiting for): the queue registers
//! its [`Waker`] and retries when busy marks go.
//!
//! The completion fd is an epoll instance over the child's completion fd,
//! the local list's eventfd and the waker's, so the owner still sees one
//! fd.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::alloc::Run;
use super::io::{slice_iovecs, AlignedBuf};
use super::meta::Meta;
use super::plan::{Backing, BackingRange, HostRange};
use super::{Shared, Waker};
use crate::completion::{clear_eventfd, new_eventfd, LocalCompletions};
use crate::node::{NodeCommon, NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::QueueStats;
use crate::BlockError;

/// A guest request waiting for its sub-requests.
pub(super) struct Parent {
    request: Request,
    left: usize,
    pub error: Option<RequestError>,
    /// Clusters the sub-requests fill, linked when they all succeeded.
    pub runs: Vec<Run>,
    /// Copy-on-write data the sub-requests write.
    pub bufs: Vec<AlignedBuf>,
}

impl Parent {
    pub fn new(request: Request) -> Self {
        Parent {
            request,
            left: 0,
            error: None,
            runs: Vec::new(),
            bufs: Vec::new(),
        }
    }
}

/// One host write or read of a parent.
pub(super) type Sub = (u64, Vec<libc::iovec>);

/// One thread's queue of a [`super::Qcow2Node`].
pub(crate) struct Qcow2Queue {
    common: NodeCommon,
    pub(super) shared: Arc<Shared>,
    /// Data sub-requests, asynchronous.
    data: Box<dyn NodeQueue>,
    /// Metadata and slow-path I/O, synchronous.
    pub(super) meta_io: Box<dyn NodeQueue>,
    pub(super) backing: Option<Backing>,
    stats: QueueStats,
    parents: Vec<Option<Parent>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    /// Requests waiting for busy clusters.
    pub(super) deferred: VecDeque<Request>,
    pub(super) waker: Arc<Waker>,
    local: LocalCompletions,
    eventfd: Arc<EventFd>,
    epoll: OwnedFd,
    scratch: Vec<Completion>,
}

fn epoll_add(epoll: &OwnedFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: a valid epoll instance and event; the kernel copies it.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Defers `req` until busy marks go, with `waker` told then.
pub(super) fn defer(
    meta: &mut Meta,
    waker: &Arc<Waker>,
    deferred: &mut VecDeque<Request>,
    req: Request,
) {
    if !meta.waiters.iter().any(|w| Arc::ptr_eq(w, waker)) {
        meta.waiters.push(waker.clone());
    }
    deferred.push_back(req);
}

impl Qcow2Queue {
    pub(crate) fn new(
        common: NodeCommon,
        shared: Arc<Shared>,
        data: Box<dyn NodeQueue>,
        meta_io: Box<dyn NodeQueue>,
        backing: Option<Backing>,
        stats: QueueStats,
    ) -> Result<Self, BlockError> {
        let os = |what: &str, e: io::Error| BlockError::Os {
            what: what.into(),
            source: e,
        };
        // SAFETY: epoll_create1 returns a new descriptor we own, or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(os("create an epoll instance", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let eventfd = Arc::new(new_eventfd()?);
        let waker = Arc::new(Waker::new()?);
        epoll_add(&epoll, data.completion_fd())
            .and_then(|()| epoll_add(&epoll, eventfd.as_raw_fd()))
            .and_then(|()| epoll_add(&epoll, waker.fd()))
            .map_err(|e| os("watch the qcow2 queue's fds", e))?;
        Ok(Qcow2Queue {
            common,
            shared,
            data,
            meta_io,
            backing,
            stats,
            parents: Vec::new(),
            free_slots: Vec::new(),
            in_flight: 0,
            deferred: VecDeque::new(),
            waker,
            local: LocalCompletions::new(eventfd.clone()),
            eventfd,
            epoll,
            scratch: Vec::new(),
        })
    }

    pub(super) fn finish(&mut self, request: Request, result: Result<(), RequestError>) {
        let len = match request.op() {
            RequestOp::Flush => 0,
            _ => request.len(),
        };
        self.local.push_quiet(Completion {
            result: result.map(|()| len),
            request,
        });
    }

    /// Sends `subs` of `parent` to the data queue (writes for a write or
    /// write-zeroes parent); the parent completes when they all have.
    pub(super) fn launch(&mut self, mut parent: Parent, subs: Vec<Sub>) {
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.parents.push(None);
            self.parents.len() - 1
        });
        let op = parent.request.op();
        let write = matches!(op, RequestOp::Write | RequestOp::WriteZeroes);
        let fua = parent.request.flags().fua;
        for (host, iov) in subs {
            // SAFETY: the iovecs are part of the parent's own, or of
            // buffers the parent or the node's shared state holds; both
            // stay valid until the parent completes, which is only after
            // this sub-request came back.
            let sub = unsafe {
                match op {
                    RequestOp::Flush => Request::flush(),
                    _ if write => Request::write(host, iov, fua),
                    _ => Request::read(host, iov),
                }
            };
            match self.data.submit(sub.with_user_data(slot as u64)) {
                Ok(()) => parent.left += 1,
                Err(e) => {
                    parent.error.get_or_insert(e.error);
                    break;
                }
            }
        }
        if parent.left == 0 {
            self.free_slots.push(slot);
            let c = self.complete(parent);
            self.local.push_quiet(c);
            return;
        }
        self.in_flight += 1;
        self.parents[slot] = Some(parent);
    }

    /// The completion of a parent whose sub-requests all came back: its
    /// new clusters linked first (step 3 of [`super::alloc`]).
    fn complete(&mut self, p: Parent) -> Completion {
        let mut result = p.error.map_or(Ok(()), Err);
        if !p.runs.is_empty() {
            let io = self.meta_io.as_mut();
            let mut meta = self.shared.lock();
            let mut done = meta.commit_runs(io, &p.runs, result.is_ok());
            // A FUA write must be durable with its allocation.
            if done.is_ok() && result.is_ok() && p.request.flags().fua {
                done = meta.checkpoint(io);
            }
            for w in meta.waiters.drain(..) {
                w.wake();
            }
            drop(meta);
            if let Err(e) = done {
                result = result.and(Err(e.request_error()));
            }
        }
        let len = match p.request.op() {
            RequestOp::Flush => 0,
            _ => p.request.len(),
        };
        Completion {
            result: result.map(|()| len),
            request: p.request,
        }
    }

    fn read(&mut self, req: Request) {
        let mut host = Vec::new();
        let mut backing: Vec<BackingRange> = Vec::new();
        let has_backing = self.backing.is_some();
        let planned = {
            let mut meta = self.shared.lock();
            // SAFETY: the request's iovecs are valid for writes until it
            // completes, which is after this call.
            unsafe {
                meta.plan_read(
                    self.meta_io.as_mut(),
                    req.offset(),
                    req.iovecs(),
                    &mut host,
                    &mut backing,
                    has_backing,
                )
            }
        };
        let done = planned.and_then(|()| {
            let Some(b) = self.backing.as_mut() else {
                return Ok(());
            };
            for r in &backing {
                // SAFETY: as above.
                unsafe { b.read(r.guest, &slice_iovecs(req.iovecs(), r.skip, r.len))? };
            }
            Ok(())
        });
        match done {
            Ok(()) => {
                let subs = ranges(&host, req.iovecs());
                self.launch(Parent::new(req), subs);
            }
            Err(e) => self.finish(req, Err(e.request_error())),
        }
    }

    /// A checkpoint of the metadata, then a flush of the data queue (for
    /// the in-place writes it completed).
    fn flush(&mut self, req: Request) {
        let done = self.shared.lock().checkpoint(self.meta_io.as_mut());
        if let Err(e) = done {
            self.finish(req, Err(e.request_error()));
            return;
        }
        self.launch(Parent::new(req), vec![(0, Vec::new())]);
    }

    fn dispatch(&mut self, req: Request) {
        match req.op() {
            RequestOp::Read => self.read(req),
            RequestOp::Write => self.write(req),
            RequestOp::Flush => self.flush(req),
            RequestOp::Discard | RequestOp::WriteZeroes => self.clear(req),
        }
    }

    /// Retries deferred requests if busy marks went since they were
    /// deferred.
    fn retry_deferred(&mut self) {
        if !self.waker.take() || self.deferred.is_empty() {
            return;
        }
        for req in std::mem::take(&mut self.deferred) {
            self.dispatch(req);
        }
        self.data.kick();
    }

    /// Accounts finished sub-requests; moves finished parents to `out`.
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut subs = std::mem::take(&mut self.scratch);
        self.data.poll_completions(&mut subs);
        self.account(&mut subs, out);
        self.scratch = subs;
    }

    /// Accounts the finished sub-requests `subs` (emptied); moves finished
    /// parents to `out`.
    fn account(&mut self, subs: &mut Vec<Completion>, out: &mut Vec<Completion>) {
        for c in subs.drain(..) {
            let slot = c.request.user_data as usize;
            let Some(Some(p)) = self.parents.get_mut(slot) else {
                continue;
            };
            p.left -= 1;
            if let Err(e) = c.result {
                p.error.get_or_insert(e);
            }
            if p.left > 0 {
                continue;
            }
            let p = self.parents[slot].take().expect("checked above");
            self.free_slots.push(slot);
            self.in_flight -= 1;
            let c = self.complete(p);
            out.push(c);
        }
    }
}

/// The sub-requests of `ranges` over the request data `iovecs`.
pub(super) fn ranges(ranges: &[HostRange], iovecs: &[libc::iovec]) -> Vec<Sub> {
    ranges
        .iter()
        .map(|r| (r.host, slice_iovecs(iovecs, r.skip, r.len)))
        .collect()
}

impl NodeQueue for Qcow2Queue {
    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let cap = self.shared.size.load(std::sync::atomic::Ordering::Acquire);
        let req = match self.common.precheck(req, cap)? {
            Precheck::Done(c) => {
                self.local.push_quiet(c);
                return Ok(());
            }
            Precheck::Forward(r) => r,
        };
        self.dispatch(req);
        Ok(())
    }

    fn kick(&mut self) {
        self.data.kick();
        self.local.signal();
    }

    fn sync_memory(&mut self) {
        self.data.sync_memory();
        self.meta_io.sync_memory();
        if let Some(b) = &mut self.backing {
            b.queue.sync_memory();
        }
    }

    fn completions_ready(&mut self) -> bool {
        !self.local.is_empty()
            || (self.in_flight > 0 && self.data.completions_ready())
            || self.waker.pending()
    }

    fn completion_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        if self.local.drain_into(out) {
            clear_eventfd(&self.eventfd);
        }
        if self.in_flight > 0 {
            self.reap(out);
        }
        // What the reaping released, or another queue did, may let
        // deferred requests go; some finish at once.
        self.retry_deferred();
        if self.local.drain_into(out) {
            clear_eventfd(&self.eventfd);
        }
        for c in &mut out[start..] {
            self.stats.record_completion(c);
        }
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.local.len() + self.deferred.len()
    }

    fn complete_now(&mut self, c: Completion) {
        self.local.push(c);
    }

    fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        self.poll_completions(out);
        if out.len() - start >= min || self.in_flight() == 0 {
            self.data.kick();
        }
        while out.len() - start < min && self.in_flight() > 0 {
            if self.local.is_empty() && self.deferred.is_empty() {
                // Only the data queue has work: wait there, in one system
                // call where its engine can (io_uring submits what is
                // queued and waits at once), not in a kick, a poll of our
                // epoll fd and a read.
                let mut subs = std::mem::take(&mut self.scratch);
                if self.data.wait_completions(1, &mut subs) == 0 && self.data.in_flight() == 0 {
                    // The data queue lost our sub-requests: nothing will
                    // complete them, so waiting longer would spin.
                    self.scratch = subs;
                    break;
                }
                let at = out.len();
                self.account(&mut subs, out);
                self.scratch = subs;
                for c in &mut out[at..] {
                    self.stats.record_completion(c);
                }
            } else {
                self.data.kick();
                crate::sys::wait_readable(self.completion_fd());
            }
            self.poll_completions(out);
        }
        out.len() - start
    }
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        // Allocations in flight keep their guest clusters busy until they
        // complete: let them, so that other queues of the node never wait
        // for marks nobody will remove. What the data queue lost is
        // released unlinked (leaked, as a crash would leave it).
        let mut done = Vec::new();
        while self.in_flight > 0 && self.data.in_flight() > 0 {
            let mut subs = std::mem::take(&mut self.scratch);
            self.data.wait_completions(1, &mut subs);
            self.account(&mut subs, &mut done);
            self.scratch = subs;
        }
        let lost: Vec<Run> = self
            .parents
            .iter_mut()
            .filter_map(Option::take)
            .flat_map(|p| p.runs)
            .collect();
        if !lost.is_empty() {
            let mut meta = self.shared.lock();
            let _ = meta.commit_runs(self.meta_io.as_mut(), &lost, false);
            for w in meta.waiters.drain(..) {
                w.wake();
            }
        }
    }
}
