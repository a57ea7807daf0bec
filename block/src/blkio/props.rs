//! From libblkio's properties to a started instance, the node's request
//! limits and the queues' plan ([`plan`]).

use blkio::{Blkio, Blkioq, Errno};

use super::job::Geometry;
use super::queue::QueueConfig;
use super::{BlkioDriver, BlkioOptions};
use crate::limits::{BlockLimits, IOV_MAX};

/// Bounce buffer size, and so the largest transfer a driver that needs
/// memory regions advertises.
const BOUNCE_BUF_SIZE: u64 = 128 << 10;
/// Bounce buffers per queue when every unmapped request needs one.
const BOUNCE_BUFS_MAPPED: usize = 32;
/// Bounce buffers per queue when only misaligned requests need one.
const BOUNCE_BUFS_UNMAPPED: usize = 8;

/// A libblkio call that failed, and what it was.
pub(super) struct StepError {
    pub what: String,
    pub error: blkio::Error,
}

pub(super) fn step(what: &str) -> impl Fn(blkio::Error) -> StepError + '_ {
    move |error| StepError {
        what: what.to_string(),
        error,
    }
}

/// The properties the node uses, read once connected.
pub(super) struct Props {
    pub capacity: u64,
    pub read_only: bool,
    pub request_alignment: u32,
    pub buf_alignment: u32,
    pub optimal_io_size: u32,
    pub max_transfer: u32,
    pub max_segments: u32,
    pub max_segment_len: u32,
    pub discard_alignment: u32,
    pub max_discard_len: u64,
    pub max_write_zeroes_len: u64,
    pub mem_region_alignment: u64,
    pub needs_mem_regions: bool,
    pub needs_mem_region_fd: bool,
    pub can_grow: bool,
}

impl Props {
    fn read(b: &Blkio) -> Result<Self, StepError> {
        let u32_of = |name: &str| {
            b.get_i32(name)
                .map(|v| u32::try_from(v).unwrap_or(0))
                .map_err(step(name))
        };
        let u64_of = |name: &str| b.get_u64(name).map_err(step(name));
        let bool_of = |name: &str| b.get_bool(name).map_err(step(name));
        Ok(Props {
            capacity: u64_of("capacity")?,
            read_only: bool_of("read-only")?,
            request_alignment: u32_of("request-alignment")?.max(1),
            buf_alignment: u32_of("buf-alignment")?.max(1),
            optimal_io_size: u32_of("optimal-io-size")?,
            max_transfer: u32_of("max-transfer")?,
            max_segments: u32_of("max-segments")?.clamp(1, IOV_MAX),
            max_segment_len: u32_of("max-segment-len")?,
            discard_alignment: u32_of("discard-alignment")?,
            max_discard_len: u64_of("max-discard-len")?,
            max_write_zeroes_len: u64_of("max-write-zeroes-len")?,
            mem_region_alignment: u64_of("mem-region-alignment")?.max(1),
            needs_mem_regions: bool_of("needs-mem-regions")?,
            needs_mem_region_fd: bool_of("needs-mem-region-fd")?,
            can_grow: bool_of("can-grow")?,
        })
    }
}

/// A started libblkio instance.
pub(super) struct Started {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub props: Props,
}

pub(super) fn start(
    opts: &BlkioOptions,
    read_only: bool,
    direct: bool,
) -> Result<Started, StepError> {
    let mut b = Blkio::new(opts.driver.name()).map_err(step("create the instance"))?;
    b.set_str("path", &opts.path).map_err(step("set 'path'"))?;
    if opts.driver == BlkioDriver::IoUring {
        b.set_bool("direct", direct).map_err(step("set 'direct'"))?;
    }
    b.set_bool("read-only", read_only)
        .map_err(step("set 'read-only'"))?;
    b.connect().map_err(step("connect"))?;
    let props = Props::read(&b)?;
    let n = i32::try_from(opts.num_queues)
        .map_err(|_| blkio::Error::new(Errno::INVAL, "num-queues is too large"))
        .map_err(step("set 'num-queues'"))?;
    b.set_i32("num-queues", n)
        .map_err(step("set 'num-queues'"))?;
    let mut outcome = b.start().map_err(step("start"))?;
    for q in &mut outcome.queues {
        q.set_completion_fd_enabled(true);
    }
    Ok(Started {
        blkio: b,
        queues: outcome.queues,
        props,
    })
}

/// Request limits and the queues' plan for what a device with `p` takes.
pub(super) fn plan(driver: BlkioDriver, p: &Props) -> (BlockLimits, QueueConfig) {
    let align = u64::from(p.request_alignment);
    let mut chunk = BOUNCE_BUF_SIZE;
    for limit in [p.max_transfer, p.max_segment_len] {
        if limit > 0 {
            chunk = chunk.min(u64::from(limit));
        }
    }
    let chunk = (chunk / align * align).max(align);
    // Step sizes: u64::MAX for no limit, 0 for not supported.
    let step_limit = |len: u64| match len {
        0 if driver.zero_len_is_unlimited() => u64::MAX,
        0 => 0,
        n => (n / align * align).max(align),
    };
    let max_discard = step_limit(p.max_discard_len);
    let max_write_zeroes = step_limit(p.max_write_zeroes_len);
    let advertised = |n: u64| if n == u64::MAX { 0 } else { n };
    let max_transfer = match (p.needs_mem_regions, p.max_transfer) {
        (false, t) => t,
        (true, 0) => chunk as u32,
        (true, t) => t.min(chunk as u32),
    };
    let limits = BlockLimits {
        request_alignment: p.request_alignment,
        buf_alignment: p.buf_alignment,
        optimal_io_size: p.optimal_io_size,
        max_transfer,
        max_segments: p.max_segments,
        discard_granularity: match max_discard {
            0 => 0,
            _ => p.discard_alignment.max(p.request_alignment),
        },
        max_discard: advertised(max_discard),
        zeroes_granularity: p.request_alignment,
        max_write_zeroes: advertised(max_write_zeroes),
    };
    let cfg = QueueConfig {
        geo: Geometry {
            align,
            chunk,
            max_write_zeroes,
            max_discard,
        },
        limits,
        max_transfer: u64::from(p.max_transfer),
        max_segment_len: p.max_segment_len as usize,
        needs_mem_regions: p.needs_mem_regions,
        discard_as_zeroes: driver == BlkioDriver::IoUring && p.can_grow && max_write_zeroes > 0,
        pool_bufs: match p.needs_mem_regions {
            true => BOUNCE_BUFS_MAPPED,
            false => BOUNCE_BUFS_UNMAPPED,
        },
        pool_align: p.buf_alignment.max(512) as usize,
    };
    (limits, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What qemu-storage-daemon's vhost-user-blk export reports.
    fn vhost_user() -> Props {
        Props {
            capacity: 1 << 30,
            read_only: false,
            request_alignment: 512,
            buf_alignment: 1,
            optimal_io_size: 512,
            max_transfer: 0,
            max_segments: 126,
            max_segment_len: 0,
            discard_alignment: 512,
            max_discard_len: 16 << 20,
            max_write_zeroes_len: 16 << 20,
            mem_region_alignment: 1,
            needs_mem_regions: true,
            needs_mem_region_fd: true,
            can_grow: false,
        }
    }

    /// What libblkio's io_uring reports for a regular file, buffered.
    fn io_uring_file() -> Props {
        Props {
            request_alignment: 1,
            max_segments: IOV_MAX,
            max_discard_len: 0,
            max_write_zeroes_len: 0,
            needs_mem_regions: false,
            needs_mem_region_fd: false,
            can_grow: true,
            ..vhost_user()
        }
    }

    #[test]
    fn drivers_needing_memory_regions_transfer_at_most_a_bounce_buffer() {
        let (limits, cfg) = plan(BlkioDriver::VirtioBlkVhostUser, &vhost_user());
        assert_eq!(limits.max_transfer, BOUNCE_BUF_SIZE as u32);
        assert_eq!(cfg.geo.chunk, BOUNCE_BUF_SIZE);
        assert_eq!(cfg.pool_bufs, BOUNCE_BUFS_MAPPED);
        let small = Props {
            max_transfer: 64 << 10,
            ..vhost_user()
        };
        assert_eq!(
            plan(BlkioDriver::VirtioBlkVhostUser, &small).0.max_transfer,
            64 << 10
        );
    }

    #[test]
    fn zero_lengths_mean_unsupported_for_virtio_and_unlimited_for_io_uring() {
        let none = Props {
            max_discard_len: 0,
            max_write_zeroes_len: 0,
            ..vhost_user()
        };
        let (limits, cfg) = plan(BlkioDriver::VirtioBlkVhostUser, &none);
        assert_eq!((limits.discard_granularity, cfg.geo.max_discard), (0, 0));
        assert_eq!(cfg.geo.max_write_zeroes, 0, "write-zeroes by hand");
        let (limits, cfg) = plan(BlkioDriver::IoUring, &io_uring_file());
        assert_eq!(
            (cfg.geo.max_discard, cfg.geo.max_write_zeroes),
            (u64::MAX, u64::MAX)
        );
        assert_eq!((limits.max_discard, limits.max_write_zeroes), (0, 0));
        assert!(limits.discard_granularity > 0);
        assert_eq!(limits.max_transfer, 0);
        assert!(
            cfg.discard_as_zeroes,
            "regular files discard by punching holes"
        );
    }

    #[test]
    fn step_limits_are_rounded_to_the_request_alignment() {
        let odd = Props {
            request_alignment: 4096,
            max_discard_len: 10000,
            max_segment_len: 6000,
            ..vhost_user()
        };
        let (_, cfg) = plan(BlkioDriver::VirtioBlkVhostUser, &odd);
        assert_eq!(cfg.geo.max_discard, 8192);
        assert_eq!(cfg.geo.chunk, 4096, "one segment per bounced step");
    }
}
