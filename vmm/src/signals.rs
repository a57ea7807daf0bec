//! Termination signals for the daemons: SIGTERM and SIGINT are blocked in
//! every thread and taken synchronously by the main thread with
//! `sigwait`, so no handler runs in an arbitrary thread.

use anyhow::{bail, Result};

/// The blocked signal set.
pub struct TerminationSignals {
    set: libc::sigset_t,
}

/// Blocks SIGTERM and SIGINT in the calling thread (and the threads it
/// starts from now on).
pub fn block_termination() -> Result<TerminationSignals> {
    // SAFETY: `set` is plain data initialised by sigemptyset before use;
    // pthread_sigmask reads it and writes no memory of ours (old set null).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!(
                "could not block termination signals: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        Ok(TerminationSignals { set })
    }
}

impl TerminationSignals {
    /// Waits for SIGTERM or SIGINT and names it.
    pub fn wait(&self) -> Result<&'static str> {
        let mut sig: libc::c_int = 0;
        // SAFETY: `self.set` is an initialised set; `sig` is a valid out pointer.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 {
            bail!("sigwait failed: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(if sig == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        })
    }
}
