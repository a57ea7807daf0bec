//! `aio=threads`: a small pool of worker threads per queue runs requests
//! with preadv/pwritev2/fdatasync/fallocate and hands completions back
//! through the queue's eventfd, like QEMU's thread pool.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{sync_io, QueueContext};
use crate::completion::{clear_eventfd, new_eventfd, LocalCompletions, SharedCompletions};
use crate::node::{NodeQueue, Precheck};
use crate::request::{Completion, Request, RequestError, SubmitError};
use crate::stats::QueueStats;
use crate::BlockError;

struct Jobs {
    queue: VecDeque<Request>,
    shutdown: bool,
}

struct PoolShared {
    ctx: QueueContext,
    jobs: Mutex<Jobs>,
    wake: Condvar,
    done: SharedCompletions,
}

/// Worker threads that run requests synchronously and signal `eventfd`.
pub(super) struct WorkerPool {
    shared: Arc<PoolShared>,
    workers: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    pub fn new(
        ctx: QueueContext,
        threads: usize,
        eventfd: Arc<EventFd>,
    ) -> Result<Self, BlockError> {
        let shared = Arc::new(PoolShared {
            ctx,
            jobs: Mutex::new(Jobs {
                queue: VecDeque::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
            done: SharedCompletions::new(eventfd),
        });
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("file-worker-{i}"))
                .spawn(move || {
                    sandbox::enter(sandbox::ThreadKind::FileWorker);
                    worker(&s)
                })
                .map_err(|source| BlockError::Os {
                    what: "spawn a file worker thread".into(),
                    source,
                })?;
            workers.push(h);
        }
        Ok(WorkerPool { shared, workers })
    }

    /// Hands a batch of requests to the workers (one lock for the batch).
    pub fn submit_batch(&self, batch: &mut Vec<Request>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let mut jobs = self.shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.queue.extend(batch.drain(..));
        drop(jobs);
        if n == 1 {
            self.shared.wake.notify_one();
        } else {
            self.shared.wake.notify_all();
        }
    }

    /// Moves finished requests to `out`.
    pub fn drain_into(&self, out: &mut Vec<Completion>) -> usize {
        self.shared.done.drain_into(out)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        // Workers finish every queued request before they see the shutdown.
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown = true;
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &PoolShared) {
    loop {
        let req = {
            let mut jobs = s.jobs.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(r) = jobs.queue.pop_front() {
                    break r;
                }
                if jobs.shutdown {
                    return;
                }
                jobs = s.wake.wait(jobs).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = sync_io::execute(&s.ctx.inner, &s.ctx.common, &req);
        s.done.push(Completion {
            request: req,
            result,
        });
    }
}

/// One thread's queue on a `file,aio=threads` node.
pub(super) struct ThreadsQueue {
    ctx: QueueContext,
    pool: WorkerPool,
    batch: Vec<Request>,
    local: LocalCompletions,
    eventfd: Arc<EventFd>,
    in_flight: usize,
    stats: QueueStats,
}

impl ThreadsQueue {
    pub fn new(ctx: QueueContext, threads: usize) -> Result<Self, BlockError> {
        let eventfd = Arc::new(new_eventfd()?);
        Ok(ThreadsQueue {
            pool: WorkerPool::new(ctx.clone(), threads, eventfd.clone())?,
            stats: ctx.stats.queue(),
            ctx,
            batch: Vec::with_capacity(64),
            local: LocalCompletions::new(eventfd.clone()),
            eventfd,
            in_flight: 0,
        })
    }
}

/// Checks what the file engines cannot take: more iovecs than preadv does.
pub(super) fn check_segments(req: Request, max: u32) -> Result<Request, SubmitError> {
    if req.iovecs().len() > max as usize {
        return Err(SubmitError {
            request: req,
            error: RequestError::Limits,
        });
    }
    Ok(req)
}

impl NodeQueue for ThreadsQueue {
    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let cap = self.ctx.inner.capacity_for(&req);
        match self.ctx.common.precheck(req, cap)? {
            Precheck::Done(c) => self.local.push(c),
            Precheck::Forward(req) => {
                let req = check_segments(req, self.ctx.inner.limits.max_segments)?;
                self.batch.push(req);
            }
        }
        self.in_flight += 1;
        Ok(())
    }

    fn kick(&mut self) {
        self.pool.submit_batch(&mut self.batch);
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        clear_eventfd(&self.eventfd);
        let start = out.len();
        self.local.drain_into(out);
        self.pool.drain_into(out);
        for c in &mut out[start..] {
            self.stats.record_completion(c);
        }
        let n = out.len() - start;
        self.in_flight -= n;
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn complete_now(&mut self, c: Completion) {
        self.in_flight += 1;
        self.local.push(c);
    }
}

impl Drop for ThreadsQueue {
    fn drop(&mut self) {
        // Requests submitted but never kicked still run: none is lost.
        self.kick();
    }
}
