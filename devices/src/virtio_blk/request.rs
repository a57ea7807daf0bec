//! Parsing one virtio-blk descriptor chain, once, into a checked request
//! (virtio 1.2, 5.2.6). The device makes no assumption about framing
//! (VIRTIO_F_VERSION_1 implies ANY_LAYOUT): the 16-byte header is the
//! first 16 device-readable bytes, the status is the last device-writable
//! byte, and the data is what lies between, wherever descriptors split it.
//! All arithmetic is checked; everything after parsing works on the
//! checked type.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::GuestMem;

/// The request types blkvm serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequestType {
    /// Read.
    In,
    /// Write.
    Out,
    /// Flush.
    Flush,
    /// Device id (serial).
    GetId,
    /// Discard ranges.
    Discard,
    /// Write-zeroes ranges.
    WriteZeroes,
    /// Anything else: completed with UNSUPP.
    Unsupported(u32),
}

impl BlkRequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A stretch of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a chain could not become a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VirtioBlkError {
    /// No device-writable byte for the status: the request cannot even be
    /// failed; its head is returned with a used length of 0.
    #[error("descriptor chain has no status byte")]
    NoStatus,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("descriptor chain has no complete request header")]
    ShortHeader,
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    /// The header could not be read from guest memory.
    #[error("request header is not in guest memory")]
    BadHeader,
    /// Data length not a multiple of 512 or past 2^64.
    #[error("request data length is invalid")]
    BadLength,
    /// The request names sectors beyond what can be addressed.
    #[error("request sector out of range")]
    BadSector,
    /// Discard/write-zeroes payload malformed.
    #[error("discard or write-zeroes segment is malformed")]
    BadSegment,
    /// The node refused or failed the request.
    #[error("the block layer failed the request")]
    Io,
    /// The device does not do this.
    #[error("request type not supported")]
    Unsupported,
}

impl VirtioBlkError {
    /// The status byte for this error (5.2.6: IOERR or UNSUPP).
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A checked request. Reused across chains: its vectors keep their capacity.
#[derive(Debug, Default)]
pub struct BlkRequest {
    /// Descriptor chain head, for the used ring.
    pub head: u16,
    /// Request type.
    pub kind: Option<BlkRequestType>,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data segments (device-writable for IN/GET_ID, readable otherwise).
    pub data: Vec<Segment>,
    /// Total data bytes.
    pub data_len: u64,
    /// The status byte's address.
    pub status: Option<GuestAddress>,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl BlkRequest {
    /// Parses `chain` into `self`. On error, `head` and (when there is one)
    /// `status` are still set, so the request can be completed.
    pub fn parse(
        &mut self,
        chain: DescriptorChain<&GuestMem>,
        mem: &GuestMem,
    ) -> Result<(), VirtioBlkError> {
        let head = chain.head_index();
        self.parse_descriptors(head, chain, mem)
    }

    /// Parses the chain at `head` made of `descs` (see [`Self::parse`]).
    pub fn parse_descriptors(
        &mut self,
        head: u16,
        descs: impl IntoIterator<Item = Descriptor>,
        mem: &GuestMem,
    ) -> Result<(), VirtioBlkError> {
        self.head = head;
        self.kind = None;
        self.sector = 0;
        self.data.clear();
        self.data_len = 0;
        self.status = None;
        self.readable.clear();
        self.writable.clear();
        let mut order_ok = true;
        for d in descs {
            let seg = Segment {
                addr: d.addr(),
                len: d.len(),
            };
            if d.is_write_only() {
                self.writable.push(seg);
            } else if self.writable.is_empty() {
                self.readable.push(seg);
            } else {
                order_ok = false;
            }
        }
        self.take_status()?;
        if !order_ok {
            return Err(VirtioBlkError::BadOrder);
        }
        let mut header = [0u8; 16];
        take_front(&mut self.readable, &mut header, mem)?;
        let kind = BlkRequestType::from_raw(u32::from_le_bytes(
            header[0..4].try_into().unwrap_or_default(),
        ));
        self.kind = Some(kind);
        self.sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let data = match kind {
            BlkRequestType::In | BlkRequestType::GetId => &self.writable,
            BlkRequestType::Out | BlkRequestType::Discard | BlkRequestType::WriteZeroes => {
                &self.readable
            }
            BlkRequestType::Flush => return Ok(()),
            BlkRequestType::Unsupported(_) => return Err(VirtioBlkError::Unsupported),
        };
        let mut total = 0u64;
        for s in data.iter().filter(|s| s.len > 0) {
            total = total
                .checked_add(u64::from(s.len))
                .ok_or(VirtioBlkError::BadLength)?;
            self.data.push(*s);
        }
        self.data_len = total;
        if matches!(kind, BlkRequestType::In | BlkRequestType::Out) {
            if !total.is_multiple_of(super::config::SECTOR_SIZE) {
                return Err(VirtioBlkError::BadLength);
            }
            self.sector
                .checked_mul(super::config::SECTOR_SIZE)
                .and_then(|b| b.checked_add(total))
                .ok_or(VirtioBlkError::BadSector)?;
        }
        Ok(())
    }

    /// Takes the last device-writable byte as the status.
    fn take_status(&mut self) -> Result<(), VirtioBlkError> {
        while let Some(last) = self.writable.last_mut() {
            if last.len == 0 {
                self.writable.pop();
                continue;
            }
            last.len -= 1;
            self.status = last.addr.checked_add(u64::from(last.len));
            if last.len == 0 {
                self.writable.pop();
            }
            return self.status.map(|_| ()).ok_or(VirtioBlkError::NoStatus);
        }
        Err(VirtioBlkError::NoStatus)
    }
}

/// Reads `buf.len()` bytes from the front of `segs` and removes them.
fn take_front<T: GuestMemoryBackend + ?Sized>(
    segs: &mut Vec<Segment>,
    buf: &mut [u8],
    mem: &T,
) -> Result<(), VirtioBlkError> {
    let mut done = 0;
    let mut consumed = 0;
    for s in segs.iter_mut() {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| VirtioBlkError::BadHeader)?;
        done += n;
        s.len -= n as u32;
        s.addr = s
            .addr
            .checked_add(n as u64)
            .ok_or(VirtioBlkError::BadHeader)?;
        if s.len == 0 {
            consumed += 1;
        }
    }
    segs.drain(..consumed);
    if done < buf.len() {
        return Err(VirtioBlkError::ShortHeader);
    }
    Ok(())
}

/// One range of a DISCARD or WRITE_ZEROES request (5.2.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap (write-zeroes only).
    pub flags: u32,
}

/// Bytes of one `virtio_blk_discard_write_zeroes`.
pub const DISCARD_RANGE_LEN: usize = 16;

/// Reads range `i` of a discard/write-zeroes payload.
/// The descriptors of the chain at `head` of a split ring whose table is
/// at `table` with `size` entries, following NEXT and one level of
/// INDIRECT as virtio-queue's iterator does: for a chain taken from the
/// ring earlier (a resubmitted inflight head). A loop, an index out of
/// range or a nested indirect table ends it with an error.
pub fn chain_at(
    mem: &GuestMem,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, VirtioBlkError> {
    const F_NEXT: u16 = 1;
    const F_INDIRECT: u16 = 4;
    let mut out = Vec::new();
    let (mut table, mut size, mut idx) = (table, u32::from(size), u32::from(head));
    let mut indirect = false;
    // A chain longer than its table loops.
    let mut left = size;
    loop {
        if idx >= size || left == 0 {
            return Err(VirtioBlkError::BadSegment);
        }
        left -= 1;
        let at = table
            .checked_add(16 * u64::from(idx))
            .ok_or(VirtioBlkError::BadSegment)?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, at)
            .map_err(|_| VirtioBlkError::BadSegment)?;
        let field = |r: std::ops::Range<usize>| -> u64 {
            raw[r]
                .iter()
                .rev()
                .fold(0u64, |a, &b| (a << 8) | u64::from(b))
        };
        let (addr, len) = (field(0..8), field(8..12) as u32);
        let (flags, next) = (field(12..14) as u16, field(14..16) as u16);
        if flags & F_INDIRECT != 0 {
            if indirect || flags & F_NEXT != 0 || len % 16 != 0 || len == 0 {
                return Err(VirtioBlkError::BadSegment);
            }
            indirect = true;
            table = GuestAddress(addr);
            size = len / 16;
            left = size;
            idx = 0;
            continue;
        }
        out.push(Descriptor::new(addr, len, flags, next));
        if flags & F_NEXT == 0 {
            return Ok(out);
        }
        idx = u32::from(next);
    }
}

pub fn read_range<T: GuestMemoryBackend + ?Sized>(
    data: &[Segment],
    i: usize,
    mem: &T,
) -> Result<DiscardRange, VirtioBlkError> {
    let mut raw = [0u8; DISCARD_RANGE_LEN];
    let mut skip = i * DISCARD_RANGE_LEN;
    let mut done = 0;
    for s in data {
        if done == raw.len() {
            break;
        }
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(raw.len() - done);
        let addr = s
            .addr
            .checked_add(skip as u64)
            .ok_or(VirtioBlkError::BadSegment)?;
        mem.read_slice(&mut raw[done..done + n], addr)
            .map_err(|_| VirtioBlkError::BadSegment)?;
        done += n;
        skip = 0;
    }
    if done < raw.len() {
        return Err(VirtioBlkError::BadSegment);
    }
    let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
    if flags & !1 != 0 {
        return Err(VirtioBlkError::BadSegment);
    }
    Ok(DiscardRange {
        sector: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        num_sectors: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
        flags,
    })
}
