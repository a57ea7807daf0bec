//! QEMU's I/O throttling arithmetic (util/throttle.c, docs/throttle.txt):
//! six leaky buckets (bytes and operations; total, read, write), each with
//! an average rate, an optional burst rate and a burst length in seconds.
//!
//! A bucket's level rises by what each request costs and leaks at the
//! average rate. Without a burst rate a request waits once the level is
//! above a tenth of a second's worth (short bursts pass, as QEMU allows);
//! with one, up to `max * burst_length` may pass at the burst rate, which
//! a second level (leaking at `max`, a tenth of a second deep) enforces.
//! Time is in nanoseconds of a clock the caller reads, so the arithmetic
//! is tested without sleeping.

/// Largest value of any rate or product (QEMU's `THROTTLE_VALUE_MAX`).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;
const NS_PER_S: f64 = 1e9;

/// The six buckets, in QEMU's `BucketType` order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// `bps-total`.
    BpsTotal = 0,
    /// `bps-read`.
    BpsRead = 1,
    /// `bps-write`.
    BpsWrite = 2,
    /// `iops-total`.
    OpsTotal = 3,
    /// `iops-read`.
    OpsRead = 4,
    /// `iops-write`.
    OpsWrite = 5,
}

/// One bucket's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketLimit {
    /// Average rate (bytes or operations per second); 0: no limit.
    pub avg: u64,
    /// Burst rate; 0: none.
    pub max: u64,
    /// Seconds the burst rate may last.
    pub burst_length: u64,
}

impl Default for BucketLimit {
    fn default() -> Self {
        BucketLimit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// Every limit of a throttle group (QEMU's `ThrottleConfig`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Limits by [`Bucket`].
    pub buckets: [BucketLimit; 6],
    /// `iops-size`: a request larger than this counts as several
    /// operations (0: every request is one).
    pub op_size: u64,
}

impl ThrottleConfig {
    /// The limits of `b`, mutably.
    pub fn bucket_mut(&mut self, b: Bucket) -> &mut BucketLimit {
        &mut self.buckets[b as usize]
    }

    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// QEMU's `throttle_is_valid`, with its messages.
    pub fn validate(&self) -> Result<(), String> {
        let b = &self.buckets;
        let both = |t: Bucket, r: Bucket, w: Bucket, f: fn(&BucketLimit) -> u64| {
            f(&b[t as usize]) > 0 && (f(&b[r as usize]) > 0 || f(&b[w as usize]) > 0)
        };
        use Bucket::*;
        if both(BpsTotal, BpsRead, BpsWrite, |x| x.avg)
            || both(OpsTotal, OpsRead, OpsWrite, |x| x.avg)
            || both(BpsTotal, BpsRead, BpsWrite, |x| x.max)
            || both(OpsTotal, OpsRead, OpsWrite, |x| x.max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.op_size > 0
            && [OpsTotal, OpsRead, OpsWrite]
                .iter()
                .all(|&x| b[x as usize].avg == 0)
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for k in b {
            if k.avg > THROTTLE_VALUE_MAX || k.max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if k.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if k.burst_length > 1 && k.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if k.max > 0 && k.burst_length > THROTTLE_VALUE_MAX / k.max {
                return Err("burst length too high for this burst rate".into());
            }
            if k.max > 0 && k.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if k.max > 0 && k.max < k.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

/// The buckets' levels under one configuration (QEMU's `ThrottleState`).
#[derive(Clone, Debug)]
pub struct ThrottleState {
    config: ThrottleConfig,
    levels: [Level; 6],
    previous_leak: u64,
}

/// The buckets a request of each direction fills and waits on.
const SIZE_BUCKETS: [[Bucket; 2]; 2] = [
    [Bucket::BpsTotal, Bucket::BpsRead],
    [Bucket::BpsTotal, Bucket::BpsWrite],
];
const UNIT_BUCKETS: [[Bucket; 2]; 2] = [
    [Bucket::OpsTotal, Bucket::OpsRead],
    [Bucket::OpsTotal, Bucket::OpsWrite],
];

impl ThrottleState {
    /// Empty buckets under `config` at time `now` (ns).
    pub fn new(config: ThrottleConfig, now: u64) -> Self {
        ThrottleState {
            config,
            levels: [Level::default(); 6],
            previous_leak: now,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// New limits; the buckets start empty (QEMU's `throttle_config`).
    pub fn set_config(&mut self, config: ThrottleConfig, now: u64) {
        *self = Self::new(config, now);
    }

    /// Leaks every bucket for the time since the last leak.
    fn leak(&mut self, now: u64) {
        let delta = now.saturating_sub(self.previous_leak);
        if delta == 0 {
            return;
        }
        self.previous_leak = now;
        for (l, k) in self.levels.iter_mut().zip(&self.config.buckets) {
            let leak = k.avg as f64 * delta as f64 / NS_PER_S;
            l.level = (l.level - leak).max(0.0);
            if k.burst_length > 1 {
                let leak = k.max as f64 * delta as f64 / NS_PER_S;
                l.burst_level = (l.burst_level - leak).max(0.0);
            }
        }
    }

    /// How long a request of this direction must wait at `now` before it
    /// may go (0: at once).
    pub fn wait_ns(&mut self, is_write: bool, now: u64) -> u64 {
        self.leak(now);
        let d = usize::from(is_write);
        SIZE_BUCKETS[d]
            .iter()
            .chain(&UNIT_BUCKETS[d])
            .map(|&b| wait(&self.config.buckets[b as usize], &self.levels[b as usize]))
            .max()
            .unwrap_or(0)
    }

    /// Charges a request of `size` bytes that goes now.
    pub fn account(&mut self, is_write: bool, size: u64) {
        let op = self.config.op_size;
        let units = if op > 0 && size > op {
            size as f64 / op as f64
        } else {
            1.0
        };
        let d = usize::from(is_write);
        for (buckets, cost) in [(&SIZE_BUCKETS[d], size as f64), (&UNIT_BUCKETS[d], units)] {
            for &b in buckets {
                let l = &mut self.levels[b as usize];
                l.level += cost;
                if self.config.buckets[b as usize].burst_length > 1 {
                    l.burst_level += cost;
                }
            }
        }
    }
}

/// QEMU's `throttle_compute_wait` for one bucket, ns.
fn wait(k: &BucketLimit, l: &Level) -> u64 {
    if k.avg == 0 {
        return 0;
    }
    let (bucket_size, burst_size) = if k.max == 0 {
        // Short bursts pass even without a burst rate.
        (k.avg as f64 / 10.0, 0.0)
    } else {
        // The burst must be spent before the average rate applies.
        ((k.max * k.burst_length) as f64, k.max as f64 / 10.0)
    };
    let extra = l.level - bucket_size;
    if extra > 0.0 {
        return (extra * NS_PER_S / k.avg as f64) as u64;
    }
    if k.burst_length > 1 {
        let extra = l.burst_level - burst_size;
        if extra > 0.0 {
            return (extra * NS_PER_S / k.max as f64) as u64;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(b: Bucket, avg: u64, max: u64, len: u64) -> ThrottleConfig {
        let mut c = ThrottleConfig::default();
        *c.bucket_mut(b) = BucketLimit {
            avg,
            max,
            burst_length: len,
        };
        c
    }

    /// Dispatches requests of `size` as fast as the state allows (each as
    /// soon as its wait is over) for `secs` seconds of virtual time;
    /// returns each one's dispatch time, ns.
    fn run(state: &mut ThrottleState, is_write: bool, size: u64, secs: u64) -> Vec<u64> {
        let mut now = 0;
        let mut out = Vec::new();
        while now < secs * 1_000_000_000 {
            let w = state.wait_ns(is_write, now);
            if w > 0 {
                now += w;
                continue;
            }
            state.account(is_write, size);
            out.push(now);
        }
        out
    }

    fn count_between(t: &[u64], from_s: f64, to_s: f64) -> usize {
        t.iter()
            .filter(|&&x| (x as f64) >= from_s * 1e9 && (x as f64) < to_s * 1e9)
            .count()
    }

    #[test]
    fn an_average_rate_allows_a_tenth_of_a_second_then_holds() {
        // docs/throttle.txt: iops-total=100 lets a burst of 10 through
        // (the bucket is avg/10 deep), then 100 per second.
        let mut s = ThrottleState::new(config(Bucket::OpsTotal, 100, 0, 1), 0);
        let t = run(&mut s, false, 4096, 10);
        assert_eq!(count_between(&t, 0.0, 1e-6), 11, "the initial burst");
        let steady = count_between(&t, 1.0, 10.0);
        assert!((899..=901).contains(&steady), "{steady} in 9 s");
    }

    #[test]
    fn a_burst_rate_lasts_its_length_then_the_average_applies() {
        // docs/throttle.txt: iops-total=100, iops-total-max=2000,
        // iops-total-max-length=60: 2000 IOPS while the 120000-deep
        // bucket fills at 2000 - 100 per second (about 63 s), then 100.
        let mut s = ThrottleState::new(config(Bucket::OpsTotal, 100, 2000, 60), 0);
        let t = run(&mut s, false, 4096, 80);
        let first = count_between(&t, 1.0, 61.0);
        assert!(
            (119_900..=120_100).contains(&first),
            "{first} in 60 s of burst"
        );
        let after = count_between(&t, 65.0, 75.0);
        assert!(
            (995..=1005).contains(&after),
            "{after} in 10 s after the burst"
        );
        // The burst ends near 120000 / 1900 s.
        let end = t
            .windows(2)
            .find(|w| w[1] - w[0] > 5_000_000)
            .map(|w| w[0] as f64 / 1e9)
            .unwrap();
        assert!((62.0..64.5).contains(&end), "the burst ended at {end} s");
    }

    #[test]
    fn bytes_per_second_count_request_sizes() {
        // bps-read=1M: 64 KiB reads, 16 per second.
        let mut s = ThrottleState::new(config(Bucket::BpsRead, 1 << 20, 0, 1), 0);
        let t = run(&mut s, false, 64 << 10, 11);
        let steady = count_between(&t, 1.0, 11.0);
        assert!((159..=161).contains(&steady), "{steady} in 10 s");
        // Writes are not read-limited.
        assert_eq!(s.wait_ns(true, 11_000_000_000), 0);
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let mut c = config(Bucket::OpsTotal, 100, 0, 1);
        c.op_size = 4096;
        let mut s = ThrottleState::new(c, 0);
        // 16 KiB requests cost 4 operations: 25 per second.
        let t = run(&mut s, true, 16 << 10, 11);
        let steady = count_between(&t, 1.0, 11.0);
        assert!((249..=251).contains(&steady), "{steady} in 10 s");
    }

    #[test]
    fn no_limit_never_waits() {
        let mut s = ThrottleState::new(ThrottleConfig::default(), 0);
        for i in 0..1000 {
            assert_eq!(s.wait_ns(i % 2 == 0, i), 0);
            s.account(i % 2 == 0, 1 << 20);
        }
        assert!(!s.config().is_enabled());
    }

    #[test]
    fn invalid_configurations_are_refused_with_qemus_words() {
        let mut c = config(Bucket::OpsTotal, 100, 0, 1);
        *c.bucket_mut(Bucket::OpsRead) = BucketLimit {
            avg: 10,
            ..BucketLimit::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .contains("cannot be used at the same time"));
        let c = config(Bucket::BpsTotal, 100, 50, 1);
        assert!(c.validate().unwrap_err().contains("cannot be lower"));
        let c = config(Bucket::BpsTotal, 0, 50, 1);
        assert!(c.validate().unwrap_err().contains("require corresponding"));
        let c = config(Bucket::BpsTotal, 100, 0, 5);
        assert!(c.validate().unwrap_err().contains("without burst rate"));
        let c = config(Bucket::BpsTotal, 100, 0, 0);
        assert!(c.validate().unwrap_err().contains("cannot be 0"));
        let mut c = config(Bucket::BpsTotal, 100, 0, 1);
        c.op_size = 512;
        assert!(c.validate().unwrap_err().contains("iops size"));
        let c = config(Bucket::BpsTotal, THROTTLE_VALUE_MAX + 1, 0, 1);
        assert!(c.validate().unwrap_err().contains("within"));
        assert!(config(Bucket::OpsWrite, 100, 2000, 60).validate().is_ok());
    }
}
