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

/// Connects to `path` and negotiates what does not depend on the guest:
/// features, protocol features, the request channel, ownership. Requests
/// time out after `HANDSHAKE_TIMEOUT` until the caller clears it.
fn connect(path: &Path, max_queues: u64) -> Result<Conn, VhostUserBlkDeviceError> {
    let p = || path.display().to_string();
    let step = |step: &'static str| {
        move |source| VhostUserBlkDeviceError::Handshake {
            path: p(),
            step,
            source,
        }
    };
    let mut fe = Frontend::connect(path, max_queues)
        .map_err(|e| VhostUserBlkDeviceError::Connect(p(), e))?;
    // A backend that accepts but never answers (one serving another
    // frontend, as ours and qemu-storage-daemon's do) must not hang the
    // VMM's start or its reconnect loop.
    set_recv_timeout(&fe, Some(HANDSHAKE_TIMEOUT)).map_err(VhostUserBlkDeviceError::Host)?;
    let features = fe.get_features().map_err(step("GET_FEATURES"))?;
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(VhostUserBlkDeviceError::Backend(
            p(),
            "it has no protocol features (vhost-user-blk needs VHOST_USER_PROTOCOL_F_CONFIG)"
                .into(),
        ));
    }
    let theirs = fe
        .get_protocol_features()
        .map_err(step("GET_PROTOCOL_FEATURES"))?;
    if !theirs.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(VhostUserBlkDeviceError::Backend(
            p(),
            "VHOST_USER_PROTOCOL_F_CONFIG is required".into(),
        ));
    }
    let protocol = theirs & wanted_protocol();
    fe.set_protocol_features(protocol)
        .map_err(step("SET_PROTOCOL_FEATURES"))?;
    fe.set_owner().map_err(step("SET_OWNER"))?;
    let changed = Arc::new(ConfigChanged::default());
    let requests = if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        let mut h = FrontendReqHandler::new(changed.clone())
            .map_err(|e| step("BACKEND_REQ channel")(vhost::Error::VhostUserProtocol(e)))?;
        h.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
        fe.set_backend_request_fd(&h.get_tx_raw_fd())
            .map_err(step("SET_BACKEND_REQ_FD"))?;
        Some(h)
    } else {
        None
    };
    Ok(Conn {
        fe,
        features,
        protocol,
        requests,
        changed,
    })
}

/// How long a backend may take to answer a handshake request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sets (or clears) the receive timeout of the connection's socket.
fn set_recv_timeout(fe: &Frontend, t: Option<Duration>) -> io::Result<()> {
    let t = t.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(t.subsec_micros() as i32),
    };
    // SAFETY: the fd is the frontend's open socket; `tv` is a valid timeval
    // of the size passed, read during the call only.
    let r = unsafe {
        libc::setsockopt(
            fe.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The backend's number of queues (1 without MQ).
fn backend_queues(conn: &mut Conn) -> Result<u16, vhost::Error> {
    if !conn.protocol.contains(VhostUserProtocolFeatures::MQ) {
        return Ok(1);
    }
    let n = conn.fe.get_queue_num()?;
    Ok(u16::try_from(n).unwrap_or(u16::MAX))
}

/// The backend's configuration space.
fn read_backend_config(conn: &mut Conn) -> Result<[u8; CONFIG_LEN], vhost::Error> {
    let (_, payload) = conn.fe.get_config(
        0,
        CONFIG_LEN as u32,
        VhostUserConfigFlags::WRITABLE,
        &[0u8; CONFIG_LEN],
    )?;
    let mut c = [0u8; CONFIG_LEN];
    let n = payload.len().min(CONFIG_LEN);
    c[..n].copy_from_slice(&payload[..n]);
    Ok(c)
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
                .spawn(move || control_thread(&shared, &stop, &kicks))
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

/// Host address of `len` bytes of guest memory at `addr`, if they are
/// all in one region.
fn host_range(mem: &GuestMem, addr: u64, len: usize) -> Option<u64> {
    let slice = mem.get_slice(GuestAddress(addr), len).ok()?;
    Some(slice.ptr_guard().as_ptr() as u64)
}

/// Hands the guest's queues to the backend on `conn`: the memory table,
/// the inflight area, each ring's size, position, addresses, kick and
/// call, then enables them. `bases` is where each queue resumes.
fn start_rings(
    shared: &Shared,
    conn: &mut Conn,
    inflight: &mut Option<Inflight>,
    active: &Active,
    kicks: &[EventFd],
    bases: &[u16],
) -> Result<(), String> {
    let err = |step: &'static str| move |e: vhost::Error| format!("{step}: {e}");
    let mut features = active.features;
    features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    conn.fe
        .set_features(features)
        .map_err(err("SET_FEATURES"))?;
    let regions = shared
        .mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()
        .map_err(err("memory table"))?;
    conn.fe
        .set_mem_table(&regions)
        .map_err(err("SET_MEM_TABLE"))?;
    if conn
        .protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    {
        if inflight.is_none() {
            let ask = VhostUserInflight::new(0, 0, shared.num_queues, shared.opts.queue_size);
            let (info, file) = conn
                .fe
                .get_inflight_fd(&ask)
                .map_err(err("GET_INFLIGHT_FD"))?;
            *inflight = Some(Inflight { info, file });
        }
        if let Some(i) = inflight.as_ref().filter(|i| i.info.mmap_size > 0) {
            conn.fe
                .set_inflight_fd(&i.info, i.file.as_raw_fd())
                .map_err(err("SET_INFLIGHT_FD"))?;
        }
    }
    for (n, ((i, q), call)) in active.queues.iter().zip(&active.calls).enumerate() {
        let i = *i;
        let desc = host_range(&shared.mem, q.desc, 16 * usize::from(q.size));
        let avail = host_range(&shared.mem, q.avail, 6 + 2 * usize::from(q.size));
        let used = host_range(&shared.mem, q.used, 6 + 8 * usize::from(q.size));
        let (Some(desc), Some(avail), Some(used)) = (desc, avail, used) else {
            return Err(format!("virtqueue {i} is not in guest RAM"));
        };
        conn.fe
            .set_vring_num(i, q.size)
            .map_err(err("SET_VRING_NUM"))?;
        conn.fe
            .set_vring_base(i, bases.get(n).copied().unwrap_or(0))
            .map_err(err("SET_VRING_BASE"))?;
        conn.fe
            .set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: q.max_size,
                    queue_size: q.size,
                    flags: 0,
                    desc_table_addr: desc,
                    used_ring_addr: used,
                    avail_ring_addr: avail,
                    log_addr: None,
                },
            )
            .map_err(err("SET_VRING_ADDR"))?;
        conn.fe
            .set_vring_kick(i, &kicks[i])
            .map_err(err("SET_VRING_KICK"))?;
        conn.fe
            .set_vring_call(i, call)
            .map_err(err("SET_VRING_CALL"))?;
    }
    for (i, _) in &active.queues {
        conn.fe
            .set_vring_enable(*i, true)
            .map_err(err("SET_VRING_ENABLE"))?;
    }
    Ok(())
}

/// Takes the queues back from the backend: disables each ring and asks
/// where it stopped (the backend completes what it has in flight first).
fn stop_rings(conn: &mut Conn, active: &Active) -> Result<(), vhost::Error> {
    for (i, _) in &active.queues {
        conn.fe.set_vring_enable(*i, false)?;
    }
    for (i, _) in &active.queues {
        conn.fe.get_vring_base(*i)?;
    }
    Ok(())
}

/// Where each active queue resumes on a new backend: the guest's used
/// index, as QEMU's `virtio_queue_restore_last_avail_idx` does. With an
/// inflight area the backend resubmits what it had taken but not
/// finished; without one, requests the old backend took and did not
/// finish are not redone.
fn resume_bases(mem: &GuestMem, active: &Active) -> Vec<u16> {
    active
        .queues
        .iter()
        .map(|(_, q)| {
            mem.read_obj::<u16>(GuestAddress(q.used).unchecked_add(2))
                .map(u16::from_le)
                .unwrap_or(0)
        })
        .collect()
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

/// Rereads the backend's configuration after a CONFIG_CHANGE message and
/// raises the config interrupt.
fn config_changed(shared: &Shared, inner: &mut Inner) {
    let Some(conn) = inner.conn.as_mut() else {
        return;
    };
    match read_backend_config(conn) {
        Ok(mut c) => {
            c[NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2]
                .copy_from_slice(&shared.num_queues.to_le_bytes());
            if let Some(v) = inner.writeback {
                c[WRITEBACK_OFFSET as usize] = v;
            }
            inner.config = c;
            if let Some(a) = &inner.active {
                let _ = a.interrupt.signal(VirtioIrq::Config);
            }
        }
        Err(e) => eprintln!("{}: GET_CONFIG failed: {e}", shared.label()),
    }
}

/// Connects again and puts the guest's queues back where they were.
fn reconnect(shared: &Shared, kicks: &[EventFd]) -> Result<(), String> {
    let mut conn = connect(&shared.opts.path, u64::from(MAX_QUEUES)).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            s += &format!(": {x}");
            src = x.source();
        }
        s
    })?;
    let theirs = backend_queues(&mut conn).map_err(|e| format!("GET_QUEUE_NUM: {e}"))?;
    if theirs < shared.num_queues {
        return Err(format!(
            "the backend now has {theirs} queues, the device {}",
            shared.num_queues
        ));
    }
    let mut inner = shared.lock();
    let inner = &mut *inner;
    if let Some(a) = &inner.active {
        let missing =
            a.features & !conn.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if missing != 0 {
            return Err(format!(
                "the backend no longer offers features {missing:#x} the guest uses"
            ));
        }
    }
    if let Some(v) = inner.writeback {
        let _ = conn.fe.set_config(
            WRITEBACK_OFFSET as u32,
            VhostUserConfigFlags::WRITABLE,
            &[v],
        );
    }
    if let Some(a) = &inner.active {
        let bases = resume_bases(&shared.mem, a);
        start_rings(shared, &mut conn, &mut inner.inflight, a, kicks, &bases)?;
    }
    set_recv_timeout(&conn.fe, None).map_err(|e| e.to_string())?;
    // Counted before the connection shows, so whoever sees it connected
    // sees the count too.
    shared.reconnects.fetch_add(1, Ordering::SeqCst);
    shared.disconnected.store(false, Ordering::SeqCst);
    inner.conn = Some(conn);
    // The backend may have been resized while we were away.
    config_changed(shared, inner);
    Ok(())
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the
    // length passed.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// The device's control thread: watches the connection and the backend's
/// request channel, reconnects.
fn control_thread(shared: &Shared, stop: &EventFd, kicks: &[EventFd]) {
    loop {
        let (sock, req): (Option<RawFd>, Option<RawFd>) = {
            let inner = shared.lock();
            match inner.conn.as_ref() {
                Some(c) => (
                    Some(c.fe.as_raw_fd()),
                    c.requests.as_ref().map(|r| r.as_raw_fd()),
                ),
                None => (None, None),
            }
        };
        let mut fds = vec![libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = sock {
            // Only a hang-up: replies are read by whoever sent the request.
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            });
        }
        if let Some(fd) = req {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Without a connection: try again after `reconnect` (or wait for
        // the end only).
        let timeout = if sock.is_none() {
            shared.opts.reconnect
        } else {
            None
        };
        if let Err(e) = poll_fds(&mut fds, timeout) {
            eprintln!("{}: poll failed: {e}", shared.label());
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if sock.is_none() {
            if shared.opts.reconnect.is_some() {
                match reconnect(shared, kicks) {
                    Ok(()) => {
                        eprintln!("{}: reconnected to the backend", shared.label());
                        shared.event(BackendEvent::Reconnected);
                    }
                    Err(e) => {
                        if !shared.disconnected.swap(true, Ordering::SeqCst) {
                            eprintln!("{}: reconnect failed: {e}", shared.label());
                        }
                    }
                }
            }
            continue;
        }
        let hup = fds[1].revents != 0;
        let mut guard = shared.lock();
        let inner = &mut *guard;
        if !hup && fds.len() > 2 && fds[2].revents != 0 {
            let mut changed = false;
            let mut lost = false;
            if let Some(conn) = inner.conn.as_mut() {
                if let Some(r) = conn.requests.as_mut() {
                    match r.handle_request() {
                        Ok(_) => changed = conn.changed.0.swap(false, Ordering::SeqCst),
                        Err(_) => lost = true,
                    }
                }
            }
            if lost {
                // The request channel died: the backend is going away;
                // the main socket's hang-up follows.
                if let Some(c) = inner.conn.as_mut() {
                    c.requests = None;
                }
            }
            if changed {
                config_changed(shared, inner);
            }
            continue;
        }
        if hup {
            inner.conn = None;
            // The hook may ask the device things: not under the lock.
            drop(guard);
            shared.disconnected.store(true, Ordering::SeqCst);
            shared.event(BackendEvent::Disconnected {
                reconnecting: shared.opts.reconnect.is_some(),
            });
            match shared.opts.reconnect {
                Some(d) => eprintln!(
                    "{}: backend disconnected; reconnecting every {} ms",
                    shared.label(),
                    d.as_millis()
                ),
                None => eprintln!(
                    "{}: backend disconnected; the disk has no backend now (set reconnect-ms \
                     on the chardev to reconnect)",
                    shared.label()
                ),
            }
        }
    }
}
