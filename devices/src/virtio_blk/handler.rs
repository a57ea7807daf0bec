//! The virtio-blk queue handler: one per virtqueue, owning its node queue
//! and its in-flight table. It turns available chains into block requests
//! whose iovecs point straight into guest RAM, and finished block requests
//! into used-ring entries. The VMM's devices and the vhost-user-blk export
//! both drive it; they differ only in how kicks and interrupts travel.
//!
//! A bad request is completed with an error status and the loop goes on;
//! a chain without even a status byte is returned with a used length of 0.
//! Nothing here blocks, and nothing allocates once the tables are warm.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::ErrorOutcome;
use block::{
    BackendQueue, BlockBackend, BlockError, BlockNode, Completion, IovecPool, NodeQueue, Request,
    RequestError, RequestOp,
};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::config::{BlkOptions, MAX_DISCARD_SEG, SECTOR_SIZE};
use super::inflight::InflightQueue;
use super::request::{
    chain_at, read_range, BlkRequest, BlkRequestType, VirtioBlkError, DISCARD_RANGE_LEN,
};
use super::GuestMem;

/// Chains started between two looks at what the node finished. A whole
/// ring started, then completed, then announced at once puts the driver
/// in lock-step with the device: it sleeps until the one interrupt, then
/// refills while the device sleeps. Completing and announcing every few
/// chains lets a driver reap and refill while the rest of the ring is
/// being served.
pub const SUBMIT_CHUNK: usize = 8;

/// Length of the GET_ID string (5.2.6).
const ID_LEN: usize = 20;

/// Why a queue stopped being served.
#[derive(Debug, thiserror::Error)]
pub enum BlkHandlerError {
    /// The driver's avail index ran more than a queue's worth ahead.
    #[error("the driver's avail index ran ahead of the queue")]
    AvailRunaway,
    /// The rings are not in guest memory.
    #[error("virtqueue rings are not accessible")]
    Queue(#[source] virtio_queue::Error),
    /// The avail index says there are entries, but none can be popped.
    #[error("the driver's avail ring has entries that cannot be read")]
    AvailUnreadable,
}

#[derive(Default)]
struct Slot {
    req: BlkRequest,
    /// Keeps guest RAM mapped while the node may touch it.
    mem: Option<Arc<GuestMem>>,
    pending: u32,
    status: u8,
    used_len: u32,
    /// A node request failed with `stop`: keep the chain, send it again
    /// on resume.
    retry: bool,
}

/// Called on the I/O thread for each request the node failed with a host
/// error (not for requests the guest got wrong), with what was done about
/// it: QMP's `BLOCK_IO_ERROR`.
pub type IoErrorHook = Arc<dyn Fn(RequestOp, &RequestError, ErrorOutcome) + Send + Sync>;

/// Counters a test or QMP can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkQueueCounters {
    /// Chains popped from the avail ring.
    pub requests: u64,
    /// Chains completed with an error status.
    pub errors: u64,
}

/// One virtqueue's handler.
pub struct BlkQueueHandler {
    backend: Arc<BlockBackend>,
    queue: BackendQueue,
    serial: [u8; ID_LEN],
    read_only: bool,
    opts: BlkOptions,
    slots: Vec<Slot>,
    free: Vec<u32>,
    done: Vec<Completion>,
    iovecs: IovecPool,
    counters: BlkQueueCounters,
    writethrough: bool,
    io_error: Option<IoErrorHook>,
    /// The vhost-user frontend's record of heads in flight, if it keeps one.
    inflight: Option<InflightQueue>,
    /// Chains kept by a `stop` error, sent again on resume.
    stopped: Vec<u32>,
}

impl BlkQueueHandler {
    /// A handler serving `backend`'s node through a queue of its own.
    pub fn new(backend: Arc<BlockBackend>, opts: &BlkOptions) -> Result<Self, BlockError> {
        let mut serial = [0u8; ID_LEN];
        let s = opts.serial.as_bytes();
        serial[..s.len().min(ID_LEN)].copy_from_slice(&s[..s.len().min(ID_LEN)]);
        Ok(BlkQueueHandler {
            read_only: opts.read_only || backend.read_only(),
            queue: backend.open_queue()?,
            backend,
            serial,
            opts: opts.clone(),
            slots: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            iovecs: IovecPool::default(),
            counters: BlkQueueCounters::default(),
            writethrough: false,
            io_error: None,
            inflight: None,
            stopped: Vec::new(),
        })
    }

    /// Keeps `record` of the heads in flight from now on (vhost-user
    /// inflight tracking; `None`: none).
    pub fn set_inflight(&mut self, record: Option<InflightQueue>) {
        self.inflight = record;
    }

    /// Starts the chains at `heads` again (inflight heads a previous
    /// backend took and did not return), in order. Returns whether the
    /// guest should be notified now.
    pub fn resubmit(
        &mut self,
        heads: &[u16],
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> Result<bool, BlkHandlerError> {
        let mut used = false;
        for &head in heads {
            let descs = chain_at(mem, GuestAddress(queue.desc_table()), queue.size(), head)
                .unwrap_or_default();
            used |= self.start_with(queue, mem, |req, mem| {
                req.parse_descriptors(head, descs, mem)
            });
        }
        self.end_round(queue, mem, used)
    }

    /// The node queue's completion fd, to watch in the thread's epoll.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.queue.completion_fd()
    }

    /// Requests handed to the node and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Counters.
    pub fn counters(&self) -> BlkQueueCounters {
        self.counters
    }

    /// Pops every available chain and submits it (5.2.6). With `rearm`,
    /// the driver's kicks are turned off while popping and back on after
    /// (checking once more for entries that raced with that); without, a
    /// poller owns the kick state and it is left alone. Returns whether
    /// the guest should be notified now.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
        rearm: bool,
        notify: &mut dyn FnMut(),
    ) -> Result<bool, BlkHandlerError> {
        check_avail(queue, mem)?;
        if self.is_stopped() {
            // `stop`: the chains wait in the ring until resume.
            return self.end_round(queue, mem, false);
        }
        // One ring's worth per call: a driver that refills as fast as the
        // chunks complete must not keep the thread from its other queues.
        let budget = usize::from(queue.size());
        let mut used = false;
        let mut started = 0;
        // A pass that pops nothing while the avail index says there is
        // more: once, the driver may have published as we looked; twice,
        // the entries cannot be popped (virtio-queue pops nothing from an
        // avail ring at address 0, nor an entry it cannot read), and
        // trying again would hold the thread forever.
        let mut stalled = false;
        'ring: loop {
            if rearm {
                queue
                    .disable_notification(mem.as_ref())
                    .map_err(BlkHandlerError::Queue)?;
            }
            let before = queue.next_avail();
            while let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) {
                used |= self.start(chain, queue, mem);
                started += 1;
                if started % SUBMIT_CHUNK == 0 {
                    // Reap before kicking: what the node finished inline
                    // is taken without its eventfd being written.
                    used |= self.reap(queue, mem);
                    self.queue.kick();
                    if used
                        && queue
                            .needs_notification(mem.as_ref())
                            .map_err(BlkHandlerError::Queue)?
                    {
                        notify();
                    }
                    used = false;
                }
                if started >= budget {
                    if rearm {
                        // The caller comes back for the rest.
                        queue
                            .enable_notification(mem.as_ref())
                            .map_err(BlkHandlerError::Queue)?;
                    }
                    break 'ring;
                }
            }
            let popped = queue.next_avail() != before;
            if !rearm && popped {
                // A poller owns the kick state and comes back for more.
                break;
            }
            let more = if rearm {
                queue
                    .enable_notification(mem.as_ref())
                    .map_err(BlkHandlerError::Queue)?
            } else {
                queue
                    .avail_idx(mem.as_ref(), Ordering::Acquire)
                    .map_err(BlkHandlerError::Queue)?
                    .0
                    != queue.next_avail()
            };
            if !more {
                break;
            }
            if popped {
                stalled = false;
            } else if stalled {
                // What this round started still goes to the node.
                self.end_round(queue, mem, used)?;
                return Err(BlkHandlerError::AvailUnreadable);
            } else {
                stalled = true;
            }
        }
        self.end_round(queue, mem, used)
    }

    /// Ends a round of starting chains: takes what the node finished
    /// inline, kicks it, and says whether the guest should be notified
    /// (`used`: chains were returned earlier in the round).
    fn end_round(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        used: bool,
    ) -> Result<bool, BlkHandlerError> {
        let used = self.reap(queue, mem) | used;
        self.queue.kick();
        Ok(used
            && queue
                .needs_notification(mem)
                .map_err(BlkHandlerError::Queue)?)
    }

    /// Completes what the node finished. Returns whether to notify.
    pub fn process_completions(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<bool, BlkHandlerError> {
        Ok(self.reap(queue, mem)
            && queue
                .needs_notification(mem)
                .map_err(BlkHandlerError::Queue)?)
    }

    /// Puts what the node finished in the used ring; returns whether a
    /// chain was returned.
    fn reap(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut done = std::mem::take(&mut self.done);
        self.queue.poll_completions(&mut done);
        let mut finished = false;
        for c in done.drain(..) {
            finished |= self.complete_one(c, queue, mem);
        }
        self.done = done;
        finished
    }

    /// Waits for every in-flight request and completes it (device stop,
    /// reset, shutdown).
    pub fn drain(&mut self, queue: &mut Queue, mem: &GuestMem) {
        let mut done = std::mem::take(&mut self.done);
        while self.in_flight() > 0 && self.queue.in_flight() > 0 {
            self.queue.wait_completions(1, &mut done);
            self.complete(&mut done, queue, mem);
        }
        self.done = done;
    }

    /// Flushes the node through this handler's own queue and waits for it
    /// (shutdown, after [`BlkQueueHandler::drain`]: nothing else is in
    /// flight). Read-only devices have nothing to flush.
    pub fn flush_node(&mut self) -> Result<(), RequestError> {
        /// Tags the flush apart from guest requests (slot indices).
        const FLUSH_TAG: u64 = u64::MAX;
        if self.read_only {
            return Ok(());
        }
        let mut req = Request::flush();
        req.user_data = FLUSH_TAG;
        self.queue.submit(req).map_err(|e| e.error)?;
        let mut done = Vec::new();
        loop {
            self.queue.wait_completions(1, &mut done);
            if let Some(i) = done.iter().position(|c| c.request.user_data == FLUSH_TAG) {
                return done.swap_remove(i).result.map(|_| ());
            }
            if self.queue.in_flight() == 0 {
                return Err(RequestError::Os(libc::EIO));
            }
        }
    }

    /// Waits for every in-flight request and forgets it without touching
    /// the rings: the driver that owned them is gone (frontend disconnect).
    pub fn abandon(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        while self.in_flight() > 0 && self.queue.in_flight() > 0 {
            self.queue.wait_completions(1, &mut done);
            for mut c in done.drain(..) {
                self.iovecs.give(c.request.take_iovecs());
                let idx = c.request.user_data as usize;
                if let Some(slot) = self.slots.get_mut(idx) {
                    slot.pending = slot.pending.saturating_sub(1);
                    if slot.pending == 0 {
                        slot.mem = None;
                        self.free.push(idx as u32);
                    }
                }
            }
        }
        self.done = done;
    }

    /// Whether the node has finished requests waiting (no system call
    /// where the engine can tell; see `NodeQueue::completions_ready`).
    pub fn completions_ready(&mut self) -> bool {
        self.in_flight() > 0 && self.queue.completions_ready()
    }

    /// Lets the node queue drop memory the registrar no longer has (see
    /// `NodeQueue::sync_memory`).
    pub fn sync_memory(&mut self) {
        self.queue.sync_memory();
    }

    /// The device's I/O status, if it has one (`stop` needs it).
    pub fn io_status(&self) -> Option<&Arc<super::IoStatus>> {
        self.backend.io_status()
    }

    /// Whether the device is stopped by a `stop` error.
    pub fn is_stopped(&self) -> bool {
        self.backend.io_status().is_some_and(|s| s.is_stopped())
    }

    /// Chains kept by `stop` errors, waiting for resume.
    pub fn stopped_chains(&self) -> usize {
        self.stopped.len()
    }

    /// After a resume: sends the kept chains again (in the order they
    /// failed). Returns whether the guest should be notified now.
    pub fn resume(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> Result<bool, BlkHandlerError> {
        if self.is_stopped() {
            return Ok(false);
        }
        let mut used = false;
        for idx in std::mem::take(&mut self.stopped) {
            let idx = idx as usize;
            let slot = &mut self.slots[idx];
            slot.retry = false;
            slot.status = VIRTIO_BLK_S_OK as u8;
            slot.pending = 0;
            let r = self.submit(idx, mem);
            let slot = &mut self.slots[idx];
            if let Err(e) = r {
                slot.status = e.status();
            }
            if self.slots[idx].pending == 0 {
                self.finish(idx, queue, mem);
                used = true;
            }
        }
        self.end_round(queue, mem, used)
    }

    /// Reports host I/O errors to `hook` from now on.
    pub fn set_io_error_hook(&mut self, hook: Option<IoErrorHook>) {
        self.io_error = hook;
    }

    /// Write-through mode (CONFIG_WCE with writeback off): every write is
    /// made durable before it completes.
    pub fn set_writethrough(&mut self, on: bool) {
        self.writethrough = on;
    }

    fn complete(&mut self, done: &mut Vec<Completion>, queue: &mut Queue, mem: &GuestMem) {
        for c in done.drain(..) {
            self.complete_one(c, queue, mem);
        }
    }

    /// Accounts one node completion; returns whether it finished its
    /// chain (put it in the used ring).
    fn complete_one(&mut self, mut c: Completion, queue: &mut Queue, mem: &GuestMem) -> bool {
        let idx = c.request.user_data as usize;
        self.iovecs.give(c.request.take_iovecs());
        let Some(slot) = self.slots.get_mut(idx) else {
            return false;
        };
        if let Err(e) = &c.result {
            let op = c.request.op();
            // Only host errors follow the policy; what the guest got
            // wrong (out of range, read-only) is reported. Without a
            // status to stop, `stop` reports.
            let outcome = self.backend.error_outcome(op, e);
            match outcome {
                ErrorOutcome::Report => slot.status = VirtioBlkError::Io.status(),
                ErrorOutcome::Ignore => {}
                ErrorOutcome::Stop => slot.retry = true,
            }
            if let (Some(hook), RequestError::Os(_)) = (&self.io_error, e) {
                hook(op, e, outcome);
            }
        }
        slot.pending = slot.pending.saturating_sub(1);
        if slot.pending == 0 {
            if slot.retry {
                self.stopped.push(idx as u32);
                return false;
            }
            self.finish(idx, queue, mem);
            return true;
        }
        false
    }

    fn take_slot(&mut self) -> usize {
        match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        }
    }

    /// Starts one chain. Returns whether it was completed at once.
    fn start(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMem>,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> bool {
        self.start_with(queue, mem, |req, mem| req.parse(chain, mem))
    }

    /// Starts the chain `parse` reads into a request.
    fn start_with(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
        parse: impl FnOnce(&mut BlkRequest, &GuestMem) -> Result<(), VirtioBlkError>,
    ) -> bool {
        self.counters.requests += 1;
        let idx = self.take_slot();
        let slot = &mut self.slots[idx];
        slot.status = VIRTIO_BLK_S_OK as u8;
        slot.used_len = 1;
        slot.pending = 0;
        let parsed = parse(&mut slot.req, mem);
        if let Some(record) = &mut self.inflight {
            record.begin(slot.req.head);
        }
        let result = parsed.and_then(|()| self.submit(idx, mem));
        match result {
            Ok(()) if self.slots[idx].pending > 0 => {
                self.slots[idx].mem = Some(mem.clone());
                false
            }
            Ok(()) => {
                self.finish(idx, queue, mem);
                true
            }
            Err(e) => {
                let slot = &mut self.slots[idx];
                slot.status = e.status();
                if slot.pending == 0 {
                    self.finish(idx, queue, mem);
                    true
                } else {
                    // Some ranges were submitted: complete when they finish.
                    self.slots[idx].mem = Some(mem.clone());
                    false
                }
            }
        }
    }

    fn submit(&mut self, idx: usize, mem: &GuestMem) -> Result<(), VirtioBlkError> {
        let kind = self.slots[idx]
            .req
            .kind
            .unwrap_or(BlkRequestType::Unsupported(u32::MAX));
        match kind {
            BlkRequestType::In | BlkRequestType::Out => {
                let req = &self.slots[idx].req;
                let write = kind == BlkRequestType::Out;
                if write && self.read_only {
                    return Err(VirtioBlkError::Io);
                }
                let mut iov = self.iovecs.take();
                for s in &req.data {
                    for slice in mem.get_slices(s.addr, s.len as usize) {
                        let slice = slice.map_err(|_| VirtioBlkError::Io)?;
                        iov.push(libc::iovec {
                            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                            iov_len: slice.len(),
                        });
                    }
                }
                let offset = req.sector * SECTOR_SIZE;
                if !write {
                    self.slots[idx].used_len = (req.data_len + 1).min(u64::from(u32::MAX)) as u32;
                }
                // SAFETY: the iovecs point into guest RAM mapped by `mem`;
                // the slot keeps an `Arc` of that mapping until the request
                // completes, so the memory stays valid.
                let r = unsafe {
                    if write {
                        Request::write(offset, iov, self.writethrough)
                    } else {
                        Request::read(offset, iov)
                    }
                };
                self.push(idx, r)
            }
            BlkRequestType::Flush => self.push(idx, Request::flush()),
            BlkRequestType::GetId => self.get_id(idx, mem),
            BlkRequestType::Discard | BlkRequestType::WriteZeroes => self.ranges(idx, kind, mem),
            BlkRequestType::Unsupported(_) => Err(VirtioBlkError::Unsupported),
        }
    }

    /// Hands a block request for slot `idx` to the node.
    fn push(&mut self, idx: usize, r: Request) -> Result<(), VirtioBlkError> {
        match self.queue.submit(r.with_user_data(idx as u64)) {
            Ok(()) => {
                self.slots[idx].pending += 1;
                Ok(())
            }
            Err(e) if matches!(e.error, RequestError::Os(_)) => {
                // A host error at submission (an NBD node whose server
                // went away) follows werror/rerror as one at completion
                // does: it is completed through the queue.
                self.queue.complete_now(Completion {
                    result: Err(e.error),
                    request: e.request,
                });
                self.slots[idx].pending += 1;
                Ok(())
            }
            Err(mut e) => {
                self.iovecs.give(e.request.take_iovecs());
                Err(match e.error {
                    RequestError::Unsupported => VirtioBlkError::Unsupported,
                    _ => VirtioBlkError::Io,
                })
            }
        }
    }

    fn get_id(&mut self, idx: usize, mem: &GuestMem) -> Result<(), VirtioBlkError> {
        let req = &self.slots[idx].req;
        let mut written = 0usize;
        for s in &req.data {
            if written == ID_LEN {
                break;
            }
            let n = (s.len as usize).min(ID_LEN - written);
            mem.write_slice(&self.serial[written..written + n], s.addr)
                .map_err(|_| VirtioBlkError::Io)?;
            written += n;
        }
        self.slots[idx].used_len = written as u32 + 1;
        Ok(())
    }

    fn ranges(
        &mut self,
        idx: usize,
        kind: BlkRequestType,
        mem: &GuestMem,
    ) -> Result<(), VirtioBlkError> {
        let zeroes = kind == BlkRequestType::WriteZeroes;
        let offered = if zeroes {
            self.opts.write_zeroes
        } else {
            self.opts.discard
        };
        if !offered || self.read_only {
            return Err(if self.read_only {
                VirtioBlkError::Io
            } else {
                VirtioBlkError::Unsupported
            });
        }
        let len = self.slots[idx].req.data_len;
        let n = len / DISCARD_RANGE_LEN as u64;
        if !len.is_multiple_of(DISCARD_RANGE_LEN as u64) || n == 0 || n > u64::from(MAX_DISCARD_SEG)
        {
            return Err(VirtioBlkError::BadSegment);
        }
        for i in 0..n as usize {
            let r = read_range(&self.slots[idx].req.data, i, mem)?;
            let (offset, bytes) = r
                .sector
                .checked_mul(SECTOR_SIZE)
                .zip(u64::from(r.num_sectors).checked_mul(SECTOR_SIZE))
                .ok_or(VirtioBlkError::BadSector)?;
            if !zeroes && r.flags != 0 {
                return Err(VirtioBlkError::Unsupported);
            }
            let req = if zeroes {
                Request::write_zeroes(offset, bytes, r.flags & 1 != 0)
            } else {
                Request::discard(offset, bytes)
            };
            self.push(idx, req)?;
        }
        Ok(())
    }

    /// Writes the status and returns the chain to the driver.
    fn finish(&mut self, idx: usize, queue: &mut Queue, mem: &GuestMem) {
        let slot = &mut self.slots[idx];
        if slot.status != VIRTIO_BLK_S_OK as u8 {
            self.counters.errors += 1;
        }
        let len = match slot.req.status {
            Some(addr) if mem.write_obj(slot.status, addr).is_ok() => slot.used_len,
            _ => 0,
        };
        let head = slot.req.head;
        if let Some(record) = &self.inflight {
            record.pre_put(head);
        }
        // A failure here means the used ring is not in guest memory; the
        // next kick's avail check reports the queue broken.
        let _ = queue.add_used(mem, head, len);
        if let Some(record) = &self.inflight {
            record.post_put(head, queue.next_used());
        }
        slot.mem = None;
        self.free.push(idx as u32);
    }

    /// The node behind this queue.
    pub fn node(&self) -> &Arc<dyn BlockNode> {
        self.backend.node()
    }

    /// The user's attachment to the node.
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.backend
    }
}

/// Refuses a driver whose avail index is more than a queue ahead (the
/// device must not loop over stale entries: vm-virtio PR #196).
fn check_avail(queue: &Queue, mem: &GuestMem) -> Result<(), BlkHandlerError> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(BlkHandlerError::Queue)?;
    let ahead = avail - std::num::Wrapping(queue.next_avail());
    if ahead.0 > queue.size() {
        return Err(BlkHandlerError::AvailRunaway);
    }
    Ok(())
}
