//! One frontend connection of a vhost-user-blk export: the vhost-user
//! requests (the `vhost` crate parses and answers them, this file holds
//! their meaning), the frontend's memory table, and the vrings, each served
//! by a [`QueueWorker`] on an IOThread while it is started and enabled.
//!
//! The session runs on the export's control thread; the data plane never
//! sees it. A vring's worker is built when the ring has a size, addresses,
//! memory, a kick and is enabled, and taken back off its IOThread when the
//! frontend stops it (GET_VRING_BASE, which returns the next avail index
//! after completing what is in flight), disables it, or goes away (then
//! in-flight requests finish but their results are dropped: the rings
//! belong to a driver that is gone). Memory is mapped once per memory-table
//! generation; workers get the new generation by value.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use event_manager::SubscriberId;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::memory::{FrontendMemory, MAX_MEM_SLOTS};
use super::{lock, ExportShared};
use crate::iothread::IoThread;
use crate::virtio::{VirtioInterrupt, VirtioIrq};
use crate::virtio_blk::config::{self, CONFIG_LEN, WRITEBACK_OFFSET};
use crate::virtio_blk::inflight::{queue_area_size, InflightMap};
use crate::virtio_blk::{QueueWorker, QueueWorkerConfig};

/// The frontend's call fd as a queue's interrupt.
struct CallInterrupt {
    call: EventFd,
}

impl VirtioInterrupt for CallInterrupt {
    fn signal(&self, _irq: VirtioIrq) -> std::io::Result<()> {
        self.call.write(1)
    }

    fn set_needs_reset(&self) {
        // vhost-user has no such signal: the worker has logged the error
        // and stopped the queue until the frontend resets it.
    }
}

/// One vring as the frontend configured it.
struct Vring {
    size: u16,
    /// Descriptor, used and avail ring addresses, in the frontend's space.
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    enabled: bool,
    /// The worker serving the ring, and the thread it runs on.
    worker: Option<(Arc<IoThread>, SubscriberId)>,
}

/// How a running worker is stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Complete in-flight requests into the ring and signal the frontend.
    Drain,
    /// The frontend is gone: wait for in-flight requests, drop results.
    Abandon,
}

/// One frontend connection.
pub(super) struct Session {
    shared: Arc<ExportShared>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    memory: FrontendMemory,
    vrings: Vec<Vring>,
    /// The frontend's inflight area and the queue size it was laid out
    /// for (INFLIGHT_SHMFD).
    inflight: Option<(Arc<InflightMap>, u16)>,
}

/// A request the session refuses. Every refusal of the session is one of
/// these, so that [`refused`] can tell it from the `vhost` crate's own
/// rejections.
pub(super) fn invalid(what: &str) -> VuError {
    VuError::ReqHandlerError(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        what.to_string(),
    ))
}

/// Whether `e` is the session's refusal of a request, which the `vhost`
/// crate has answered if an answer was due (REPLY_ACK, or the failure
/// reply of a GET_CONFIG); the session's refusals of requests whose
/// answer the crate would not send end the connection instead
/// ([`Session::unanswerable`]). The crate's own rejections
/// (`InvalidParam`, `InactiveFeature`, `InactiveOperation`, ...) come
/// before any answer.
pub(super) fn refused(e: &VuError) -> bool {
    matches!(
        e,
        VuError::ReqHandlerError(_) | VuError::InvalidOperation(_)
    )
}

/// Takes `file` as an eventfd, refusing anything else (an untrusted
/// frontend could pass a pipe or a regular file, which would make the
/// IOThread's epoll spin or fail).
fn eventfd(file: File) -> VuResult<EventFd> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(VuError::ReqHandlerError)?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(invalid("a vring kick or call fd must be an eventfd"));
    }
    // SAFETY: `into_raw_fd` hands over sole ownership of an open eventfd,
    // which the EventFd now owns and closes.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

impl Session {
    pub(super) fn new(shared: Arc<ExportShared>) -> Self {
        let size = shared.opts.queue_size;
        let vrings = (0..shared.opts.num_queues)
            .map(|_| Vring {
                size,
                addrs: None,
                base: 0,
                kick: None,
                call: None,
                enabled: false,
                worker: None,
            })
            .collect();
        Session {
            memory: FrontendMemory::new(shared.registrar.clone()),
            shared,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            vrings,
            inflight: None,
        }
    }

    /// A new, zeroed inflight area for `inflight`'s queues (GET_INFLIGHT_FD).
    fn new_inflight(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let len = self.inflight_len(inflight)?;
        // SAFETY: a NUL-terminated name; memfd_create returns a new fd or
        // -1 and touches no memory of ours.
        let fd = unsafe { libc::memfd_create(c"blkvm-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(VuError::ReqHandlerError(std::io::Error::last_os_error()));
        }
        // SAFETY: the fd was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(VuError::ReqHandlerError)?;
        let map = InflightMap::map(file.as_fd(), 0, len).map_err(VuError::ReqHandlerError)?;
        self.inflight = Some((Arc::new(map), inflight.queue_size));
        Ok((
            VhostUserInflight {
                mmap_size: len as u64,
                mmap_offset: 0,
                num_queues: inflight.num_queues,
                queue_size: inflight.queue_size,
            },
            file,
        ))
    }

    /// A request that needs an answer failed: the `vhost` crate sends no
    /// reply then, and the frontend would wait forever, so the failure is
    /// logged and the connection ended instead.
    fn unanswerable(&self, e: VuError) -> VuError {
        eprintln!(
            "export '{}': frontend request refused: {e}; closing the connection",
            self.shared.id
        );
        VuError::InvalidMessage
    }

    /// Bytes of the inflight area `inflight` describes, checked against
    /// the export's queues (untrusted sizes).
    fn inflight_len(&self, inflight: &VhostUserInflight) -> VuResult<usize> {
        let (nq, qs) = (inflight.num_queues, inflight.queue_size);
        if nq == 0 || usize::from(nq) > self.vrings.len() {
            return Err(invalid("inflight area for more queues than the export has"));
        }
        if qs == 0 || qs > config::MAX_QUEUE_SIZE {
            return Err(invalid("inflight area for an invalid queue size"));
        }
        Ok(usize::from(nq) * queue_area_size(qs))
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid("no such vring"))
    }

    /// Starts or stops vring `i`'s worker to match what the frontend asked.
    fn reconcile(&mut self, i: usize) -> VuResult<()> {
        let v = &self.vrings[i];
        let want = v.enabled
            && v.kick.is_some()
            && v.addrs.is_some()
            && self.memory.current().is_some()
            && !self.shared.stopping.load(Ordering::SeqCst);
        match (want, v.worker.is_some()) {
            (true, false) => self.start_worker(i),
            (false, true) => {
                self.stop_worker(i, Stop::Drain);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn start_worker(&mut self, i: usize) -> VuResult<()> {
        let shared = self.shared.clone();
        let mem = self
            .memory
            .current()
            .cloned()
            .ok_or_else(|| invalid("no memory table"))?;
        let v = &self.vrings[i];
        let (desc, used, avail) = v.addrs.ok_or_else(|| invalid("no vring addresses"))?;
        let gpa = |a: u64| {
            self.memory
                .to_gpa(a)
                .ok_or_else(|| invalid("a vring address is outside the memory table"))
        };
        let (desc, used, avail) = (gpa(desc)?, gpa(used)?, gpa(avail)?);
        let mut queue = Queue::new(shared.opts.queue_size).map_err(|_| invalid("queue size"))?;
        queue.set_size(v.size);
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(avail)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(used)))
            .map_err(|_| invalid("misaligned vring address"))?;
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_next_avail(v.base);
        queue.set_ready(true);
        if !queue.is_valid(mem.as_ref()) {
            return Err(invalid("the vring does not fit in guest memory"));
        }
        // The used index the driver last saw: a ring restarted at a base
        // continues where it stopped (vhost-user-backend does the same).
        let used_idx = queue
            .used_idx(mem.as_ref(), Ordering::Acquire)
            .map_err(|_| invalid("the used ring is not readable"))?;
        queue.set_next_used(used_idx.0);
        // With the frontend's inflight area, the ring resumes after what
        // the last backend took, and what it had not returned runs first.
        let mut resubmit = Vec::new();
        let record = match &self.inflight {
            Some((map, qs)) => map.queue(i as u16, *qs),
            None => None,
        };
        let record = record.map(|mut r| {
            if let Some((heads, next_avail)) = r.recover(used_idx.0, v.size) {
                queue.set_next_avail(next_avail);
                resubmit = heads;
            }
            r
        });
        let kick = v
            .kick
            .as_ref()
            .map(EventFd::try_clone)
            .transpose()
            .map_err(VuError::ReqHandlerError)?
            .ok_or_else(|| invalid("no kick"))?;
        // Without a call fd the frontend polls the used ring: signal into a
        // private eventfd nobody reads.
        let call = match &v.call {
            Some(c) => c.try_clone(),
            None => EventFd::new(libc::EFD_NONBLOCK),
        }
        .map_err(VuError::ReqHandlerError)?;
        let mut handler = lock(&shared.handlers)[i]
            .take()
            .ok_or_else(|| invalid("the vring's handler is in use"))?;
        handler.set_inflight(record);
        let worker = QueueWorker::new(QueueWorkerConfig {
            id: format!("export '{}': queue {i}", shared.id),
            index: i as u16,
            queue,
            handler,
            mem,
            kick,
            interrupt: Arc::new(CallInterrupt { call }),
            writethrough: shared.writethrough.clone(),
            counters: shared.counters.clone(),
            resubmit,
        });
        let thread = shared.iothreads[i % shared.iothreads.len()].clone();
        match thread.add(Box::new(worker)) {
            Ok(id) => {
                self.vrings[i].worker = Some((thread, id));
                Ok(())
            }
            Err(e) => Err(VuError::ReqHandlerError(std::io::Error::other(e))),
        }
    }

    /// Takes vring `i`'s worker off its thread; with `how`, completes or
    /// abandons its in-flight requests, and keeps where the ring stopped.
    pub(super) fn stop_worker(&mut self, i: usize, how: Stop) {
        let Some((thread, id)) = self.vrings[i].worker.take() else {
            return;
        };
        let mut w = match thread.remove_as::<QueueWorker>(id) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("export '{}': queue {i}: {e}", self.shared.id);
                return;
            }
        };
        match how {
            Stop::Drain => {
                w.drain();
                w.signal();
            }
            Stop::Abandon => w.abandon(),
        }
        self.vrings[i].base = w.queue().next_avail();
        lock(&self.shared.handlers)[i] = Some(w.into_handler());
    }

    /// Stops every worker (disconnect, shutdown).
    pub(super) fn stop_all(&mut self, how: Stop) {
        for i in 0..self.vrings.len() {
            self.stop_worker(i, how);
        }
    }

    /// Hands every running worker the current memory generation.
    fn remap_workers(&mut self) {
        let Some(mem) = self.memory.current().cloned() else {
            self.stop_all(Stop::Drain);
            return;
        };
        for v in &self.vrings {
            let Some((thread, id)) = &v.worker else {
                continue;
            };
            let m = mem.clone();
            if let Err(e) = thread.with_subscriber::<QueueWorker>(*id, move |w| w.set_memory(m)) {
                eprintln!("export '{}': {e}", self.shared.id);
            }
        }
    }

    /// Ends the session: stops every worker (`how`), forgets the memory.
    pub(super) fn close(&mut self, how: Stop) {
        self.stop_all(how);
        self.memory.clear();
        // The node queues would keep the departed frontend's RAM (its
        // memfds, io_uring fixed buffers) until their next request.
        for h in lock(&self.shared.handlers).iter_mut().flatten() {
            h.sync_memory();
            h.set_inflight(None);
        }
        self.inflight = None;
        for v in &mut self.vrings {
            v.kick = None;
            v.call = None;
        }
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all(Stop::Drain);
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all(Stop::Drain);
        for v in &mut self.vrings {
            v.enabled = false;
            v.base = 0;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.shared.features)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.shared.features != 0 {
            return Err(invalid(
                "the frontend acked features the export did not offer",
            ));
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES, rings are enabled from the start.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..self.vrings.len() {
                self.vrings[i].enabled = true;
                self.reconcile(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let r = self.memory.replace(ctx, files);
        self.remap_workers();
        r.map(|()| None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.shared.opts.queue_size);
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(invalid(
                "vring size must be a power of 2 up to the queue size",
            ));
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.vring(index)?.addrs = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| invalid("vring base beyond 65535"))?;
        self.vring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        if let Err(e) = self.vring(index) {
            return Err(self.unanswerable(e));
        }
        let i = index as usize;
        // GET_VRING_BASE stops the ring (vhost-user: "Ring states").
        self.stop_worker(i, Stop::Drain);
        let v = &mut self.vrings[i];
        v.kick = None;
        v.call = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        let kick = fd.map(eventfd).transpose()?;
        if kick.is_none() {
            return Err(VuError::InvalidOperation(
                "vrings without a kick fd (polling frontends) are not supported",
            ));
        }
        // A new kick on a running ring: serve it with the new fd.
        self.stop_worker(i, Stop::Drain);
        self.vrings[i].kick = kick;
        self.reconcile(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        let call = fd.map(eventfd).transpose()?;
        let running = self.vrings[i].worker.is_some();
        if running {
            // Complete what is in flight on the old call fd, then serve
            // the ring again with the new one.
            self.stop_worker(i, Stop::Drain);
        }
        self.vrings[i].call = call;
        self.reconcile(i)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        // Errors are logged, not signalled; the fd is not kept.
        drop(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            // Reached when SET_FEATURES was refused: the crate checked its
            // own record of the acked features, which it keeps even then.
            // The crate acks this refusal, so the session goes on.
            return Err(invalid("SET_VRING_ENABLE without PROTOCOL_FEATURES"));
        }
        self.vring(index)?.enabled = enable;
        self.reconcile(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let wb = !self.shared.writethrough.load(Ordering::SeqCst);
        let c = config::config_space(self.shared.node.as_ref(), &self.shared.opts, wb);
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        Ok(out)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only `writeback` is writable, and only with CONFIG_WCE (5.2.4).
        if u64::from(offset) != WRITEBACK_OFFSET || buf.len() != 1 || !self.shared.opts.config_wce {
            return Err(invalid("only the writeback byte is writable"));
        }
        self.shared
            .writethrough
            .store(buf[0] == 0, Ordering::SeqCst);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        self.new_inflight(inflight)
            .map_err(|e| self.unanswerable(e))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let len = self.inflight_len(inflight)?;
        if inflight.mmap_size < len as u64 {
            return Err(invalid("the inflight area is smaller than its queues need"));
        }
        // A mapping past the end of the file would fault (SIGBUS) on the
        // first access: the frontend's file must hold the whole area.
        let size = file.metadata().map_err(VuError::ReqHandlerError)?.len();
        if inflight
            .mmap_offset
            .checked_add(len as u64)
            .is_none_or(|end| end > size)
        {
            return Err(invalid("the inflight file is smaller than the area"));
        }
        let map = InflightMap::map(file.as_fd(), inflight.mmap_offset, len)
            .map_err(VuError::ReqHandlerError)?;
        self.inflight = Some((Arc::new(map), inflight.queue_size));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        self.memory.add(region, fd)?;
        self.remap_workers();
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let r = self
            .memory
            .remove(region.guest_phys_addr, region.memory_size);
        self.remap_workers();
        r
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("DEVICE_STATE is not offered"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("DEVICE_STATE is not offered"))
    }

    // The two below are reached only if the frontend acked a protocol
    // feature that was not offered (the crate keeps whatever it acked);
    // the crate sends no reply for a failure of either.
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(self.unanswerable(VuError::InvalidOperation("SHMEM is not offered")))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(self.unanswerable(VuError::InvalidOperation("LOG_SHMFD is not offered")))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close(Stop::Abandon);
    }
}
