//! IOThread loop: remote add/remove, busy-poll on and off, adaptive poll
//! time, stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;

/// Counts epoll events and poll hits; `work` marks work a poll can find.
struct Counter {
    fd: EventFd,
    work: Arc<AtomicBool>,
    events: Arc<AtomicU64>,
    polls: Arc<AtomicU64>,
    polled_hits: Arc<AtomicU64>,
    thread: Arc<Mutex<String>>,
}

impl MutEventSubscriber for Counter {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        // A poll can take the work between the kick's flag and its eventfd
        // write; the wake-up that write causes then finds nothing, and
        // counting it would serve one kick twice.
        if self.work.swap(false, Ordering::SeqCst) {
            self.events.fetch_add(1, Ordering::SeqCst);
        }
        *self.thread.lock().unwrap() = std::thread::current().name().unwrap_or("").into();
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.fd, EventSet::IN)).unwrap();
    }
}

impl IoSubscriber for Counter {
    fn poll(&mut self) -> bool {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if self.work.swap(false, Ordering::SeqCst) {
            let _ = self.fd.read();
            self.polled_hits.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        false
    }
}

struct Probe {
    fd: EventFd,
    work: Arc<AtomicBool>,
    events: Arc<AtomicU64>,
    polls: Arc<AtomicU64>,
    polled_hits: Arc<AtomicU64>,
    thread: Arc<Mutex<String>>,
}

fn counter() -> (Box<Counter>, Probe) {
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let c = Counter {
        fd: fd.try_clone().unwrap(),
        work: Arc::default(),
        events: Arc::default(),
        polls: Arc::default(),
        polled_hits: Arc::default(),
        thread: Arc::default(),
    };
    let p = Probe {
        fd,
        work: c.work.clone(),
        events: c.events.clone(),
        polls: c.polls.clone(),
        polled_hits: c.polled_hits.clone(),
        thread: c.thread.clone(),
    };
    (Box::new(c), p)
}

impl Probe {
    /// Hands the subscriber work: the flag a poll sees, and the eventfd
    /// epoll sees.
    fn kick(&self) {
        self.work.store(true, Ordering::SeqCst);
        self.fd.write(1).unwrap();
    }

    fn served(&self) -> u64 {
        self.events.load(Ordering::SeqCst) + self.polled_hits.load(Ordering::SeqCst)
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn no_poll() -> IoThreadConfig {
    IoThreadConfig {
        poll_max_ns: 0,
        ..IoThreadConfig::default()
    }
}

#[test]
fn subscribers_added_from_another_thread_run_on_the_iothread() {
    let io = IoThread::new("io0", no_poll()).unwrap();
    let (c, p) = counter();
    let id = io.add(c).unwrap();
    p.kick();
    wait_for("event", || p.events.load(Ordering::SeqCst) == 1);
    assert_eq!(*p.thread.lock().unwrap(), "iothread-io0");
    assert_ne!(io.thread_id(), 0);
    // Taken back by type: the loop no longer serves it.
    let back = io.remove_as::<Counter>(id).unwrap();
    p.kick();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(p.events.load(Ordering::SeqCst), 1);
    assert!(back.fd.read().is_ok(), "the kick is still unread");
    assert!(matches!(io.remove(id), Err(IoThreadError::NoSubscriber(_))));
    io.stop();
}

#[test]
fn without_poll_max_ns_the_loop_never_polls() {
    let io = IoThread::new("io0", no_poll()).unwrap();
    let (c, p) = counter();
    io.add(c).unwrap();
    for i in 1..=50 {
        p.kick();
        wait_for("event", || p.served() == i);
    }
    assert_eq!(p.polls.load(Ordering::SeqCst), 0);
    assert_eq!(io.poll_hits(), 0);
    assert_eq!(io.poll_ns(), 0);
    assert!(io.epoll_waits() >= 50);
}

#[test]
fn busy_poll_grows_finds_work_before_epoll_and_shrinks_after_idling() {
    let cfg = IoThreadConfig {
        poll_max_ns: 20_000_000,
        poll_grow: 4,
        poll_shrink: 0,
    };
    let io = IoThread::new("io0", cfg).unwrap();
    let (c, p) = counter();
    io.add(c).unwrap();
    // Frequent work: each sleep is far shorter than poll-max-ns, so the
    // poll time grows and polls start finding the work.
    let start = Instant::now();
    let mut n = 0;
    while p.polled_hits.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "polling never hit"
        );
        p.kick();
        n += 1;
        wait_for("served", || p.served() == n);
    }
    assert!(io.poll_ns() > 0);
    assert!(io.poll_ns() <= cfg.poll_max_ns);
    assert!(io.poll_hits() > 0);
    // Idle for longer than poll-max-ns: the next wake-up drops polling.
    std::thread::sleep(Duration::from_millis(60));
    p.kick();
    n += 1;
    wait_for("served", || p.served() == n);
    wait_for("poll time shrinks", || io.poll_ns() < cfg.poll_max_ns);
}

#[test]
fn adapt_follows_qemus_rules() {
    let config = IoThreadConfig {
        poll_max_ns: 32768,
        poll_grow: 0,
        poll_shrink: 2,
    };
    let mut p = PollTime::new(config);
    p.adapt(1000);
    assert_eq!(p.ns(), 4000, "starts at 4 us");
    p.adapt(3000);
    assert_eq!(p.ns(), 4000, "polling was enough");
    p.adapt(10_000);
    assert_eq!(p.ns(), 8000, "doubles by default");
    for _ in 0..5 {
        p.adapt(32_768);
    }
    assert_eq!(p.ns(), 32768, "clamped at poll-max-ns");
    p.adapt(1_000_000);
    assert_eq!(p.ns(), 16384, "shrinks by poll-shrink");
    let mut p = PollTime::new(IoThreadConfig {
        poll_shrink: 0,
        ..config
    });
    p.adapt(10_000);
    assert_eq!(p.ns(), 4000);
    p.adapt(1_000_000);
    assert_eq!(p.ns(), 0, "drops to 0 without poll-shrink");
    let mut off = PollTime::new(IoThreadConfig {
        poll_max_ns: 0,
        ..config
    });
    off.adapt(10);
    assert_eq!(off.ns(), 0, "poll-max-ns=0 never polls");
}

#[test]
fn stop_joins_and_later_calls_fail_cleanly() {
    let io = IoThread::new("io0", IoThreadConfig::default()).unwrap();
    let (c, _p) = counter();
    io.add(c).unwrap();
    io.stop();
    io.stop();
    let (c, _p) = counter();
    assert!(matches!(io.add(c), Err(IoThreadError::Gone(_))));
}

/// Re-arms its own eventfd and then works for `work` after each event: the
/// loop's waits are short, its handlers long.
struct SlowWorker {
    fd: EventFd,
    left: Arc<AtomicU64>,
    work: Duration,
}

impl SlowWorker {
    fn serve(&mut self) {
        if self.left.load(Ordering::SeqCst) > 0 {
            self.left.fetch_sub(1, Ordering::SeqCst);
            self.fd.write(1).unwrap();
        }
        let start = Instant::now();
        while start.elapsed() < self.work {
            std::hint::spin_loop();
        }
    }
}

impl MutEventSubscriber for SlowWorker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        note_event(0);
        if self.fd.read().is_ok() {
            self.serve();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.fd, EventSet::IN)).unwrap();
    }
}

impl IoSubscriber for SlowWorker {
    fn poll(&mut self) -> bool {
        let found = self.fd.read().is_ok();
        if found {
            note_event(0);
            self.serve();
        }
        found
    }
}

#[test]
fn time_spent_handling_an_event_does_not_count_as_waiting() {
    let cfg = IoThreadConfig::default();
    let io = IoThread::new("io0", cfg).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let left = Arc::new(AtomicU64::new(20));
    io.add(Box::new(SlowWorker {
        fd: fd.try_clone().unwrap(),
        left: left.clone(),
        // Each event's handling takes longer than poll-max-ns.
        work: Duration::from_nanos(4 * cfg.poll_max_ns),
    }))
    .unwrap();
    fd.write(1).unwrap();
    wait_for("the events are handled", || {
        left.load(Ordering::SeqCst) == 0
    });
    // Every wait was short (the next event was ready before the handler
    // returned), so polling started and then found the events itself;
    // counting the handlers' time as waiting would have kept it off.
    assert!(io.poll_ns() > 0);
    assert!(io.poll_hits() > 0);
    io.stop();
}

#[test]
fn a_slow_source_does_not_turn_off_polling_that_a_fast_one_needs() {
    let cfg = IoThreadConfig::default();
    let mut times = super::poll::PollTimes::new(cfg);
    let wait = |times: &mut super::poll::PollTimes, source: u64, blocked: Duration| {
        times.begin_wait();
        let start = Instant::now() - blocked;
        note_event(source);
        times.end_wait(start, None);
    };
    // The queue's kicks come back quickly: polling for them grows.
    for _ in 0..4 {
        wait(&mut times, 1, Duration::from_micros(1));
    }
    let fast = times.ns();
    assert!(fast > 0);
    // The disk's completions take a millisecond: their own poll time stays
    // off, and the kicks' is untouched.
    wait(&mut times, 2, Duration::from_millis(1));
    assert_eq!(times.ns(), fast);
    // The same long wait on the kicks' own source turns it off.
    wait(&mut times, 1, Duration::from_millis(1));
    assert_eq!(times.ns(), 0);
}
