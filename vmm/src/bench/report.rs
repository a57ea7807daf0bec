//! Turning measured latencies into the numbers people compare: IOPS,
//! MiB/s, mean and percentile latencies, as text and as JSON.

use serde_json::{json, Value};

use block::NodeStatsSnapshot;

use super::job::{JobResult, JobSpec, OpResult};

/// Summary of one direction.
pub struct OpSummary {
    pub ios: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub mean_ns: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

impl OpSummary {
    fn new(r: &OpResult, secs: f64) -> Self {
        let mut lat = r.lat_ns.clone();
        lat.sort_unstable();
        let mean = if lat.is_empty() {
            0.0
        } else {
            lat.iter().map(|&l| l as f64).sum::<f64>() / lat.len() as f64
        };
        OpSummary {
            ios: r.ios,
            iops: r.ios as f64 / secs,
            mib_s: r.bytes as f64 / secs / (1024.0 * 1024.0),
            mean_ns: mean,
            p50_ns: percentile(&lat, 0.50),
            p99_ns: percentile(&lat, 0.99),
            p999_ns: percentile(&lat, 0.999),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "ios": self.ios,
            "iops": self.iops,
            "mib_s": self.mib_s,
            "lat_ns": {
                "mean": self.mean_ns,
                "p50": self.p50_ns,
                "p99": self.p99_ns,
                "p99.9": self.p999_ns,
            },
        })
    }

    fn to_text(&self, name: &str) -> String {
        let us = |ns: f64| ns / 1000.0;
        format!(
            "  {name:5}: IOPS={:.0}, BW={:.1} MiB/s, lat(us) mean={:.1} p50={:.1} p99={:.1} p99.9={:.1}\n",
            self.iops,
            self.mib_s,
            us(self.mean_ns),
            us(self.p50_ns as f64),
            us(self.p99_ns as f64),
            us(self.p999_ns as f64),
        )
    }
}

/// The whole report.
pub struct Report {
    buffers: String,
    node: String,
    driver: &'static str,
    pattern: String,
    bs: u64,
    iodepth: usize,
    poll_max_ns: u64,
    ramp_s: f64,
    secs: f64,
    /// CPU time of the benchmark thread per request, ns.
    cpu_ns_per_io: f64,
    total: OpSummary,
    read: OpSummary,
    write: OpSummary,
}

impl Report {
    pub fn new(node: &str, driver: &'static str, spec: &JobSpec, r: &JobResult) -> Self {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let mut all = OpResult {
            ios: r.read.ios + r.write.ios,
            bytes: r.read.bytes + r.write.bytes,
            lat_ns: r.read.lat_ns.clone(),
        };
        all.lat_ns.extend_from_slice(&r.write.lat_ns);
        Report {
            buffers: format!("{:?}", spec.buffers),
            node: node.to_string(),
            driver,
            pattern: format!("{:?}", spec.pattern).to_lowercase(),
            bs: spec.bs,
            iodepth: spec.iodepth,
            poll_max_ns: spec.poll_max_ns,
            ramp_s: spec.ramp.as_secs_f64(),
            secs,
            cpu_ns_per_io: r.cpu.as_nanos() as f64 / (all.ios.max(1) as f64),
            total: OpSummary::new(&all, secs),
            read: OpSummary::new(&r.read, secs),
            write: OpSummary::new(&r.write, secs),
        }
    }

    /// IOPS over both directions.
    pub fn iops(&self) -> f64 {
        self.total.iops
    }

    pub fn to_json(&self) -> Value {
        json!({
            "buffers": kebab(&self.buffers),
            "node": self.node,
            "driver": self.driver,
            "rw": self.pattern,
            "bs": self.bs,
            "iodepth": self.iodepth,
            "poll_max_ns": self.poll_max_ns,
            "ramp_time_s": self.ramp_s,
            "runtime_s": self.secs,
            "cpu_ns_per_io": self.cpu_ns_per_io,
            "ios": self.total.ios,
            "iops": self.total.iops,
            "mib_s": self.total.mib_s,
            "lat_ns": self.total.to_json()["lat_ns"],
            "read": self.read.to_json(),
            "write": self.write.to_json(),
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "blkvm bench: node '{}' ({}), rw={} bs={} iodepth={} poll-max-ns={} buffers={}, {:.2} s, {} requests\n",
            self.node,
            self.driver,
            self.pattern,
            self.bs,
            self.iodepth,
            self.poll_max_ns,
            kebab(&self.buffers),
            self.secs,
            self.total.ios
        );
        if self.read.ios > 0 {
            s += &self.read.to_text("read");
        }
        if self.write.ios > 0 {
            s += &self.write.to_text("write");
        }
        s += &format!(
            "  cpu  : {:.2} us per request (this thread, user and system)\n",
            self.cpu_ns_per_io / 1000.0
        );
        s
    }
}

/// For each mode (`iops[mode][round]`, mode 0 being registered), the
/// median over rounds of its IOPS divided by registered's IOPS in the same
/// round. Runs of one round are seconds apart, so this ratio is steadier
/// than one of medians when the machine's speed drifts.
pub fn paired_ratios(iops: &[Vec<f64>]) -> Vec<f64> {
    let Some(base) = iops.first() else {
        return Vec::new();
    };
    iops.iter()
        .map(|mode| {
            let mut r: Vec<f64> = mode
                .iter()
                .zip(base)
                .map(|(m, b)| if *b > 0.0 { m / b } else { 0.0 })
                .collect();
            r.sort_by(f64::total_cmp);
            match r.len() {
                0 => 0.0,
                n if n % 2 == 1 => r[n / 2],
                n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
            }
        })
        .collect()
}

/// The run with the median IOPS.
pub fn median(mut runs: Vec<Report>) -> Report {
    runs.sort_by(|a, b| a.total.iops.total_cmp(&b.total.iops));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

/// `MapPerRequest` -> `map-per-request`.
fn kebab(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Counters from the node that show which path requests took.
fn paths_json(stats: &NodeStatsSnapshot) -> Value {
    json!({
        "registered_ops": stats.registered_ops,
        "bounced_ops": stats.bounced_ops,
        "region_map_failures": stats.region_map_failures,
    })
}

/// One run: its report. Several: each, plus ratios to the first
/// (registered) run: of the medians, and paired per round
/// ([`paired_ratios`]).
pub fn to_json(
    reports: &[Report],
    paired: &[f64],
    rounds: &[Vec<f64>],
    stats: &NodeStatsSnapshot,
) -> Value {
    let mut v = match reports {
        [one] => one.to_json(),
        _ => json!({
            "runs": reports.iter().map(Report::to_json).collect::<Vec<_>>(),
            "ratio_to_registered": reports
                .iter()
                .map(|r| (kebab(&r.buffers), json!(r.total.iops / reports[0].total.iops)))
                .collect::<serde_json::Map<_, _>>(),
            "paired_ratio_to_registered": reports
                .iter()
                .zip(paired)
                .map(|(r, p)| (kebab(&r.buffers), json!(p)))
                .collect::<serde_json::Map<_, _>>(),
            // Every run's IOPS, per mode in round order, for analyses
            // the medians hide (order effects, drift).
            "round_iops": reports
                .iter()
                .zip(rounds)
                .map(|(r, i)| (kebab(&r.buffers), json!(i)))
                .collect::<serde_json::Map<_, _>>(),
        }),
    };
    v["node_paths"] = paths_json(stats);
    v
}

/// Text for one run, or a table for several.
pub fn to_text(reports: &[Report], paired: &[f64], stats: &NodeStatsSnapshot) -> String {
    let paths = format!(
        "  node paths: {} registered, {} bounced, {} region map failures\n",
        stats.registered_ops, stats.bounced_ops, stats.region_map_failures
    );
    if let [one] = reports {
        return one.to_text() + &paths;
    }
    let first = &reports[0];
    let mut s = format!(
        "blkvm bench: node '{}' ({}), rw={} bs={} iodepth={} poll-max-ns={}\n\n",
        first.node, first.driver, first.pattern, first.bs, first.iodepth, first.poll_max_ns
    );
    s += "| buffers | IOPS | lat mean (us) | p50 | p99 | p99.9 | CPU/IO (us) | vs registered | paired |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (r, p) in reports.iter().zip(paired) {
        let t = &r.total;
        s += &format!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2}x | {p:.2}x |\n",
            kebab(&r.buffers),
            t.iops,
            t.mean_ns / 1000.0,
            t.p50_ns as f64 / 1000.0,
            t.p99_ns as f64 / 1000.0,
            t.p999_ns as f64 / 1000.0,
            r.cpu_ns_per_io / 1000.0,
            t.iops / first.total.iops
        );
    }
    s + "\n"
        + "  IOPS and latencies are each mode's median run; 'paired' is the median over rounds\n"
        + "  of the mode's IOPS over registered's in the same round.\n"
        + &paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratios_divide_within_rounds() {
        // Registered drifts 10x between rounds; bounce stays at half of it.
        let iops = vec![vec![100.0, 1000.0, 10.0], vec![50.0, 500.0, 5.0]];
        assert_eq!(paired_ratios(&iops), vec![1.0, 0.5]);
        // A mode slower in two rounds of three has a paired median below 1.
        let iops = vec![vec![10.0, 10.0, 10.0], vec![9.0, 30.0, 8.0]];
        assert_eq!(paired_ratios(&iops)[1], 0.9);
        // An even number of rounds takes the mean of the middle two.
        let iops = vec![vec![10.0; 4], vec![5.0, 8.0, 12.0, 30.0]];
        assert_eq!(paired_ratios(&iops)[1], 1.0);
        assert!(paired_ratios(&[]).is_empty());
    }

    #[test]
    fn kebab_splits_words() {
        assert_eq!(kebab("MapPerRequest"), "map-per-request");
        assert_eq!(kebab("Registered"), "registered");
    }

    #[test]
    fn percentile_picks_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 501);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&[], 0.99), 0);
    }
}
