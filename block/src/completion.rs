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
///
/// [`LocalCompletions::push`] makes the eventfd readable at once;
/// [`LocalCompletions::push_quiet`] leaves that to the queue's `kick`
/// ([`LocalCompletions::signal`]), so a caller that reaps right after it
/// submits (a queue handler polling for completions a node finished
/// inline) pays no eventfd write and read for them.
pub(crate) struct LocalCompletions {
    ready: VecDeque<Completion>,
    eventfd: Arc<EventFd>,
    /// The eventfd was written for what is in `ready`.
    signaled: bool,
}

impl LocalCompletions {
    pub fn new(eventfd: Arc<EventFd>) -> Self {
        LocalCompletions {
            ready: VecDeque::with_capacity(64),
            eventfd,
            signaled: false,
        }
    }

    /// Queue a completion and make the eventfd readable.
    pub fn push(&mut self, c: Completion) {
        self.ready.push_back(c);
        self.signal();
    }

    /// Queue a completion; the eventfd is made readable by the next
    /// [`LocalCompletions::signal`] (the queue's `kick`) if nobody has
    /// taken it by then.
    pub fn push_quiet(&mut self, c: Completion) {
        self.ready.push_back(c);
    }

    /// Make the eventfd readable if completions wait and it is not yet.
    pub fn signal(&mut self) {
        if !self.signaled && !self.ready.is_empty() {
            // A failed write means the counter is saturated: already readable.
            let _ = self.eventfd.write(1);
            self.signaled = true;
        }
    }

    /// Move everything ready to `out`; returns whether the eventfd was
    /// written for them (the caller then clears it).
    pub fn drain_into(&mut self, out: &mut Vec<Completion>) -> bool {
        out.extend(self.ready.drain(..));
        std::mem::take(&mut self.signaled)
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
