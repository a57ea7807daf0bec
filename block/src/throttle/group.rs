//! A throttle group (`--object throttle-group`): one set of limits and
//! one [`ThrottleState`] shared by every queue of every `throttle` node
//! that names it, with QEMU's fairness (throttle-groups.c): members whose
//! requests wait take turns, per direction, so one busy member cannot
//! take a budget the others wait for.
//!
//! A member first in line waits for the buckets (its own timer); the rest
//! wait for their turn, and the member that goes wakes the next one
//! through its eventfd. With no limit set, members go straight through
//! after one atomic load.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::bucket::{ThrottleConfig, ThrottleState};

/// How a member is woken for its turn.
pub(crate) struct Waker {
    pub eventfd: Arc<EventFd>,
    /// Set before the eventfd is written, so the member checks cheaply.
    pub woken: AtomicBool,
}

struct Inner {
    state: ThrottleState,
    /// Members with requests waiting, in turn order, per direction.
    turns: [VecDeque<u64>; 2],
    members: HashMap<u64, Arc<Waker>>,
}

/// A named set of limits shared by throttle nodes.
pub struct ThrottleGroup {
    name: String,
    enabled: AtomicBool,
    next_member: AtomicU64,
    epoch: Instant,
    inner: Mutex<Inner>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ThrottleGroup {
    /// A group named `name` with `config` (validated).
    pub fn new(name: &str, config: ThrottleConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(ThrottleGroup {
            name: name.to_string(),
            enabled: AtomicBool::new(config.is_enabled()),
            next_member: AtomicU64::new(0),
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                state: ThrottleState::new(config, 0),
                turns: [VecDeque::new(), VecDeque::new()],
                members: HashMap::new(),
            }),
        })
    }

    /// The group's id.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limits now.
    pub fn config(&self) -> ThrottleConfig {
        *lock(&self.inner).state.config()
    }

    /// Changes the limits live (QMP `block_set_io_throttle`, `qom-set`):
    /// the buckets start empty and every waiting member looks again.
    pub fn set_config(&self, config: ThrottleConfig) -> Result<(), String> {
        config.validate()?;
        let mut g = lock(&self.inner);
        let now = self.now();
        g.state.set_config(config, now);
        self.enabled.store(config.is_enabled(), Ordering::Release);
        for w in g.members.values() {
            wake(w);
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether any limit is set (one atomic load).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// A new member woken through `waker`.
    pub(crate) fn join(&self, waker: Arc<Waker>) -> u64 {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner).members.insert(id, waker);
        id
    }

    /// Whether member `m` may send a request of `size` bytes now. If so
    /// it is charged; if not, returns how long the buckets want (0 when
    /// it is simply not `m`'s turn: it is woken for it).
    pub(crate) fn try_dispatch(&self, m: u64, is_write: bool, size: u64) -> Result<(), u64> {
        let mut g = lock(&self.inner);
        let d = usize::from(is_write);
        if let Some(&front) = g.turns[d].front() {
            if front != m {
                if !g.turns[d].contains(&m) {
                    g.turns[d].push_back(m);
                }
                return Err(0);
            }
        }
        let now = self.now();
        let w = g.state.wait_ns(is_write, now);
        if w > 0 {
            if g.turns[d].is_empty() {
                g.turns[d].push_back(m);
            }
            return Err(w);
        }
        g.state.account(is_write, size);
        if g.turns[d].front() == Some(&m) {
            g.turns[d].pop_front();
            if let Some(next) = g.turns[d].front().and_then(|n| g.members.get(n)) {
                wake(next);
            }
        }
        Ok(())
    }

    /// Member `m` has nothing waiting in direction `is_write` any more.
    pub(crate) fn done_waiting(&self, m: u64, is_write: bool) {
        let mut guard = lock(&self.inner);
        let g = &mut *guard;
        let q = &mut g.turns[usize::from(is_write)];
        let was_front = q.front() == Some(&m);
        q.retain(|&x| x != m);
        if was_front {
            if let Some(next) = q.front().and_then(|n| g.members.get(n)) {
                wake(next);
            }
        }
    }

    /// Member `m` is gone.
    pub(crate) fn leave(&self, m: u64) {
        self.done_waiting(m, false);
        self.done_waiting(m, true);
        lock(&self.inner).members.remove(&m);
    }
}

fn wake(w: &Waker) {
    w.woken.store(true, Ordering::Release);
    let _ = w.eventfd.write(1);
}
