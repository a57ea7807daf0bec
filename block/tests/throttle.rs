//! The `throttle` filter over null-co, driven in process at a fixed queue
//! depth for a few seconds of wall time: the configured IOPS and
//! bandwidth hold, bursts pass as configured, two nodes in one group
//! share it fairly, limits change live, and without limits the filter
//! passes everything through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::throttle::{Bucket, BucketLimit, ThrottleConfig, ThrottleGroup};
use block::{BlockGraph, BlockNode, Completion, NodeQueue, Request};

fn limit(b: Bucket, avg: u64, max: u64, len: u64) -> ThrottleConfig {
    let mut c = ThrottleConfig::default();
    *c.bucket_mut(b) = BucketLimit {
        avg,
        max,
        burst_length: len,
    };
    c
}

/// A graph with group `g0` and `n` throttle nodes `t0..` over null-co.
fn graph(
    config: ThrottleConfig,
    n: usize,
) -> (BlockGraph, Arc<ThrottleGroup>, Vec<Arc<dyn BlockNode>>) {
    let mut g = BlockGraph::new();
    let group = Arc::new(ThrottleGroup::new("g0", config).unwrap());
    g.add_throttle_group(group.clone());
    let nodes = (0..n)
        .map(|i| {
            let arg = format!(
                "throttle,node-name=t{i},throttle-group=g0,file.driver=null-co,file.size=1G"
            );
            g.add(&qapi::parse_blockdev(&arg).unwrap()).unwrap()
        })
        .collect();
    (g, group, nodes)
}

/// Keeps `depth` reads of `bs` bytes (or writes) in flight on `q` for
/// `secs`; returns how many completed.
fn drive(q: &mut dyn NodeQueue, depth: usize, bs: usize, write: bool, secs: f64) -> u64 {
    let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; bs]).collect();
    let mut done: Vec<Completion> = Vec::new();
    let submit = |q: &mut dyn NodeQueue, i: usize, buf: &mut Vec<u8>| {
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: bs,
        }];
        let off = (i as u64 * 7919 % 1000) * 4096;
        // SAFETY: the buffer outlives the request: it is resubmitted only
        // after its completion, and all complete before `bufs` drops.
        let r = unsafe {
            if write {
                Request::write(off, iov, false)
            } else {
                Request::read(off, iov)
            }
        };
        q.submit(r.with_user_data(i as u64)).unwrap();
    };
    for (i, b) in bufs.iter_mut().enumerate() {
        submit(q, i, b);
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut count = 0;
    while Instant::now() < end {
        done.clear();
        q.wait_completions(1, &mut done);
        for c in &done {
            assert!(c.result.is_ok(), "{:?}", c.result);
            count += 1;
            let i = c.request.user_data as usize;
            if Instant::now() < end {
                submit(q, i, &mut bufs[i]);
            }
        }
    }
    // Drain.
    while q.in_flight() > 0 {
        done.clear();
        q.wait_completions(1, &mut done);
    }
    count
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= want * tol
}

#[test]
fn iops_and_bandwidth_limits_hold() {
    let (_g, _group, nodes) = graph(limit(Bucket::OpsTotal, 2000, 0, 1), 1);
    let mut q = nodes[0].open_queue().unwrap();
    let n = drive(&mut *q, 16, 4096, false, 3.0) as f64;
    // 3 s at 2000/s plus the initial tenth-of-a-second burst.
    assert!(
        within(n, 6200.0, 0.05),
        "{n} reads in 3 s at iops-total=2000"
    );

    let (_g, _group, nodes) = graph(limit(Bucket::BpsWrite, 16 << 20, 0, 1), 1);
    let mut q = nodes[0].open_queue().unwrap();
    let n = drive(&mut *q, 8, 64 << 10, true, 3.0) as f64;
    // 256 writes of 64 KiB per second, plus the burst.
    assert!(
        within(n, 3.1 * 256.0, 0.05),
        "{n} writes in 3 s at bps-write=16M"
    );
    // Reads are not limited by bps-write.
    let n = drive(&mut *q, 8, 64 << 10, false, 0.5);
    assert!(n > 5000, "only {n} reads in 0.5 s");
}

#[test]
fn a_burst_passes_at_the_burst_rate_then_the_average_applies() {
    // 500/s on average, 2000/s for up to 2 s of burst: the 4000-deep
    // bucket fills at 1500/s, so about 2.7 s at 2000/s, then 500/s.
    let (_g, _group, nodes) = graph(limit(Bucket::OpsTotal, 500, 2000, 2), 1);
    let mut q = nodes[0].open_queue().unwrap();
    let first = drive(&mut *q, 16, 4096, false, 2.0) as f64;
    assert!(within(first, 4000.0, 0.06), "{first} in the first 2 s");
    // Let the burst run out, then measure the average.
    drive(&mut *q, 16, 4096, false, 1.5);
    let later = drive(&mut *q, 16, 4096, false, 2.0) as f64;
    assert!(
        within(later, 1000.0, 0.08),
        "{later} in 2 s after the burst"
    );
}

#[test]
fn two_nodes_in_one_group_split_it_fairly() {
    let (_g, _group, nodes) = graph(limit(Bucket::OpsTotal, 3000, 0, 1), 2);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .map(|n| {
                let n = n.clone();
                // Different depths: the fair share must not follow them.
                let depth = if n.node_name() == "t0" { 4 } else { 32 };
                s.spawn(move || {
                    let mut q = n.open_queue().unwrap();
                    drive(&mut *q, depth, 4096, false, 3.0)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (a, b) = (counts[0] as f64, counts[1] as f64);
    assert!(within(a + b, 9300.0, 0.05), "total {a} + {b}");
    assert!(
        (a - b).abs() <= 0.1 * (a + b) / 2.0,
        "unfair split: {a} and {b}"
    );
}

#[test]
fn limits_change_live_and_lifting_them_releases_the_waiters() {
    let (_g, group, nodes) = graph(limit(Bucket::OpsTotal, 1000, 0, 1), 1);
    let mut q = nodes[0].open_queue().unwrap();
    let slow = drive(&mut *q, 8, 4096, false, 1.0) as f64;
    assert!(within(slow, 1100.0, 0.06), "{slow} at 1000/s");
    group
        .set_config(limit(Bucket::OpsTotal, 4000, 0, 1))
        .unwrap();
    let fast = drive(&mut *q, 8, 4096, false, 1.0) as f64;
    assert!(within(fast, 4400.0, 0.06), "{fast} at 4000/s");
    // Bad limits are refused and the old ones stay.
    let e = group
        .set_config(limit(Bucket::OpsTotal, 100, 50, 1))
        .unwrap_err();
    assert!(e.contains("cannot be lower"), "{e}");
    assert_eq!(group.config().buckets[Bucket::OpsTotal as usize].avg, 4000);
    // Requests waiting when the limits go away are sent at once.
    group.set_config(limit(Bucket::OpsTotal, 10, 0, 1)).unwrap();
    // A burst of 2 (a tenth of a second's worth, plus one), then 10/s.
    let n = drive(&mut *q, 4, 4096, false, 0.2);
    assert!(n <= 5, "{n} in 0.2 s at 10/s");
    let t = Instant::now();
    let mut bufs = vec![vec![0u8; 4096]; 32];
    for (i, b) in bufs.iter_mut().enumerate() {
        let iov = vec![libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        // SAFETY: `bufs` outlives the requests, drained below.
        q.submit(unsafe { Request::read(0, iov) }.with_user_data(i as u64))
            .unwrap();
    }
    group.set_config(ThrottleConfig::default()).unwrap();
    let mut out = Vec::new();
    while out.len() < 32 {
        q.wait_completions(1, &mut out);
    }
    assert!(t.elapsed() < Duration::from_secs(1), "waiters not released");
}

#[test]
fn without_limits_everything_passes_and_unknown_groups_are_named() {
    let (mut g, _group, nodes) = graph(ThrottleConfig::default(), 1);
    let mut q = nodes[0].open_queue().unwrap();
    let n = drive(&mut *q, 16, 4096, false, 0.3);
    assert!(n > 20_000, "only {n} in 0.3 s without limits");
    let e = g
        .add(&qapi::parse_blockdev("throttle,throttle-group=nope,file.driver=null-co").unwrap())
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "Throttle group 'nope' does not exist");
}
