//! IOThreads: named threads, each running an event-manager `EventManager`
//! (one epoll set) that serves the data planes placed on it
//! (`--object iothread,id=io0[,poll-max-ns=N]`).
//!
//! Subscribers are added and removed from other threads through the
//! manager's remote endpoint: the closure runs on the IOThread between two
//! epoll waits, so a subscriber is never touched by two threads at once and
//! the data path takes no lock.
//!
//! With `poll-max-ns > 0` the loop busy-polls before it sleeps, as QEMU's
//! `aio_poll` does: every subscriber's [`IoSubscriber::poll`] hook is run
//! until one finds work or the poll time runs out. While the loop polls,
//! subscribers may turn their notifications off ([`IoSubscriber::poll_begin`]);
//! they stay off as long as polling keeps finding work, and are turned back
//! on, with one last look for work, only before the thread sleeps
//! ([`IoSubscriber::poll_end`]). The poll time adapts per event source
//! ([`poll`]): it grows (by `poll-grow`, from 4 µs) while a source keeps
//! ending waits shorter than `poll-max-ns`, and shrinks (by `poll-shrink`,
//! or to 0) after a longer one.

use std::any::Any;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use poll::PollTimes;
pub use poll::{note_event, PollTime, DEFAULT_POLL_MAX_NS};

use event_manager::{
    EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps,
};

/// A subscriber seen as `Any`, so its owner can reach it by type
/// ([`IoThread::remove_as`], [`IoThread::with_subscriber`]). Every
/// `'static` type has it.
pub trait AsAny {
    /// Boxed, for taking the subscriber back.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    /// Borrowed, for calling it in place.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Any + Send> AsAny for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// What runs on an IOThread: an event-manager subscriber that may also
/// offer busy-poll hooks (QEMU's `io_poll`, `io_poll_begin`,
/// `io_poll_end`).
pub trait IoSubscriber: MutEventSubscriber + Send + AsAny {
    /// Whether the subscriber has poll hooks. A thread whose subscribers
    /// have none never busy-polls (QEMU polls only handlers with
    /// `io_poll`): spinning there would find nothing and take a CPU from
    /// whoever would send the next event.
    fn pollable(&self) -> bool {
        true
    }

    /// The thread starts polling: notifications the poll makes redundant
    /// (the driver's kicks) may be turned off until [`IoSubscriber::poll_end`].
    fn poll_begin(&mut self) {}

    /// Busy-poll hook: looks for work without waiting (a new avail entry,
    /// finished node requests) and does it. Returns whether it found any.
    fn poll(&mut self) -> bool {
        false
    }

    /// The thread stops polling and is about to sleep: turn notifications
    /// back on, and do (and report) any work that arrived while they were
    /// off, which no notification will announce.
    fn poll_end(&mut self) -> bool {
        false
    }
}

type Sub = Box<dyn IoSubscriber>;

/// Options of one IOThread (QEMU's `iothread` object properties).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoThreadConfig {
    /// Longest busy-poll before sleeping in epoll, ns; 0 turns polling off.
    pub poll_max_ns: u64,
    /// Factor by which the poll time grows (0: the default, 2).
    pub poll_grow: u64,
    /// Divisor by which the poll time shrinks (0: drop to 0 at once).
    pub poll_shrink: u64,
}

impl Default for IoThreadConfig {
    fn default() -> Self {
        IoThreadConfig {
            poll_max_ns: DEFAULT_POLL_MAX_NS,
            poll_grow: 0,
            poll_shrink: 0,
        }
    }
}

/// Why an IOThread could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum IoThreadError {
    /// The event manager could not be created.
    #[error("could not create the event loop of iothread '{0}'")]
    EventManager(String, #[source] event_manager::Error),
    /// The thread could not be spawned.
    #[error("could not start iothread '{0}'")]
    Spawn(String, #[source] io::Error),
    /// The thread is gone or refused the call.
    #[error("iothread '{0}' is not running")]
    Gone(String),
    /// No subscriber has that id (or it has another type).
    #[error("iothread '{0}' has no such subscriber")]
    NoSubscriber(String),
}

/// Poll list shared between the owner and the loop: the loop rereads it
/// only when `dirty` says it changed.
#[derive(Default)]
struct PollList {
    ids: Mutex<Vec<SubscriberId>>,
    dirty: AtomicBool,
}

impl PollList {
    fn edit(&self, f: impl FnOnce(&mut Vec<SubscriberId>)) {
        f(&mut self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        self.dirty.store(true, Ordering::Release);
    }
}

/// Counters for tests and `query-iothreads`.
#[derive(Default)]
struct Stats {
    /// Current adaptive poll time, ns.
    poll_ns: AtomicU64,
    /// Times a poll hook found work.
    poll_hits: AtomicU64,
    /// Epoll waits.
    waits: AtomicU64,
}

/// A running IOThread.
pub struct IoThread {
    id: String,
    config: IoThreadConfig,
    endpoint: RemoteEndpoint<Sub>,
    stop: Arc<AtomicBool>,
    polls: Arc<PollList>,
    stats: Arc<Stats>,
    tid: Arc<AtomicI32>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl IoThread {
    /// Starts the IOThread `id`.
    pub fn new(id: &str, config: IoThreadConfig) -> Result<Arc<Self>, IoThreadError> {
        let em = EventManager::<Sub>::new()
            .map_err(|e| IoThreadError::EventManager(id.to_string(), e))?;
        let endpoint = em.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(PollList::default());
        let stats = Arc::new(Stats::default());
        let tid = Arc::new(AtomicI32::new(0));
        let mut lp = Loop {
            em,
            config,
            stop: stop.clone(),
            polls: polls.clone(),
            ids: Vec::new(),
            polling: false,
            poll: PollTimes::new(config),
            stats: stats.clone(),
        };
        let t = tid.clone();
        let handle = std::thread::Builder::new()
            .name(format!("iothread-{id}"))
            .spawn(move || {
                sandbox::enter(sandbox::ThreadKind::IoThread);
                // SAFETY: gettid has no preconditions.
                t.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                lp.run();
            })
            .map_err(|e| IoThreadError::Spawn(id.to_string(), e))?;
        Ok(Arc::new(IoThread {
            id: id.to_string(),
            config,
            endpoint,
            stop,
            polls,
            stats,
            tid,
            handle: Mutex::new(Some(handle)),
        }))
    }

    /// The IOThread's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its options.
    pub fn config(&self) -> IoThreadConfig {
        self.config
    }

    /// The host thread id (0 until the thread has started).
    pub fn thread_id(&self) -> i32 {
        self.tid.load(Ordering::Relaxed)
    }

    /// The current adaptive busy-poll time, ns.
    pub fn poll_ns(&self) -> u64 {
        self.stats.poll_ns.load(Ordering::Relaxed)
    }

    /// How many times a poll hook found work.
    pub fn poll_hits(&self) -> u64 {
        self.stats.poll_hits.load(Ordering::Relaxed)
    }

    /// How many times the loop waited in epoll.
    pub fn epoll_waits(&self) -> u64 {
        self.stats.waits.load(Ordering::Relaxed)
    }

    /// Places `sub` on the thread (its `init` runs there) and returns its id.
    /// Must not be called from the IOThread itself.
    pub fn add(&self, sub: Sub) -> Result<SubscriberId, IoThreadError> {
        let polls = self.polls.clone();
        let pollable = sub.pollable();
        self.endpoint
            .call_blocking(move |ops| -> Result<SubscriberId, event_manager::Error> {
                let id = ops.add_subscriber(sub);
                if pollable {
                    polls.edit(|v| v.push(id));
                }
                Ok(id)
            })
            .map_err(|_| IoThreadError::Gone(self.id.clone()))
    }

    /// Takes subscriber `id` off the thread and hands it back. Must not be
    /// called from the IOThread itself.
    pub fn remove(&self, id: SubscriberId) -> Result<Sub, IoThreadError> {
        let polls = self.polls.clone();
        let r = self
            .endpoint
            .call_blocking(move |ops| -> Result<Option<Sub>, event_manager::Error> {
                polls.edit(|v| v.retain(|x| *x != id));
                Ok(ops.remove_subscriber(id).ok())
            })
            .map_err(|_| IoThreadError::Gone(self.id.clone()))?;
        r.ok_or_else(|| IoThreadError::NoSubscriber(self.id.clone()))
    }

    /// [`IoThread::remove`], downcast to the subscriber's own type.
    pub fn remove_as<T: 'static>(&self, id: SubscriberId) -> Result<Box<T>, IoThreadError> {
        self.remove(id)?
            .into_any()
            .downcast::<T>()
            .map_err(|_| IoThreadError::NoSubscriber(self.id.clone()))
    }

    /// Runs `f` on subscriber `id` (of type `T`) on the thread, between two
    /// epoll waits. Must not be called from the IOThread itself.
    pub fn with_subscriber<T: 'static>(
        &self,
        id: SubscriberId,
        f: impl FnOnce(&mut T) + Send + 'static,
    ) -> Result<(), IoThreadError> {
        let found = self
            .endpoint
            .call_blocking(move |ops| -> Result<bool, event_manager::Error> {
                Ok(ops
                    .subscriber_mut(id)
                    .ok()
                    .and_then(|s| (**s).as_any_mut().downcast_mut::<T>())
                    .map(f)
                    .is_some())
            })
            .map_err(|_| IoThreadError::Gone(self.id.clone()))?;
        if found {
            Ok(())
        } else {
            Err(IoThreadError::NoSubscriber(self.id.clone()))
        }
    }

    /// Stops the loop and joins the thread. Subscribers still on it are
    /// dropped there. Idempotent.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.endpoint.kick();
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The state the thread owns.
struct Loop {
    em: EventManager<Sub>,
    config: IoThreadConfig,
    stop: Arc<AtomicBool>,
    polls: Arc<PollList>,
    ids: Vec<SubscriberId>,
    /// Subscribers were told polling started and not yet that it ended.
    polling: bool,
    poll: PollTimes,
    stats: Arc<Stats>,
}

impl Loop {
    fn run(&mut self) {
        while !self.stop.load(Ordering::Acquire) {
            if self.polls.dirty.swap(false, Ordering::Acquire) {
                self.ids
                    .clone_from(&self.polls.ids.lock().unwrap_or_else(|e| e.into_inner()));
                self.poll.reset();
            }
            let start = Instant::now();
            self.poll.begin_wait();
            let mut found_at = if self.poll.ns() > 0 && !self.ids.is_empty() {
                self.busy_poll(start)
            } else {
                None
            };
            if found_at.is_none() && self.polling && self.end_polling() {
                found_at = Some(Instant::now());
            }
            let timeout = if found_at.is_some() { 0 } else { -1 };
            if found_at.is_none() {
                self.stats.waits.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = self.em.run_with_timeout(timeout) {
                // Only a broken epoll fd gets here; back off rather than spin.
                eprintln!("iothread: epoll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.config.poll_max_ns > 0 {
                self.poll.end_wait(start, found_at);
                self.stats.poll_ns.store(self.poll.ns(), Ordering::Relaxed);
            }
        }
    }

    /// Runs the poll hooks until one finds work or the poll time is up;
    /// returns when the round that found work began.
    fn busy_poll(&mut self, start: Instant) -> Option<Instant> {
        let deadline = start + Duration::from_nanos(self.poll.ns());
        if !self.polling {
            self.polling = true;
            for id in &self.ids {
                if let Ok(s) = self.em.subscriber_mut(*id) {
                    s.poll_begin();
                }
            }
        }
        loop {
            let round = Instant::now();
            let mut found = false;
            for id in &self.ids {
                if let Ok(s) = self.em.subscriber_mut(*id) {
                    found |= s.poll();
                }
            }
            if found {
                self.stats.poll_hits.fetch_add(1, Ordering::Relaxed);
                return Some(round);
            }
            if round >= deadline || self.stop.load(Ordering::Relaxed) {
                return None;
            }
            std::hint::spin_loop();
        }
    }

    /// Tells every subscriber polling ended (before the thread sleeps);
    /// returns whether one found work that arrived meanwhile.
    fn end_polling(&mut self) -> bool {
        self.polling = false;
        let mut found = false;
        for id in &self.ids {
            if let Ok(s) = self.em.subscriber_mut(*id) {
                found |= s.poll_end();
            }
        }
        found
    }
}

mod poll;
#[cfg(test)]
mod tests;
