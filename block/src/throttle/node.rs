//! The `throttle` filter driver (`--blockdev throttle,throttle-group=g0,
//! file=NODE`): requests pass to the child when the group's buckets allow
//! and wait in the queue otherwise, on the data plane: a waiting request
//! holds no thread, and other devices on the same IOThread go on.
//!
//! The queue's completion fd is an epoll instance over the child's
//! completion fd, a timerfd (the buckets' wait) and an eventfd (the
//! group's "your turn"), so the owner still sees one fd. Flushes are not
//! throttled (as in QEMU); reads count as reads, and writes, discards and
//! write-zeroes as writes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qapi::BlockdevCommon;
use vmm_sys_util::timerfd::TimerFd;

use super::group::{ThrottleGroup, Waker};
use crate::completion::{clear_eventfd, new_eventfd, LocalCompletions};
use crate::limits::BlockLimits;
use crate::node::{BlockNode, BlockStatus, NodeCommon, NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestOp, SubmitError};
use crate::stats::{NodeStats, QueueStats};
use crate::BlockError;

/// The `throttle` node.
pub struct ThrottleNode {
    common: NodeCommon,
    child: Arc<dyn BlockNode>,
    group: Arc<ThrottleGroup>,
    stats: Arc<NodeStats>,
}

impl ThrottleNode {
    pub(crate) fn open(
        name: String,
        common: &BlockdevCommon,
        child: Arc<dyn BlockNode>,
        group: Arc<ThrottleGroup>,
    ) -> Result<Self, BlockError> {
        if !common.read_only && child.read_only() {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                child.node_name()
            )));
        }
        Ok(ThrottleNode {
            common: NodeCommon::new(name, common, common.read_only),
            child,
            group,
            stats: Arc::default(),
        })
    }

    /// The group whose limits apply.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }
}

impl BlockNode for ThrottleNode {
    fn node_name(&self) -> &str {
        &self.common.name
    }
    fn driver(&self) -> &'static str {
        "throttle"
    }
    fn capacity(&self) -> u64 {
        self.child.capacity()
    }
    fn refresh_capacity(&self) -> Result<u64, BlockError> {
        self.child.refresh_capacity()
    }
    fn limits(&self) -> BlockLimits {
        self.child.limits()
    }
    fn read_only(&self) -> bool {
        self.common.read_only
    }
    fn children(&self) -> Vec<Arc<dyn BlockNode>> {
        vec![self.child.clone()]
    }
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        self.child.truncate(size)
    }
    fn cache_direct(&self) -> bool {
        self.child.cache_direct()
    }
    fn options(&self) -> crate::node::NodeOptions {
        self.common.options()
    }
    fn stats(&self) -> &NodeStats {
        &self.stats
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, BlockStatus), BlockError> {
        self.child.block_status(offset, len)
    }
    fn throttle_group(&self) -> Option<Arc<ThrottleGroup>> {
        Some(self.group.clone())
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        let child = self.child.open_queue()?;
        Ok(Box::new(ThrottleQueue::new(self, child)?))
    }
}

const TOKEN_CHILD: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const TOKEN_WAKE: u64 = 2;

/// One thread's queue of a [`ThrottleNode`].
struct ThrottleQueue {
    common: NodeCommon,
    child: Box<dyn NodeQueue>,
    group: Arc<ThrottleGroup>,
    member: u64,
    waker: Arc<Waker>,
    stats: QueueStats,
    capacity_of: Arc<dyn BlockNode>,
    /// Requests waiting for the buckets, reads and writes.
    waiting: [VecDeque<Request>; 2],
    local: LocalCompletions,
    epoll: OwnedFd,
    timer: TimerFd,
    due: Option<Instant>,
}

fn epoll_add(epoll: &OwnedFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: a valid epoll instance and event; the kernel copies it.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_write(op: RequestOp) -> bool {
    !matches!(op, RequestOp::Read)
}

impl ThrottleQueue {
    fn new(node: &ThrottleNode, child: Box<dyn NodeQueue>) -> Result<Self, BlockError> {
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
        let timer = TimerFd::new().map_err(|e| os("create a timerfd", e.into()))?;
        let eventfd = Arc::new(new_eventfd()?);
        epoll_add(&epoll, child.completion_fd(), TOKEN_CHILD)
            .and_then(|()| epoll_add(&epoll, timer.as_raw_fd(), TOKEN_TIMER))
            .and_then(|()| epoll_add(&epoll, eventfd.as_raw_fd(), TOKEN_WAKE))
            .map_err(|e| os("watch the throttle queue's fds", e))?;
        let waker = Arc::new(Waker {
            eventfd: eventfd.clone(),
            woken: Default::default(),
        });
        let member = node.group.join(waker.clone());
        Ok(ThrottleQueue {
            common: node.common.clone(),
            child,
            group: node.group.clone(),
            member,
            waker,
            stats: node.stats.queue(),
            capacity_of: node.child.clone(),
            waiting: [VecDeque::new(), VecDeque::new()],
            local: LocalCompletions::new(eventfd),
            epoll,
            timer,
            due: None,
        })
    }

    fn forward(&mut self, req: Request) {
        if let Err(e) = self.child.submit(req) {
            self.local.push(Completion {
                request: e.request,
                result: Err(e.error),
            });
        }
    }

    fn arm(&mut self, wait_ns: u64) {
        let due = Instant::now() + Duration::from_nanos(wait_ns.max(1));
        if self.due.is_some_and(|d| d <= due) {
            return;
        }
        self.due = Some(due);
        let _ = self.timer.reset(Duration::from_nanos(wait_ns.max(1)), None);
    }

    /// Sends what the buckets allow of the waiting requests.
    fn dispatch(&mut self) {
        for d in 0..2 {
            let write = d == 1;
            while let Some(req) = self.waiting[d].front() {
                let size = req.len();
                match self.group.try_dispatch(self.member, write, size) {
                    Ok(()) => {
                        let req = self.waiting[d].pop_front().expect("front");
                        self.forward(req);
                    }
                    Err(0) => break,
                    Err(w) => {
                        self.arm(w);
                        break;
                    }
                }
            }
            if self.waiting[d].is_empty() {
                self.group.done_waiting(self.member, write);
            }
        }
        self.child.kick();
    }

    fn waiting_len(&self) -> usize {
        self.waiting[0].len() + self.waiting[1].len()
    }
}

impl NodeQueue for ThrottleQueue {
    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let req = match self
            .common
            .precheck_with(req, || self.capacity_of.capacity())?
        {
            Precheck::Done(c) => {
                self.local.push_quiet(c);
                return Ok(());
            }
            Precheck::Forward(r) => r,
        };
        if req.op() == RequestOp::Flush || !self.group.enabled() {
            return self.child.submit(req);
        }
        let d = usize::from(is_write(req.op()));
        if self.waiting[d].is_empty() {
            match self.group.try_dispatch(self.member, d == 1, req.len()) {
                Ok(()) => return self.child.submit(req),
                Err(w) => {
                    if w > 0 {
                        self.arm(w);
                    }
                }
            }
        }
        self.waiting[d].push_back(req);
        Ok(())
    }

    fn kick(&mut self) {
        self.child.kick();
        self.local.signal();
    }

    fn sync_memory(&mut self) {
        self.child.sync_memory();
    }

    fn completions_ready(&mut self) -> bool {
        !self.local.is_empty()
            || self.child.completions_ready()
            || self.waker.woken.load(Ordering::Acquire)
            || self.due.is_some_and(|d| d <= Instant::now())
    }

    fn completion_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let mut signaled = self.local.drain_into(out);
        if self.waker.woken.load(Ordering::Acquire)
            && self.waker.woken.swap(false, Ordering::AcqRel)
        {
            signaled = true;
        }
        if signaled {
            clear_eventfd(&self.waker.eventfd);
        }
        let mut look = signaled;
        if self.due.is_some_and(|d| d <= Instant::now()) {
            self.due = None;
            // Disarming also clears the timer's readiness.
            let _ = self.timer.reset(Duration::ZERO, None);
            look = true;
        }
        if self.waiting_len() > 0 && (look || !self.group.enabled()) {
            if self.group.enabled() {
                self.dispatch();
            } else {
                // Limits were lifted: everything goes.
                for d in 0..2 {
                    while let Some(r) = self.waiting[d].pop_front() {
                        self.forward(r);
                    }
                    self.group.done_waiting(self.member, d == 1);
                }
                self.child.kick();
            }
            self.local.drain_into(out);
        }
        self.child.poll_completions(out);
        for c in &mut out[start..] {
            self.stats.record_completion(c);
        }
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.child.in_flight() + self.waiting_len() + self.local.len()
    }

    fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
        let idle = self.waiting_len() == 0
            && self.local.is_empty()
            && self.due.is_none()
            && !self.waker.woken.load(Ordering::Acquire);
        if idle {
            // Nothing waits here: the child's own wait, as if alone (an
            // io_uring child submits and sleeps in one system call).
            let start = out.len();
            let got = self.child.wait_completions(min, out);
            for c in &mut out[start..] {
                self.stats.record_completion(c);
            }
            return got;
        }
        let mut got = self.poll_completions(out);
        self.kick();
        if got < min {
            got += self.poll_completions(out);
        }
        while got < min && self.in_flight() > 0 {
            crate::sys::wait_readable(self.epoll.as_raw_fd());
            got += self.poll_completions(out);
        }
        got
    }

    fn complete_now(&mut self, c: Completion) {
        self.local.push(c);
    }
}

impl Drop for ThrottleQueue {
    fn drop(&mut self) {
        self.group.leave(self.member);
    }
}
