//! Synchronous execution of one request on a file: what the worker pool
//! runs, and the slow path of the io_uring engine for requests O_DIRECT
//! cannot take as they are.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use qapi::BlockdevDiscardOptions;

use super::FileInner;
use crate::node::NodeCommon;
use crate::request::{Request, RequestError, RequestOp};
use crate::sys::{self, AlignedBuf};

/// Largest alignment probed, and the alignment of every bounce buffer.
const MAX_ALIGN: usize = 4096;
/// Chunk size for writing zeroes by hand.
const ZERO_CHUNK: usize = 1 << 20;

/// Finds the offset/length alignment and the memory alignment O_DIRECT
/// needs, as QEMU's `raw_probe_alignment` does: the smallest power of two
/// from 512 whose read succeeds.
pub fn probe_alignment(file: &File, is_blockdev: bool) -> (u32, u32) {
    let fd = file.as_raw_fd();
    if is_blockdev {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut sector) } == 0 && sector > 0 {
            return (sector as u32, sector as u32);
        }
    }
    let mut buf = AlignedBuf::new(2 * MAX_ALIGN, MAX_ALIGN);
    let base = buf.as_mut_ptr();
    let works = |ptr: *mut u8, len: usize| {
        // SAFETY: `ptr..ptr+len` lies inside `buf` (at most MAX_ALIGN past
        // its start, len at most MAX_ALIGN), which is live and writable.
        unsafe { libc::pread(fd, ptr.cast(), len, 0) >= 0 }
    };
    let mut request = MAX_ALIGN;
    let mut align = 512;
    while align <= MAX_ALIGN {
        if works(base, align) {
            request = align;
            break;
        }
        align <<= 1;
    }
    let mut memory = MAX_ALIGN;
    align = 512;
    while align <= MAX_ALIGN {
        // SAFETY: `align <= MAX_ALIGN` so `base + align` stays inside `buf`.
        if works(unsafe { base.add(align) }, MAX_ALIGN) {
            memory = align;
            break;
        }
        align <<= 1;
    }
    (request as u32, memory as u32)
}

/// Runs `req` to completion on the calling thread; returns bytes transferred.
pub fn execute(inner: &FileInner, common: &NodeCommon, req: &Request) -> Result<u64, RequestError> {
    let fd = inner.file.as_raw_fd();
    match req.op() {
        RequestOp::Read | RequestOp::Write => {
            if inner.direct
                && !inner
                    .limits
                    .is_aligned(req.offset(), req.len(), req.iovecs())
            {
                bounce_rw(inner, req)
            } else {
                rw(fd, req.op(), req.offset(), req.iovecs(), req.flags().fua)
            }
        }
        RequestOp::Flush => fdatasync(fd).map(|_| 0),
        RequestOp::Discard => discard(inner, req.offset(), req.len()).map(|_| req.len()),
        RequestOp::WriteZeroes => {
            let flags = req.flags();
            let unmap = flags.may_unmap && common.discard == BlockdevDiscardOptions::Unmap;
            write_zeroes(inner, req.offset(), req.len(), unmap, flags.no_fallback)?;
            if req.flags().fua {
                fdatasync(fd)?;
            }
            Ok(req.len())
        }
    }
}

fn fdatasync(fd: RawFd) -> Result<(), RequestError> {
    // SAFETY: fdatasync on an open fd touches no memory.
    sys::check(unsafe { libc::fdatasync(fd) } as isize).map(|_| ())
}

/// Vectored read or write at `offset`, looping over short transfers. A read
/// that meets end-of-file fills the rest with zeroes (as QEMU does).
pub fn rw(
    fd: RawFd,
    op: RequestOp,
    offset: u64,
    iovecs: &[libc::iovec],
    fua: bool,
) -> Result<u64, RequestError> {
    let total: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
    let mut done = 0u64;
    let mut owned: Vec<libc::iovec>;
    let mut iov = iovecs;
    while done < total {
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let off = (offset + done) as libc::off_t;
        // SAFETY: `iov` describes buffers the request's constructor promised
        // valid (for writes when reading, for reads when writing) until
        // completion; the count matches the slice.
        let ret = unsafe {
            match op {
                RequestOp::Read => libc::preadv(fd, iov.as_ptr(), iov.len() as i32, off),
                _ => libc::pwritev2(fd, iov.as_ptr(), iov.len() as i32, off, flags),
            }
        };
        let n = match sys::check(ret) {
            Err(RequestError::Os(libc::EINTR)) => continue,
            r => r?,
        };
        if n == 0 {
            if op == RequestOp::Read {
                sys::zero_iovecs(iovecs, done as usize);
                return Ok(total);
            }
            return Err(RequestError::Os(libc::ENOSPC));
        }
        done += n;
        if done < total {
            owned = advance(iovecs, done as usize);
            iov = &owned;
        }
    }
    Ok(total)
}

/// The iovecs that remain after skipping `skip` bytes (slow path only).
fn advance(iovecs: &[libc::iovec], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iovecs.len());
    for v in iovecs {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            iov_base: (v.iov_base as usize + skip) as *mut libc::c_void,
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    out
}

fn buf_iovec(buf: &mut AlignedBuf, len: usize) -> [libc::iovec; 1] {
    [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    }]
}

/// A read or write that breaks the O_DIRECT alignment, done through an
/// aligned buffer; a write whose ends are unaligned reads the edge blocks
/// first (read-modify-write).
fn bounce_rw(inner: &FileInner, req: &Request) -> Result<u64, RequestError> {
    let fd = inner.file.as_raw_fd();
    let align = u64::from(inner.limits.request_alignment.max(1));
    let start = req.offset() / align * align;
    let end = (req.offset() + req.len()).div_ceil(align) * align;
    let span = (end - start) as usize;
    let head = (req.offset() - start) as usize;
    let mut buf = AlignedBuf::new(span, MAX_ALIGN.max(inner.limits.buf_alignment as usize));
    if req.op() == RequestOp::Read {
        rw(
            fd,
            RequestOp::Read,
            start,
            &buf_iovec(&mut buf, span),
            false,
        )?;
        sys::copy_to_iovecs(
            req.iovecs(),
            0,
            &buf.as_mut_slice()[head..head + req.len() as usize],
        );
        return Ok(req.len());
    }
    let a = align as usize;
    if head != 0 {
        rw(fd, RequestOp::Read, start, &buf_iovec(&mut buf, a), false)?;
    }
    if !(req.offset() + req.len()).is_multiple_of(align) && (span > a || head == 0) {
        let mut tail = AlignedBuf::new(a, MAX_ALIGN);
        rw(
            fd,
            RequestOp::Read,
            end - align,
            &buf_iovec(&mut tail, a),
            false,
        )?;
        buf.as_mut_slice()[span - a..].copy_from_slice(tail.as_mut_slice());
    }
    sys::copy_from_iovecs(
        req.iovecs(),
        0,
        &mut buf.as_mut_slice()[head..head + req.len() as usize],
    );
    rw(
        fd,
        RequestOp::Write,
        start,
        &buf_iovec(&mut buf, span),
        req.flags().fua,
    )?;
    Ok(req.len())
}

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> Result<(), RequestError> {
    // SAFETY: fallocate on an open fd touches no memory.
    let ret = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    sys::check(ret as isize).map(|_| ())
}

fn blk_ioctl(fd: RawFd, op: libc::c_ulong, offset: u64, len: u64) -> Result<(), RequestError> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 through the pointer, which
    // points at `range`, alive for the call.
    let ret = unsafe { libc::ioctl(fd, op, range.as_ptr()) };
    sys::check(ret as isize).map(|_| ())
}

fn is_unsupported(e: &RequestError) -> bool {
    matches!(
        e,
        RequestError::Os(libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Deallocates a range. Discard is advisory: a host that cannot do it
/// reports success, as QEMU's `bdrv_co_pdiscard` does with `-ENOTSUP`.
fn discard(inner: &FileInner, offset: u64, len: u64) -> Result<(), RequestError> {
    let fd = inner.file.as_raw_fd();
    let r = if inner.is_blockdev {
        blk_ioctl(fd, sys::BLKDISCARD, offset, len)
    } else {
        fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    match r {
        Err(e) if is_unsupported(&e) => Ok(()),
        r => r,
    }
}

/// Makes a range read as zeroes: one of the host's cheap ways
/// ([`zero_cheaply`]), else zero buffers written by hand. With
/// `no_fallback` (QEMU's `BDRV_REQ_NO_FALLBACK`) a range the host cannot
/// zero cheaply fails with `Unsupported` instead: "fast" means one
/// fallocate or ioctl that does not write the range's data.
fn write_zeroes(
    inner: &FileInner,
    offset: u64,
    len: u64,
    unmap: bool,
    no_fallback: bool,
) -> Result<(), RequestError> {
    match zero_cheaply(inner, offset, len, unmap, no_fallback) {
        Err(e) if is_unsupported(&e) || e == RequestError::Os(libc::EINVAL) => {
            if no_fallback {
                Err(RequestError::Unsupported)
            } else {
                write_zeroes_by_hand(inner, offset, len)
            }
        }
        r => r,
    }
}

/// The host's cheap ways to zero a range, in QEMU's order
/// (`handle_aiocb_write_zeroes`): punch a hole when allowed, else
/// FALLOC_FL_ZERO_RANGE, else punch a hole and allocate it again. On a
/// block device BLKZEROOUT, which the kernel may carry out by writing
/// zero pages itself: with `no_fallback` only a punched range (the
/// kernel's `BLKDEV_ZERO_NOFALLBACK`) will do, as QEMU refuses
/// BLKZEROOUT there.
fn zero_cheaply(
    inner: &FileInner,
    offset: u64,
    len: u64,
    unmap: bool,
    no_fallback: bool,
) -> Result<(), RequestError> {
    let fd = inner.file.as_raw_fd();
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let punch = || fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len);
    if inner.is_blockdev {
        return match (no_fallback, unmap) {
            (false, _) => blk_ioctl(fd, sys::BLKZEROOUT, offset, len),
            (true, true) => punch(),
            (true, false) => Err(RequestError::Os(libc::EOPNOTSUPP)),
        };
    }
    let zero_range = || fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len);
    if unmap {
        return punch().or_else(|_| zero_range());
    }
    match zero_range() {
        // tmpfs, for one, punches holes but has no ZERO_RANGE.
        Err(e) if is_unsupported(&e) || e == RequestError::Os(libc::EINVAL) => {
            punch().and_then(|()| fallocate(fd, keep, offset, len))
        }
        r => r,
    }
}

fn write_zeroes_by_hand(inner: &FileInner, offset: u64, len: u64) -> Result<(), RequestError> {
    let mut buf = AlignedBuf::new(ZERO_CHUNK.min(len as usize), MAX_ALIGN);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK as u64) as usize;
        let iov = buf_iovec(&mut buf, n);
        // SAFETY: `buf` is ours, zeroed and alive until the request below
        // completes synchronously.
        let req = unsafe { Request::write(offset + done, iov.to_vec(), false) };
        if inner.direct
            && !inner
                .limits
                .is_aligned(req.offset(), req.len(), req.iovecs())
        {
            bounce_rw(inner, &req)?;
        } else {
            rw(
                inner.file.as_raw_fd(),
                RequestOp::Write,
                offset + done,
                &iov,
                false,
            )?;
        }
        done += n as u64;
    }
    Ok(())
}
