//! Per-node I/O statistics (QEMU's `BlockAcctStats`).
//!
//! A data-plane queue records into its own [`QueueStats`], which only its
//! thread writes: plain loads and stores, no locked read-modify-write and
//! no cache line shared with another IOThread. A snapshot sums the live
//! queues' counters with what closed queues left behind, so the counts of
//! a node survive its queues.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::request::{Completion, RequestError, RequestOp};

/// Number of latency buckets: bucket `i` counts latencies in `[2^i, 2^(i+1))` ns.
pub const LATENCY_BUCKETS: usize = 40;

/// Adds `n` to a counter that only the calling thread writes: a load and
/// a store, which readers on other threads still see whole.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Adds `n` to a counter any thread may write.
fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Counters for one kind of operation.
#[derive(Debug)]
struct OpStats {
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

/// A snapshot of one operation kind's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
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

impl Default for OpStatsSnapshot {
    fn default() -> Self {
        OpStatsSnapshot {
            ops: 0,
            bytes: 0,
            errors: 0,
            total_ns: 0,
            histogram: vec![0; LATENCY_BUCKETS],
        }
    }
}

impl OpStats {
    fn record(&self, bytes: u64, ok: bool, ns: u64) {
        bump(&self.ops, 1);
        if ok {
            bump(&self.bytes, bytes);
        } else {
            bump(&self.errors, 1);
        }
        bump(&self.total_ns, ns);
        let bucket = (63 - ns.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        bump(&self.histogram[bucket], 1);
    }

    fn add_to(&self, s: &mut OpStatsSnapshot) {
        s.ops += self.ops.load(Ordering::Relaxed);
        s.bytes += self.bytes.load(Ordering::Relaxed);
        s.errors += self.errors.load(Ordering::Relaxed);
        s.total_ns += self.total_ns.load(Ordering::Relaxed);
        for (t, b) in s.histogram.iter_mut().zip(&self.histogram) {
            *t += b.load(Ordering::Relaxed);
        }
    }

    fn absorb(&self, s: &OpStatsSnapshot) {
        add(&self.ops, s.ops);
        add(&self.bytes, s.bytes);
        add(&self.errors, s.errors);
        add(&self.total_ns, s.total_ns);
        for (t, b) in self.histogram.iter().zip(&s.histogram) {
            add(t, *b);
        }
    }
}

/// One set of counters: one queue's, or what a node's closed queues left.
#[derive(Debug, Default)]
struct Counters {
    region_map_failures: AtomicU64,
    registered_ops: AtomicU64,
    bounced_ops: AtomicU64,
    read: OpStats,
    write: OpStats,
    flush: OpStats,
    discard: OpStats,
    write_zeroes: OpStats,
}

impl Counters {
    fn op(&self, op: RequestOp) -> &OpStats {
        match op {
            RequestOp::Read => &self.read,
            RequestOp::Write => &self.write,
            RequestOp::Flush => &self.flush,
            RequestOp::Discard => &self.discard,
            RequestOp::WriteZeroes => &self.write_zeroes,
        }
    }

    fn ops(&self) -> [&OpStats; 5] {
        [
            &self.read,
            &self.write,
            &self.flush,
            &self.discard,
            &self.write_zeroes,
        ]
    }

    fn record_completion(&self, c: &mut Completion) {
        let ns = match c.request.latency_ns {
            Some(ns) => ns,
            None => {
                let ns = c.request.start.map_or(0, |s| s.elapsed().as_nanos() as u64);
                c.request.latency_ns = Some(ns);
                ns
            }
        };
        let (bytes, ok) = match c.result {
            Ok(b) => (b, true),
            Err(_) => (0, false),
        };
        self.op(c.request.op()).record(bytes, ok, ns);
    }

    fn record(&self, op: RequestOp, start: Option<Instant>, result: &Result<u64, RequestError>) {
        let ns = start.map_or(0, |s| s.elapsed().as_nanos() as u64);
        let (bytes, ok) = match result {
            Ok(b) => (*b, true),
            Err(_) => (0, false),
        };
        self.op(op).record(bytes, ok, ns);
    }

    fn add_to(&self, s: &mut NodeStatsSnapshot) {
        s.region_map_failures += self.region_map_failures.load(Ordering::Relaxed);
        s.registered_ops += self.registered_ops.load(Ordering::Relaxed);
        s.bounced_ops += self.bounced_ops.load(Ordering::Relaxed);
        for (o, t) in self.ops().into_iter().zip(s.ops_mut()) {
            o.add_to(t);
        }
    }

    fn absorb(&self, s: &mut NodeStatsSnapshot) {
        add(&self.region_map_failures, s.region_map_failures);
        add(&self.registered_ops, s.registered_ops);
        add(&self.bounced_ops, s.bounced_ops);
        for (o, t) in self.ops().into_iter().zip(s.ops_mut()) {
            o.absorb(t);
        }
    }
}

/// Statistics of one node (or one user of a node), per operation kind.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// What closed queues left.
    closed: Counters,
    /// The live queues' own counters.
    queues: Mutex<Vec<Arc<Counters>>>,
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

impl NodeStatsSnapshot {
    fn ops_mut(&mut self) -> [&mut OpStatsSnapshot; 5] {
        [
            &mut self.read,
            &mut self.write,
            &mut self.flush,
            &mut self.discard,
            &mut self.write_zeroes,
        ]
    }
}

impl NodeStats {
    fn queues(&self) -> MutexGuard<'_, Vec<Arc<Counters>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters for one data-plane queue, which only the queue's thread
    /// writes; they join the node's totals at once and stay in them after
    /// the queue closes.
    pub fn queue(self: &Arc<Self>) -> QueueStats {
        let counters = Arc::new(Counters::default());
        self.queues().push(counters.clone());
        QueueStats {
            node: self.clone(),
            counters,
            _one_thread: PhantomData,
        }
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> NodeStatsSnapshot {
        let mut s = NodeStatsSnapshot::default();
        let queues = self.queues();
        self.closed.add_to(&mut s);
        for q in queues.iter() {
            q.add_to(&mut s);
        }
        s
    }
}

/// One queue's statistics (see [`NodeStats::queue`]): written by the
/// queue's thread only, so it is `Send` but not `Sync`.
pub struct QueueStats {
    node: Arc<NodeStats>,
    counters: Arc<Counters>,
    _one_thread: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for QueueStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueStats").finish_non_exhaustive()
    }
}

impl QueueStats {
    /// Record one finished request (see [`NodeStats::record_completion`]).
    pub fn record_completion(&self, c: &mut Completion) {
        self.counters.record_completion(c);
    }

    /// Record one finished operation that started at `start`.
    pub fn record(
        &self,
        op: RequestOp,
        start: Option<Instant>,
        result: &Result<u64, RequestError>,
    ) {
        self.counters.record(op, start, result);
    }

    /// Count a memory region this queue could not register or map.
    pub fn count_region_map_failure(&self) {
        bump(&self.counters.region_map_failures, 1);
    }

    /// Count a request served from registered memory.
    pub fn count_registered(&self) {
        bump(&self.counters.registered_ops, 1);
    }

    /// Count a request copied through a bounce buffer.
    pub fn count_bounced(&self) {
        bump(&self.counters.bounced_ops, 1);
    }
}

impl Drop for QueueStats {
    fn drop(&mut self) {
        // Under the lock, so a snapshot sees these counts exactly once.
        let mut queues = self.node.queues();
        let mut mine = NodeStatsSnapshot::default();
        self.counters.add_to(&mut mine);
        self.node.closed.absorb(&mut mine);
        queues.retain(|q| !Arc::ptr_eq(q, &self.counters));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_bytes_only_for_successes() {
        let node = Arc::new(NodeStats::default());
        let s = node.queue();
        s.record(RequestOp::Read, None, &Ok(4096));
        s.record(RequestOp::Read, None, &Err(RequestError::ReadOnly));
        let snap = node.snapshot();
        assert_eq!(snap.read.ops, 2);
        assert_eq!(snap.read.bytes, 4096);
        assert_eq!(snap.read.errors, 1);
        assert_eq!(snap.write.ops, 0);
    }

    #[test]
    fn every_layer_times_a_completion_to_the_same_end() {
        let (inner, outer) = (
            Arc::new(NodeStats::default()),
            Arc::new(NodeStats::default()),
        );
        let (inner_q, outer_q) = (inner.queue(), outer.queue());
        let mut req = crate::Request::flush();
        req.stamp();
        let mut c = Completion {
            request: req,
            result: Ok(0),
        };
        inner_q.record_completion(&mut c);
        let ns = c
            .request
            .latency_ns
            .expect("the first layer reads the clock");
        std::thread::sleep(std::time::Duration::from_millis(2));
        outer_q.record_completion(&mut c);
        assert_eq!(c.request.latency_ns, Some(ns));
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
        let mut snap = OpStatsSnapshot::default();
        s.add_to(&mut snap);
        assert_eq!(snap.histogram[9], 1);
        assert_eq!(snap.histogram[10], 1);
        assert_eq!(snap.total_ns, 2024);
    }

    fn read_done(ns: u64) -> Completion {
        let mut req = crate::Request::flush();
        req.start = Some(Instant::now());
        req.latency_ns = Some(ns);
        Completion {
            request: req,
            result: Ok(0),
        }
    }

    #[test]
    fn queue_counts_join_the_node_and_outlive_the_queue() {
        let node = Arc::new(NodeStats::default());
        // A queue that came and went.
        node.queue().record_completion(&mut read_done(10));
        let (q1, q2) = (node.queue(), node.queue());
        q1.record_completion(&mut read_done(100));
        q1.count_registered();
        q2.record_completion(&mut read_done(1000));
        q2.count_bounced();
        let live = node.snapshot();
        assert_eq!(live.flush.ops, 3);
        assert_eq!(live.flush.total_ns, 1110);
        assert_eq!((live.registered_ops, live.bounced_ops), (1, 1));
        drop(q1);
        assert_eq!(node.snapshot(), live, "a closed queue's counts stay");
        assert_eq!(node.queues().len(), 1);
        drop(q2);
        assert_eq!(node.snapshot(), live);
        assert!(node.queues().is_empty());
        let q3 = node.queue();
        q3.record(RequestOp::Read, None, &Err(RequestError::ReadOnly));
        let s = node.snapshot();
        assert_eq!((s.read.ops, s.read.errors, s.flush.ops), (1, 1, 3));
    }

    #[test]
    fn queues_on_other_threads_count_once_each() {
        let node = Arc::new(NodeStats::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let q = node.queue();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        q.record_completion(&mut read_done(5));
                    }
                    q
                })
            })
            .collect();
        let queues: Vec<QueueStats> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(node.snapshot().flush.ops, 40_000);
        drop(queues);
        assert_eq!(node.snapshot().flush.ops, 40_000);
        assert_eq!(node.snapshot().flush.total_ns, 200_000);
    }
}
