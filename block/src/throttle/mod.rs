//! I/O throttling as QEMU does it: the bucket arithmetic ([`bucket`]),
//! throttle groups shared by nodes with fair turns ([`group`]), and the
//! `throttle` filter driver ([`node`]).

pub mod bucket;
pub mod group;
pub mod node;

pub use bucket::{Bucket, BucketLimit, ThrottleConfig};
pub use group::ThrottleGroup;
pub use node::ThrottleNode;

/// `limits` applied over `base` (what `limits` leaves out stays), as
/// QEMU's `throttle_limits_to_config`; the result is not yet validated.
pub fn apply_limits(base: ThrottleConfig, l: &qapi::throttle::ThrottleLimits) -> ThrottleConfig {
    let mut c = base;
    let mut set = |b: Bucket, avg: Option<u64>, max: Option<u64>, len: Option<u64>| {
        let k = c.bucket_mut(b);
        if let Some(v) = avg {
            k.avg = v;
        }
        if let Some(v) = max {
            k.max = v;
        }
        if let Some(v) = len {
            k.burst_length = v;
        }
    };
    set(
        Bucket::OpsTotal,
        l.iops_total,
        l.iops_total_max,
        l.iops_total_max_length,
    );
    set(
        Bucket::OpsRead,
        l.iops_read,
        l.iops_read_max,
        l.iops_read_max_length,
    );
    set(
        Bucket::OpsWrite,
        l.iops_write,
        l.iops_write_max,
        l.iops_write_max_length,
    );
    set(
        Bucket::BpsTotal,
        l.bps_total,
        l.bps_total_max,
        l.bps_total_max_length,
    );
    set(
        Bucket::BpsRead,
        l.bps_read,
        l.bps_read_max,
        l.bps_read_max_length,
    );
    set(
        Bucket::BpsWrite,
        l.bps_write,
        l.bps_write_max,
        l.bps_write_max_length,
    );
    if let Some(v) = l.iops_size {
        c.op_size = v;
    }
    c
}
