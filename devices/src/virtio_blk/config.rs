//! virtio-blk features and configuration space (virtio 1.2, 5.2.3-5.2.4),
//! derived from the node's size and limits and the device's options.

use block::{BlockLimits, BlockNode};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes of `struct virtio_blk_config` we expose (up to `unused1`).
pub const CONFIG_LEN: usize = 60;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Offset of `writeback` in the configuration space (5.2.4), the one
/// byte a driver may write (with CONFIG_WCE).
pub const WRITEBACK_OFFSET: u64 = 32;
/// Most discard/write-zeroes segments per request.
pub const MAX_DISCARD_SEG: u32 = 32;

/// Options of one virtio-blk device (or export) that shape what the guest sees.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// Logical block size reported to the guest.
    pub logical_block_size: u32,
    /// Physical block size reported to the guest.
    pub physical_block_size: u32,
    /// Device read-only (also when the node is).
    pub read_only: bool,
    /// Offer DISCARD.
    pub discard: bool,
    /// Offer WRITE_ZEROES.
    pub write_zeroes: bool,
    /// Offer CONFIG_WCE (writeback cache toggle).
    pub config_wce: bool,
    /// Serial returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// What a failed write, flush, discard or write-zeroes does (QEMU's
    /// `werror`; default `enospc`).
    pub werror: super::ErrorAction,
    /// What a failed read does (QEMU's `rerror`; default `report`).
    pub rerror: super::ErrorAction,
    /// The device's I/O status, shared by its queues (needed for `stop`
    /// and `enospc`; without it those act as `report`).
    pub io_status: Option<std::sync::Arc<super::IoStatus>>,
}

impl BlkOptions {
    /// How the device's [`block::BlockBackend`] attaches to its node.
    pub fn backend_options(&self) -> block::BackendOptions {
        block::BackendOptions {
            read_only: self.read_only,
            werror: self.werror,
            rerror: self.rerror,
            io_status: self.io_status.clone(),
        }
    }
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            num_queues: 1,
            queue_size: 256,
            logical_block_size: 512,
            physical_block_size: 0,
            read_only: false,
            discard: true,
            write_zeroes: true,
            config_wce: true,
            serial: String::new(),
            werror: super::ErrorAction::Enospc,
            rerror: super::ErrorAction::Report,
            io_status: None,
        }
    }
}

/// Largest virtqueue QEMU accepts (VIRTQUEUE_MAX_SIZE).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues a virtio-blk device or export may have.
pub const MAX_QUEUES: u16 = 64;

/// A virtio-blk option out of range, in QEMU's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlkOptionsError {
    /// `num-queues=0`.
    #[error("num-queues property must be larger than 0")]
    NoQueues,
    /// More queues than [`MAX_QUEUES`].
    #[error("num-queues property must be <= {MAX_QUEUES}")]
    TooManyQueues,
    /// A queue too small for a request (header, data, status).
    #[error("invalid queue-size property ({0}), must be > 2")]
    QueueTooSmall(u16),
    /// Not a power of two, or above [`MAX_QUEUE_SIZE`].
    #[error("invalid queue-size property ({0}), must be a power of 2 (max {MAX_QUEUE_SIZE})")]
    BadQueueSize(u16),
    /// A block size that is not a power of two in 512..=65536.
    #[error("{0} must be a power of 2 between 512 and 65536, not {1}")]
    BadBlockSize(&'static str, u32),
    /// Logical blocks larger than physical ones.
    #[error("logical_block_size > physical_block_size not supported")]
    LogicalAbovePhysical,
}

impl BlkOptions {
    /// The one check of virtio-blk options, for the VMM's devices and the
    /// vhost-user-blk export alike. A physical block size of 0 means the
    /// logical one.
    pub fn check(&self) -> Result<(), BlkOptionsError> {
        if self.num_queues == 0 {
            return Err(BlkOptionsError::NoQueues);
        }
        if self.num_queues > MAX_QUEUES {
            return Err(BlkOptionsError::TooManyQueues);
        }
        let qs = self.queue_size;
        if qs <= 2 {
            return Err(BlkOptionsError::QueueTooSmall(qs));
        }
        if !qs.is_power_of_two() || qs > MAX_QUEUE_SIZE {
            return Err(BlkOptionsError::BadQueueSize(qs));
        }
        let lbs = self.logical_block_size;
        let pbs = match self.physical_block_size {
            0 => lbs,
            p => p,
        };
        for (name, v) in [("logical_block_size", lbs), ("physical_block_size", pbs)] {
            if !(512..=65536).contains(&v) || !v.is_power_of_two() {
                return Err(BlkOptionsError::BadBlockSize(name, v));
            }
        }
        if lbs > pbs {
            return Err(BlkOptionsError::LogicalAbovePhysical);
        }
        Ok(())
    }
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The device features offered for `node` with `opts`.
pub fn features(opts: &BlkOptions, read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH);
    if opts.config_wce {
        f |= bit(VIRTIO_BLK_F_CONFIG_WCE);
    }
    if opts.num_queues > 1 {
        f |= bit(VIRTIO_BLK_F_MQ);
    }
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        if opts.discard {
            f |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if opts.write_zeroes {
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
    }
    f
}

/// The configuration space for `node`, little-endian, `CONFIG_LEN` bytes.
pub fn config_space(node: &dyn BlockNode, opts: &BlkOptions, writeback: bool) -> [u8; CONFIG_LEN] {
    let limits: BlockLimits = node.limits();
    let mut c = [0u8; CONFIG_LEN];
    let put = |c: &mut [u8; CONFIG_LEN], off: usize, bytes: &[u8]| {
        c[off..off + bytes.len()].copy_from_slice(bytes);
    };
    let lbs = opts.logical_block_size.max(512);
    let pbs = opts
        .physical_block_size
        .max(lbs)
        .max(limits.request_alignment);
    let seg_max = limits
        .max_segments
        .saturating_sub(2)
        .clamp(1, u32::from(opts.queue_size).saturating_sub(2).max(1));
    put(&mut c, 0, &(node.capacity() / SECTOR_SIZE).to_le_bytes());
    put(&mut c, 12, &seg_max.to_le_bytes());
    put(&mut c, 20, &lbs.to_le_bytes());
    c[24] = (pbs / lbs).max(1).ilog2() as u8;
    let min_io = (limits.request_alignment.max(lbs) / lbs).min(u32::from(u16::MAX)) as u16;
    put(&mut c, 26, &min_io.to_le_bytes());
    put(&mut c, 28, &(limits.optimal_io_size / lbs).to_le_bytes());
    c[WRITEBACK_OFFSET as usize] = u8::from(writeback);
    put(&mut c, 34, &opts.num_queues.to_le_bytes());
    let sectors_max = |bytes: u64| {
        if bytes == 0 {
            u32::MAX
        } else {
            (bytes / SECTOR_SIZE).min(u64::from(u32::MAX)) as u32
        }
    };
    put(&mut c, 36, &sectors_max(limits.max_discard).to_le_bytes());
    put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
    let gran = (u64::from(limits.discard_granularity.max(lbs)) / SECTOR_SIZE) as u32;
    put(&mut c, 44, &gran.to_le_bytes());
    put(
        &mut c,
        48,
        &sectors_max(limits.max_write_zeroes).to_le_bytes(),
    );
    put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::BlockGraph;

    #[test]
    fn config_space_carries_capacity_block_size_and_queues() {
        let mut g = BlockGraph::new();
        let n = g.add(&qapi_parse("null-co,size=1M")).unwrap();
        let opts = BlkOptions {
            num_queues: 2,
            logical_block_size: 4096,
            ..BlkOptions::default()
        };
        let c = config_space(n.as_ref(), &opts, true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(c[32], 1);
    }

    #[test]
    fn read_only_drops_discard_and_write_zeroes() {
        let f = features(&BlkOptions::default(), true);
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        let f = features(&BlkOptions::default(), false);
        assert_ne!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_MQ), 0);
    }

    fn qapi_parse(s: &str) -> qapi::BlockdevOptions {
        qapi::parse_blockdev(s).unwrap()
    }
}
