//! Writes: clusters written in place (allocated, refcount one) become host
//! ranges the caller submits asynchronously with the guest's iovecs; the
//! others are allocated here:
//!
//! 1. under the lock: the L2 table made to exist (written and flushed at
//!    once), clusters allocated (refcounts raised in the cache); the guest
//!    clusters marked busy;
//! 2. without the lock: the data written, with the copy-on-write head and
//!    tail (from the backing node, the old or compressed cluster);
//! 3. under the lock: the L2 entries pointed at the new clusters (in the
//!    cache), old clusters (compressed, shared, zero-allocated) queued to
//!    be let go; the busy mark removed.
//!
//! Nothing of step 1 and 3 reaches the disk until a checkpoint
//! ([`Meta::checkpoint`]: at a guest flush or FUA write, when half a cache
//! is dirty, on close), which writes in the order that keeps the image
//! consistent at every instant, as QEMU's cache dependencies do:
//! refcounts, flush (the data too), L2 entries, flush, lowered refcounts.
//! A crash at any point leaks clusters at worst, and loses only writes no
//! flush acknowledged. Reads meanwhile see the cache.
//! Other writers of
//! a busy guest cluster wait for step 3 (allocation of one cluster is
//! serialised); writes to other clusters go on meanwhile, and so do reads,
//! which see the old mapping until the new one is complete.

use super::io::{self, iovec_of, slice_iovecs};
use super::meta::{self, Geometry, Mapping, Meta, COPIED};
use super::plan::{Backing, HostRange};
use super::{Qcow2Error, Shared};
use crate::node::{BlockNode, NodeQueue};

/// Guest clusters being allocated: what step 1 made for step 2 and 3.
struct Run {
    gc: u64,
    n: u64,
    host: u64,
    olds: Vec<Mapping>,
}

fn io_err(what: &'static str) -> impl FnOnce(crate::RequestError) -> Qcow2Error {
    move |source| Qcow2Error::Io {
        what: what.into(),
        source,
    }
}

impl Meta {
    /// Step 1 for guest clusters `gc..gc + n` (within one L2 table).
    fn prepare_run(&mut self, io: &mut dyn NodeQueue, gc: u64, n: u64) -> Result<Run, Qcow2Error> {
        self.ensure_l2(io, gc)?;
        let olds = (gc..gc + n)
            .map(|c| self.mapping(io, c))
            .collect::<Result<Vec<_>, _>>()?;
        let host = self.alloc(io, n)?;
        self.busy.extend(gc..gc + n);
        Ok(Run { gc, n, host, olds })
    }

    /// Step 3: the L2 entries, then the old clusters let go.
    fn commit_run(&mut self, io: &mut dyn NodeQueue, run: &Run) -> Result<(), Qcow2Error> {
        let cs = self.g.cluster_size();
        // What the entries hold now: the busy mark kept other writers and
        // clears away, so this is what `olds` was.
        let current = (run.gc..run.gc + run.n)
            .map(|c| self.mapping(io, c))
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..run.n {
            self.set_l2(io, run.gc + i, (run.host + i * cs) | COPIED)?;
        }
        self.drop_old(&current);
        self.maybe_checkpoint(io)
    }
}

/// Fills `buf` with the guest bytes at `guest` as mapping `m` (of the
/// cluster holding them) has them. Needs no lock: `m` is pinned by the
/// cluster's busy mark.
fn read_old(
    g: &Geometry,
    child: &dyn BlockNode,
    io: &mut dyn NodeQueue,
    backing: Option<&mut Backing>,
    m: Mapping,
    guest: u64,
    buf: &mut [u8],
) -> Result<(), Qcow2Error> {
    if buf.is_empty() {
        return Ok(());
    }
    let within = guest % g.cluster_size();
    match (m, backing) {
        (Mapping::Unallocated, Some(b)) => {
            // SAFETY: `buf` is ours and outlives the call.
            unsafe { b.read(guest, &[iovec_of(buf)]) }
        }
        (Mapping::Unallocated | Mapping::Zero(_), _) => {
            buf.fill(0);
            Ok(())
        }
        (Mapping::Normal { host, .. }, _) => {
            io::pread(io, host + within, buf).map_err(io_err("read a cluster to copy"))
        }
        (Mapping::Compressed { off, len }, _) => {
            let mut cluster = vec![0u8; g.cluster_size() as usize];
            meta::read_compressed(g, child, io, off, len, &mut cluster)?;
            let w = within as usize;
            buf.copy_from_slice(&cluster[w..w + buf.len()]);
            Ok(())
        }
    }
}

/// Step 2: the run's data, with what the request does not cover copied
/// from the old clusters.
///
/// # Safety
/// The iovecs must be valid for reads until this returns.
#[allow(clippy::too_many_arguments)]
unsafe fn write_run_data(
    g: &Geometry,
    child: &dyn BlockNode,
    io: &mut dyn NodeQueue,
    mut backing: Option<&mut Backing>,
    run: &Run,
    off: u64,
    iovecs: &[libc::iovec],
) -> Result<(), Qcow2Error> {
    let cs = g.cluster_size();
    let len: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
    let end = off + len;
    let run_start = run.gc * cs;
    let run_end = run_start + run.n * cs;
    let (w_start, w_end) = (off.max(run_start), end.min(run_end));
    let mut head = vec![0u8; (w_start - run_start) as usize];
    let first = run.olds[0];
    read_old(
        g,
        child,
        io,
        backing.as_deref_mut(),
        first,
        run_start,
        &mut head,
    )?;
    let mut tail = vec![0u8; (run_end - w_end) as usize];
    let last = run.olds[run.n as usize - 1];
    read_old(g, child, io, backing, last, w_end, &mut tail)?;
    let mut iov = Vec::new();
    if !head.is_empty() {
        iov.push(iovec_of(&mut head));
    }
    iov.extend(slice_iovecs(
        iovecs,
        (w_start - off) as usize,
        (w_end - w_start) as usize,
    ));
    if !tail.is_empty() {
        iov.push(iovec_of(&mut tail));
    }
    // SAFETY: `head` and `tail` live to the end of this function, the
    // guest's iovecs as long as our caller promised.
    unsafe { io::pwritev(io, run.host, iov) }.map_err(io_err("write allocated clusters"))
}

/// Writes `iovecs` at guest `off`: clusters that need allocating are
/// written here; ranges to write in place are returned in `direct`.
/// Returns whether anything was allocated.
///
/// # Safety
/// The iovecs must be valid for reads until this returns.
pub(crate) unsafe fn write(
    shared: &Shared,
    io: &mut dyn NodeQueue,
    mut backing: Option<&mut Backing>,
    off: u64,
    iovecs: &[libc::iovec],
    direct: &mut Vec<HostRange>,
) -> Result<bool, Qcow2Error> {
    let len: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
    let end = off + len;
    let mut meta = shared.lock();
    let (g, child) = (meta.g, meta.child.clone());
    let cs = g.cluster_size();
    let mut allocated = false;
    let mut gc = off / cs;
    while gc * cs < end {
        if meta.busy.contains(&gc) {
            meta = shared.wait(meta);
            continue;
        }
        let at = (gc * cs).max(off);
        if let Mapping::Normal { host, copied: true } = meta.mapping(io, gc)? {
            let n = ((gc + 1) * cs).min(end) - at;
            super::plan::push_host(
                direct,
                HostRange {
                    host: host + at % cs,
                    skip: (at - off) as usize,
                    len: n as usize,
                },
            );
            gc += 1;
            continue;
        }
        // A run of clusters to allocate, within one L2 table.
        let mut n = 1;
        while (gc + n) * cs < end
            && !(gc + n).is_multiple_of(g.l2_entries())
            && !meta.busy.contains(&(gc + n))
            && !matches!(
                meta.mapping(io, gc + n)?,
                Mapping::Normal { copied: true, .. }
            )
        {
            n += 1;
        }
        let run = meta.prepare_run(io, gc, n)?;
        drop(meta);
        // SAFETY: forwarded from our caller.
        let data = unsafe {
            write_run_data(
                &g,
                child.as_ref(),
                io,
                backing.as_deref_mut(),
                &run,
                off,
                iovecs,
            )
        };
        meta = shared.lock();
        let done = data.and_then(|()| meta.commit_run(io, &run));
        for c in run.gc..run.gc + run.n {
            meta.busy.remove(&c);
        }
        shared.wake();
        // On failure the new clusters stay allocated and unreferenced:
        // leaked, as a crash would leave them.
        done?;
        allocated = true;
        gc += n;
    }
    Ok(allocated)
}

/// Waits until no guest cluster of `first..first + n` is busy; returns
/// the guard again.
pub(crate) fn wait_idle<'a>(
    shared: &'a Shared,
    mut meta: std::sync::MutexGuard<'a, Meta>,
    first: u64,
    n: u64,
) -> std::sync::MutexGuard<'a, Meta> {
    while (first..first + n).any(|c| meta.busy.contains(&c)) {
        meta = shared.wait(meta);
    }
    meta
}
