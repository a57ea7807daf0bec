//! The benchmark loop: keep `iodepth` requests in flight on one node queue,
//! timing each from submission to completion.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use block::{Completion, NodeQueue, RamRegistrar, RegionId, Request, RequestOp};
use clap::ValueEnum;

use super::buffers::Buffers;

/// The access pattern, with fio's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random mixed reads and writes (--rwmixread).
    Randrw,
}

impl Pattern {
    /// Whether the pattern writes at all.
    pub fn writes(self, rwmixread: u8) -> bool {
        match self {
            Pattern::Read | Pattern::Randread => false,
            Pattern::Randrw => rwmixread < 100,
            Pattern::Write | Pattern::Randwrite => true,
        }
    }

    fn random(self) -> bool {
        !matches!(self, Pattern::Read | Pattern::Write)
    }
}

/// Where the benchmark's buffers live, as seen by the block layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BufferMode {
    /// In memory registered once with the RAM registrar (as guest RAM is).
    Registered,
    /// In plain memory the registrar does not know: drivers that need
    /// registered memory copy through their bounce pool.
    Bounce,
    /// Each buffer is registered before its request and unregistered after
    /// it: what a block layer without a registrar must do for drivers that
    /// need memory regions.
    MapPerRequest,
}

/// What to run.
pub struct JobSpec {
    pub buffers: BufferMode,
    pub pattern: Pattern,
    pub rwmixread: u8,
    pub bs: u64,
    /// Blocks between one sequential request and the next (1: adjacent).
    pub step_blocks: u64,
    pub iodepth: usize,
    pub size: u64,
    pub runtime: Option<Duration>,
    pub count: Option<u64>,
    /// Run this long before measuring (fio's ramp_time): completions in
    /// the ramp are not counted, and the runtime starts after it.
    pub ramp: Duration,
    /// Busy-poll for a completion this long before sleeping, ns (0: sleep
    /// at once).
    pub poll_max_ns: u64,
    pub progress: bool,
}

/// Results for one direction.
#[derive(Default)]
pub struct OpResult {
    pub ios: u64,
    pub bytes: u64,
    pub lat_ns: Vec<u64>,
}

/// What a run measured.
pub struct JobResult {
    pub elapsed: Duration,
    /// CPU time (user and system) the job's thread used.
    pub cpu: Duration,
    pub read: OpResult,
    pub write: OpResult,
}

/// xorshift64*: fast, and good enough to spread offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Issuer<'a> {
    spec: &'a JobSpec,
    bufs: Buffers,
    rng: Rng,
    next_seq: u64,
    blocks: u64,
    issued: u64,
    iovecs: Vec<Vec<libc::iovec>>,
    starts: Vec<Instant>,
    registrar: &'a RamRegistrar,
    /// Per-slot regions in map-per-request mode.
    mapped: Vec<Option<RegionId>>,
}

impl Issuer<'_> {
    /// Undoes what `submit` registered for `slot` (map-per-request).
    fn finish(&mut self, slot: usize) {
        if let Some(id) = self.mapped[slot].take() {
            self.registrar.remove(id);
        }
    }

    fn submit(&mut self, queue: &mut dyn NodeQueue, slot: usize) -> Result<()> {
        let spec = self.spec;
        let block = if spec.pattern.random() {
            self.rng.next() % self.blocks
        } else {
            let b = self.next_seq;
            // In u128: a step near the whole size must not overflow.
            self.next_seq =
                ((u128::from(b) + u128::from(spec.step_blocks)) % u128::from(self.blocks)) as u64;
            b
        };
        let write = match spec.pattern {
            Pattern::Read | Pattern::Randread => false,
            Pattern::Write | Pattern::Randwrite => true,
            Pattern::Randrw => self.rng.next() % 100 >= u64::from(spec.rwmixread),
        };
        let mut iov = std::mem::take(&mut self.iovecs[slot]);
        iov.clear();
        iov.push(self.bufs.iovec(slot, spec.bs as usize));
        let offset = block * spec.bs;
        if spec.buffers == BufferMode::MapPerRequest {
            if let Some(r) = self.bufs.slot_region(slot) {
                self.mapped[slot] = Some(self.registrar.add(r));
            }
        }
        // SAFETY: the slot's buffer lives in `self.bufs`, which outlives the
        // request: `run` waits for every request before returning.
        let req = unsafe {
            if write {
                Request::write(offset, iov, false)
            } else {
                Request::read(offset, iov)
            }
        };
        self.starts[slot] = Instant::now();
        self.issued += 1;
        queue.submit(req.with_user_data(slot as u64)).map_err(|e| {
            anyhow!(
                "submitting a request at offset {offset} failed: {}",
                e.error
            )
        })
    }
}

/// Runs the job on `queue` until the runtime or count is reached.
pub fn run(
    queue: &mut dyn NodeQueue,
    registrar: &RamRegistrar,
    spec: &JobSpec,
) -> Result<JobResult> {
    let bufs = Buffers::new(
        spec.iodepth,
        spec.bs as usize,
        spec.buffers != BufferMode::Bounce,
    )?;
    let whole = match spec.buffers {
        BufferMode::Registered => bufs.region().map(|r| registrar.add(r)),
        _ => None,
    };
    let result = run_with(queue, registrar, bufs, spec);
    if let Some(id) = whole {
        registrar.remove(id);
    }
    result
}

fn run_with(
    queue: &mut dyn NodeQueue,
    registrar: &RamRegistrar,
    bufs: Buffers,
    spec: &JobSpec,
) -> Result<JobResult> {
    let mut iss = Issuer {
        spec,
        bufs,
        registrar,
        mapped: vec![None; spec.iodepth],
        rng: Rng(0x9e37_79b9_7f4a_7c15),
        next_seq: 0,
        blocks: spec.size / spec.bs,
        issued: 0,
        iovecs: vec![Vec::with_capacity(1); spec.iodepth],
        starts: vec![Instant::now(); spec.iodepth],
    };
    let expected = spec.count.unwrap_or(1 << 20).min(1 << 24) as usize;
    let mut read = OpResult {
        lat_ns: Vec::with_capacity(expected),
        ..OpResult::default()
    };
    let mut write = OpResult {
        lat_ns: Vec::with_capacity(expected),
        ..OpResult::default()
    };
    let mut begin = Instant::now();
    let mut cpu_begin = thread_cpu_time();
    let mut ramp_end = (!spec.ramp.is_zero()).then(|| begin + spec.ramp);
    let mut deadline = spec.runtime.map(|r| begin + spec.ramp + r);
    let more = |issued: u64, now: Instant, deadline: Option<Instant>| {
        spec.count.is_none_or(|c| issued < c) && deadline.is_none_or(|d| now < d)
    };
    let mut failure = None;
    for slot in 0..spec.iodepth {
        if !more(iss.issued, Instant::now(), deadline) {
            break;
        }
        iss.submit(queue, slot)?;
    }
    let mut done: Vec<Completion> = Vec::with_capacity(spec.iodepth);
    let mut last_progress = begin;
    let mut last_ios = 0u64;
    let poll = Duration::from_nanos(spec.poll_max_ns);
    while queue.in_flight() > 0 {
        if !poll.is_zero() {
            queue.kick();
            let start = Instant::now();
            while queue.poll_completions(&mut done) == 0 && start.elapsed() < poll {
                std::hint::spin_loop();
            }
        }
        if done.is_empty() {
            queue.wait_completions(1, &mut done);
        }
        let now = Instant::now();
        if ramp_end.is_some_and(|end| now >= end) {
            // The ramp is over: measure from here. Requests in flight now
            // count when they complete.
            ramp_end = None;
            for r in [&mut read, &mut write] {
                r.ios = 0;
                r.bytes = 0;
                r.lat_ns.clear();
            }
            begin = now;
            deadline = spec.runtime.map(|r| now + r);
            cpu_begin = thread_cpu_time();
            last_progress = now;
            last_ios = 0;
        }
        for mut c in done.drain(..) {
            let slot = c.request.user_data as usize;
            let r = if c.request.op() == RequestOp::Write {
                &mut write
            } else {
                &mut read
            };
            match c.result {
                Ok(n) => {
                    r.ios += 1;
                    r.bytes += n;
                    r.lat_ns.push((now - iss.starts[slot]).as_nanos() as u64);
                }
                Err(e) => {
                    failure.get_or_insert(anyhow!(
                        "{:?} at offset {} failed: {e}",
                        c.request.op(),
                        c.request.offset()
                    ));
                }
            }
            iss.iovecs[slot] = c.request.take_iovecs();
            iss.finish(slot);
            if failure.is_none() && more(iss.issued, now, deadline) {
                if let Err(e) = iss.submit(queue, slot) {
                    failure.get_or_insert(e);
                }
            }
        }
        if spec.progress && now - last_progress >= Duration::from_secs(1) {
            let ios = read.ios + write.ios;
            let rate = (ios - last_ios) as f64 / (now - last_progress).as_secs_f64();
            print!(
                "\r[{:6.1}s] {:>10.0} IOPS",
                (now - begin).as_secs_f64(),
                rate
            );
            let _ = std::io::Write::flush(&mut std::io::stdout());
            last_progress = now;
            last_ios = ios;
        }
    }
    if spec.progress {
        print!("\r{:40}\r", "");
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(JobResult {
        elapsed: begin.elapsed(),
        cpu: thread_cpu_time().saturating_sub(cpu_begin),
        read,
        write,
    })
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::BlockGraph;

    /// A queue that notes the offset of every request and how often the
    /// job slept on it.
    struct Spy {
        inner: Box<dyn NodeQueue>,
        offsets: Vec<u64>,
        waits: usize,
    }

    impl Spy {
        fn new(inner: Box<dyn NodeQueue>) -> Self {
            Spy {
                inner,
                offsets: Vec::new(),
                waits: 0,
            }
        }
    }

    impl NodeQueue for Spy {
        fn submit(&mut self, req: Request) -> Result<(), block::SubmitError> {
            self.offsets.push(req.offset());
            self.inner.submit(req)
        }
        fn kick(&mut self) {
            self.inner.kick()
        }
        fn completion_fd(&self) -> std::os::fd::RawFd {
            self.inner.completion_fd()
        }
        fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize {
            self.inner.poll_completions(out)
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn complete_now(&mut self, c: Completion) {
            self.inner.complete_now(c)
        }
        fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
            self.waits += 1;
            self.inner.wait_completions(min, out)
        }
    }

    #[test]
    fn a_step_strides_through_the_blocks_and_wraps_at_the_end() {
        let mut graph = BlockGraph::new();
        let opts = qapi::parse_blockdev("null-co,node-name=n0,size=1M").unwrap();
        let node = graph.add(&opts).unwrap();
        let mut q = Spy::new(node.open_queue().unwrap());
        // 256 blocks of 4 KiB; a step of 100 blocks wraps on the third.
        let spec = JobSpec {
            pattern: Pattern::Read,
            step_blocks: 100,
            count: Some(5),
            ..spec()
        };
        run(&mut q, graph.registrar(), &spec).unwrap();
        let blocks: Vec<u64> = q.offsets.iter().map(|o| o / 4096).collect();
        assert_eq!(blocks, [0, 100, 200, 44, 144]);
    }

    /// `spec`'s job on a null-co node answering after `latency_ns`,
    /// through a queue that counts its waits; with the job's wall time.
    fn run_counted(latency_ns: u64, spec: JobSpec) -> (JobResult, usize, Duration) {
        let mut graph = BlockGraph::new();
        let opts = qapi::parse_blockdev(&format!(
            "null-co,node-name=n0,size=1M,latency-ns={latency_ns}"
        ))
        .unwrap();
        let node = graph.add(&opts).unwrap();
        let mut q = Spy::new(node.open_queue().unwrap());
        let started = Instant::now();
        let r = run(&mut q, graph.registrar(), &spec).unwrap();
        (r, q.waits, started.elapsed())
    }

    /// Random 4 KiB reads at depth 1 over the node's 1 MiB, nothing else
    /// set: each test fills in how long to run.
    fn spec() -> JobSpec {
        JobSpec {
            buffers: BufferMode::Registered,
            pattern: Pattern::Randread,
            rwmixread: 100,
            bs: 4096,
            step_blocks: 1,
            iodepth: 1,
            size: 1 << 20,
            runtime: None,
            count: None,
            ramp: Duration::ZERO,
            poll_max_ns: 0,
            progress: false,
        }
    }

    fn run_counting(poll_max_ns: u64) -> (JobResult, usize) {
        // 200 µs per request: far inside a 1 s poll window.
        let spec = JobSpec {
            iodepth: 2,
            count: Some(50),
            poll_max_ns,
            ..spec()
        };
        let (r, waits, _) = run_counted(200_000, spec);
        (r, waits)
    }

    #[test]
    fn a_polling_job_finds_its_completions_without_sleeping() {
        let (r, waits) = run_counting(1_000_000_000);
        assert_eq!(r.read.ios, 50);
        assert_eq!(r.read.lat_ns.len(), 50);
        assert_eq!(waits, 0, "the poll window covers every request");
        // The thread spun for its requests: it used CPU time, and no more
        // than the wall time one thread can use.
        assert!(r.cpu > Duration::ZERO, "{:?}", r.cpu);
        assert!(
            r.cpu <= r.elapsed + Duration::from_millis(2),
            "{:?} > {:?}",
            r.cpu,
            r.elapsed
        );
    }

    #[test]
    fn without_polling_the_job_sleeps_for_each_completion() {
        let (r, waits) = run_counting(0);
        assert_eq!(r.read.ios, 50);
        assert!(waits >= 25, "slept only {waits} times for 50 requests");
    }

    #[test]
    fn a_ramp_runs_first_and_is_not_counted() {
        // 1 ms per request at depth 1: about 100 in the ramp, 100 after it.
        let spec = JobSpec {
            runtime: Some(Duration::from_millis(100)),
            ramp: Duration::from_millis(100),
            ..spec()
        };
        let (r, waits, wall) = run_counted(1_000_000, spec);
        assert!(wall >= Duration::from_millis(200), "ran {wall:?}");
        // Measured time is the runtime alone (plus the last request).
        assert!(
            r.elapsed >= Duration::from_millis(100) && r.elapsed < wall - Duration::from_millis(90),
            "measured {:?} of {wall:?}",
            r.elapsed
        );
        // At most one request per ms of measured time, plus the one in
        // flight when the ramp ended.
        let most = r.elapsed.as_millis() as u64 + 1;
        assert!(r.read.ios >= 1 && r.read.ios <= most, "{} ios", r.read.ios);
        assert_eq!(r.read.lat_ns.len() as u64, r.read.ios);
        // Every request issued, ramp included, went through the queue.
        assert!(waits as u64 > r.read.ios, "{waits} waits");
    }
}
