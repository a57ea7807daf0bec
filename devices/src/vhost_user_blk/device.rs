//! The VMM's vhost-user-blk device (QEMU's `vhost-user-blk-pci` and
//! `vhost-user-blk`): a virtio-blk device whose queues another process
//! serves (`blkvm storage-daemon`, qemu-storage-daemon, SPDK), on the
//! `vhost` crate's frontend.
//!
//! The VMM only negotiates. Guest RAM (a memfd) goes to the backend in the
//! memory table, each queue's kick is the KVM ioeventfd the transport
//! registered and its call the irqfd of the queue's interrupt
//! ([`VirtioInterrupt::queue_notifier`]), so no VMM thread touches a
//! request. Features, the queue count and the configuration space come
//! from the backend (GET_FEATURES, GET_QUEUE_NUM, GET_CONFIG); the guest's
//! writeback toggle goes back with SET_CONFIG.
//!
//! A control thread per device watches the connection and the backend's
//! request channel: a CONFIG_CHANGE message (a resize) rereads the
//! configuration and raises the config interrupt; a lost backend is
//! reported, and with `reconnect` the thread connects again, renegotiates
//! and restarts the guest's queues where they were (the used index, or
//! the backend's inflight record when it keeps one), while the guest's
//! queues wait.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{QueueConfig, VirtioDevice, VirtioDeviceError, VirtioInterrupt, VirtioIrq};
use crate::virtio_blk::config::{CONFIG_LEN, MAX_QUEUES, MAX_QUEUE_SIZE, WRITEBACK_OFFSET};
use crate::virtio_blk::GuestMem;

mod control;
mod negotiate;

use control::control_thread;
use negotiate::*;

/// Offset of `num_queues` in virtio-blk's configuration space.
const NUM_QUEUES_OFFSET: usize = 34;

/// Device features the device passes on from a backend (QEMU's
/// vhost-user-blk feature list, split rings only).
const PASSED_FEATURES: &[u32] = &[
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
];

/// Protocol features the device uses when the backend has them.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

fn bit(b: u32) -> u64 {
    1 << b
}

/// A change of a device's connection to its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// The backend went away; `reconnecting` when the device will try
    /// again (`reconnect-ms`).
    Disconnected {
        /// The device connects again by itself.
        reconnecting: bool,
    },
    /// The device connected again and restarted the guest's queues.
    Reconnected,
}

/// Called from the device's control thread on each [`BackendEvent`]
/// (QMP events).
pub type BackendEventHook = Arc<dyn Fn(BackendEvent) + Send + Sync>;

/// What a vhost-user-blk device is made of (QEMU's properties).
#[derive(Clone, Debug)]
pub struct VhostUserBlkDeviceOptions {
    /// Device id, for messages and the control thread's name.
    pub id: String,
    /// The backend's unix socket (the chardev's `path`).
    pub path: PathBuf,
    /// Connect again this often after the backend is lost (`reconnect-ms`);
    /// `None`: report the loss and leave the disk without a backend.
    pub reconnect: Option<Duration>,
    /// Queues (`num-queues`); `None`: as many as the backend has.
    pub num_queues: Option<u16>,
    /// Largest queue size the guest may choose (`queue-size`).
    pub queue_size: u16,
    /// Offer the writeback toggle when the backend does (`config-wce`).
    pub config_wce: bool,
}

/// Why a vhost-user-blk device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkDeviceError {
    /// Connecting to the socket failed.
    #[error("Failed to connect to '{0}'")]
    Connect(String, #[source] vhost::Error),
    /// A vhost-user request failed during the handshake.
    #[error("vhost-user backend at '{path}': {step} failed")]
    Handshake {
        /// The socket.
        path: String,
        /// The request.
        step: &'static str,
        /// What went wrong.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something the device needs.
    #[error("vhost-user backend at '{0}': {1}")]
    Backend(String, String),
    /// An option is out of range.
    #[error("{0}")]
    Options(String),
    /// An eventfd or the control thread could not be made.
    #[error("could not set up the device")]
    Host(#[source] io::Error),
}

/// One connection to the backend, negotiated.
struct Conn {
    fe: Frontend,
    /// The backend's device features.
    features: u64,
    /// Protocol features both sides have.
    protocol: VhostUserProtocolFeatures,
    /// The backend's request channel (config changes).
    requests: Option<FrontendReqHandler<ConfigChanged>>,
    /// What the request channel's handler saw.
    changed: Arc<ConfigChanged>,
}

/// Raised by the backend's CONFIG_CHANGE message; the control thread
/// rereads the configuration after it has answered the message.
#[derive(Default)]
struct ConfigChanged(AtomicBool);

impl VhostUserFrontendReqHandler for ConfigChanged {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.store(true, Ordering::SeqCst);
        Ok(0)
    }
}

/// The guest's running queues.
struct Active {
    features: u64,
    /// `(index, configuration)` of each enabled queue.
    queues: Vec<(usize, QueueConfig)>,
    /// Each enabled queue's call fd (its interrupt's irqfd).
    calls: Vec<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The backend's inflight area (GET_INFLIGHT_FD), kept across reconnects
/// so that a restarted backend finds what it had not finished.
struct Inflight {
    info: VhostUserInflight,
    file: File,
}

struct Inner {
    conn: Option<Conn>,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    inflight: Option<Inflight>,
    /// The guest's writeback choice, sent again after a reconnect.
    writeback: Option<u8>,
}

struct Shared {
    opts: VhostUserBlkDeviceOptions,
    mem: Arc<GuestMem>,
    num_queues: u16,
    inner: Mutex<Inner>,
    /// The last connection failed and no new one is up yet.
    disconnected: AtomicBool,
    /// Reconnections so far.
    reconnects: std::sync::atomic::AtomicU64,
    /// Told about disconnects and reconnects.
    events: Mutex<Option<BackendEventHook>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self, e: BackendEvent) {
        let hook = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(h) = hook {
            h(e);
        }
    }

    fn label(&self) -> String {
        format!(
            "vhost-user-blk '{}' ({})",
            self.opts.id,
            self.opts.path.display()
        )
    }
}

/// A vhost-user-blk device of the VMM.
pub struct VhostUserBlk {
    shared: Arc<Shared>,
    features: u64,
    kicks: Arc<Vec<EventFd>>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserBlk {
    /// Connects to the backend at `opts.path`, negotiates, reads its
    /// configuration and starts the device's control thread.
    pub fn new(
        opts: VhostUserBlkDeviceOptions,
        mem: Arc<GuestMem>,
    ) -> Result<Self, VhostUserBlkDeviceError> {
        if !(2..=MAX_QUEUE_SIZE).contains(&opts.queue_size) || !opts.queue_size.is_power_of_two() {
            return Err(VhostUserBlkDeviceError::Options(format!(
                "queue-size property must be a power of 2 between 2 and {MAX_QUEUE_SIZE}, not {}",
                opts.queue_size
            )));
        }
        if opts.num_queues == Some(0) || opts.num_queues.is_some_and(|n| n > MAX_QUEUES) {
            return Err(VhostUserBlkDeviceError::Options(format!(
                "num-queues property must be between 1 and {MAX_QUEUES}"
            )));
        }
        for r in mem.iter() {
            if r.file_offset().is_none() {
                return Err(VhostUserBlkDeviceError::Options(
                    "vhost-user needs guest RAM in shared memory".into(),
                ));
            }
        }
        let path = opts.path.display().to_string();
        let mut conn = connect(&opts.path, u64::from(MAX_QUEUES))?;
        let theirs =
            backend_queues(&mut conn).map_err(|source| VhostUserBlkDeviceError::Handshake {
                path: path.clone(),
                step: "GET_QUEUE_NUM",
                source,
            })?;
        let num_queues = opts.num_queues.unwrap_or(theirs.clamp(1, MAX_QUEUES));
        if num_queues > theirs {
            return Err(VhostUserBlkDeviceError::Backend(
                path,
                format!("num-queues {num_queues} is more than the backend's {theirs} queues"),
            ));
        }
        let mut config = read_backend_config(&mut conn).map_err(|source| {
            VhostUserBlkDeviceError::Handshake {
                path: path.clone(),
                step: "GET_CONFIG",
                source,
            }
        })?;
        set_recv_timeout(&conn.fe, None).map_err(VhostUserBlkDeviceError::Host)?;
        config[NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2].copy_from_slice(&num_queues.to_le_bytes());
        let mut features = PASSED_FEATURES
            .iter()
            .map(|&b| bit(b))
            .fold(0, |a, b| a | b)
            & conn.features;
        if num_queues == 1 {
            features &= !bit(VIRTIO_BLK_F_MQ);
        }
        if !opts.config_wce {
            features &= !bit(VIRTIO_BLK_F_CONFIG_WCE);
        }
        let kicks = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VhostUserBlkDeviceError::Host)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VhostUserBlkDeviceError::Host)?);
        let shared = Arc::new(Shared {
            num_queues,
            mem,
            inner: Mutex::new(Inner {
                conn: Some(conn),
                config,
                active: None,
                inflight: None,
                writeback: None,
            }),
            disconnected: AtomicBool::new(false),
            reconnects: Default::default(),
            events: Mutex::new(None),
            opts,
        });
        let kicks = Arc::new(kicks);
        let thread = {
            let (shared, stop, kicks) = (shared.clone(), stop.clone(), kicks.clone());
            std::thread::Builder::new()
                .name(format!("{}-vu", shared.opts.id))
                .spawn(move || {
                    sandbox::enter(sandbox::ThreadKind::VhostUserFrontend);
                    control_thread(&shared, &stop, &kicks)
                })
                .map_err(VhostUserBlkDeviceError::Host)?
        };
        Ok(VhostUserBlk {
            shared,
            features,
            kicks,
            stop,
            thread: Some(thread),
        })
    }

    /// Whether a backend is connected now.
    pub fn connected(&self) -> bool {
        self.shared.lock().conn.is_some()
    }

    /// How many times the device connected again after losing its backend.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::SeqCst)
    }

    /// Calls `hook` on every disconnect and reconnect from now on.
    pub fn set_event_hook(&self, hook: Option<BackendEventHook>) {
        *self.shared.events.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// The socket the backend listens on.
    pub fn path(&self) -> &Path {
        &self.shared.opts.path
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.shared.opts.queue_size; usize::from(self.shared.num_queues)]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let inner = self.shared.lock();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(data.len())
            .and_then(|end| inner.config.get(start..end))
        {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only the writeback toggle is writable (virtio 1.2, 5.2.4).
        if offset != WRITEBACK_OFFSET
            || data.len() != 1
            || self.features & bit(VIRTIO_BLK_F_CONFIG_WCE) == 0
        {
            return;
        }
        let mut inner = self.shared.lock();
        let v = u8::from(data[0] != 0);
        inner.config[WRITEBACK_OFFSET as usize] = v;
        inner.writeback = Some(v);
        if let Some(conn) = inner.conn.as_mut() {
            if let Err(e) = conn
                .fe
                .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, &[v])
            {
                eprintln!("{}: SET_CONFIG failed: {e}", self.shared.label());
            }
        }
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
        let host = |e: io::Error| VirtioDeviceError::Host(Box::new(e));
        let mut enabled = Vec::new();
        let mut calls = Vec::new();
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
            let call = interrupt
                .queue_notifier(i as u16)
                .map_err(host)?
                .ok_or(VirtioDeviceError::BadQueue(i))?;
            enabled.push((i, *q));
            calls.push(call);
        }
        let active = Active {
            features,
            queues: enabled,
            calls,
            interrupt,
        };
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        let inner = &mut *inner;
        if let Some(conn) = inner.conn.as_mut() {
            let bases = vec![0; active.queues.len()];
            if let Err(e) = start_rings(
                &shared,
                conn,
                &mut inner.inflight,
                &active,
                &self.kicks,
                &bases,
            ) {
                return Err(VirtioDeviceError::Host(
                    format!("{}: {e}", shared.label()).into(),
                ));
            }
        }
        // Without a backend the queues start when one connects.
        inner.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        let inner = &mut *inner;
        if let (Some(conn), Some(active)) = (inner.conn.as_mut(), inner.active.as_ref()) {
            if let Err(e) = stop_rings(conn, active) {
                eprintln!("{}: stopping the queues failed: {e}", shared.label());
            }
        }
        inner.active = None;
        // A new driver starts from empty rings: the old inflight record
        // must not be replayed into them.
        inner.inflight = None;
    }
}
