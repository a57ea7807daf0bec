//! `null-co`: a node that does no I/O. Reads leave buffers untouched (or
//! zero them with `read-zeroes=on`), writes are dropped. With `latency-ns`
//! each request completes that long after submission, timed by a timerfd;
//! without it requests complete at once. It isolates the cost of the rest
//! of the stack from any disk's.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qapi::{BlockdevCommon, BlockdevOptionsNull};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::completion::{clear_eventfd, new_eventfd, LocalCompletions};
use crate::limits::BlockLimits;
use crate::node::{BlockNode, NodeCommon, NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestOp, SubmitError};
use crate::stats::{NodeStats, QueueStats};
use crate::{sys, BlockError};

/// QEMU's default null-co size: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;

/// The `null-co` node.
pub struct NullNode {
    common: NodeCommon,
    size: Arc<AtomicU64>,
    read_zeroes: bool,
    latency: Duration,
    stats: Arc<NodeStats>,
}

impl NullNode {
    pub(crate) fn open(
        name: String,
        common: &BlockdevCommon,
        opts: &BlockdevOptionsNull,
    ) -> Result<Self, BlockError> {
        Ok(NullNode {
            common: NodeCommon::new(name, common, common.read_only),
            size: Arc::new(AtomicU64::new(opts.size.map_or(DEFAULT_SIZE, |s| s.0))),
            read_zeroes: opts.read_zeroes,
            latency: Duration::from_nanos(opts.latency_ns),
            stats: Arc::default(),
        })
    }
}

impl BlockNode for NullNode {
    fn node_name(&self) -> &str {
        &self.common.name
    }
    fn driver(&self) -> &'static str {
        "null-co"
    }
    fn capacity(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.common.read_only {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                self.common.name
            )));
        }
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
    fn limits(&self) -> BlockLimits {
        BlockLimits {
            discard_granularity: 512,
            ..BlockLimits::default()
        }
    }
    fn block_status(
        &self,
        _offset: u64,
        len: u64,
    ) -> Result<(u64, crate::BlockStatus), BlockError> {
        // With read-zeroes the node reads zeroes and holds nothing.
        let st = if self.read_zeroes {
            crate::BlockStatus::Hole
        } else {
            crate::BlockStatus::Data
        };
        Ok((len.max(1), st))
    }
    fn read_only(&self) -> bool {
        self.common.read_only
    }
    fn options(&self) -> crate::node::NodeOptions {
        self.common.options()
    }
    fn stats(&self) -> &NodeStats {
        &self.stats
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        let eventfd = Arc::new(new_eventfd()?);
        let timer = if self.latency.is_zero() {
            None
        } else {
            Some(TimerFd::new().map_err(|e| BlockError::Os {
                what: "create a timerfd".into(),
                source: e.into(),
            })?)
        };
        Ok(Box::new(NullQueue {
            common: self.common.clone(),
            size: self.size.clone(),
            read_zeroes: self.read_zeroes,
            latency: self.latency,
            stats: self.stats.queue(),
            ready: LocalCompletions::new(eventfd.clone()),
            eventfd,
            timer,
            delayed: VecDeque::new(),
        }))
    }
}

/// One thread's queue on a [`NullNode`].
struct NullQueue {
    common: NodeCommon,
    size: Arc<AtomicU64>,
    read_zeroes: bool,
    latency: Duration,
    stats: QueueStats,
    ready: LocalCompletions,
    eventfd: Arc<EventFd>,
    timer: Option<TimerFd>,
    delayed: VecDeque<(Instant, Completion)>,
}

impl NullQueue {
    fn complete(&mut self, c: Completion) {
        let Some(timer) = &mut self.timer else {
            // Announced at the next kick, unless reaped before.
            self.ready.push_quiet(c);
            return;
        };
        let due = c.request.start.unwrap_or_else(Instant::now) + self.latency;
        if self.delayed.is_empty() {
            arm(timer, due);
        }
        self.delayed.push_back((due, c));
    }
}

impl NodeQueue for NullQueue {
    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let req = match self
            .common
            .precheck(req, self.size.load(Ordering::Relaxed))?
        {
            Precheck::Done(c) => {
                self.complete(c);
                return Ok(());
            }
            Precheck::Forward(req) => req,
        };
        if req.op() == RequestOp::Read && self.read_zeroes {
            sys::zero_iovecs(req.iovecs(), 0);
        }
        let len = match req.op() {
            RequestOp::Flush => 0,
            _ => req.len(),
        };
        self.complete(Completion {
            request: req,
            result: Ok(len),
        });
        Ok(())
    }

    fn kick(&mut self) {
        self.ready.signal();
    }

    fn completion_fd(&self) -> RawFd {
        match &self.timer {
            Some(t) => t.as_raw_fd(),
            None => self.eventfd.as_raw_fd(),
        }
    }

    fn completions_ready(&mut self) -> bool {
        !self.ready.is_empty()
            || self
                .delayed
                .front()
                .is_some_and(|(due, _)| *due <= Instant::now())
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        if let Some(timer) = &mut self.timer {
            let now = Instant::now();
            while self.delayed.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, c)) = self.delayed.pop_front() {
                    out.push(c);
                }
            }
            // Re-arming (or disarming) also clears the timer's readiness.
            match self.delayed.front() {
                Some((due, _)) => arm(timer, *due),
                None => {
                    let _ = timer.reset(Duration::ZERO, None);
                }
            }
        } else if self.ready.drain_into(out) {
            // The eventfd is readable only after a kick left completions
            // waiting: a poller that reaps first makes no system call.
            clear_eventfd(&self.eventfd);
        }
        for c in &mut out[start..] {
            self.stats.record_completion(c);
        }
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.ready.len() + self.delayed.len()
    }

    fn complete_now(&mut self, c: Completion) {
        self.complete(c);
    }
}

/// Arms `timer` to fire at `due` (at once if that has passed).
fn arm(timer: &mut TimerFd, due: Instant) {
    let wait = due.saturating_duration_since(Instant::now());
    // A zero duration would disarm the timer: wait at least a nanosecond.
    let _ = timer.reset(wait.max(Duration::from_nanos(1)), None);
}

#[cfg(test)]
mod tests {
    use std::os::fd::RawFd;

    use crate::{BlockGraph, Request};

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn completions_reaped_before_the_kick_cost_no_eventfd_signal() {
        let mut g = BlockGraph::new();
        let node = g
            .add(&qapi::parse_blockdev("null-co,node-name=n0,size=1M").unwrap())
            .unwrap();
        let mut q = node.open_queue().unwrap();
        let fd = q.completion_fd();
        let mut out = Vec::new();

        // Reaped at once: the eventfd was never made readable.
        assert!(!q.completions_ready());
        q.submit(Request::flush()).unwrap();
        assert!(q.completions_ready());
        assert_eq!(q.poll_completions(&mut out), 1);
        assert!(!q.completions_ready());
        assert!(!readable(fd));
        q.kick();
        assert!(!readable(fd), "nothing left to announce");

        // Left for the event loop: the kick announces it.
        q.submit(Request::flush()).unwrap();
        assert!(!readable(fd));
        q.kick();
        assert!(readable(fd));
        assert_eq!(q.poll_completions(&mut out), 1);
        assert!(!readable(fd), "reaping clears the eventfd");
    }
}
