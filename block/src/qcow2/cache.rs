//! A bounded cache of metadata table slices (L2 tables, refcount blocks),
//! as QEMU's `Qcow2Cache` with `l2-cache-entry-size`: a slice is at most
//! 4 KiB of a table, so a 2 MiB-cluster image does not read 2 MiB to look
//! up one entry.
//!
//! Writes are tracked per 512-byte sector and written back by the caller
//! at the point its ordering rules allow ([`SliceCache::writeback`]); a
//! sector is the unit a disk writes atomically, so a torn write cannot
//! leave half an entry. Dirty slices are never evicted: the metadata code
//! writes them back (a checkpoint) when half the cache is dirty, so the
//! bound is exceeded at most for the length of one operation.

use std::collections::HashMap;

use super::io;
use super::Qcow2Error;
use crate::node::NodeQueue;

/// Largest slice: 4 KiB (QEMU's default L2 cache entry size).
pub(crate) const MAX_SLICE_BYTES: usize = 4096;
/// The write-back unit.
const SECTOR: usize = 512;

/// One cached slice.
pub(crate) struct Slice {
    data: Vec<u8>,
    /// Bit `i` set: sector `i` of the slice differs from the disk.
    dirty: u8,
    last_use: u64,
}

impl Slice {
    /// The big-endian u64 entry `i`.
    pub fn get_u64(&self, i: usize) -> u64 {
        u64::from_be_bytes(self.data[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
    }

    /// Sets u64 entry `i`.
    fn set_u64(&mut self, i: usize, v: u64) {
        self.data[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        self.dirty |= 1 << (i * 8 / SECTOR);
    }

    /// The big-endian u16 entry `i`.
    pub fn get_u16(&self, i: usize) -> u16 {
        u16::from_be_bytes(self.data[i * 2..i * 2 + 2].try_into().expect("2 bytes"))
    }

    /// Sets u16 entry `i`.
    fn set_u16(&mut self, i: usize, v: u16) {
        self.data[i * 2..i * 2 + 2].copy_from_slice(&v.to_be_bytes());
        self.dirty |= 1 << (i * 2 / SECTOR);
    }
}

/// Slices of tables in the image file, by host offset.
pub(crate) struct SliceCache {
    slice_bytes: usize,
    capacity: usize,
    slices: HashMap<u64, Slice>,
    clock: u64,
    /// Slices with `dirty != 0`, counted as they change: asked after
    /// every allocation, where counting them would walk the cache.
    dirty_slices: usize,
}

impl SliceCache {
    /// A cache of at most `capacity` slices of `slice_bytes` (a power of
    /// two from 512 to [`MAX_SLICE_BYTES`]).
    pub fn new(slice_bytes: usize, capacity: usize) -> Self {
        debug_assert!((SECTOR..=MAX_SLICE_BYTES).contains(&slice_bytes));
        SliceCache {
            slice_bytes,
            capacity: capacity.max(2),
            slices: HashMap::new(),
            clock: 0,
            dirty_slices: 0,
        }
    }

    /// Slices with unwritten changes.
    pub fn dirty_count(&self) -> usize {
        self.dirty_slices
    }

    /// Whether enough slices are dirty that they should be written back
    /// now (half the bound): dirty slices cannot be evicted.
    pub fn wants_writeback(&self) -> bool {
        self.dirty_count() * 2 >= self.capacity
    }

    /// The slice starting at host offset `off` (a multiple of the slice
    /// size), read from the image if it is not cached.
    pub fn get(&mut self, io: &mut dyn NodeQueue, off: u64) -> Result<&mut Slice, Qcow2Error> {
        self.clock += 1;
        let clock = self.clock;
        if !self.slices.contains_key(&off) {
            self.evict();
            let mut data = vec![0u8; self.slice_bytes];
            io::pread(io, off, &mut data).map_err(|e| Qcow2Error::Io {
                what: format!("read a metadata table at {off:#x}"),
                source: e,
            })?;
            self.slices.insert(
                off,
                Slice {
                    data,
                    dirty: 0,
                    last_use: clock,
                },
            );
        }
        let s = self.slices.get_mut(&off).expect("inserted above");
        s.last_use = clock;
        Ok(s)
    }

    /// Sets u64 entry `i` of the slice at `off`.
    pub fn set_u64(
        &mut self,
        io: &mut dyn NodeQueue,
        off: u64,
        i: usize,
        v: u64,
    ) -> Result<(), Qcow2Error> {
        let s = self.get(io, off)?;
        let was_clean = s.dirty == 0;
        s.set_u64(i, v);
        self.dirty_slices += usize::from(was_clean);
        Ok(())
    }

    /// Sets u16 entry `i` of the slice at `off`.
    pub fn set_u16(
        &mut self,
        io: &mut dyn NodeQueue,
        off: u64,
        i: usize,
        v: u16,
    ) -> Result<(), Qcow2Error> {
        let s = self.get(io, off)?;
        let was_clean = s.dirty == 0;
        s.set_u16(i, v);
        self.dirty_slices += usize::from(was_clean);
        Ok(())
    }

    /// Caches the slices of a table that was just zeroed on disk, without
    /// reading them back.
    pub fn insert_zeroed(&mut self, off: u64, len: u64) {
        let mut at = off;
        while at < off + len && self.slices.len() < self.capacity {
            let old = self.slices.insert(
                at,
                Slice {
                    data: vec![0u8; self.slice_bytes],
                    dirty: 0,
                    last_use: self.clock,
                },
            );
            if old.is_some_and(|o| o.dirty != 0) {
                self.dirty_slices -= 1;
            }
            at += self.slice_bytes as u64;
        }
    }

    fn evict(&mut self) {
        while self.slices.len() >= self.capacity {
            let oldest = self
                .slices
                .iter()
                .filter(|(_, s)| s.dirty == 0)
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => {
                    self.slices.remove(&k);
                }
                None => return,
            }
        }
    }

    /// Writes every dirty sector back, coalescing neighbours of a slice.
    pub fn writeback(&mut self, io: &mut dyn NodeQueue) -> Result<(), Qcow2Error> {
        let sectors = self.slice_bytes / SECTOR;
        for (&off, s) in self.slices.iter_mut().filter(|(_, s)| s.dirty != 0) {
            let mut i = 0;
            while i < sectors {
                if s.dirty & (1 << i) == 0 {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < sectors && s.dirty & (1 << i) != 0 {
                    i += 1;
                }
                let at = off + (first * SECTOR) as u64;
                io::pwrite(io, at, &s.data[first * SECTOR..i * SECTOR]).map_err(|e| {
                    Qcow2Error::Io {
                        what: format!("write a metadata table at {at:#x}"),
                        source: e,
                    }
                })?;
            }
            s.dirty = 0;
            self.dirty_slices -= 1;
        }
        Ok(())
    }
}
