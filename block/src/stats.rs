//! Per-node I/O statistics, kept with relaxed atomics so data-plane threads
//! of several queues can record without locks (QEMU's `BlockAcctStats`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::request::{Completion, RequestError, RequestOp};

/// Number of latency buckets: bucket `i` counts latencies in `[2^i, 2^(i+1))` ns.
pub const LATENCY_BUCKETS: usize = 40;

/// Counters for one kind of operation.
#[derive(Debug)]
pub struct OpStats {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    total_ns: AtomicU64,
    histogram: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            histogram: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A snapshot of [`OpStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpStatsSnapshot {
    /// Completed operations (including failed ones).
    pub ops: u64,
    /// Bytes transferred by successful operations.
    pub bytes: u64,
    /// Failed operations.
    pub errors: u64,
    /// Sum of latencies, nanoseconds.
    pub total_ns: u64,
    /// Log2 latency histogram, nanoseconds.
    pub histogram: Vec<u64>,
}

impl OpStats {
    fn record(&self, bytes: u64, ok: bool, ns: u64) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        let bucket = (63 - ns.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.histogram[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> OpStatsSnapshot {
        OpStatsSnapshot {
            ops: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            total_ns: self.total_ns.load(Ordering::Relaxed),
            histogram: self
                .histogram
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Statistics of one node, per operation kind.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Memory regions a queue of this node could not register or map
    /// (requests in them take the bounce or unregistered path instead).
    region_map_failures: AtomicU64,
    /// Requests whose buffers lay in registered memory (fixed buffers,
    /// mapped regions) and went to the driver as they were.
    registered_ops: AtomicU64,
    /// Requests copied through a bounce buffer.
    bounced_ops: AtomicU64,
    read: OpStats,
    write: OpStats,
    flush: OpStats,
    discard: OpStats,
    write_zeroes: OpStats,
}

/// A snapshot of [`NodeStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatsSnapshot {
    /// Memory regions that could not be registered or mapped.
    pub region_map_failures: u64,
    /// Requests served from registered memory.
    pub registered_ops: u64,
    /// Requests copied through a bounce buffer.
    pub bounced_ops: u64,
    /// Reads.
    pub read: OpStatsSnapshot,
    /// Writes.
    pub write: OpStatsSnapshot,
    /// Flushes.
    pub flush: OpStatsSnapshot,
    /// Discards.
    pub discard: OpStatsSnapshot,
    /// Write-zeroes.
    pub write_zeroes: OpStatsSnapshot,
}

impl NodeStats {
    fn op(&self, op: RequestOp) -> &OpStats {
        match op {
            RequestOp::Read => &self.read,
            RequestOp::Write => &self.write,
            RequestOp::Flush => &self.flush,
            RequestOp::Discard => &self.discard,
            RequestOp::WriteZeroes => &self.write_zeroes,
        }
    }

    /// Record one finished operation that started at `start`.
    pub fn record(
        &self,
        op: RequestOp,
        start: Option<Instant>,
        result: &Result<u64, RequestError>,
    ) {
        let ns = start.map_or(0, |s| s.elapsed().as_nanos() as u64);
        let (bytes, ok) = match result {
            Ok(b) => (*b, true),
            Err(_) => (0, false),
        };
        self.op(op).record(bytes, ok, ns);
    }

    /// Record one finished request: its latency runs from its start to
    /// when the innermost node finished it, read from the clock once
    /// (here, by the first node to record it) for every layer.
    pub fn record_completion(&self, c: &mut Completion) {
        let ns = match c.request.start {
            Some(s) => {
                let end = *c.request.finished.get_or_insert_with(Instant::now);
                end.saturating_duration_since(s).as_nanos() as u64
            }
            None => 0,
        };
        let (bytes, ok) = match c.result {
            Ok(b) => (b, true),
            Err(_) => (0, false),
        };
        self.op(c.request.op()).record(bytes, ok, ns);
    }

    /// Count a memory region a queue could not register or map.
    pub fn count_region_map_failure(&self) {
        self.region_map_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a request served from registered memory.
    pub fn count_registered(&self) {
        self.registered_ops.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a request copied through a bounce buffer.
    pub fn count_bounced(&self) {
        self.bounced_ops.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> NodeStatsSnapshot {
        NodeStatsSnapshot {
            region_map_failures: self.region_map_failures.load(Ordering::Relaxed),
            registered_ops: self.registered_ops.load(Ordering::Relaxed),
            bounced_ops: self.bounced_ops.load(Ordering::Relaxed),
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
            discard: self.discard.snapshot(),
            write_zeroes: self.write_zeroes.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_bytes_only_for_successes() {
        let s = NodeStats::default();
        s.record(RequestOp::Read, None, &Ok(4096));
        s.record(RequestOp::Read, None, &Err(RequestError::ReadOnly));
        let snap = s.snapshot();
        assert_eq!(snap.read.ops, 2);
        assert_eq!(snap.read.bytes, 4096);
        assert_eq!(snap.read.errors, 1);
        assert_eq!(snap.write.ops, 0);
    }

    #[test]
    fn every_layer_times_a_completion_to_the_same_end() {
        let (inner, outer) = (NodeStats::default(), NodeStats::default());
        let mut req = crate::Request::flush();
        req.stamp();
        let mut c = Completion {
            request: req,
            result: Ok(0),
        };
        inner.record_completion(&mut c);
        let end = c.request.finished.expect("the first layer reads the clock");
        std::thread::sleep(std::time::Duration::from_millis(2));
        outer.record_completion(&mut c);
        assert_eq!(c.request.finished, Some(end));
        let (i, o) = (inner.snapshot().flush, outer.snapshot().flush);
        assert_eq!((i.ops, o.ops), (1, 1));
        assert_eq!(
            i.total_ns, o.total_ns,
            "the outer layer's wait is not counted"
        );
        assert!(i.total_ns < 2_000_000);
    }

    #[test]
    fn histogram_buckets_by_power_of_two() {
        let s = OpStats::default();
        s.record(0, true, 1000); // 2^9 <= 1000 < 2^10
        s.record(0, true, 1024); // 2^10
        let snap = s.snapshot();
        assert_eq!(snap.histogram[9], 1);
        assert_eq!(snap.histogram[10], 1);
    }
}
