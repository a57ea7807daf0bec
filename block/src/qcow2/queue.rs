//! One thread's queue of a qcow2 node. A guest request is planned under
//! the metadata lock ([`super::plan`]); its host ranges go to the child's
//! data queue as sub-requests over the guest's own iovecs, and the guest
//! request completes when the last of them does. Requests finished here
//! (zero clusters, allocation, discard) complete through a local list.
//!
//! The completion fd is an epoll instance over the child's completion fd
//! and the local list's eventfd, so the owner still sees one fd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::alloc;
use super::io::slice_iovecs;
use super::plan::{Backing, BackingRange, Clear, HostRange};
use super::{Qcow2Error, Shared};
use crate::completion::{clear_eventfd, new_eventfd, LocalCompletions};
use crate::node::{NodeCommon, NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::NodeStats;
use crate::BlockError;

/// A guest request waiting for its sub-requests.
struct Parent {
    request: Request,
    left: usize,
    error: Option<RequestError>,
}

/// One thread's queue of a [`super::Qcow2Node`].
pub(crate) struct Qcow2Queue {
    common: NodeCommon,
    shared: Arc<Shared>,
    /// Data sub-requests, asynchronous.
    data: Box<dyn NodeQueue>,
    /// Metadata and slow-path I/O, synchronous.
    meta_io: Box<dyn NodeQueue>,
    backing: Option<Backing>,
    stats: Arc<NodeStats>,
    parents: Vec<Option<Parent>>,
    free_slots: Vec<usize>,
    in_flight: usize,
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

impl Qcow2Queue {
    pub(crate) fn new(
        common: NodeCommon,
        shared: Arc<Shared>,
        data: Box<dyn NodeQueue>,
        meta_io: Box<dyn NodeQueue>,
        backing: Option<Backing>,
        stats: Arc<NodeStats>,
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
        epoll_add(&epoll, data.completion_fd())
            .and_then(|()| epoll_add(&epoll, eventfd.as_raw_fd()))
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
            local: LocalCompletions::new(eventfd.clone()),
            eventfd,
            epoll,
            scratch: Vec::new(),
        })
    }

    fn finish(&mut self, request: Request, result: Result<(), RequestError>) {
        let len = match request.op() {
            RequestOp::Flush => 0,
            _ => request.len(),
        };
        self.local.push_quiet(Completion {
            result: result.map(|()| len),
            request,
        });
    }

    /// Sends `ranges` of `request` to the data queue; the request completes
    /// when they all have.
    fn submit_ranges(&mut self, request: Request, ranges: &[HostRange]) {
        if ranges.is_empty() {
            self.finish(request, Ok(()));
            return;
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.parents.push(None);
            self.parents.len() - 1
        });
        let mut parent = Parent {
            left: 0,
            error: None,
            request,
        };
        let write = parent.request.op() == RequestOp::Write;
        let fua = parent.request.flags().fua;
        for r in ranges {
            let iov = slice_iovecs(parent.request.iovecs(), r.skip, r.len);
            // SAFETY: the iovecs are part of the parent's, valid until the
            // parent completes (its submitter's promise); the parent
            // completes only after this sub-request came back.
            let sub = unsafe {
                if write {
                    Request::write(r.host, iov, fua)
                } else {
                    Request::read(r.host, iov)
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
            let result = parent.error.map_or(Ok(()), Err);
            self.finish(parent.request, result);
            return;
        }
        self.in_flight += 1;
        self.parents[slot] = Some(parent);
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
            Ok(()) => self.submit_ranges(req, &host),
            Err(e) => self.finish(req, Err(e.request_error())),
        }
    }

    fn write(&mut self, req: Request) {
        let mut direct = Vec::new();
        // SAFETY: the request's iovecs are valid for reads until it
        // completes, which is after this call.
        let planned = unsafe {
            alloc::write(
                &self.shared,
                self.meta_io.as_mut(),
                self.backing.as_mut(),
                req.offset(),
                req.iovecs(),
                &mut direct,
            )
        };
        let planned = planned.and_then(|allocated| {
            // A FUA write must be durable with its allocation.
            if allocated && req.flags().fua {
                self.shared.lock().checkpoint(self.meta_io.as_mut())?;
            }
            Ok(())
        });
        match planned {
            Ok(()) => self.submit_ranges(req, &direct),
            Err(e) => self.finish(req, Err(e.request_error())),
        }
    }

    /// Discard and write-zeroes: full clusters become zero (or
    /// unallocated) clusters; write-zeroes writes zeroes to partial ones.
    fn clear(&mut self, req: Request) {
        let result = self.clear_range(&req);
        self.finish(req, result.map_err(|e| e.request_error()));
    }

    fn clear_range(&mut self, req: &Request) -> Result<(), Qcow2Error> {
        let zeroes = req.op() == RequestOp::WriteZeroes;
        let has_backing = self.backing.is_some();
        let meta = self.shared.lock();
        let cs = meta.g.cluster_size();
        let (off, end) = (req.offset(), req.offset() + req.len());
        let (first, last) = (off.div_ceil(cs), end / cs);
        // Version 2 cannot mark clusters zero over a backing file.
        let by_cluster = !(zeroes && meta.g.version < 3 && has_backing);
        let (mid_start, mid_end) = if by_cluster && first < last {
            (first * cs, last * cs)
        } else {
            (end, end)
        };
        if zeroes && req.flags().no_fallback && (mid_start != off || mid_end != end) {
            return Err(Qcow2Error::Unsupported(
                "write-zeroes without fallback".into(),
            ));
        }
        if mid_start < mid_end {
            let how = if zeroes {
                Clear::Zeroes
            } else {
                Clear::Discard {
                    keep: self.shared.discard_keep,
                }
            };
            let mut meta = alloc::wait_idle(&self.shared, meta, first, last - first);
            meta.clear(self.meta_io.as_mut(), first, last - first, how, has_backing)?;
        } else {
            drop(meta);
        }
        if !zeroes {
            // Partial clusters of a discard are left alone (as QEMU does).
            return Ok(());
        }
        for (a, b) in [(off, mid_start.min(end)), (mid_end.max(off), end)] {
            if a >= b {
                continue;
            }
            let mut zeros = vec![0u8; (b - a) as usize];
            let iov = [super::io::iovec_of(&mut zeros)];
            let mut direct = Vec::new();
            // SAFETY: `zeros` outlives both calls.
            unsafe {
                alloc::write(
                    &self.shared,
                    self.meta_io.as_mut(),
                    self.backing.as_mut(),
                    a,
                    &iov,
                    &mut direct,
                )?;
                for r in direct {
                    super::io::pwritev(
                        self.meta_io.as_mut(),
                        r.host,
                        slice_iovecs(&iov, r.skip, r.len),
                    )
                    .map_err(|source| Qcow2Error::Io {
                        what: "write zeroes".into(),
                        source,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// A checkpoint of the metadata, then a flush of the data queue (for
    /// the in-place writes it completed).
    fn flush(&mut self, req: Request) {
        let done = self.shared.lock().checkpoint(self.meta_io.as_mut());
        if let Err(e) = done {
            self.finish(req, Err(e.request_error()));
            return;
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.parents.push(None);
            self.parents.len() - 1
        });
        match self
            .data
            .submit(Request::flush().with_user_data(slot as u64))
        {
            Ok(()) => {
                self.in_flight += 1;
                self.parents[slot] = Some(Parent {
                    request: req,
                    left: 1,
                    error: None,
                });
            }
            Err(e) => {
                self.free_slots.push(slot);
                self.finish(req, Err(e.error));
            }
        }
    }

    /// Accounts finished sub-requests; moves finished parents to `out`.
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut subs = std::mem::take(&mut self.scratch);
        self.data.poll_completions(&mut subs);
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
            let len = match p.request.op() {
                RequestOp::Flush => 0,
                _ => p.request.len(),
            };
            out.push(Completion {
                result: p.error.map_or(Ok(len), Err),
                request: p.request,
            });
        }
        self.scratch = subs;
    }
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
        match req.op() {
            RequestOp::Read => self.read(req),
            RequestOp::Write => self.write(req),
            RequestOp::Flush => self.flush(req),
            RequestOp::Discard | RequestOp::WriteZeroes => self.clear(req),
        }
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
        !self.local.is_empty() || (self.in_flight > 0 && self.data.completions_ready())
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
        for c in &mut out[start..] {
            self.stats.record_completion(c);
        }
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.local.len()
    }

    fn complete_now(&mut self, c: Completion) {
        self.local.push(c);
    }
}
