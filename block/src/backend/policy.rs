//! What a user (a virtio-blk device, an export) does when its node fails
//! a request with a host error: QEMU's `werror`/`rerror`
//! (BlockdevOnError), decided by its [`BlockBackend`](super::BlockBackend).
//!
//! - `report`: the guest gets VIRTIO_BLK_S_IOERR (the default for reads);
//! - `ignore`: the guest is told the request succeeded;
//! - `enospc`: stop on ENOSPC, report anything else (the default for
//!   writes, as QEMU's);
//! - `stop`: the request is kept, the device stops taking requests from
//!   its queues, and the owner is told (QMP `BLOCK_IO_ERROR` with
//!   `action: stop`, and `STOP` for a VM); [`IoStatus::resume`] (QMP
//!   `cont`) sends the kept requests again and the queues go on.
//!
//! One [`IoStatus`] is shared by all queues of a device: its state is
//! what `query-block` reports as `io-status`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::request::{RequestError, RequestOp};
use vmm_sys_util::eventfd::EventFd;

/// One of QEMU's `BlockdevOnError` actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorAction {
    /// Complete the request with an error.
    #[default]
    Report,
    /// Complete the request as if it succeeded.
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Keep the request and stop.
    Stop,
}

impl ErrorAction {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "report" => Self::Report,
            "ignore" => Self::Ignore,
            "enospc" => Self::Enospc,
            "stop" => Self::Stop,
            _ => return None,
        })
    }
}

/// What was done about one failed request (QMP's `BLOCK_IO_ERROR` action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorOutcome {
    /// The guest got the error.
    Report,
    /// The guest was told it succeeded.
    Ignore,
    /// The request is kept and the device stopped.
    Stop,
}

impl ErrorOutcome {
    /// QMP's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Report => "report",
            Self::Ignore => "ignore",
            Self::Stop => "stop",
        }
    }
}

/// The outcome of `error` on a request of `op` under `werror`/`rerror`.
pub fn decide(
    werror: ErrorAction,
    rerror: ErrorAction,
    op: RequestOp,
    error: &RequestError,
) -> ErrorOutcome {
    let action = if op == RequestOp::Read {
        rerror
    } else {
        werror
    };
    match action {
        ErrorAction::Report => ErrorOutcome::Report,
        ErrorAction::Ignore => ErrorOutcome::Ignore,
        ErrorAction::Stop => ErrorOutcome::Stop,
        ErrorAction::Enospc if *error == RequestError::Os(libc::ENOSPC) => ErrorOutcome::Stop,
        ErrorAction::Enospc => ErrorOutcome::Report,
    }
}

/// A device's I/O status, shared by its queues and its owner.
#[derive(Default)]
pub struct IoStatus {
    stopped: AtomicBool,
    /// 0 ok, 1 failed, 2 nospace (QEMU's `BlockDeviceIoStatus`).
    status: AtomicU8,
    /// The queues' "go on" eventfds.
    wakers: Mutex<Vec<Arc<EventFd>>>,
}

impl std::fmt::Debug for IoStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoStatus")
            .field("stopped", &self.is_stopped())
            .field("io_status", &self.io_status())
            .finish()
    }
}

impl IoStatus {
    /// Whether the queues are stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// QEMU's `io-status`: `ok`, `failed` or `nospace`.
    pub fn io_status(&self) -> &'static str {
        match self.status.load(Ordering::Acquire) {
            0 => "ok",
            1 => "failed",
            _ => "nospace",
        }
    }

    /// Stops the queues after `error`; returns whether this stopped them
    /// (the first error since the last resume).
    pub fn stop(&self, error: &RequestError) -> bool {
        let s = if *error == RequestError::Os(libc::ENOSPC) {
            2
        } else {
            1
        };
        let _ = self
            .status
            .compare_exchange(0, s, Ordering::AcqRel, Ordering::Acquire);
        !self.stopped.swap(true, Ordering::AcqRel)
    }

    /// Lets the queues go on: kept requests are sent again. Returns
    /// whether they were stopped.
    pub fn resume(&self) -> bool {
        self.status.store(0, Ordering::Release);
        let was = self.stopped.swap(false, Ordering::AcqRel);
        for w in self.wakers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = w.write(1);
        }
        was
    }

    /// A queue's eventfd, written on resume.
    pub fn add_waker(&self, w: Arc<EventFd>) {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    /// Forgets a queue's eventfd.
    pub fn remove_waker(&self, w: &Arc<EventFd>) {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| !Arc::ptr_eq(x, w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_follow_qemus_table() {
        use ErrorAction::*;
        let nospc = RequestError::Os(libc::ENOSPC);
        let eio = RequestError::Os(libc::EIO);
        assert_eq!(
            decide(Enospc, Report, RequestOp::Write, &nospc),
            ErrorOutcome::Stop
        );
        assert_eq!(
            decide(Enospc, Report, RequestOp::Write, &eio),
            ErrorOutcome::Report
        );
        assert_eq!(
            decide(Enospc, Report, RequestOp::Read, &nospc),
            ErrorOutcome::Report
        );
        assert_eq!(
            decide(Report, Stop, RequestOp::Read, &eio),
            ErrorOutcome::Stop
        );
        assert_eq!(
            decide(Ignore, Report, RequestOp::Flush, &eio),
            ErrorOutcome::Ignore
        );
        assert_eq!(ErrorAction::parse("enospc"), Some(Enospc));
        assert_eq!(ErrorAction::parse("pause"), None);
    }

    #[test]
    fn io_status_stops_once_and_resumes() {
        let s = IoStatus::default();
        assert_eq!(s.io_status(), "ok");
        assert!(s.stop(&RequestError::Os(libc::ENOSPC)));
        assert!(!s.stop(&RequestError::Os(libc::EIO)), "already stopped");
        assert_eq!(s.io_status(), "nospace");
        let w = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        s.add_waker(w.clone());
        assert!(s.resume());
        assert_eq!(w.read().unwrap(), 1);
        assert_eq!(s.io_status(), "ok");
        assert!(!s.is_stopped());
    }
}
