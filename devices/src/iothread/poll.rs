//! QEMU's adaptive busy polling (`adjust_polling_time`), kept per event
//! source as QEMU keeps it per `AioHandler`: a queue's kicks and its
//! node's completions arrive at different paces (a guest's turnaround
//! against a disk's latency), and one shared poll time would let the slow
//! source turn off polling that the fast one needs. The loop polls for the
//! longest time any source wants, and adapts only the sources that ended
//! a wait, by the time it blocked before they did.
//!
//! Subscribers name the source of each event with [`note_event`], as
//! their `process` or `poll` begins to handle it, so the time their
//! handlers run afterwards does not count as waiting (QEMU takes
//! `block_ns` before it dispatches).

use std::cell::RefCell;
use std::time::Instant;

use super::IoThreadConfig;

/// QEMU's default `poll-max-ns` on Linux.
pub const DEFAULT_POLL_MAX_NS: u64 = 32768;
/// The first poll time after polling was off (QEMU's 4 µs).
const POLL_START_NS: u64 = 4000;
/// QEMU's default grow factor.
const DEFAULT_POLL_GROW: u64 = 2;
/// Sources remembered per wait; more in one wake-up are not adapted.
const MAX_NOTED: usize = 8;
/// The source of events whose subscriber names none.
const UNNAMED: u64 = u64::MAX;

/// QEMU's adaptive busy-poll time (`adjust_polling_time`).
#[derive(Clone, Copy, Debug)]
pub struct PollTime {
    config: IoThreadConfig,
    ns: u64,
}

impl PollTime {
    /// Polling off until the first wait shows it would pay.
    pub fn new(config: IoThreadConfig) -> Self {
        PollTime { config, ns: 0 }
    }

    /// The current poll time, ns (0: do not poll).
    pub fn ns(&self) -> u64 {
        if self.config.poll_max_ns == 0 {
            0
        } else {
            self.ns
        }
    }

    /// Adapts to a wait of `block_ns` (from the start of polling to the
    /// event that ended the wait): a wait polling would have covered keeps
    /// the time, one within `poll-max-ns` grows it, a longer one shrinks it.
    pub fn adapt(&mut self, block_ns: u64) {
        let max = self.config.poll_max_ns;
        if max == 0 || block_ns <= self.ns {
            // Polling is off, or would have been enough (or was): keep it.
        } else if block_ns > max {
            self.ns = match self.config.poll_shrink {
                0 => 0,
                s => self.ns / s,
            };
        } else if self.ns < max {
            let grow = match self.config.poll_grow {
                0 => DEFAULT_POLL_GROW,
                g => g,
            };
            self.ns = match self.ns {
                0 => POLL_START_NS,
                p => p.saturating_mul(grow),
            }
            .min(max);
        }
    }
}

/// What ended the current wait of this thread's loop.
#[derive(Default)]
struct Woken {
    at: Option<Instant>,
    sources: [u64; MAX_NOTED],
    n: usize,
}

thread_local! {
    static WOKEN: RefCell<Woken> = RefCell::default();
}

/// Called by a subscriber as it starts to handle an event of `source` (a
/// key of its choosing, unique on the thread, such as the event's fd),
/// from `process` or from a `poll` that found work.
pub fn note_event(source: u64) {
    WOKEN.with(|w| {
        let mut w = w.borrow_mut();
        if w.at.is_none() {
            w.at = Some(Instant::now());
        }
        let n = w.n;
        if n < MAX_NOTED && !w.sources[..n].contains(&source) {
            w.sources[n] = source;
            w.n += 1;
        }
    });
}

/// The loop's poll times, one per source.
pub(super) struct PollTimes {
    config: IoThreadConfig,
    times: Vec<(u64, PollTime)>,
}

impl PollTimes {
    pub(super) fn new(config: IoThreadConfig) -> Self {
        PollTimes {
            config,
            times: Vec::new(),
        }
    }

    /// How long to poll: the longest any source wants.
    pub(super) fn ns(&self) -> u64 {
        self.times.iter().map(|(_, t)| t.ns()).max().unwrap_or(0)
    }

    /// Forgets every source (subscribers came or went).
    pub(super) fn reset(&mut self) {
        self.times.clear();
    }

    /// Starts a wait: nothing has ended it yet.
    pub(super) fn begin_wait(&self) {
        WOKEN.with(|w| *w.borrow_mut() = Woken::default());
    }

    /// Ends a wait that began at `start`: each source noted since
    /// [`PollTimes::begin_wait`] adapts to how long the loop blocked
    /// before the first of them (`found_at` when polling found the work;
    /// now when nothing was noted, for the unnamed source).
    pub(super) fn end_wait(&mut self, start: Instant, found_at: Option<Instant>) {
        let woken = WOKEN.with(|w| std::mem::take(&mut *w.borrow_mut()));
        let at = found_at.or(woken.at).unwrap_or_else(Instant::now);
        let block = at.saturating_duration_since(start).as_nanos();
        let block = u64::try_from(block).unwrap_or(u64::MAX);
        let sources = match woken.n {
            0 => &[UNNAMED][..],
            n => &woken.sources[..n],
        };
        for &source in sources {
            let config = self.config;
            let i = match self.times.iter().position(|(s, _)| *s == source) {
                Some(i) => i,
                None => {
                    self.times.push((source, PollTime::new(config)));
                    self.times.len() - 1
                }
            };
            self.times[i].1.adapt(block);
        }
    }
}
