//! `blkvm bench`: drives one node of a block graph from one thread, the way
//! an IOThread would (one node queue, batched submissions, completions from
//! the queue's eventfd), and reports IOPS, bandwidth and latency
//! percentiles. Comparable runs of `qemu-img bench` and fio are in
//! `resources/bench/`.

mod buffers;
mod job;
mod report;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

pub use job::{BufferMode, Pattern};

/// `blkvm bench` arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A block node in QEMU's --blockdev syntax (keyval or JSON); repeatable.
    #[arg(long = "blockdev", required = true, value_name = "OPTIONS")]
    blockdevs: Vec<String>,
    /// An object in QEMU's --object syntax (tls-creds-x509 for an nbd
    /// node's tls-creds, throttle-group for a throttle node, secret for an
    /// rbd node's key-secret); repeatable.
    #[arg(long = "object", value_name = "OPTIONS")]
    objects: Vec<String>,
    /// The node to measure (default: the node of the last --blockdev).
    #[arg(long)]
    node: Option<String>,
    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Pattern,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Block size (suffixes k, M, G).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    iodepth: u32,
    /// Seconds to run (default 10 unless --count is given).
    #[arg(long)]
    runtime: Option<f64>,
    /// Stop after this many requests.
    #[arg(long)]
    count: Option<u64>,
    /// Seconds to run each run before measuring it (fio's ramp_time):
    /// these hosts run a thread slower for about a second after it has
    /// been idle or mostly idle.
    #[arg(long, default_value_t = 0.0, conflicts_with = "count")]
    ramp_time: f64,
    /// For --rw read and write: each request's offset is the previous
    /// one's plus this, wrapping at the end of the size used, as
    /// `qemu-img bench -S` (default: --bs, i.e. sequential). A multiple
    /// of --bs; a step coprime to the number of blocks visits every block
    /// once per pass, in an order with no locality.
    #[arg(long, value_parser = parse_size)]
    step: Option<u64>,
    /// Bytes of the node to use, from offset 0 (default: all of it).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Where the buffers live: registered once with the RAM registrar, in
    /// plain memory (drivers that need registered memory bounce), mapped
    /// around each request, or all three in turn.
    #[arg(long, value_enum, default_value = "registered")]
    buffers: BuffersArg,
    /// Repeat the run(s) this many times, modes interleaved (the order
    /// changes each round; with --buffers all, six rounds hold every
    /// order), and report each mode's median run (the disks here are
    /// noisy).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Busy-poll the node's queue for a completion for up to this many ns
    /// before sleeping on it, as a polling IOThread does (QEMU's IOThreads
    /// poll up to 32768 ns by default). The window is fixed, not adaptive:
    /// 0 sleeps at once.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    poll_max_ns: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Output format for humans: progress line when stdout is a terminal.
    #[arg(long, value_enum, default_value = "auto")]
    progress: Progress,
}

/// `--buffers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BuffersArg {
    /// Registered once.
    Registered,
    /// Plain memory.
    Bounce,
    /// Registered and unregistered around each request.
    MapPerRequest,
    /// The three in turn, with ratios to registered.
    All,
}

impl BuffersArg {
    fn modes(self) -> Vec<BufferMode> {
        match self {
            BuffersArg::Registered => vec![BufferMode::Registered],
            BuffersArg::Bounce => vec![BufferMode::Bounce],
            BuffersArg::MapPerRequest => vec![BufferMode::MapPerRequest],
            BuffersArg::All => vec![
                BufferMode::Registered,
                BufferMode::Bounce,
                BufferMode::MapPerRequest,
            ],
        }
    }
}

/// Whether to print a live progress line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// When stdout is a terminal.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// The order of `n` modes in round `round`. Rounds go through every
/// rotation of the modes, then every rotation reversed: for three modes,
/// six rounds hold all six orders, so each mode runs first equally often
/// and after each other mode equally often. Rotations alone would always
/// run registered right after map-per-request, whose slow, mostly idle
/// requests leave the next run starting cold, and so bias the comparison
/// against registered.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    let rotated = (0..n).map(|k| (k + round) % n);
    if (round / n.max(1)).is_multiple_of(2) {
        rotated.collect()
    } else {
        rotated.rev().collect()
    }
}

/// `v` seconds of option `name` as a duration: finite, not negative,
/// not beyond what a `Duration` holds, and not zero unless `zero_ok`.
fn seconds(name: &str, v: f64, zero_ok: bool) -> Result<std::time::Duration> {
    match std::time::Duration::try_from_secs_f64(v) {
        Ok(d) if zero_ok || !d.is_zero() => Ok(d),
        _ if zero_ok => bail!("{name} must be a non-negative number of seconds, not {v}"),
        _ => bail!("{name} must be a positive number of seconds, not {v}"),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    qapi::parse_size(s).map_err(|e| e.to_string())
}

/// Runs the benchmark and prints its report.
pub fn run(args: BenchArgs) -> Result<()> {
    let objects = crate::startup::objects(&args.objects)?;
    let (mut graph, last) = crate::startup::open_blockdevs(&args.blockdevs, &objects)?;
    let name = args.node.clone().or(last).context("no --blockdev given")?;
    let node = graph.attach(&name, "bench")?;
    let capacity = node.capacity();
    let size = args.size.unwrap_or(capacity);
    if size > capacity {
        bail!("--size {size} exceeds the size of node '{name}' ({capacity} bytes)");
    }
    if args.bs == 0 || args.bs > size || args.bs > u64::from(u32::MAX) {
        bail!(
            "--bs {} must be between 1 and the size used ({size} bytes)",
            args.bs
        );
    }
    let step = args.step.unwrap_or(args.bs);
    if step == 0 || !step.is_multiple_of(args.bs) {
        bail!(
            "--step {step} must be a non-zero multiple of --bs {}",
            args.bs
        );
    }
    if args.step.is_some() && !matches!(args.rw, Pattern::Read | Pattern::Write) {
        bail!("--step applies to --rw read and write only");
    }
    if args.rw.writes(args.rwmixread) && node.read_only() {
        bail!(
            "node '{name}' is read-only: --rw {} writes",
            format!("{:?}", args.rw).to_lowercase()
        );
    }
    let runtime = match (args.runtime, args.count) {
        (Some(r), _) => Some(seconds("--runtime", r, false)?),
        (None, Some(_)) => None,
        (None, None) => Some(std::time::Duration::from_secs(10)),
    };
    let ramp = seconds("--ramp-time", args.ramp_time, true)?;
    let progress = match args.progress {
        Progress::Auto => !args.json && std::io::IsTerminal::is_terminal(&std::io::stdout()),
        Progress::On => true,
        Progress::Off => false,
    };
    // As a device would: through a BlockBackend (the one request check,
    // the user's statistics), as `qemu-img bench` goes through QEMU's.
    let backend = block::BlockBackend::new("bench", node.clone(), block::BackendOptions::default());
    let mut queue = backend.open_queue()?;
    let modes = args.buffers.modes();
    let mut runs: Vec<Vec<report::Report>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds as usize {
        for i in round_order(modes.len(), round) {
            let buffers = modes[i];
            let spec = job::JobSpec {
                buffers,
                pattern: args.rw,
                rwmixread: args.rwmixread,
                bs: args.bs,
                step_blocks: step / args.bs,
                iodepth: args.iodepth as usize,
                size,
                runtime,
                count: args.count,
                ramp,
                poll_max_ns: args.poll_max_ns,
                progress,
            };
            let result = job::run(&mut queue, graph.registrar(), &spec)?;
            runs[i].push(report::Report::new(&name, node.driver(), &spec, &result));
        }
    }
    let iops: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| r.iter().map(report::Report::iops).collect())
        .collect();
    let paired = report::paired_ratios(&iops);
    let reports: Vec<report::Report> = runs.into_iter().map(report::median).collect();
    let stats = node.stats().snapshot();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::to_json(&reports, &paired, &iops, &stats))?
        );
    } else {
        print!("{}", report::to_text(&reports, &paired, &stats));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{round_order, seconds};

    #[test]
    fn seconds_refuse_what_a_duration_cannot_hold() {
        assert_eq!(seconds("--runtime", 0.25, false).unwrap().as_millis(), 250);
        assert!(seconds("--ramp-time", 0.0, true).unwrap().is_zero());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e30] {
            let e = seconds("--runtime", bad, false).unwrap_err().to_string();
            assert!(e.starts_with("--runtime must be a positive number"), "{e}");
        }
        let e = seconds("--ramp-time", -0.5, true).unwrap_err().to_string();
        assert_eq!(
            e,
            "--ramp-time must be a non-negative number of seconds, not -0.5"
        );
    }

    #[test]
    fn six_rounds_of_three_modes_balance_first_places_and_predecessors() {
        let mut first = [0; 3];
        let mut after = [[0; 3]; 3];
        let mut orders = std::collections::HashSet::new();
        for round in 0..6 {
            let o = round_order(3, round);
            let mut sorted = o.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2], "round {round}: {o:?}");
            first[o[0]] += 1;
            for w in o.windows(2) {
                after[w[1]][w[0]] += 1;
            }
            orders.insert(o);
        }
        assert_eq!(orders.len(), 6);
        assert_eq!(first, [2, 2, 2]);
        for (m, preds) in after.iter().enumerate() {
            for (p, &count) in preds.iter().enumerate() {
                assert_eq!(count, if m == p { 0 } else { 2 }, "{m} after {p}");
            }
        }
    }

    #[test]
    fn one_mode_always_runs_alone() {
        for round in 0..4 {
            assert_eq!(round_order(1, round), [0]);
        }
    }
}
