//! What a read becomes, worked out under the metadata lock: host ranges
//! (left to the caller to submit asynchronously with the guest's own
//! iovecs), zeroes, backing ranges and compressed clusters; and the
//! metadata-only operations: clearing clusters (discard, write-zeroes) and
//! block status. Writes are in [`super::alloc`].

use std::sync::Arc;

use super::io::{self, slice_iovecs};
use super::meta::{Mapping, Meta, ZERO};
use super::Qcow2Error;
use crate::node::{BlockNode, NodeQueue};

/// A queue's view of the backing node.
pub(crate) struct Backing {
    pub node: Arc<dyn BlockNode>,
    pub queue: Box<dyn NodeQueue>,
}

impl Backing {
    /// Reads guest bytes from `off` into `iovecs`; what lies beyond the
    /// backing node's end reads as zeroes.
    ///
    /// # Safety
    /// The iovecs must be valid for writes until this returns.
    pub unsafe fn read(&mut self, off: u64, iovecs: &[libc::iovec]) -> Result<(), Qcow2Error> {
        let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
        let cap = self.node.capacity();
        let inside = cap.saturating_sub(off).min(len as u64) as usize;
        if inside > 0 {
            // SAFETY: the caller keeps the iovecs valid until we return.
            unsafe { io::preadv(self.queue.as_mut(), off, slice_iovecs(iovecs, 0, inside)) }
                .map_err(|source| Qcow2Error::Io {
                    what: "read the backing file".into(),
                    source,
                })?;
        }
        if inside < len {
            crate::sys::zero_iovecs(iovecs, inside);
        }
        Ok(())
    }
}

/// A range of the request served from the image file in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HostRange {
    /// Host offset.
    pub host: u64,
    /// Offset into the request's data.
    pub skip: usize,
    pub len: usize,
}

/// A range of a read that comes from the backing node.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackingRange {
    pub guest: u64,
    pub skip: usize,
    pub len: usize,
}

/// Appends `r`, merged with the last range when contiguous in both spaces.
pub(crate) fn push_host(v: &mut Vec<HostRange>, r: HostRange) {
    if let Some(last) = v.last_mut() {
        if last.host + last.len as u64 == r.host && last.skip + last.len == r.skip {
            last.len += r.len;
            return;
        }
    }
    v.push(r);
}

/// How full clusters are cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Clear {
    /// Guest discard; `keep` leaves clusters allocated (discard-no-unref).
    Discard { keep: bool },
    /// Write-zeroes.
    Zeroes,
}

/// What a status query found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Data,
    Zero,
    Unallocated,
}

impl Meta {
    fn cs(&self) -> u64 {
        self.g.cluster_size()
    }

    /// Splits a read of `iovecs` at guest `off`: zero and compressed
    /// clusters are served here; host and backing ranges are returned.
    ///
    /// # Safety
    /// The iovecs must be valid for writes until this returns.
    pub unsafe fn plan_read(
        &mut self,
        io: &mut dyn NodeQueue,
        off: u64,
        iovecs: &[libc::iovec],
        host: &mut Vec<HostRange>,
        backing: &mut Vec<BackingRange>,
        has_backing: bool,
    ) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        let len: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let end = off + len;
        let mut at = off;
        while at < end {
            let gc = at / cs;
            let n = ((gc + 1) * cs).min(end) - at;
            let skip = (at - off) as usize;
            let within = at % cs;
            match self.mapping(io, gc)? {
                Mapping::Normal { host: h, .. } => push_host(
                    host,
                    HostRange {
                        host: h + within,
                        skip,
                        len: n as usize,
                    },
                ),
                Mapping::Unallocated if has_backing => match backing.last_mut() {
                    Some(b) if b.skip + b.len == skip => b.len += n as usize,
                    _ => backing.push(BackingRange {
                        guest: at,
                        skip,
                        len: n as usize,
                    }),
                },
                Mapping::Unallocated | Mapping::Zero(_) => {
                    crate::sys::zero_iovecs(&slice_iovecs(iovecs, skip, n as usize), 0);
                }
                Mapping::Compressed { off: c, len: clen } => {
                    let mut cluster = vec![0u8; cs as usize];
                    self.read_compressed(io, c, clen, &mut cluster)?;
                    let w = within as usize;
                    crate::sys::copy_to_iovecs(iovecs, skip, &cluster[w..w + n as usize]);
                }
            }
            at += n;
        }
        Ok(())
    }

    /// Clears full guest clusters `gc..gc + n` (zero clusters in version
    /// 3, unallocated in version 2). Version 2 write-zeroes over a backing
    /// file cannot be done this way: the caller writes zeroes instead.
    pub fn clear(
        &mut self,
        io: &mut dyn NodeQueue,
        gc: u64,
        n: u64,
        how: Clear,
        has_backing: bool,
    ) -> Result<(), Qcow2Error> {
        let v3 = self.g.version >= 3;
        let mut olds = Vec::new();
        for c in gc..gc + n {
            let old_entry = self.l2_entry(io, c)?;
            let m = self.decode(old_entry)?;
            // The new entry, and whether the old cluster is let go.
            let new = match (how, m) {
                (Clear::Discard { keep: true }, Mapping::Normal { .. }) if v3 => {
                    Some((old_entry | ZERO, false))
                }
                (Clear::Discard { keep: true }, _) if !v3 => None,
                (_, Mapping::Unallocated) if !has_backing || !v3 => None,
                (_, Mapping::Zero(None)) => None,
                _ if v3 => Some((ZERO, true)),
                _ => Some((0, true)),
            };
            let Some((new, free)) = new else { continue };
            if new != 0 {
                self.ensure_l2(io, c)?;
            }
            self.set_l2(io, c, new)?;
            if free {
                olds.push(m);
            }
        }
        self.drop_old(&olds);
        self.maybe_checkpoint(io)
    }

    /// The status of guest bytes from `off`, for at most `len` bytes (at
    /// least one).
    pub fn status(
        &mut self,
        io: &mut dyn NodeQueue,
        off: u64,
        len: u64,
    ) -> Result<(u64, Status), Qcow2Error> {
        /// Clusters looked at per call: callers ask again for the rest.
        const MAX_CLUSTERS: u64 = 1 << 16;
        let cs = self.cs();
        let kind = |m: Mapping| match m {
            Mapping::Normal { .. } | Mapping::Compressed { .. } => Status::Data,
            Mapping::Zero(_) => Status::Zero,
            Mapping::Unallocated => Status::Unallocated,
        };
        let first = kind(self.mapping(io, off / cs)?);
        let end = off.saturating_add(len.max(1)).min(self.size);
        let mut at = (off / cs + 1) * cs;
        let mut looked = 1;
        while at < end && looked < MAX_CLUSTERS && kind(self.mapping(io, at / cs)?) == first {
            at += cs;
            looked += 1;
        }
        Ok((at.min(end).saturating_sub(off).max(1), first))
    }
}
