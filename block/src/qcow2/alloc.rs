//! Writes, as QEMU's qcow2 does them (`handle_copied`, `handle_alloc`,
//! `qcow2_alloc_cluster_link_l2`): clusters written in place (allocated,
//! refcount one) become host ranges; the others are allocated, in three
//! steps that never wait for the disk under the metadata lock:
//!
//! 1. [`Meta::plan_write`], under the lock: the L2 table made to exist
//!    (a new one is written and flushed at once, rare), host clusters
//!    handed out (refcounts raised in the cache only), the guest clusters
//!    marked busy;
//! 2. [`run_iovecs`], without the lock: the data of each run of new
//!    clusters, with the copy-on-write head and tail around the guest's
//!    bytes, becomes one write the caller submits asynchronously, many in
//!    flight. A new cluster that reads as zeroes already (past the end of
//!    the file as it was opened, [`Meta::is_fresh`]) over an old one that
//!    read as zeroes needs no copy at all: only the guest's bytes are
//!    written, from the guest's own (registered) iovecs;
//! 3. [`Meta::commit_runs`], under the lock, once that write completed:
//!    the L2 entries point at the new clusters (in the cache, dirty), old
//!    clusters (compressed, shared, zero-allocated) are queued to be let
//!    go, the busy marks removed and the writers waiting for them woken.
//!
//! Nothing of steps 1 and 3 reaches the disk until a checkpoint
//! ([`Meta::checkpoint`]: a guest flush, a FUA write that allocated, half
//! a cache dirty, a clean close), which writes in the order QEMU's cache
//! dependencies give (`qcow2_cache_set_dependency`,
//! `qcow2_cache_depends_on_flush`): refcount blocks, flush (which also
//! makes the data of every committed run durable: step 3 runs only after
//! its data write completed), L2 slices, flush, lowered refcounts. So a
//! crash at any point leaves L2 entries that point only at clusters whose
//! refcount is on disk (leaks at worst), and loses only writes no flush
//! acknowledged. Refcount writes are as rare as checkpoints: between two,
//! any number of allocations only change the cache.
//!
//! A request that touches a busy guest cluster waits (the queue defers it
//! and retries when marks go): allocation of one cluster is serialised,
//! of different clusters it runs in parallel. Reads of a busy cluster see
//! the old mapping until the new one is complete.

use super::io::{self, iovec_of, slice_iovecs, AlignedBuf};
use super::meta::{self, Geometry, Mapping, Meta, COPIED};
use super::plan::{push_host, Backing, HostRange};
use super::Qcow2Error;
use crate::node::{BlockNode, NodeQueue};

/// Guest clusters being allocated: what step 1 made for steps 2 and 3.
pub(crate) struct Run {
    gc: u64,
    n: u64,
    host: u64,
    olds: Vec<Mapping>,
    /// The new host clusters read as zeroes already.
    fresh: bool,
    /// The guest bytes `[start, end)` the request writes into the run.
    start: u64,
    end: u64,
    /// Where those bytes start in the request's data.
    skip: usize,
}

/// What a write becomes under the lock.
#[derive(Default)]
pub(crate) struct WritePlan {
    /// Ranges of allocated clusters written in place.
    pub direct: Vec<HostRange>,
    /// Runs of new clusters, marked busy.
    pub runs: Vec<Run>,
}

fn io_err(what: &'static str) -> impl FnOnce(crate::RequestError) -> Qcow2Error {
    move |source| Qcow2Error::Io {
        what: what.into(),
        source,
    }
}

impl Meta {
    /// Whether a guest cluster of the bytes `[off, end)` is busy.
    pub fn any_busy(&self, off: u64, end: u64) -> bool {
        if self.busy.is_empty() || end <= off {
            return false;
        }
        let cs = self.g.cluster_size();
        (off / cs..end.div_ceil(cs)).any(|c| self.busy.contains(&c))
    }

    /// Step 1 for a write of `len` bytes at guest `off` whose data starts
    /// at `skip` of the request's; no cluster of it may be busy. On error
    /// the runs planned so far stay in `plan` for [`Meta::commit_runs`]
    /// to release.
    pub fn plan_write(
        &mut self,
        io: &mut dyn NodeQueue,
        off: u64,
        len: u64,
        skip: usize,
        plan: &mut WritePlan,
    ) -> Result<(), Qcow2Error> {
        let cs = self.g.cluster_size();
        let end = off + len;
        let mut gc = off / cs;
        while gc * cs < end {
            let at = (gc * cs).max(off);
            if let Mapping::Normal { host, copied: true } = self.mapping(io, gc)? {
                let n = ((gc + 1) * cs).min(end) - at;
                push_host(
                    &mut plan.direct,
                    HostRange {
                        host: host + at % cs,
                        skip: skip + (at - off) as usize,
                        len: n as usize,
                    },
                );
                gc += 1;
                continue;
            }
            // A run of clusters to allocate, within one L2 table.
            let mut n = 1;
            while (gc + n) * cs < end
                && !(gc + n).is_multiple_of(self.g.l2_entries())
                && !matches!(
                    self.mapping(io, gc + n)?,
                    Mapping::Normal { copied: true, .. }
                )
            {
                n += 1;
            }
            self.ensure_l2(io, gc)?;
            let olds = (gc..gc + n)
                .map(|c| self.mapping(io, c))
                .collect::<Result<Vec<_>, _>>()?;
            let host = self.alloc(io, n)?;
            self.busy.extend(gc..gc + n);
            let run_end = ((gc + n) * cs).min(end);
            plan.runs.push(Run {
                gc,
                n,
                host,
                olds,
                fresh: self.is_fresh(host >> self.g.cluster_bits),
                start: at,
                end: run_end,
                skip: skip + (at - off) as usize,
            });
            gc += n;
        }
        Ok(())
    }

    /// Step 3: when `ok` (their data is written), the L2 entries of `runs`
    /// point at the new clusters and the old ones are queued to be let go;
    /// otherwise the new clusters stay allocated and unreferenced (leaked,
    /// as a crash would leave them). Either way the busy marks go.
    pub fn commit_runs(
        &mut self,
        io: &mut dyn NodeQueue,
        runs: &[Run],
        ok: bool,
    ) -> Result<(), Qcow2Error> {
        let mut done = Ok(());
        if ok {
            done = runs.iter().try_for_each(|r| self.link_run(io, r));
        }
        for r in runs {
            for c in r.gc..r.gc + r.n {
                self.busy.remove(&c);
            }
        }
        done?;
        self.maybe_checkpoint(io)
    }

    fn link_run(&mut self, io: &mut dyn NodeQueue, run: &Run) -> Result<(), Qcow2Error> {
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
        Ok(())
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

/// Where the copy-on-write bytes of a run come from.
pub(crate) struct CowSource<'a> {
    pub g: Geometry,
    pub child: &'a dyn BlockNode,
    pub io: &'a mut dyn NodeQueue,
    pub backing: Option<&'a mut Backing>,
    /// At least one cluster of zeroes.
    pub zeroes: &'a AlignedBuf,
}

impl CowSource<'_> {
    /// Iovecs of the `len` guest bytes at `guest` as mapping `m` has them:
    /// nothing when they read as zeroes in a fresh cluster, the shared
    /// zeroes, or a buffer read now (kept in `bufs`).
    fn part(
        &mut self,
        m: Mapping,
        fresh: bool,
        guest: u64,
        len: usize,
        bufs: &mut Vec<AlignedBuf>,
    ) -> Result<Option<libc::iovec>, Qcow2Error> {
        let zero = match m {
            Mapping::Unallocated => self.backing.is_none(),
            Mapping::Zero(_) => true,
            _ => false,
        };
        if len == 0 || (zero && fresh) {
            return Ok(None);
        }
        if zero {
            return Ok(Some(self.zeroes.iovec(0, len)));
        }
        let mut buf = AlignedBuf::zeroed(len);
        read_old(
            &self.g,
            self.child,
            &mut *self.io,
            self.backing.as_deref_mut(),
            m,
            guest,
            buf.bytes_mut(),
        )?;
        let iov = buf.iovec(0, len);
        bufs.push(buf);
        Ok(Some(iov))
    }
}

/// Step 2: the host offset and iovecs of the one write that fills `run`:
/// its copy-on-write head (unless it reads as zeroes already), the
/// request's bytes from `data`, its tail. Buffers read for the copy go to
/// `bufs`, which must outlive the write.
pub(crate) fn run_iovecs(
    src: &mut CowSource<'_>,
    run: &Run,
    data: &[libc::iovec],
    bufs: &mut Vec<AlignedBuf>,
) -> Result<(u64, Vec<libc::iovec>), Qcow2Error> {
    let cs = src.g.cluster_size();
    let run_start = run.gc * cs;
    let run_end = run_start + run.n * cs;
    let head_len = (run.start - run_start) as usize;
    let tail_len = (run_end - run.end) as usize;
    let last = run.olds[run.n as usize - 1];
    let head = src.part(run.olds[0], run.fresh, run_start, head_len, bufs)?;
    let tail = src.part(last, run.fresh, run.end, tail_len, bufs)?;
    let mut iov = Vec::with_capacity(data.len() + 2);
    let mut host = run.host + (run.start - run_start);
    if let Some(h) = head {
        iov.push(h);
        host = run.host;
    }
    iov.extend(slice_iovecs(data, run.skip, (run.end - run.start) as usize));
    iov.extend(tail);
    Ok((host, iov))
}
