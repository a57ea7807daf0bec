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

/// How a counter is bumped: by any thread (locked add) or by its one
/// writer (load and store, which readers on other threads still see
/// whole).
#[derive(Clone, Copy)]
enum Writer {
    Any,
    One,
}

fn bump(c: &AtomicU64, n: u64, w: Writer) {
    match w {
        Writer::Any => {
            c.fetch_add(n, Ordering::Relaxed);
        }
        Writer::One => c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed),
    }
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
    fn record(&self, bytes: u64, ok: bool, ns: u64, w: Writer) {
        bump(&self.ops, 1, w);
        if ok {
            bump(&self.bytes, bytes, w);
        } else {
            bump(&self.errors, 1, w);
        }
        bump(&self.total_ns, ns, w);
        let bucket = (63 - ns.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        bump(&self.histogram[bucket], 1, w);
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
        bump(&self.ops, s.ops, Writer::Any);
        bump(&self.bytes, s.bytes, Writer::Any);
        bump(&self.errors, s.errors, Writer::Any);
        bump(&self.total_ns, s.total_ns, Writer::Any);
        for (t, b) in self.histogram.iter().zip(&s.histogram) {
            bump(t, *b, Writer::Any);
        }
    }
}

/// One set of counters: a node's shared set, or one queue's.
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

    fn record_completion(&self, c: &mut Completion, w: Writer) {
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
        self.op(c.request.op()).record(bytes, ok, ns, w);
    }

    fn record(
        &self,
        op: RequestOp,
        start: Option<Instant>,
        result: &Result<u64, RequestError>,
        w: Writer,
    ) {
        let ns = start.map_or(0, |s| s.elapsed().as_nanos() as u64);
        let (bytes, ok) = match result {
            Ok(b) => (*b, true),
            Err(_) => (0, false),
        };
        self.op(op).record(bytes, ok, ns, w);
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
        bump(
            &self.region_map_failures,
            s.region_map_failures,
            Writer::Any,
        );
        bump(&self.registered_ops, s.registered_ops, Writer::Any);
        bump(&self.bounced_ops, s.bounced_ops, Writer::Any);
        for (o, t) in self.ops().into_iter().zip(s.ops_mut()) {
            o.absorb(t);
        }
    }
}

/// Statistics of one node (or one user of a node), per operation kind.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// What any thread records directly, and what closed queues left.
    shared: Counters,
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

    /// Record one finished operation that started at `start` (from any
    /// thread).
    pub fn record(
        &self,
        op: RequestOp,
        start: Option<Instant>,
        result: &Result<u64, RequestError>,
    ) {
        self.shared.record(op, start, result, Writer::Any);
    }

    /// Record one finished request (from any thread): its latency runs
    /// from its start to when the innermost node finished it, read from
    /// the clock once (here, by the first node to record it) for every
    /// layer.
    pub fn record_completion(&self, c: &mut Completion) {
        self.shared.record_completion(c, Writer::Any);
    }

    /// Count a memory region a queue could not register or map.
    pub fn count_region_map_failure(&self) {
        bump(&self.shared.region_map_failures, 1, Writer::Any);
    }

    /// Count a request served from registered memory.
    pub fn count_registered(&self) {
        bump(&self.shared.registered_ops, 1, Writer::Any);
    }

    /// Count a request copied through a bounce buffer.
    pub fn count_bounced(&self) {
        bump(&self.shared.bounced_ops, 1, Writer::Any);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> NodeStatsSnapshot {
        let mut s = NodeStatsSnapshot::default();
        let queues = self.queues();
        self.shared.add_to(&mut s);
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
        self.counters.record_completion(c, Writer::One);
    }

    /// Record one finished operation that started at `start`.
    pub fn record(
        &self,
        op: RequestOp,
        start: Option<Instant>,
        result: &Result<u64, RequestError>,
    ) {
        self.counters.record(op, start, result, Writer::One);
    }

    /// Count a memory region this queue could not register or map.
    pub fn count_region_map_failure(&self) {
        bump(&self.counters.region_map_failures, 1, Writer::One);
    }

    /// Count a request served from registered memory.
    pub fn count_registered(&self) {
        bump(&self.counters.registered_ops, 1, Writer::One);
    }

    /// Count a request copied through a bounce buffer.
    pub fn count_bounced(&self) {
        bump(&self.counters.bounced_ops, 1, Writer::One);
    }
}

impl Drop for QueueStats {
    fn drop(&mut self) {
        // Under the lock, so a snapshot sees these counts exactly once.
        let mut queues = self.node.queues();
        let mut mine = NodeStatsSnapshot::default();
        self.counters.add_to(&mut mine);
        self.node.shared.absorb(&mut mine);
        queues.retain(|q| !Arc::ptr_eq(q, &self.counters));
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
        let ns = c
            .request
            .latency_ns
            .expect("the first layer reads the clock");
        std::thread::sleep(std::time::Duration::from_millis(2));
        outer.record_completion(&mut c);
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
        s.record(0, true, 1000, Writer::One); // 2^9 <= 1000 < 2^10
        s.record(0, true, 1024, Writer::Any); // 2^10
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
        node.record_completion(&mut read_done(10));
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
