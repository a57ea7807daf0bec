//! The `qcow2` driver opening a hostile image: the input's first 16 bytes
//! drive the operations, the rest is the image file. The image is opened
//! read-write (read-only when that is refused) through a `file` node on a
//! memfd, then read, written, zeroed, discarded, flushed, queried for
//! block status and grown at offsets the operation bytes pick. Nothing
//! may panic, write outside its buffers or hang: a bad image must give
//! errors.
//!
//! The file node uses `aio=io_uring`: its queue starts 2 slow-path
//! threads where `aio=threads` starts 16, and thread creation was most of
//! an execution (295 executions/s with threads, about 1,100 with io_uring;
//! io_uring also reaches more of the driver).

#![no_main]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};

use block::{BlockGraph, Completion, NodeQueue, Request};
use libfuzzer_sys::fuzz_target;

/// Operation bytes at the start of the input.
const OPS: usize = 16;
/// The largest transfer one operation makes.
const MAX_IO: u64 = 256 << 10;

/// Runs one request to completion on `q`.
fn run(q: &mut dyn NodeQueue, req: Request) {
    if q.submit(req).is_err() {
        return;
    }
    let mut out: Vec<Completion> = Vec::new();
    while out.is_empty() && q.in_flight() > 0 {
        q.wait_completions(1, &mut out);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < OPS + 72 {
        return;
    }
    let (ops, image) = data.split_at(OPS);
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"qcow2-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor nobody else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(image).expect("write the image");
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let mut g = BlockGraph::new();
    let arg = format!(
        "qcow2,node-name=q0,discard=unmap,backing=null,file.driver=file,file.filename={path},file.locking=off,file.aio=io_uring"
    );
    let opts = qapi::parse_blockdev(&arg).expect("options parse");
    let node = match g.add(&opts) {
        Ok(n) => n,
        Err(e) => {
            let _ = e.to_string();
            let ro = qapi::parse_blockdev(&format!("{arg},read-only=on")).expect("options parse");
            match BlockGraph::new().add(&ro) {
                Ok(n) => n,
                Err(e) => {
                    let _ = e.to_string();
                    return;
                }
            }
        }
    };
    let cap = node.capacity();
    if cap == 0 {
        return;
    }
    let Ok(mut q) = node.open_queue() else { return };
    let mut buf = vec![0u8; MAX_IO as usize];
    for pair in ops.chunks_exact(2) {
        let (op, arg) = (pair[0], u64::from(pair[1]));
        // Offsets spread over the whole disk, lengths up to MAX_IO.
        let off = (cap / 256).saturating_mul(arg).min(cap - 1) / 512 * 512;
        let len = (u64::from(op >> 3) * 4096 + 512).min(MAX_IO).min(cap - off);
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len as usize,
        }];
        let req = match op & 7 {
            // SAFETY: `buf` outlives `run`, which waits for the request.
            0 | 1 => unsafe { Request::read(off, iov) },
            // SAFETY: as above.
            2 | 3 => unsafe { Request::write(off, iov, op & 8 != 0) },
            4 => Request::write_zeroes(off, len, op & 8 != 0),
            5 => Request::discard(off, len),
            6 => Request::flush(),
            _ => {
                let _ = node.block_status(off, len);
                let _ = node.truncate(cap.saturating_add(len * 64) / 512 * 512);
                continue;
            }
        };
        run(q.as_mut(), req);
    }
});
