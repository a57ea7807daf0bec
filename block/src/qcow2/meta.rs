//! The image's metadata in memory: L1 table, refcount table, the slice
//! caches of L2 tables and refcount blocks, and cluster allocation.
//!
//! L2 entries and refcounts change in the caches and reach the disk at a
//! checkpoint ([`Meta::checkpoint`]); structural changes (a new L2 table
//! or refcount block, a larger refcount or L1 table, the header) are
//! written at once. Either way the order keeps the image consistent if
//! the process dies between any two writes (QEMU's rules): a cluster's
//! refcount is on disk (flushed) before anything on disk points to it,
//! and a pointer is removed (flushed) before the refcount drops. A crash
//! can leak clusters, never leave a pointer to a cluster whose refcount
//! is zero.
//!
//! Clusters freed while the image is open are not reused until it is
//! opened again: a request still in flight to a cluster's old owner can
//! then never land in its new one. So every cluster is handed out at most
//! once per opening, and one past the end of the file as it was opened
//! has never been written: it reads as zeroes (a hole), and allocating it
//! needs no zero copy-on-write ([`Meta::is_fresh`]).
//!
//! The file grows in steps of [`GROW_STEP`], not a cluster at a time
//! (one `ftruncate` per step); a clean close gives back what no cluster
//! took ([`Meta::trim_tail`]).

use std::collections::HashSet;
use std::sync::Arc;

use super::cache::{SliceCache, MAX_SLICE_BYTES};
use super::header::{self, CompressionType, Header};
use super::{compress, io, Qcow2Error};
use crate::node::{BlockNode, NodeQueue};

/// L1, L2 and refcount table entries: host offset bits 9..=55.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount table entries: offset bits 9..=63.
const REFTABLE_MASK: u64 = !0x1ff;
/// How far the image file grows at once when allocation needs room:
/// growing per cluster cost an `ftruncate` per allocating write.
const GROW_STEP: u64 = 4 << 20;

/// L1/L2 entry: the cluster's refcount is exactly one.
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// L2 entry (v3): reads as zeroes.
pub(crate) const ZERO: u64 = 1;

/// What a guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here: the backing file's, or zeroes.
    Unallocated,
    /// Reads as zeroes; `Some(host)` when a cluster stays allocated.
    Zero(Option<u64>),
    /// Data at a host cluster; `copied` when its refcount is one (so it
    /// may be written in place).
    Normal { host: u64, copied: bool },
    /// Compressed data of `len` bytes at host byte `off`.
    Compressed { off: u64, len: u64 },
}

/// Fixed geometry of an open image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub version: u32,
    pub compression: CompressionType,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }
    /// Refcounts per refcount block (16-bit refcounts).
    pub fn refcounts_per_block(&self) -> u64 {
        self.cluster_size() / 2
    }
    pub fn slice_bytes(&self) -> usize {
        (self.cluster_size() as usize).min(MAX_SLICE_BYTES)
    }
}

/// The metadata state, behind the node's lock.
pub(crate) struct Meta {
    pub g: Geometry,
    pub size: u64,
    /// The image's first sector, rewritten whole when a header field changes.
    header_sector: Vec<u8>,
    pub l1: Vec<u64>,
    l1_offset: u64,
    reftable: Vec<u64>,
    reftable_offset: u64,
    l2: SliceCache,
    rc: SliceCache,
    /// Where the search for a free cluster starts (a cluster index); it
    /// only moves forward, and every cluster handed out lies below it.
    free_hint: u64,
    /// The first cluster past the end of the file as it was opened.
    fresh_from: u64,
    /// The file's size when it was opened.
    opened_len: u64,
    /// Guest clusters being allocated, whose data is being written: other
    /// writes and clears of them are deferred until the mark goes.
    pub busy: HashSet<u64>,
    /// Queues with requests deferred until busy marks go.
    pub waiters: Vec<Arc<super::Waker>>,
    /// Clusters whose last reference was removed from an L2 entry that is
    /// not yet on disk: their refcounts drop at the next checkpoint.
    pending_frees: Vec<Mapping>,
    pub child: Arc<dyn BlockNode>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(crate::RequestError) -> Qcow2Error {
    let what = what.into();
    move |source| Qcow2Error::Io { what, source }
}

fn read_table(
    io: &mut dyn NodeQueue,
    off: u64,
    entries: u64,
    what: &str,
) -> Result<Vec<u64>, Qcow2Error> {
    let mut buf = vec![0u8; (entries * 8) as usize];
    if !buf.is_empty() {
        io::pread(io, off, &mut buf).map_err(io_err(format!("read the {what}")))?;
    }
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Decompresses the cluster stored at `(off, len)` in `child` into `out`
/// (one cluster); needs no metadata, so no lock.
pub(crate) fn read_compressed(
    g: &Geometry,
    child: &dyn BlockNode,
    io: &mut dyn NodeQueue,
    off: u64,
    len: u64,
    out: &mut [u8],
) -> Result<(), Qcow2Error> {
    let end = child.capacity();
    if off >= end {
        return Err(Qcow2Error::Corrupt(format!(
            "compressed cluster at {off:#x} lies past the end of the file"
        )));
    }
    // The sector count may round past the end of the file.
    let len = len.min(end - off) as usize;
    let mut buf = vec![0u8; len];
    io::pread(io, off, &mut buf).map_err(io_err("read a compressed cluster"))?;
    compress::decompress(g.compression, &buf, out)
}

fn table_bytes(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Meta {
    /// Reads the tables of an image whose header is `h`.
    pub fn load(
        io: &mut dyn NodeQueue,
        child: Arc<dyn BlockNode>,
        h: &Header,
        first_sector: Vec<u8>,
        l2_cache_bytes: u64,
    ) -> Result<Meta, Qcow2Error> {
        let g = Geometry {
            cluster_bits: h.cluster_bits,
            version: h.version,
            compression: h.compression,
        };
        let l1 = read_table(io, h.l1_offset, u64::from(h.l1_size), "L1 table")?;
        let rt_entries = (u64::from(h.reftable_clusters) << h.cluster_bits) / 8;
        let reftable = read_table(io, h.reftable_offset, rt_entries, "refcount table")?;
        let slice = g.slice_bytes();
        let opened_len = child.capacity();
        let l2_slices = (l2_cache_bytes / slice as u64).clamp(4, 1 << 16) as usize;
        Ok(Meta {
            g,
            size: h.size,
            header_sector: first_sector,
            l1,
            l1_offset: h.l1_offset,
            reftable,
            reftable_offset: h.reftable_offset,
            l2: SliceCache::new(slice, l2_slices),
            // 256 KiB of refcounts: 2^17 clusters, 8 GiB of 64 KiB clusters.
            rc: SliceCache::new(slice, (256 << 10) / slice),
            free_hint: 0,
            fresh_from: opened_len.div_ceil(g.cluster_size()),
            opened_len,
            busy: HashSet::new(),
            waiters: Vec::new(),
            pending_frees: Vec::new(),
            child,
        })
    }

    /// Rewrites the header's first sector with `edit` applied.
    fn write_header(
        &mut self,
        io: &mut dyn NodeQueue,
        edit: impl FnOnce(&mut [u8]),
    ) -> Result<(), Qcow2Error> {
        let mut s = self.header_sector.clone();
        edit(&mut s);
        io::pwrite(io, 0, &s).map_err(io_err("write the image header"))?;
        self.header_sector = s;
        Ok(())
    }

    /// Clears the autoclear feature bits (extensions blkvm does not keep up
    /// to date, such as persistent bitmaps, are then ignored by QEMU).
    pub fn clear_autoclear(&mut self, io: &mut dyn NodeQueue) -> Result<(), Qcow2Error> {
        self.write_header(io, |s| {
            s[header::OFF_AUTOCLEAR..header::OFF_AUTOCLEAR + 8].fill(0)
        })?;
        io::flush(io).map_err(io_err("flush the image header"))
    }

    fn cluster_aligned(&self, off: u64) -> bool {
        off & (self.g.cluster_size() - 1) == 0
    }

    /// The L2 table offset for guest cluster `gc`, 0 if none.
    fn l2_table(&self, gc: u64) -> Result<(usize, u64), Qcow2Error> {
        let l1_index = (gc / self.g.l2_entries()) as usize;
        let Some(&e) = self.l1.get(l1_index) else {
            return Err(Qcow2Error::Corrupt(format!(
                "guest cluster {gc} lies beyond the L1 table"
            )));
        };
        let off = e & OFFSET_MASK;
        if !self.cluster_aligned(off) {
            return Err(Qcow2Error::Corrupt(format!(
                "L2 table offset {off:#x} is not cluster aligned"
            )));
        }
        Ok((l1_index, off))
    }

    /// Host offset of the slice holding entry `index` of the table at `table`.
    fn slice_of(&self, table: u64, index: u64, entry_bytes: u64) -> (u64, usize) {
        let slice = self.g.slice_bytes() as u64;
        let byte = index * entry_bytes;
        (
            table + byte / slice * slice,
            ((byte % slice) / entry_bytes) as usize,
        )
    }

    /// The raw L2 entry of guest cluster `gc` (0 when no L2 table).
    pub fn l2_entry(&mut self, io: &mut dyn NodeQueue, gc: u64) -> Result<u64, Qcow2Error> {
        let (_, table) = self.l2_table(gc)?;
        if table == 0 {
            return Ok(0);
        }
        let (slice, i) = self.slice_of(table, gc % self.g.l2_entries(), 8);
        Ok(self.l2.get(io, slice)?.get_u64(i))
    }

    /// What guest cluster `gc` maps to.
    pub fn mapping(&mut self, io: &mut dyn NodeQueue, gc: u64) -> Result<Mapping, Qcow2Error> {
        let e = self.l2_entry(io, gc)?;
        self.decode(e)
    }

    /// Decodes an L2 entry.
    pub fn decode(&self, e: u64) -> Result<Mapping, Qcow2Error> {
        let cb = self.g.cluster_bits;
        if e & COMPRESSED != 0 {
            let x = 62 - (cb - 8);
            let off = e & ((1u64 << x) - 1);
            let sectors = ((e >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
            let len = (sectors * 512).saturating_sub(off & 511);
            return Ok(Mapping::Compressed { off, len });
        }
        let host = e & OFFSET_MASK;
        if host != 0 && !self.cluster_aligned(host) {
            return Err(Qcow2Error::Corrupt(format!(
                "data cluster offset {host:#x} is not cluster aligned"
            )));
        }
        if e & ZERO != 0 {
            return Ok(Mapping::Zero((host != 0).then_some(host)));
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Normal {
            host,
            copied: e & COPIED != 0,
        })
    }

    /// Decompresses the cluster at `(off, len)` into `out` (one cluster).
    pub fn read_compressed(
        &mut self,
        io: &mut dyn NodeQueue,
        off: u64,
        len: u64,
        out: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        read_compressed(&self.g, self.child.as_ref(), io, off, len, out)
    }

    /// Sets guest cluster `gc`'s L2 entry (the L2 table must exist);
    /// written back by [`Meta::checkpoint`].
    pub fn set_l2(&mut self, io: &mut dyn NodeQueue, gc: u64, e: u64) -> Result<(), Qcow2Error> {
        let (_, table) = self.l2_table(gc)?;
        if table == 0 {
            return Err(Qcow2Error::Corrupt(format!(
                "guest cluster {gc} has no L2 table"
            )));
        }
        let (slice, i) = self.slice_of(table, gc % self.g.l2_entries(), 8);
        self.l2.set_u64(io, slice, i, e)?;
        Ok(())
    }

    /// Makes every metadata change so far durable, in the crash-safe
    /// order: refcounts (and the data written before them), flush, L2
    /// entries, flush, then the refcounts of clusters let go, flush.
    pub fn checkpoint(&mut self, io: &mut dyn NodeQueue) -> Result<(), Qcow2Error> {
        let frees = !self.pending_frees.is_empty();
        if self.l2.dirty_count() == 0 && self.rc.dirty_count() == 0 && !frees {
            return Ok(());
        }
        self.writeback_rc(io)?;
        io::flush(io).map_err(io_err("flush refcounts and data"))?;
        self.l2.writeback(io)?;
        io::flush(io).map_err(io_err("flush L2 tables"))?;
        if frees {
            for m in std::mem::take(&mut self.pending_frees) {
                self.unref(io, m)?;
            }
            self.writeback_rc(io)?;
            io::flush(io).map_err(io_err("flush refcounts"))?;
        }
        Ok(())
    }

    /// A checkpoint when the caches hold too much that is dirty.
    pub fn maybe_checkpoint(&mut self, io: &mut dyn NodeQueue) -> Result<(), Qcow2Error> {
        if self.l2.wants_writeback() || self.rc.wants_writeback() {
            self.checkpoint(io)?;
        }
        Ok(())
    }

    /// Lets go of the clusters `olds` hold, once the L2 entries that no
    /// longer point at them are on disk (at the next checkpoint).
    pub fn drop_old(&mut self, olds: &[Mapping]) {
        self.pending_frees.extend(olds.iter().copied().filter(|m| {
            matches!(
                m,
                Mapping::Normal { .. } | Mapping::Compressed { .. } | Mapping::Zero(Some(_))
            )
        }));
    }

    pub fn writeback_rc(&mut self, io: &mut dyn NodeQueue) -> Result<(), Qcow2Error> {
        self.rc.writeback(io)
    }

    /// Makes the L2 table of guest cluster `gc` exist; returns its offset.
    pub fn ensure_l2(&mut self, io: &mut dyn NodeQueue, gc: u64) -> Result<u64, Qcow2Error> {
        let (l1_index, table) = self.l2_table(gc)?;
        if table != 0 {
            if self.l1[l1_index] & COPIED == 0 {
                return Err(Qcow2Error::Unsupported(
                    "writing through a shared L2 table".into(),
                ));
            }
            return Ok(table);
        }
        let cs = self.g.cluster_size();
        let table = self.alloc(io, 1)?;
        io::pwrite(io, table, &vec![0u8; cs as usize]).map_err(io_err("write a new L2 table"))?;
        self.l2.insert_zeroed(table, cs);
        self.writeback_rc(io)?;
        io::flush(io).map_err(io_err("flush a new L2 table"))?;
        self.l1[l1_index] = table | COPIED;
        self.write_table_entry(io, self.l1_offset, l1_index, &self.l1.clone())?;
        Ok(table)
    }

    /// Writes the sector of a table held in memory that holds `index`.
    fn write_table_entry(
        &mut self,
        io: &mut dyn NodeQueue,
        table_off: u64,
        index: usize,
        table: &[u64],
    ) -> Result<(), Qcow2Error> {
        let first = index / 64 * 64;
        let last = (first + 64).min(table.len());
        let mut buf = table_bytes(&table[first..last]);
        buf.resize(512, 0);
        io::pwrite(io, table_off + first as u64 * 8, &buf).map_err(io_err("write a table entry"))
    }

    /// The refcount of host cluster `c`.
    pub fn refcount(&mut self, io: &mut dyn NodeQueue, c: u64) -> Result<u16, Qcow2Error> {
        let rpb = self.g.refcounts_per_block();
        let Some(&e) = self.reftable.get((c / rpb) as usize) else {
            return Ok(0);
        };
        let block = e & REFTABLE_MASK;
        if block == 0 {
            return Ok(0);
        }
        if !self.cluster_aligned(block) {
            return Err(Qcow2Error::Corrupt(format!(
                "refcount block offset {block:#x} is not cluster aligned"
            )));
        }
        let (slice, i) = self.slice_of(block, c % rpb, 2);
        Ok(self.rc.get(io, slice)?.get_u16(i))
    }

    /// Adds `delta` to host cluster `c`'s refcount (written back by
    /// [`Meta::writeback_rc`]; a new refcount block is written and
    /// flushed at once).
    pub fn change_refcount(
        &mut self,
        io: &mut dyn NodeQueue,
        c: u64,
        delta: i32,
    ) -> Result<(), Qcow2Error> {
        let rpb = self.g.refcounts_per_block();
        let index = c / rpb;
        if delta > 0 {
            self.ensure_refcount_block(io, index)?;
        }
        let e = self.reftable.get(index as usize).copied().unwrap_or(0);
        let block = e & REFTABLE_MASK;
        if block == 0 || !self.cluster_aligned(block) {
            return Err(Qcow2Error::Corrupt(format!(
                "freeing cluster {c} which has no refcount block"
            )));
        }
        let (slice, i) = self.slice_of(block, c % rpb, 2);
        let s = self.rc.get(io, slice)?;
        let old = s.get_u16(i);
        let new = i32::from(old) + delta;
        let new = u16::try_from(new).map_err(|_| {
            Qcow2Error::Corrupt(format!("refcount of cluster {c} would become {new}"))
        })?;
        self.rc.set_u16(io, slice, i, new)?;
        Ok(())
    }

    /// `n` free clusters in a row from the hint (not yet referenced).
    fn find_free(&mut self, io: &mut dyn NodeQueue, n: u64) -> Result<u64, Qcow2Error> {
        let mut start = self.free_hint.max(1);
        let mut c = start;
        // Clusters beyond the refcount table are all free, and so are those
        // past the end of the file (a refcount there is a leak at worst):
        // the search never walks further than the file, whatever a
        // hostile refcount table says.
        let covered = (self.reftable.len() as u64 * self.g.refcounts_per_block())
            .min(self.child.capacity().div_ceil(self.g.cluster_size()));
        while c - start < n {
            if c >= covered {
                break;
            }
            if self.refcount(io, c)? == 0 {
                c += 1;
            } else {
                c += 1;
                start = c;
            }
        }
        let max_clusters = (OFFSET_MASK >> self.g.cluster_bits) + 1;
        if start + n > max_clusters {
            return Err(Qcow2Error::Unsupported("an image this large".into()));
        }
        Ok(start)
    }

    /// Grows the file to hold clusters below `end_cluster`, by at least
    /// [`GROW_STEP`].
    fn extend_file(&mut self, end_cluster: u64) -> Result<(), Qcow2Error> {
        let end = end_cluster << self.g.cluster_bits;
        let cap = self.child.capacity();
        if end > cap {
            let cs = self.g.cluster_size();
            let target = end.max(cap.saturating_add(GROW_STEP).next_multiple_of(cs));
            self.child
                .truncate(target)
                .or_else(|_| self.child.truncate(end))
                .map_err(|e| Qcow2Error::Grow(e.to_string()))?;
        }
        Ok(())
    }

    /// Whether host cluster `c` (just handed out) has never been written
    /// since the image was opened, so reads as zeroes.
    pub fn is_fresh(&self, c: u64) -> bool {
        c >= self.fresh_from
    }

    /// Gives back the end of the file that growth steps reserved and no
    /// cluster took (at a clean close, with nothing in flight).
    pub fn trim_tail(&mut self) -> Result<(), Qcow2Error> {
        let used = (self.free_hint << self.g.cluster_bits).max(self.opened_len);
        if self.busy.is_empty() && self.child.capacity() > used {
            self.child
                .truncate(used)
                .map_err(|e| Qcow2Error::Grow(e.to_string()))?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters: refcounts set to one (written
    /// back later by the caller's ordering), file grown. Returns the host
    /// offset of the first.
    pub fn alloc(&mut self, io: &mut dyn NodeQueue, n: u64) -> Result<u64, Qcow2Error> {
        let start = self.find_free(io, n)?;
        // Move the hint first: refcount blocks this allocation needs are
        // placed after the range, never inside it.
        self.free_hint = start + n;
        self.extend_file(start + n)?;
        for c in start..start + n {
            self.change_refcount(io, c, 1)?;
        }
        Ok(start << self.g.cluster_bits)
    }

    /// Makes refcount block `index` exist.
    fn ensure_refcount_block(
        &mut self,
        io: &mut dyn NodeQueue,
        index: u64,
    ) -> Result<(), Qcow2Error> {
        if index >= self.reftable.len() as u64 {
            self.grow_reftable(io, index)?;
        }
        if self.reftable[index as usize] & REFTABLE_MASK != 0 {
            return Ok(());
        }
        let cs = self.g.cluster_size();
        let f = self.find_free(io, 1)?;
        self.free_hint = f + 1;
        self.extend_file(f + 1)?;
        let block = f << self.g.cluster_bits;
        io::pwrite(io, block, &vec![0u8; cs as usize]).map_err(io_err("write a refcount block"))?;
        self.rc.insert_zeroed(block, cs);
        self.reftable[index as usize] = block;
        // The block's own refcount: in itself when it covers itself, else
        // in another block (made the same way if need be).
        self.change_refcount(io, f, 1)?;
        self.writeback_rc(io)?;
        io::flush(io).map_err(io_err("flush a new refcount block"))?;
        let rt = self.reftable.clone();
        self.write_table_entry(io, self.reftable_offset, index as usize, &rt)
    }

    /// Moves the refcount table to a larger one at the end of the image,
    /// with the refcount blocks that cover the new table itself.
    fn grow_reftable(&mut self, io: &mut dyn NodeQueue, min_index: u64) -> Result<(), Qcow2Error> {
        let cs = self.g.cluster_size();
        let epc = cs / 8;
        let rpb = self.g.refcounts_per_block();
        let old_len = self.reftable.len() as u64;
        let file_clusters = self.child.capacity().div_ceil(cs);
        let start = self.free_hint.max(file_clusters).max(1);
        let has_block =
            |rt: &[u64], i: u64| rt.get(i as usize).is_some_and(|e| e & REFTABLE_MASK != 0);
        let mut new_len = (old_len * 2).max(min_index + 1).next_multiple_of(epc);
        let (table_clusters, missing) = loop {
            let tc = new_len / epc;
            let mut missing: Vec<u64> = Vec::new();
            loop {
                let end = start + tc + missing.len() as u64;
                let now: Vec<u64> = (start / rpb..=(end - 1) / rpb)
                    .filter(|i| !has_block(&self.reftable, *i))
                    .collect();
                if now.len() == missing.len() {
                    break;
                }
                missing = now;
            }
            let last = (start + tc + missing.len() as u64 - 1) / rpb;
            if last < new_len {
                break (tc, missing);
            }
            new_len = (last + 1).next_multiple_of(epc);
        };
        if table_clusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::Unsupported(
                "an image this large (the refcount table would exceed 8 MiB)".into(),
            ));
        }
        let end = start + table_clusters + missing.len() as u64;
        self.extend_file(end)?;
        let mut table = self.reftable.clone();
        table.resize(new_len as usize, 0);
        for (k, idx) in missing.iter().enumerate() {
            table[*idx as usize] = (start + table_clusters + k as u64) << self.g.cluster_bits;
        }
        // New blocks, with the refcounts of the new area they cover.
        for idx in &missing {
            let mut buf = vec![0u8; cs as usize];
            for c in (idx * rpb).max(start)..((idx + 1) * rpb).min(end) {
                let i = ((c % rpb) * 2) as usize;
                buf[i..i + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            io::pwrite(io, table[*idx as usize], &buf).map_err(io_err("write a refcount block"))?;
        }
        // Area clusters covered by blocks that exist already.
        for c in start..end {
            if has_block(&self.reftable, c / rpb) {
                self.change_refcount(io, c, 1)?;
            }
        }
        let new_off = start << self.g.cluster_bits;
        io::pwrite(io, new_off, &table_bytes(&table))
            .map_err(io_err("write the refcount table"))?;
        self.writeback_rc(io)?;
        io::flush(io).map_err(io_err("flush the new refcount table"))?;
        self.write_header(io, |s| {
            s[header::OFF_REFTABLE_OFFSET..header::OFF_REFTABLE_OFFSET + 8]
                .copy_from_slice(&new_off.to_be_bytes());
            s[header::OFF_REFTABLE_CLUSTERS..header::OFF_REFTABLE_CLUSTERS + 4]
                .copy_from_slice(&(table_clusters as u32).to_be_bytes());
        })?;
        io::flush(io).map_err(io_err("flush the image header"))?;
        let old_off = self.reftable_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        self.reftable = table;
        self.reftable_offset = new_off;
        self.free_hint = self.free_hint.max(end);
        for k in 0..old_clusters {
            self.change_refcount(io, (old_off >> self.g.cluster_bits) + k, -1)?;
        }
        self.writeback_rc(io)
    }

    /// Drops one reference to each host cluster `m` holds.
    pub fn unref(&mut self, io: &mut dyn NodeQueue, m: Mapping) -> Result<(), Qcow2Error> {
        let cb = self.g.cluster_bits;
        match m {
            Mapping::Normal { host, .. } | Mapping::Zero(Some(host)) => {
                self.change_refcount(io, host >> cb, -1)
            }
            Mapping::Compressed { off, len } => {
                let last = (off + len.max(1) - 1) >> cb;
                for c in off >> cb..=last {
                    self.change_refcount(io, c, -1)?;
                }
                Ok(())
            }
            Mapping::Zero(None) | Mapping::Unallocated => Ok(()),
        }
    }

    /// Grows the virtual size to `size` (the L1 table moves when it is too
    /// small).
    pub fn grow(&mut self, io: &mut dyn NodeQueue, size: u64) -> Result<(), Qcow2Error> {
        let need = header::l1_entries_for(size, self.g.cluster_bits);
        if need * 8 > header::MAX_L1_BYTES {
            return Err(Qcow2Error::Unsupported(format!(
                "a virtual size of {size} bytes"
            )));
        }
        let cs = self.g.cluster_size();
        if need > self.l1.len() as u64 {
            let mut l1 = self.l1.clone();
            l1.resize(need as usize, 0);
            let bytes = table_bytes(&l1);
            let clusters = (bytes.len() as u64).div_ceil(cs);
            let off = self.alloc(io, clusters)?;
            io::pwrite(io, off, &bytes).map_err(io_err("write the L1 table"))?;
            self.writeback_rc(io)?;
            io::flush(io).map_err(io_err("flush the new L1 table"))?;
            let old = (self.l1_offset, (self.l1.len() as u64 * 8).div_ceil(cs));
            self.write_header(io, |s| {
                s[header::OFF_L1_SIZE..header::OFF_L1_SIZE + 4]
                    .copy_from_slice(&(need as u32).to_be_bytes());
                s[header::OFF_L1_OFFSET..header::OFF_L1_OFFSET + 8]
                    .copy_from_slice(&off.to_be_bytes());
                s[header::OFF_SIZE..header::OFF_SIZE + 8].copy_from_slice(&size.to_be_bytes());
            })?;
            io::flush(io).map_err(io_err("flush the image header"))?;
            self.l1 = l1;
            self.l1_offset = off;
            for k in 0..old.1 {
                self.change_refcount(io, (old.0 >> self.g.cluster_bits) + k, -1)?;
            }
            self.writeback_rc(io)?;
        } else {
            self.write_header(io, |s| {
                s[header::OFF_SIZE..header::OFF_SIZE + 8].copy_from_slice(&size.to_be_bytes())
            })?;
            io::flush(io).map_err(io_err("flush the image header"))?;
        }
        self.size = size;
        Ok(())
    }
}
