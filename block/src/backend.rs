//! [`BlockBackend`]: what stands between a user of the graph (a virtio-blk
//! device, a vhost-user-blk or NBD export, the benchmark) and its root
//! node, as QEMU's `BlockBackend` does:
//!
//! - the one request check (read-only for this user, range against the
//!   node's size), made when a request enters the graph; the nodes below
//!   see the request marked checked and apply only their own options
//!   (`cache.no-flush`, `discard`, `detect-zeroes`);
//! - the user's own I/O statistics (`query-blockstats` without
//!   `query-nodes` reports these, per device or export), apart from the
//!   node's, which count every user's requests;
//! - the error policy (`werror`/`rerror`, [`policy`]) and the user's
//!   [`IoStatus`].
//!
//! Throttling is a filter node (`driver=throttle`, [`crate::throttle`]),
//! as in current QEMU; a user whose root is one gets its limits from QMP
//! `block_set_io_throttle` by the device's name.

pub mod policy;

use std::os::fd::RawFd;
use std::sync::Arc;

pub use policy::{decide, ErrorAction, ErrorOutcome, IoStatus};

use crate::node::check_request;
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::{NodeStats, QueueStats};
use crate::{BlockError, BlockNode, NodeQueue};

/// How a user attaches to its node.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// The user may not modify the node (also when the node is read-only).
    pub read_only: bool,
    /// What a failed write, flush, discard or write-zeroes does.
    pub werror: ErrorAction,
    /// What a failed read does.
    pub rerror: ErrorAction,
    /// The user's I/O status, which `stop` needs (without one, `stop` and
    /// `enospc` report).
    pub io_status: Option<Arc<IoStatus>>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            read_only: false,
            werror: ErrorAction::Report,
            rerror: ErrorAction::Report,
            io_status: None,
        }
    }
}

/// One user's attachment to a node.
pub struct BlockBackend {
    name: String,
    node: Arc<dyn BlockNode>,
    read_only: bool,
    werror: ErrorAction,
    rerror: ErrorAction,
    io_status: Option<Arc<IoStatus>>,
    stats: Arc<NodeStats>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("name", &self.name)
            .field("node", &self.node.node_name())
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl BlockBackend {
    /// `name` (a device's or export's id) attached to `node`.
    pub fn new(name: impl Into<String>, node: Arc<dyn BlockNode>, opts: BackendOptions) -> Self {
        BlockBackend {
            name: name.into(),
            read_only: opts.read_only || node.read_only(),
            node,
            werror: opts.werror,
            rerror: opts.rerror,
            io_status: opts.io_status,
            stats: Arc::default(),
        }
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root node.
    pub fn node(&self) -> &Arc<dyn BlockNode> {
        &self.node
    }

    /// Whether the user may not modify the node.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The user's own statistics (its requests only).
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// The user's I/O status, if it can stop.
    pub fn io_status(&self) -> Option<&Arc<IoStatus>> {
        self.io_status.as_ref()
    }

    /// A data-plane queue for one thread: the node's queue behind the
    /// request check and the user's statistics.
    pub fn open_queue(&self) -> Result<BackendQueue, BlockError> {
        Ok(BackendQueue {
            inner: self.node.open_queue()?,
            node: self.node.clone(),
            read_only: self.read_only,
            stats: self.stats.queue(),
        })
    }

    /// What to do about a request of `op` that failed with `error`
    /// (werror/rerror). Only host errors follow the policy: what the user
    /// got wrong (out of range, read-only, unsupported) is reported. A
    /// `stop` sets the I/O status; without one, it reports.
    pub fn error_outcome(&self, op: RequestOp, error: &RequestError) -> ErrorOutcome {
        if !matches!(error, RequestError::Os(_)) {
            return ErrorOutcome::Report;
        }
        match (decide(self.werror, self.rerror, op, error), &self.io_status) {
            (ErrorOutcome::Stop, None) => ErrorOutcome::Report,
            (ErrorOutcome::Stop, Some(st)) => {
                st.stop(error);
                ErrorOutcome::Stop
            }
            (o, _) => o,
        }
    }
}

/// A [`BlockBackend`]'s queue for one thread.
pub struct BackendQueue {
    inner: Box<dyn NodeQueue>,
    node: Arc<dyn BlockNode>,
    read_only: bool,
    stats: QueueStats,
}

impl BackendQueue {
    fn record(&self, done: &mut [Completion]) {
        for c in done {
            self.stats.record_completion(c);
        }
    }
}

impl NodeQueue for BackendQueue {
    fn submit(&mut self, mut req: Request) -> Result<(), SubmitError> {
        req.stamp();
        // A request sent again (kept by `stop`) is timed to its new end.
        req.latency_ns = None;
        if let Err(error) = check_request(&req, self.read_only, self.node.capacity()) {
            self.stats.record(req.op(), req.start, &Err(error));
            return Err(SubmitError {
                request: req,
                error,
            });
        }
        req.checked = true;
        self.inner.submit(req)
    }

    fn kick(&mut self) {
        self.inner.kick();
    }

    fn sync_memory(&mut self) {
        self.inner.sync_memory();
    }

    fn completions_ready(&mut self) -> bool {
        self.inner.completions_ready()
    }

    fn completion_fd(&self) -> RawFd {
        self.inner.completion_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let n = self.inner.poll_completions(out);
        self.record(&mut out[start..]);
        n
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn complete_now(&mut self, c: Completion) {
        self.inner.complete_now(c);
    }

    fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let n = self.inner.wait_completions(min, out);
        self.record(&mut out[start..]);
        n
    }
}

#[cfg(test)]
mod tests;
