//! One virtqueue on an IOThread: the unit of the data plane that the VMM's
//! virtio-blk devices and the vhost-user-blk export both run.
//!
//! A worker owns its `Queue`, its [`BlkQueueHandler`] (with its own node
//! queue), its kick EventFd (a KVM ioeventfd, or the frontend's kick fd)
//! and its interrupt (an irqfd behind a transport, or the frontend's call
//! fd). Nothing on the request path is shared but the write-through flag
//! and the counters, all atomics; nothing takes a lock or allocates once
//! the handler's tables are warm.
//!
//! Busy polling follows QEMU's `aio_poll`: when the IOThread starts
//! polling, [`IoSubscriber::poll_begin`] turns the driver's kicks off
//! (VRING_USED_F_NO_NOTIFY, or with EVENT_IDX no new `avail_event`); while
//! polling, the avail ring and the node queue are read without a syscall;
//! before the thread sleeps, [`IoSubscriber::poll_end`] turns kicks back
//! on and looks at the avail ring once more, so an entry the driver added
//! while it was not kicking is never left behind (virtio 1.2, 2.7.10).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::ring::AvailIdx;
use super::{BlkHandlerError, BlkQueueHandler, GuestMem, IoStatus};
use crate::iothread::{note_event, IoSubscriber};
use crate::virtio::{VirtioInterrupt, VirtioIrq};

const KICK: u32 = 0;
const COMPLETION: u32 = 1;
const RESUME: u32 = 2;

/// What a worker did, for tests, the export's statistics and the
/// evidence of where a queue waits. Written by the worker's own thread
/// only (relaxed atomics: no contention on the path).
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Kick events served (the thread woke for the driver).
    pub kicks: AtomicU64,
    /// Completion events served (the thread woke for the node).
    pub completion_wakeups: AtomicU64,
    /// Busy polls that found avail entries or completions.
    pub poll_hits: AtomicU64,
    /// Interrupts raised (irqfd or call fd writes).
    pub interrupts: AtomicU64,
    /// Entries that arrived while kicks were off and were found only when
    /// kicks were turned back on (the race `poll_end` closes).
    pub late_entries: AtomicU64,
}

impl WorkerCounters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a queue worker is made of.
pub struct QueueWorkerConfig {
    /// Name for messages (`dev0: queue 1`).
    pub id: String,
    /// Queue index, for the interrupt.
    pub index: u16,
    /// The virtqueue, set up and ready.
    pub queue: Queue,
    /// The handler with its node queue.
    pub handler: BlkQueueHandler,
    /// Guest memory of this memory-table generation.
    pub mem: Arc<GuestMem>,
    /// The driver's kick.
    pub kick: EventFd,
    /// Where used buffers are signalled.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The device's write-through mode, changed by the control plane.
    pub writethrough: Arc<AtomicBool>,
    /// Counters shared with the owner.
    pub counters: Arc<WorkerCounters>,
    /// Heads to start before the avail ring (vhost-user inflight heads a
    /// previous backend took and did not return).
    pub resubmit: Vec<u16>,
}

/// One enabled virtqueue on its IOThread.
pub struct QueueWorker {
    id: String,
    index: u16,
    queue: Queue,
    handler: BlkQueueHandler,
    mem: Arc<GuestMem>,
    kick: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    writethrough: Arc<AtomicBool>,
    wt: bool,
    broken: bool,
    /// The driver's kicks are off because the thread is polling.
    polling: bool,
    counters: Arc<WorkerCounters>,
    /// The avail index the poller reads every round.
    avail_idx: AvailIdx,
    /// Heads to start first (see `QueueWorkerConfig::resubmit`).
    resubmit: Vec<u16>,
    /// Written when a stopped device resumes (QMP `cont`).
    resume: Option<ResumeWaker>,
}

impl QueueWorker {
    /// A worker for `cfg`; it starts serving when added to an IOThread.
    pub fn new(cfg: QueueWorkerConfig) -> Self {
        let mut handler = cfg.handler;
        let wt = cfg.writethrough.load(Ordering::SeqCst);
        handler.set_writethrough(wt);
        QueueWorker {
            avail_idx: AvailIdx::resolve(&cfg.queue, cfg.mem.clone()),
            id: cfg.id,
            index: cfg.index,
            queue: cfg.queue,
            handler,
            mem: cfg.mem,
            kick: cfg.kick,
            interrupt: cfg.interrupt,
            writethrough: cfg.writethrough,
            wt,
            broken: false,
            polling: false,
            counters: cfg.counters,
            resubmit: cfg.resubmit,
            resume: None,
        }
    }

    /// Sends the chains a `stop` error kept, then serves the ring again.
    fn run_resume(&mut self) {
        if self.broken {
            return;
        }
        let r = self.handler.resume(&mut self.queue, &self.mem);
        self.notify(r);
        self.run_queue();
    }

    /// The virtqueue (its `next_avail` is what vhost-user's
    /// GET_VRING_BASE returns).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The handler (counters, node).
    pub fn handler(&self) -> &BlkQueueHandler {
        &self.handler
    }

    /// Whether a ring error stopped the queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Completes every in-flight request into the used ring (device stop
    /// or reset; the worker is off its thread). Kicks are left on, so a
    /// ring resumed later is not left mute.
    pub fn drain(&mut self) {
        if !self.broken {
            self.set_kicks(true);
        }
        self.handler.drain(&mut self.queue, &self.mem);
    }

    /// Raises the queue's interrupt (after [`QueueWorker::drain`]).
    pub fn signal(&self) {
        if let Err(e) = self.interrupt.signal(VirtioIrq::Queue(self.index)) {
            eprintln!("{}: could not raise the interrupt: {e}", self.id);
        }
    }

    /// Gives back the handler (with its node queue) of a stopped worker.
    pub fn into_handler(self) -> BlkQueueHandler {
        self.handler
    }

    /// Waits for in-flight requests and drops their results without
    /// touching the rings (the driver that owned them is gone).
    pub fn abandon(&mut self) {
        self.handler.abandon();
    }

    /// Flushes the node through this worker's node queue (shutdown).
    pub fn flush_node(&mut self) -> Result<(), block::RequestError> {
        self.handler.flush_node()
    }

    /// Guest memory of a new memory-table generation; requests in flight
    /// keep the old one mapped until they complete.
    pub fn set_memory(&mut self, mem: Arc<GuestMem>) {
        self.avail_idx = AvailIdx::resolve(&self.queue, mem.clone());
        self.mem = mem;
    }

    fn notify(&mut self, r: Result<bool, BlkHandlerError>) {
        match r {
            Ok(true) => raise(
                &self.id,
                self.index,
                self.interrupt.as_ref(),
                &self.counters,
            ),
            Ok(false) => {}
            Err(e) => {
                eprintln!(
                    "{}: {e}; the queue stops until the driver resets it",
                    self.id
                );
                self.broken = true;
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn run_queue(&mut self) {
        if self.broken {
            return;
        }
        let wt = self.writethrough.load(Ordering::Relaxed);
        if wt != self.wt {
            self.wt = wt;
            self.handler.set_writethrough(wt);
        }
        // While polling, kicks stay off: the poller watches the ring.
        let (id, index) = (self.id.as_str(), self.index);
        let (interrupt, counters) = (self.interrupt.as_ref(), self.counters.as_ref());
        let r = self
            .handler
            .process_queue(&mut self.queue, &self.mem, !self.polling, &mut || {
                raise(id, index, interrupt, counters)
            });
        self.notify(r);
        // The handler serves one ring's worth per call; come back for the
        // rest after the thread's other work, as a kick would.
        if !self.broken && !self.polling && self.avail_pending() {
            let _ = self.kick.write(1);
        }
    }

    fn run_completions(&mut self) {
        let r = self.handler.process_completions(&mut self.queue, &self.mem);
        // After a failure the rings are suspect; completions still free
        // their slots but raise nothing.
        if !self.broken {
            self.notify(r);
        }
    }

    /// Turns the driver's kicks on or off. Turning them on returns whether
    /// entries arrived that nobody has looked at.
    fn set_kicks(&mut self, on: bool) -> bool {
        let r = if on {
            self.queue.enable_notification(self.mem.as_ref())
        } else {
            self.queue
                .disable_notification(self.mem.as_ref())
                .map(|()| false)
        };
        match r {
            Ok(more) => more,
            Err(e) => {
                self.notify(Err(BlkHandlerError::Queue(e)));
                false
            }
        }
    }

    /// The poll-time source of the driver's kicks.
    fn kick_source(&self) -> u64 {
        self.kick.as_raw_fd() as u64
    }

    /// The poll-time source of the node's completions.
    fn completion_source(&self) -> u64 {
        self.handler.completion_fd() as u64
    }

    fn avail_pending(&self) -> bool {
        if self.handler.is_stopped() {
            // Stopped by an I/O error: the ring waits for resume, and a
            // poller must not take it for work.
            return false;
        }
        let idx = match self.avail_idx.load() {
            Some(i) => i,
            None => match self.queue.avail_idx(self.mem.as_ref(), Ordering::Acquire) {
                Ok(i) => i.0,
                Err(_) => return false,
            },
        };
        idx != self.queue.next_avail()
    }
}

/// Raises queue `index`'s interrupt and counts it.
fn raise(id: &str, index: u16, interrupt: &dyn VirtioInterrupt, counters: &WorkerCounters) {
    WorkerCounters::bump(&counters.interrupts);
    if let Err(e) = interrupt.signal(VirtioIrq::Queue(index)) {
        eprintln!("{id}: could not raise the interrupt: {e}");
    }
}

impl MutEventSubscriber for QueueWorker {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            return;
        }
        match events.data() {
            KICK => {
                note_event(self.kick_source());
                WorkerCounters::bump(&self.counters.kicks);
                let _ = self.kick.read();
                self.run_queue();
            }
            COMPLETION => {
                note_event(self.completion_source());
                WorkerCounters::bump(&self.counters.completion_wakeups);
                self.run_completions();
            }
            RESUME => {
                if let Some(r) = &self.resume {
                    let _ = r.eventfd.read();
                }
                self.run_resume();
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let kick = Events::with_data(&self.kick, KICK, EventSet::IN);
        let done = Events::with_data_raw(self.handler.completion_fd(), COMPLETION, EventSet::IN);
        if let Err(e) = ops.add(kick).and_then(|()| ops.add(done)) {
            eprintln!("{}: cannot watch the queue: {e:?}", self.id);
            self.broken = true;
            self.interrupt.set_needs_reset();
        }
        if let Some(st) = self.handler.io_status().cloned() {
            match EventFd::new(libc::EFD_NONBLOCK) {
                Ok(e) => {
                    let e = Arc::new(e);
                    if ops
                        .add(Events::with_data(e.as_ref(), RESUME, EventSet::IN))
                        .is_ok()
                    {
                        st.add_waker(e.clone());
                        self.resume = Some(ResumeWaker {
                            status: st,
                            eventfd: e,
                        });
                    }
                }
                Err(e) => eprintln!("{}: no resume eventfd: {e}", self.id),
            }
        }
        if !self.resubmit.is_empty() && !self.broken {
            let heads = std::mem::take(&mut self.resubmit);
            let r = self.handler.resubmit(&heads, &mut self.queue, &self.mem);
            self.notify(r);
        }
        // Entries made available before the worker existed (a vhost-user
        // ring resumed at a base, a kick consumed by a previous worker).
        if self.avail_pending() {
            self.run_queue();
        }
    }
}

/// A worker's resume eventfd, known to the device's I/O status while the
/// worker lives.
struct ResumeWaker {
    status: Arc<IoStatus>,
    eventfd: Arc<EventFd>,
}

impl Drop for ResumeWaker {
    fn drop(&mut self) {
        self.status.remove_waker(&self.eventfd);
    }
}

impl IoSubscriber for QueueWorker {
    fn poll_begin(&mut self) {
        if !self.broken && !self.polling {
            self.set_kicks(false);
            self.polling = true;
        }
    }

    fn poll(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let mut found = false;
        if self.avail_pending() {
            note_event(self.kick_source());
            self.run_queue();
            found = true;
        }
        let before = self.handler.in_flight();
        if self.handler.completions_ready() {
            self.run_completions();
            if self.handler.in_flight() < before {
                // Polling found it: the loop's clock is the poll round's.
                note_event(self.completion_source());
                found = true;
            }
        }
        if found {
            WorkerCounters::bump(&self.counters.poll_hits);
        }
        found
    }

    fn poll_end(&mut self) -> bool {
        if !self.polling {
            return false;
        }
        self.polling = false;
        if self.broken {
            return false;
        }
        if self.set_kicks(true) && !self.handler.is_stopped() {
            note_event(self.kick_source());
            WorkerCounters::bump(&self.counters.late_entries);
            self.run_queue();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests;
