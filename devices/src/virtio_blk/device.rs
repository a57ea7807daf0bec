//! The VMM's virtio-blk device: configuration space and features for a
//! transport ([`crate::virtio`]), and on DRIVER_OK one [`QueueWorker`] per
//! enabled queue on an IOThread, the same worker the vhost-user-blk export
//! runs.
//!
//! A worker's kick is the queue's ioeventfd and its interrupt the
//! transport's (irqfd); nothing on the request path is shared but atomics
//! (write-through mode, device status). Queues go round-robin over the device's
//! IOThreads. A handler error marks the device NEEDS_RESET and raises the
//! config interrupt; the rest of the VM carries on. Reset takes the workers
//! back from their IOThreads and completes what is in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block::{BlockBackend, BlockNode};
use event_manager::SubscriberId;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{self, BlkOptions, CONFIG_LEN, WRITEBACK_OFFSET};
use super::worker::{QueueWorker, QueueWorkerConfig, WorkerCounters};
use super::{BlkQueueHandler, GuestMem, IoErrorHook};
use crate::iothread::{IoThread, IoThreadConfig};
use crate::virtio::{QueueConfig, VirtioDevice, VirtioDeviceError, VirtioInterrupt};

/// Why a virtio-blk device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VirtioBlkDeviceError {
    /// An option is out of range.
    #[error("invalid virtio-blk options")]
    Options(#[from] config::BlkOptionsError),
    /// A notification EventFd could not be made.
    #[error("could not create a queue event")]
    Event(#[source] std::io::Error),
    /// The dedicated IOThread could not start.
    #[error("could not start the device's iothread")]
    IoThread(#[source] crate::iothread::IoThreadError),
}

/// What a virtio-blk device is made of.
pub struct VirtioBlkConfig {
    /// Device id (for messages and a dedicated IOThread's name).
    pub id: String,
    /// The node the device serves.
    pub node: Arc<dyn BlockNode>,
    /// Options shaping what the guest sees.
    pub opts: BlkOptions,
    /// IOThreads to spread the queues over; empty: a dedicated one.
    pub iothreads: Vec<Arc<IoThread>>,
}

/// A virtio-blk device of the VMM.
pub struct VirtioBlk {
    id: String,
    backend: Arc<BlockBackend>,
    opts: BlkOptions,
    mem: Arc<GuestMem>,
    iothreads: Vec<Arc<IoThread>>,
    features: u64,
    config: [u8; CONFIG_LEN],
    writeback: bool,
    writethrough: Arc<AtomicBool>,
    kicks: Vec<EventFd>,
    active: Vec<(Arc<IoThread>, SubscriberId)>,
    io_error: Option<IoErrorHook>,
    counters: Arc<WorkerCounters>,
}

impl VirtioBlk {
    /// A device for `cfg` over guest memory `mem`.
    pub fn new(cfg: VirtioBlkConfig, mem: Arc<GuestMem>) -> Result<Self, VirtioBlkDeviceError> {
        cfg.opts.check()?;
        let iothreads = if cfg.iothreads.is_empty() {
            let t = IoThread::new(
                &format!("{}-io", cfg.id),
                IoThreadConfig {
                    poll_max_ns: 0,
                    ..IoThreadConfig::default()
                },
            )
            .map_err(VirtioBlkDeviceError::IoThread)?;
            vec![t]
        } else {
            cfg.iothreads
        };
        let kicks = (0..cfg.opts.num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioBlkDeviceError::Event)?;
        let read_only = cfg.opts.read_only || cfg.node.read_only();
        Ok(VirtioBlk {
            features: config::features(&cfg.opts, read_only),
            config: config::config_space(cfg.node.as_ref(), &cfg.opts, true),
            backend: Arc::new(BlockBackend::new(
                cfg.id.clone(),
                cfg.node,
                cfg.opts.backend_options(),
            )),
            id: cfg.id,
            opts: cfg.opts,
            mem,
            iothreads,
            writeback: true,
            writethrough: Arc::new(AtomicBool::new(false)),
            kicks,
            active: Vec::new(),
            io_error: None,
            counters: Arc::default(),
        })
    }

    /// The node the device serves.
    pub fn node(&self) -> &Arc<dyn BlockNode> {
        self.backend.node()
    }

    /// The device's attachment to its node (its own statistics).
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.backend
    }

    /// The IOThreads the queues run on.
    pub fn iothreads(&self) -> &[Arc<IoThread>] {
        &self.iothreads
    }

    /// Reports the node's host I/O errors to `hook` (QMP's
    /// `BLOCK_IO_ERROR`), from the queue handlers made at the next
    /// activation on; queues already served keep their hook until then.
    pub fn set_io_error_hook(&mut self, hook: Option<IoErrorHook>) {
        self.io_error = hook;
    }

    /// What the device's queue workers did (all queues together).
    pub fn counters(&self) -> &Arc<WorkerCounters> {
        &self.counters
    }

    /// Queues currently being served.
    pub fn active_queues(&self) -> usize {
        self.active.len()
    }

    fn make_worker(
        &self,
        index: usize,
        qc: &QueueConfig,
        event_idx: bool,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<QueueWorker, VirtioDeviceError> {
        let mut queue = Queue::new(qc.max_size).map_err(|_| VirtioDeviceError::BadQueue(index))?;
        queue.set_size(qc.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = split(qc.desc);
        queue.set_desc_table_address(l, h);
        let (l, h) = split(qc.avail);
        queue.set_avail_ring_address(l, h);
        let (l, h) = split(qc.used);
        queue.set_used_ring_address(l, h);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(self.mem.as_ref()) {
            return Err(VirtioDeviceError::BadQueue(index));
        }
        let mut handler = BlkQueueHandler::new(self.backend.clone(), &self.opts)
            .map_err(|e| VirtioDeviceError::Host(Box::new(e)))?;
        handler.set_io_error_hook(self.io_error.clone());
        Ok(QueueWorker::new(QueueWorkerConfig {
            id: format!("{}: queue {index}", self.id),
            index: index as u16,
            queue,
            handler,
            mem: self.mem.clone(),
            kick: self.kicks[index]
                .try_clone()
                .map_err(|e| VirtioDeviceError::Host(Box::new(e)))?,
            interrupt: interrupt.clone(),
            writethrough: self.writethrough.clone(),
            counters: self.counters.clone(),
            resubmit: Vec::new(),
        }))
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.opts.queue_size; usize::from(self.opts.num_queues)]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.config.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE (5.2.4).
        if offset != WRITEBACK_OFFSET || data.len() != 1 || !self.opts.config_wce {
            return;
        }
        self.writeback = data[0] != 0;
        self.config[WRITEBACK_OFFSET as usize] = u8::from(self.writeback);
        self.writethrough.store(!self.writeback, Ordering::SeqCst);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.kicks
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig],
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioDeviceError> {
        if !self.active.is_empty() {
            self.reset();
        }
        let has = |b: u32| features & (1u64 << b) != 0;
        // Without CONFIG_WCE the mode is fixed: writeback if the driver can
        // flush, write-through if it cannot (5.2.5.1).
        let wt = if has(VIRTIO_BLK_F_CONFIG_WCE) {
            !self.writeback
        } else {
            !has(VIRTIO_BLK_F_FLUSH)
        };
        self.writethrough.store(wt, Ordering::SeqCst);
        let event_idx = has(VIRTIO_RING_F_EVENT_IDX);
        let mut workers = Vec::new();
        for (i, qc) in queues.iter().enumerate().take(self.kicks.len()) {
            // A queue the driver did not enable is not served (Linux may
            // use fewer queues than offered).
            if qc.ready {
                workers.push((i, self.make_worker(i, qc, event_idx, &interrupt)?));
            }
        }
        for (i, w) in workers {
            let t = self.iothreads[i % self.iothreads.len()].clone();
            match t.add(Box::new(w)) {
                Ok(id) => self.active.push((t, id)),
                Err(e) => {
                    self.reset();
                    return Err(VirtioDeviceError::Host(Box::new(e)));
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        for (t, id) in self.active.drain(..) {
            match t.remove_as::<QueueWorker>(id) {
                Ok(mut w) => w.drain(),
                Err(e) => eprintln!("{}: reset: {e}", self.id),
            }
        }
        for k in &self.kicks {
            // Stale notifications belong to the old rings.
            let _ = k.read();
        }
        self.writeback = true;
        self.writethrough.store(false, Ordering::SeqCst);
        self.refresh_config();
    }

    fn refresh_config(&mut self) {
        self.config =
            config::config_space(self.backend.node().as_ref(), &self.opts, self.writeback);
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        if !self.active.is_empty() {
            self.reset();
        }
    }
}
