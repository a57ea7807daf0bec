//! The vhost-user-blk export: the virtio-blk data plane of
//! [`crate::virtio_blk`] behind a vhost-user socket, built on
//! vhost-user-backend. Each virtqueue gets its own worker thread (or, with
//! an iothread, all of an export's queues share one); the worker's epoll
//! watches the queue's kick and the node queue's completion fd, so a
//! request goes from kick to block layer to used ring on one thread.
//!
//! The frontend's memory table feeds the RAM registrar, so guest RAM
//! becomes registered memory for every node that can use it. A frontend
//! that disconnects leaves its in-flight requests to finish (their results
//! are dropped: the rings belong to a driver that is gone) and the export
//! waits for the next one.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{BlockNode, MemoryRegion, RamRegistrar, RegionId};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::iothread::{IoThreadConfig, PollTime};
use crate::virtio_blk::config::{self, BlkOptions, CONFIG_LEN};
use crate::virtio_blk::{BlkHandlerError, BlkQueueHandler, GuestMem};

type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// The adaptive busy-poll cap of an export's own workers (no
/// `iothread=`). qemu-storage-daemon serves such an export from its main
/// loop, which polls too (QEMU's event-loop default, 32 µs), but mostly it
/// never sleeps under load, being busy with the ring. Our workers finish
/// a ring sooner and then wait for the frontend's next batch: a frontend
/// woken by our interrupt needs 40 to 100 µs to reap and resubmit on a
/// virtualized host (measured: a thread's wake-up there costs tens of
/// µs), past a 32 µs window, so polling would shrink to nothing and every
/// batch would pay two wake-ups. 128 µs covers that turnaround; an idle
/// frontend still shrinks the poll to zero after one longer wait.
pub const EXPORT_POLL_MAX_NS: u64 = 131_072;

struct Queue {
    handler: Mutex<BlkQueueHandler>,
    /// The vring, captured at its first event so `stop_vring` can drain.
    vring: Mutex<Option<Vring>>,
}

struct PollState {
    time: PollTime,
    /// When the worker returned to its epoll wait after polling.
    slept_at: Option<Instant>,
}

struct Inner {
    name: String,
    node: Arc<dyn BlockNode>,
    opts: BlkOptions,
    features: u64,
    queues: Vec<Queue>,
    /// Global queue indices served by each worker thread.
    thread_queues: Vec<Vec<usize>>,
    /// Exit events of the current connection's worker threads.
    exit: Mutex<Vec<(EventConsumer, EventNotifier)>>,
    mem: GuestMemoryAtomic<GuestMem>,
    registrar: RamRegistrar,
    regions: Mutex<Vec<RegionId>>,
    writeback: Mutex<bool>,
    /// Thread id of each worker thread, as seen at its last event (0 before).
    worker_tids: Vec<std::sync::atomic::AtomicI32>,
    /// Each worker thread's adaptive busy-poll time and when it last went
    /// back to sleep.
    polls: Vec<Mutex<PollState>>,
    /// Set on shutdown: no new requests are started.
    stopping: std::sync::atomic::AtomicBool,
}

/// The vhost-user backend of one export.
#[derive(Clone)]
pub struct VhostUserBlkBackend {
    inner: Arc<Inner>,
}

/// Setting up an export failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// The node could not give a queue.
    #[error("could not open a node queue")]
    Queue(#[source] block::BlockError),
    /// An eventfd could not be made.
    #[error("could not create an event fd")]
    Event(#[source] io::Error),
}

impl VhostUserBlkBackend {
    /// A backend for `node`. With `iothread` (the export's `--object
    /// iothread` properties) all queues share one worker thread that
    /// busy-polls as that IOThread would (`poll-max-ns`); without, each
    /// queue has its own worker, polling adaptively up to
    /// [`EXPORT_POLL_MAX_NS`].
    pub fn new(
        name: &str,
        node: Arc<dyn BlockNode>,
        opts: BlkOptions,
        registrar: RamRegistrar,
        iothread: Option<IoThreadConfig>,
    ) -> Result<Self, VhostUserBlkError> {
        let one_thread = iothread.is_some();
        let poll = iothread.unwrap_or(IoThreadConfig {
            poll_max_ns: EXPORT_POLL_MAX_NS,
            ..IoThreadConfig::default()
        });
        let read_only = opts.read_only || node.read_only();
        let n = usize::from(opts.num_queues.max(1));
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            let q = node.open_queue().map_err(VhostUserBlkError::Queue)?;
            queues.push(Queue {
                handler: Mutex::new(BlkQueueHandler::new(node.clone(), q, &opts)),
                vring: Mutex::new(None),
            });
        }
        let thread_queues: Vec<Vec<usize>> = if one_thread {
            vec![(0..n).collect()]
        } else {
            (0..n).map(|q| vec![q]).collect()
        };
        let exit = exit_events(thread_queues.len()).map_err(VhostUserBlkError::Event)?;
        let features =
            config::features(&opts, read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        Ok(VhostUserBlkBackend {
            inner: Arc::new(Inner {
                name: name.to_string(),
                node,
                opts,
                features,
                queues,
                polls: thread_queues
                    .iter()
                    .map(|_| {
                        Mutex::new(PollState {
                            time: PollTime::new(poll),
                            slept_at: None,
                        })
                    })
                    .collect(),
                worker_tids: thread_queues
                    .iter()
                    .map(|_| std::sync::atomic::AtomicI32::new(0))
                    .collect(),
                thread_queues,
                exit: Mutex::new(exit),
                mem: GuestMemoryAtomic::new(GuestMem::default()),
                registrar,
                regions: Mutex::new(Vec::new()),
                writeback: Mutex::new(true),
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The guest memory the daemon maps (hand it to `VhostUserDaemon::new`).
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMem> {
        self.inner.mem.clone()
    }

    /// For each worker thread, the node completion fds to watch and the
    /// listener ids to register them under.
    pub fn completion_listeners(&self) -> Vec<Vec<(std::os::fd::RawFd, u64)>> {
        let nq = self.inner.queues.len() as u64;
        self.inner
            .thread_queues
            .iter()
            .map(|qs| {
                qs.iter()
                    .enumerate()
                    .map(|(local, &q)| {
                        (
                            lock(&self.inner.queues[q].handler).completion_fd(),
                            nq + 1 + local as u64,
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// Waits for every in-flight request of every queue and drops its
    /// result, and forgets the frontend's memory (the frontend went away).
    pub fn abandon_in_flight(&self) {
        for q in &self.inner.queues {
            lock(&q.handler).abandon();
            *lock(&q.vring) = None;
        }
        for id in lock(&self.inner.regions).drain(..) {
            self.inner.registrar.remove(id);
        }
        // The next frontend sends its own memory table from scratch.
        if let Ok(guard) = self.inner.mem.lock() {
            guard.replace(GuestMem::default());
        }
    }

    /// Stops taking requests and completes every in-flight one into its
    /// vring (shutdown: the guest sees its requests finish).
    pub fn quiesce(&self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for q in 0..self.inner.queues.len() {
            let _ = self.stop_vring(q as u32);
        }
    }

    /// Reports host I/O errors of every queue to `hook`.
    pub fn set_io_error_hook(&self, hook: Option<crate::virtio_blk::IoErrorHook>) {
        for q in &self.inner.queues {
            lock(&q.handler).set_io_error_hook(hook.clone());
        }
    }

    /// The thread id of the first worker thread of the current connection
    /// that has served an event (what QMP's `query-iothreads` reports for
    /// the export's iothread).
    pub fn worker_tid(&self) -> Option<i32> {
        self.inner
            .worker_tids
            .iter()
            .map(|t| t.load(std::sync::atomic::Ordering::Relaxed))
            .find(|&t| t != 0)
    }

    /// Makes what the frontend wrote durable: a flush through the export's
    /// first queue (call after [`VhostUserBlkBackend::quiesce`]).
    pub fn flush(&self) -> Result<(), block::RequestError> {
        match self.inner.queues.first() {
            Some(q) => lock(&q.handler).flush_node(),
            None => Ok(()),
        }
    }

    /// Requests started and completed, over all queues.
    pub fn requests(&self) -> u64 {
        self.inner
            .queues
            .iter()
            .map(|q| lock(&q.handler).counters().requests)
            .sum()
    }

    /// Tells every worker thread to leave its loop.
    pub fn stop_workers(&self) {
        for t in &self.inner.worker_tids {
            t.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        for (_, n) in lock(&self.inner.exit).iter() {
            let _ = n.notify();
        }
    }

    /// Fresh exit events for the worker threads of the next connection
    /// (the previous connection's workers were told to exit with theirs).
    pub fn renew_exit_events(&self) -> io::Result<()> {
        *lock(&self.inner.exit) = exit_events(self.inner.thread_queues.len())?;
        Ok(())
    }

    fn run_queue(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let inner = &self.inner;
        if inner.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let queue = &inner.queues[q];
        {
            let mut saved = lock(&queue.vring);
            if saved.is_none() {
                *saved = Some(vring.clone());
            }
        }
        let mem = inner.mem.memory().into_inner();
        let mut h = lock(&queue.handler);
        let mut state = vring.get_mut();
        let notify = h.process_queue(state.get_queue_mut(), &mem).map_err(|e| {
            eprintln!(
                "{}: queue {q}: {e}; the queue stops until the frontend resets it",
                inner.name
            );
            io::Error::other(e)
        })?;
        drop(state);
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn complete_queue(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let mem = self.inner.mem.memory().into_inner();
        let mut h = lock(&self.inner.queues[q].handler);
        let mut state = vring.get_mut();
        let notify = h
            .process_completions(state.get_queue_mut(), &mem)
            .map_err(io::Error::other)?;
        drop(state);
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBlkBackend {
    /// QEMU's busy polling, after an event and before the worker sleeps
    /// again: with the driver's kicks turned off, watch the avail rings
    /// and the node queues of this worker's queues until the adaptive poll
    /// time passes with nothing to do; then turn kicks back on (and serve
    /// what raced with that).
    fn busy_poll(&self, thread_id: usize, mine: &[usize], vrings: &[Vring]) -> io::Result<()> {
        let inner = &self.inner;
        let Some(state) = inner.polls.get(thread_id) else {
            return Ok(());
        };
        let mut state = lock(state);
        let now = Instant::now();
        if let Some(t) = state.slept_at.take() {
            let block_ns = now.duration_since(t).as_nanos().min(u128::from(u64::MAX)) as u64;
            state.time.adapt(block_ns);
        }
        let poll_ns = state.time.ns();
        if poll_ns == 0 || inner.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            state.slept_at = Some(now);
            return Ok(());
        }
        let mem = inner.mem.memory().into_inner();
        self.for_each_queue(mine, vrings, |q, _| {
            BlkQueueHandler::set_guest_notifications(q, &mem, false).map(|_| (false, false))
        })?;
        let budget = Duration::from_nanos(poll_ns);
        let mut idle_from = Instant::now();
        loop {
            let moved = self.for_each_queue(mine, vrings, |q, h| h.poll_once(q, &mem))?;
            let t = Instant::now();
            if moved {
                idle_from = t;
            } else if t.duration_since(idle_from) >= budget
                || inner.stopping.load(std::sync::atomic::Ordering::Relaxed)
            {
                break;
            }
            std::hint::spin_loop();
        }
        let raced = self.for_each_queue(mine, vrings, |q, _| {
            BlkQueueHandler::set_guest_notifications(q, &mem, true).map(|r| (r, false))
        })?;
        // The time the worker now sleeps counts from the poll's start, as
        // QEMU measures it: a wait polling would have covered is short.
        state.slept_at = Some(idle_from);
        drop(state);
        if raced {
            for (local, &q) in mine.iter().enumerate() {
                self.run_queue(q, &vrings[local])?;
            }
        }
        Ok(())
    }

    /// Runs `f` on each of a worker's queues (queue, handler); `f` says
    /// whether something moved and whether to notify the frontend, which
    /// happens once the vring is unlocked. Returns whether anything moved.
    /// A queue error stops the queue as [`VhostUserBlkBackend::run_queue`]
    /// does.
    fn for_each_queue(
        &self,
        mine: &[usize],
        vrings: &[Vring],
        mut f: impl FnMut(
            &mut virtio_queue::Queue,
            &mut BlkQueueHandler,
        ) -> Result<(bool, bool), BlkHandlerError>,
    ) -> io::Result<bool> {
        let mut any = false;
        for (local, &q) in mine.iter().enumerate() {
            let vring = &vrings[local];
            let mut h = lock(&self.inner.queues[q].handler);
            let mut state = vring.get_mut();
            if !state.get_queue().ready() {
                continue;
            }
            let r = f(state.get_queue_mut(), &mut h);
            drop(state);
            drop(h);
            let (moved, notify) = r.map_err(|e| {
                eprintln!(
                    "{}: queue {q}: {e}; the queue stops until the frontend resets it",
                    self.inner.name
                );
                io::Error::other(e)
            })?;
            if notify {
                vring.signal_used_queue()?;
            }
            any |= moved;
        }
        Ok(any)
    }
}

fn exit_events(n: usize) -> io::Result<Vec<(EventConsumer, EventNotifier)>> {
    (0..n)
        .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VhostUserBackend for VhostUserBlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.inner.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.opts.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings carry the flag; the handler asks the queue.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let wb = *lock(&self.inner.writeback);
        let c = config::config_space(self.inner.node.as_ref(), &self.inner.opts, wb);
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` (offset 32) is writable (5.2.4, CONFIG_WCE).
        if offset != 32 || buf.len() != 1 || !self.inner.opts.config_wce {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only writeback is writable",
            ));
        }
        let wb = buf[0] != 0;
        *lock(&self.inner.writeback) = wb;
        for q in &self.inner.queues {
            lock(&q.handler).set_writethrough(!wb);
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        let inner = &self.inner;
        let mut ids = lock(&inner.regions);
        for id in ids.drain(..) {
            inner.registrar.remove(id);
        }
        for r in mem.memory().iter() {
            let (fd, fd_offset) = match r.file_offset() {
                Some(fo) => (
                    Some(Arc::new(OwnedFd::from(fo.file().try_clone()?))),
                    fo.start(),
                ),
                None => (None, 0),
            };
            ids.push(inner.registrar.add(MemoryRegion {
                host_addr: r.as_ptr() as u64,
                len: r.len(),
                fd,
                fd_offset,
            }));
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.inner
            .thread_queues
            .iter()
            .map(|qs| qs.iter().fold(0u64, |m, q| m | (1 << q)))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let exit = lock(&self.inner.exit);
        let (c, n) = exit.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(q) = self.inner.queues.get(queue_index as usize) else {
            return Ok(());
        };
        let vring = lock(&q.vring).clone();
        let mut h = lock(&q.handler);
        match vring {
            Some(vring) => {
                let mem = self.inner.mem.memory().into_inner();
                let mut state = vring.get_mut();
                h.drain(state.get_queue_mut(), &mem);
                drop(state);
                vring.signal_used_queue()
            }
            None => {
                h.abandon();
                Ok(())
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(mine) = self.inner.thread_queues.get(thread_id) else {
            return Ok(());
        };
        if let Some(t) = self.inner.worker_tids.get(thread_id) {
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            t.store(tid, std::sync::atomic::Ordering::Relaxed);
        }
        let nq = self.inner.queues.len();
        let ev = usize::from(device_event);
        if ev < mine.len() {
            self.run_queue(mine[ev], &vrings[ev])?;
        } else if let Some(local) = ev.checked_sub(nq + 1).filter(|l| *l < mine.len()) {
            self.complete_queue(mine[local], &vrings[local])?;
        } else {
            return Ok(());
        }
        self.busy_poll(thread_id, mine, vrings)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for id in lock(&self.regions).drain(..) {
            self.registrar.remove(id);
        }
    }
}
