//! `raw`: the format driver with no format. With `offset` and `size` it is
//! a window over its child: requests are checked against the window and
//! moved by the offset, so a guest can never reach outside it.

use std::os::fd::RawFd;
use std::sync::Arc;

use qapi::BlockdevCommon;

use crate::limits::BlockLimits;
use crate::node::{BlockNode, NodeCommon, NodeQueue, Precheck};
use crate::request::{Completion, Request, SubmitError};
use crate::stats::{NodeStats, QueueStats};
use crate::BlockError;

/// The `raw` node.
pub struct RawNode {
    common: NodeCommon,
    child: Arc<dyn BlockNode>,
    offset: u64,
    size: Option<u64>,
    stats: Arc<NodeStats>,
}

impl RawNode {
    pub(crate) fn open(
        name: String,
        common: &BlockdevCommon,
        child: Arc<dyn BlockNode>,
        offset: Option<u64>,
        size: Option<u64>,
    ) -> Result<Self, BlockError> {
        let offset = offset.unwrap_or(0);
        let child_size = child.capacity();
        let end = offset.checked_add(size.unwrap_or(0));
        if offset > child_size || end.is_none_or(|e| e > child_size) {
            return Err(BlockError::Invalid(format!(
                "The sum of offset ({offset}) and size ({}) has to be smaller or equal to the actual size of the containing file ({child_size})",
                size.unwrap_or(0)
            )));
        }
        if !common.read_only && child.read_only() {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                child.node_name()
            )));
        }
        Ok(RawNode {
            common: NodeCommon::new(name, common, common.read_only),
            child,
            offset,
            size,
            stats: Arc::default(),
        })
    }
}

/// The window's size for a child of `child_size` bytes.
fn window(offset: u64, size: Option<u64>, child_size: u64) -> u64 {
    size.unwrap_or_else(|| child_size.saturating_sub(offset))
}

impl BlockNode for RawNode {
    fn node_name(&self) -> &str {
        &self.common.name
    }
    fn driver(&self) -> &'static str {
        "raw"
    }
    fn capacity(&self) -> u64 {
        window(self.offset, self.size, self.child.capacity())
    }
    fn refresh_capacity(&self) -> Result<u64, BlockError> {
        let child = self.child.refresh_capacity()?;
        Ok(window(self.offset, self.size, child))
    }
    fn limits(&self) -> BlockLimits {
        self.child.limits()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, crate::BlockStatus), BlockError> {
        let cap = self.capacity();
        let len = len.min(cap.saturating_sub(offset)).max(1);
        self.child.block_status(self.offset + offset, len)
    }
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.size.is_some() {
            return Err(BlockError::Invalid(
                "Cannot resize fixed-size raw disks".into(),
            ));
        }
        if self.common.read_only {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                self.common.name
            )));
        }
        let end = self
            .offset
            .checked_add(size)
            .ok_or_else(|| BlockError::Invalid(format!("Size {size} is too large")))?;
        self.child.truncate(end)
    }
    fn cache_direct(&self) -> bool {
        self.child.cache_direct()
    }
    fn read_only(&self) -> bool {
        self.common.read_only
    }
    fn options(&self) -> crate::node::NodeOptions {
        self.common.options()
    }
    fn children(&self) -> Vec<Arc<dyn BlockNode>> {
        vec![self.child.clone()]
    }
    fn stats(&self) -> &NodeStats {
        &self.stats
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        Ok(Box::new(RawQueue {
            common: self.common.clone(),
            child_node: self.child.clone(),
            child: self.child.open_queue()?,
            offset: self.offset,
            size: self.size,
            stats: self.stats.queue(),
        }))
    }
}

struct RawQueue {
    common: NodeCommon,
    child_node: Arc<dyn BlockNode>,
    child: Box<dyn NodeQueue>,
    offset: u64,
    size: Option<u64>,
    stats: QueueStats,
}

impl NodeQueue for RawQueue {
    fn sync_memory(&mut self) {
        self.child.sync_memory();
    }

    fn completions_ready(&mut self) -> bool {
        self.child.completions_ready()
    }

    fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        let cap = window(self.offset, self.size, self.child_node.capacity());
        let mut req = match self.common.precheck(req, cap)? {
            Precheck::Done(mut c) => {
                c.request.shift(self.offset);
                self.child.complete_now(c);
                return Ok(());
            }
            Precheck::Forward(req) => req,
        };
        req.shift(self.offset);
        self.child.submit(req).map_err(|mut e| {
            e.request.unshift(self.offset);
            e
        })
    }

    fn kick(&mut self) {
        self.child.kick();
    }

    fn completion_fd(&self) -> RawFd {
        self.child.completion_fd()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let n = self.child.poll_completions(out);
        self.fixup(&mut out[start..]);
        n
    }

    fn in_flight(&self) -> usize {
        self.child.in_flight()
    }

    fn complete_now(&mut self, mut c: Completion) {
        c.request.shift(self.offset);
        self.child.complete_now(c);
    }

    fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let n = self.child.wait_completions(min, out);
        self.fixup(&mut out[start..]);
        n
    }
}

impl RawQueue {
    fn fixup(&self, done: &mut [Completion]) {
        for c in done {
            c.request.unshift(self.offset);
            self.stats.record_completion(c);
        }
    }
}
