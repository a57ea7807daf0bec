//! Helpers for driving a node synchronously from a test: a scratch image,
//! a [`Disk`] that submits requests on one queue and waits for them, and
//! deterministic data patterns.

#![allow(dead_code)]

pub mod qsd;

use std::sync::Arc;

use block::{BlockGraph, BlockNode, Completion, NodeQueue, Request, RequestError, RequestOp};

/// A scratch image file, removed on drop.
pub struct Image {
    file: tempfile::NamedTempFile,
    path: String,
}

impl Image {
    /// A sparse image of `size` bytes (in the target dir: tmpfs refuses O_DIRECT).
    pub fn new(size: u64) -> Self {
        let dir = std::env::var("CARGO_TARGET_TMPDIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string() + "/../target");
        std::fs::create_dir_all(&dir).unwrap();
        let file = tempfile::Builder::new()
            .suffix(".img")
            .tempfile_in(dir)
            .unwrap();
        file.as_file().set_len(size).unwrap();
        let path = file.path().to_str().unwrap().to_string();
        Image { file, path }
    }
    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
    pub fn file(&self) -> &std::fs::File {
        self.file.as_file()
    }
}

/// Deterministic, seed-dependent bytes (never all zero).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_shr(13) as u8 ^ seed | 1)
        .collect()
}

/// A node with one open queue, driven synchronously.
pub struct Disk {
    pub graph: BlockGraph,
    pub node: Arc<dyn BlockNode>,
    pub queue: Box<dyn NodeQueue>,
}

/// A buffer with 4 KiB alignment plus a chosen misalignment.
struct Buf {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, misalign: usize) -> Self {
        let mem = vec![0u8; len + 8192];
        let off = (4096 - mem.as_ptr() as usize % 4096) % 4096 + misalign;
        Buf { mem, off, len }
    }
    fn from(data: &[u8], misalign: usize) -> Self {
        let mut b = Self::new(data.len(), misalign);
        b.bytes_mut().copy_from_slice(data);
        b
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }
    fn bytes(&self) -> &[u8] {
        &self.mem[self.off..self.off + self.len]
    }
    /// Iovecs cut at `splits` (lengths; the rest goes in a last segment).
    fn iovecs(&mut self, splits: &[usize]) -> Vec<libc::iovec> {
        let base = self.bytes_mut().as_mut_ptr();
        let mut out = Vec::new();
        let mut at = 0;
        for &s in splits.iter().chain(std::iter::once(&usize::MAX)) {
            let n = s.min(self.len - at);
            if n == 0 {
                break;
            }
            // SAFETY: `at + n <= len`: inside the buffer.
            let p = unsafe { base.add(at) };
            out.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: n,
            });
            at += n;
        }
        out
    }
}

impl Disk {
    pub fn new(graph: BlockGraph, node: Arc<dyn BlockNode>) -> Self {
        let queue = node.open_queue().expect("open queue");
        Disk { graph, node, queue }
    }

    /// Submits and waits for all of `reqs`; results in submission order.
    fn run(&mut self, reqs: Vec<Request>) -> Vec<Result<u64, RequestError>> {
        let n = reqs.len();
        let mut results = vec![Err(RequestError::QueueFull); n];
        let mut waiting = 0;
        for (i, r) in reqs.into_iter().enumerate() {
            match self.queue.submit(r.with_user_data(i as u64)) {
                Ok(()) => waiting += 1,
                Err(e) => results[i] = Err(e.error),
            }
        }
        let mut done: Vec<Completion> = Vec::new();
        while waiting > 0 {
            let got = self.queue.wait_completions(1, &mut done);
            assert!(got > 0 || self.queue.in_flight() > 0, "queue lost requests");
            for c in done.drain(..) {
                results[c.request.user_data as usize] = c.result;
                waiting -= 1;
            }
        }
        assert_eq!(self.queue.in_flight(), 0);
        results
    }

    fn one(&mut self, r: Request) -> Result<u64, RequestError> {
        self.run(vec![r]).remove(0)
    }

    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<u64, RequestError> {
        self.writev(off, data, &[])
    }
    pub fn write_fua(&mut self, off: u64, data: &[u8]) -> Result<u64, RequestError> {
        let mut b = Buf::from(data, 0);
        // SAFETY: `b` outlives the synchronous request.
        self.one(unsafe { Request::write(off, b.iovecs(&[]), true) })
    }
    pub fn write_misaligned(&mut self, off: u64, data: &[u8]) -> Result<u64, RequestError> {
        let mut b = Buf::from(data, 3);
        // SAFETY: `b` outlives the synchronous request.
        self.one(unsafe { Request::write(off, b.iovecs(&[]), false) })
    }
    pub fn writev(&mut self, off: u64, data: &[u8], splits: &[usize]) -> Result<u64, RequestError> {
        let mut b = Buf::from(data, 0);
        // SAFETY: `b` outlives the synchronous request.
        self.one(unsafe { Request::write(off, b.iovecs(splits), false) })
    }
    pub fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, RequestError> {
        self.readv(off, len, &[])
    }
    pub fn read_misaligned(&mut self, off: u64, len: usize) -> Result<Vec<u8>, RequestError> {
        let mut b = Buf::new(len, 5);
        // SAFETY: `b` outlives the synchronous request.
        self.one(unsafe { Request::read(off, b.iovecs(&[])) })?;
        Ok(b.bytes().to_vec())
    }
    pub fn readv(
        &mut self,
        off: u64,
        len: usize,
        splits: &[usize],
    ) -> Result<Vec<u8>, RequestError> {
        let mut b = Buf::new(len, 0);
        // SAFETY: `b` outlives the synchronous request.
        self.one(unsafe { Request::read(off, b.iovecs(splits)) })?;
        Ok(b.bytes().to_vec())
    }
    pub fn op(&mut self, op: RequestOp, off: u64, len: u64) -> Result<u64, RequestError> {
        self.one(match op {
            RequestOp::Flush => Request::flush(),
            RequestOp::Discard => Request::discard(off, len),
            RequestOp::WriteZeroes => Request::write_zeroes(off, len, false),
            _ => panic!("use read/write"),
        })
    }
    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> Result<u64, RequestError> {
        self.one(Request::write_zeroes(off, len, unmap))
    }
    /// All writes in flight at once.
    pub fn write_many(&mut self, writes: &[(u64, &[u8])]) -> Vec<Result<u64, RequestError>> {
        let mut bufs: Vec<Buf> = writes.iter().map(|(_, d)| Buf::from(d, 0)).collect();
        let reqs = writes
            .iter()
            .zip(bufs.iter_mut())
            // SAFETY: `bufs` outlives `run`, which waits for every request.
            .map(|((off, _), b)| unsafe { Request::write(*off, b.iovecs(&[]), false) })
            .collect();
        self.run(reqs)
    }
    /// All reads in flight at once.
    pub fn read_many(&mut self, offsets: &[u64], len: usize) -> Vec<Result<Vec<u8>, RequestError>> {
        let mut bufs: Vec<Buf> = offsets.iter().map(|_| Buf::new(len, 0)).collect();
        let reqs = offsets
            .iter()
            .zip(bufs.iter_mut())
            // SAFETY: `bufs` outlives `run`, which waits for every request.
            .map(|(off, b)| unsafe { Request::read(*off, b.iovecs(&[])) })
            .collect();
        let results = self.run(reqs);
        results
            .into_iter()
            .zip(bufs)
            .map(|(r, b)| r.map(|_| b.bytes().to_vec()))
            .collect()
    }
}
