//! Completion delivery shared by the engines: every queue announces ready
//! completions on one eventfd, whether they were produced on the queue's own
//! thread ([`LocalCompletions`]) or by worker threads ([`SharedCompletions`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::request::Completion;
use crate::BlockError;

/// A non-blocking eventfd, as every queue uses.
pub(crate) fn new_eventfd() -> Result<EventFd, BlockError> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| BlockError::Os {
        what: "create a completion eventfd".into(),
        source: e,
    })
}

/// Completions produced on the owning thread (immediate results).
pub(crate) struct LocalCompletions {
    ready: VecDeque<Completion>,
    eventfd: Arc<EventFd>,
}

impl LocalCompletions {
    pub fn new(eventfd: Arc<EventFd>) -> Self {
        LocalCompletions {
            ready: VecDeque::with_capacity(64),
            eventfd,
        }
    }

    /// Queue a completion and make the eventfd readable.
    pub fn push(&mut self, c: Completion) {
        if self.ready.is_empty() {
            // A failed write means the counter is saturated: already readable.
            let _ = self.eventfd.write(1);
        }
        self.ready.push_back(c);
    }

    /// Move everything ready to `out`.
    pub fn drain_into(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    pub fn len(&self) -> usize {
        self.ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }
}

/// Completions produced by worker threads.
pub(crate) struct SharedCompletions {
    ready: Mutex<Vec<Completion>>,
    eventfd: Arc<EventFd>,
}

impl SharedCompletions {
    pub fn new(eventfd: Arc<EventFd>) -> Self {
        SharedCompletions {
            ready: Mutex::new(Vec::with_capacity(64)),
            eventfd,
        }
    }

    /// Called by a worker: queue and signal.
    pub fn push(&self, c: Completion) {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        let _ = self.eventfd.write(1);
    }

    /// Called by the owner: move everything ready to `out`.
    pub fn drain_into(&self, out: &mut Vec<Completion>) -> usize {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let n = ready.len();
        out.append(&mut ready);
        n
    }
}

/// Clears a non-blocking eventfd's counter (nothing to do when already zero).
pub(crate) fn clear_eventfd(eventfd: &EventFd) {
    let _ = eventfd.read();
}
