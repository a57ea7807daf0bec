//! Request limits a node advertises (QEMU's `BlockLimits`). Devices turn
//! them into virtio-blk config (seg_max, blk_size, topology, discard
//! granularity); the node refuses requests that break them.

/// Limits of a node, all in bytes unless named otherwise. Zero means no
/// limit (or, for granularities, "not supported").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    /// Offsets and lengths must be multiples of this for the fast path.
    pub request_alignment: u32,
    /// Buffer addresses and lengths must be multiples of this for the fast path.
    pub buf_alignment: u32,
    /// Preferred I/O size.
    pub optimal_io_size: u32,
    /// Largest read or write in one request (0: no limit).
    pub max_transfer: u32,
    /// Most iovecs in one request.
    pub max_segments: u32,
    /// Discard granularity (0: discard not supported).
    pub discard_granularity: u32,
    /// Largest discard in one request (0: no limit).
    pub max_discard: u64,
    /// Write-zeroes granularity.
    pub zeroes_granularity: u32,
    /// Largest write-zeroes in one request (0: no limit).
    pub max_write_zeroes: u64,
}

impl Default for BlockLimits {
    fn default() -> Self {
        BlockLimits {
            request_alignment: 1,
            buf_alignment: 1,
            optimal_io_size: 0,
            max_transfer: 0,
            max_segments: IOV_MAX,
            discard_granularity: 0,
            max_discard: 0,
            zeroes_granularity: 1,
            max_write_zeroes: 0,
        }
    }
}

/// Linux's `IOV_MAX`: the most iovecs one preadv/pwritev takes.
pub const IOV_MAX: u32 = 1024;

impl BlockLimits {
    /// Whether an offset and iovecs meet both alignments.
    pub fn is_aligned(&self, offset: u64, len: u64, iovecs: &[libc::iovec]) -> bool {
        let req = u64::from(self.request_alignment.max(1));
        let buf = self.buf_alignment.max(1) as usize;
        offset.is_multiple_of(req)
            && len.is_multiple_of(req)
            && iovecs
                .iter()
                .all(|v| (v.iov_base as usize).is_multiple_of(buf) && v.iov_len.is_multiple_of(buf))
    }
}
