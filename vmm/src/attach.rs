//! From `--device` options to devices on the VM's buses.
//!
//! [`blk_options`] checks a device's options against its node and turns
//! them into the virtio-blk configuration the devices crate uses.
//! [`attach_devices`] is where each virtio-blk device gets its transport
//! (virtio-mmio: a slot from [`DeviceManager::add_mmio_device`];
//! virtio-pci: a function behind the PCI host bridge placed at
//! [`DeviceManager::pci_layout`]) and its IOThread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use block::{BlockBackend, BlockGraph, BlockNode};
use devices::bus::{Bus, BusDevice};
use devices::iothread::{IoThread, IoThreadConfig};
use devices::pci::PciSegment;
use devices::vhost_user_blk::device::{VhostUserBlk, VhostUserBlkDeviceOptions};
use devices::virtio::mmio::{MmioTransport, MMIO_LEN};
use devices::virtio::pci::{VirtioPciDevice, BAR_SIZE as PCI_BAR_SIZE};
use devices::virtio::VirtioDevice;
use devices::virtio_blk::{
    BlkOptions, ErrorAction, GuestMem, IoStatus, VirtioBlk, VirtioBlkConfig,
};
use qapi::device::DeviceOptions;
use qapi::object::IothreadProperties;
use qapi::qmp::ChardevSocketOptions;

use crate::vm::device_manager::DeviceManager;

/// The name a device goes by in messages: its id, else its driver and
/// position.
pub fn device_label(d: &DeviceOptions, index: usize) -> String {
    match &d.id {
        Some(id) => format!("device '{id}'"),
        None if d.driver.is_vhost_user() => format!(
            "device {index} ({}, chardev '{}')",
            d.driver.name(),
            d.chardev.as_deref().unwrap_or_default()
        ),
        None => format!(
            "device {index} ({}, drive '{}')",
            d.driver.name(),
            d.drive()
        ),
    }
}

/// A `werror`/`rerror` value; `auto` and absent are the device's default.
pub fn error_action(v: Option<qapi::BlockdevOnError>, default: ErrorAction) -> ErrorAction {
    match v {
        None | Some(qapi::BlockdevOnError::Auto) => default,
        Some(qapi::BlockdevOnError::Report) => ErrorAction::Report,
        Some(qapi::BlockdevOnError::Ignore) => ErrorAction::Ignore,
        Some(qapi::BlockdevOnError::Enospc) => ErrorAction::Enospc,
        Some(qapi::BlockdevOnError::Stop) => ErrorAction::Stop,
    }
}

/// Checks `d` (QEMU's messages for the same mistakes) and builds its
/// virtio-blk configuration for a node that is `read_only` or not.
pub fn blk_options(d: &DeviceOptions, read_only: bool) -> Result<BlkOptions> {
    let num_queues = d.num_queues.unwrap_or(1);
    let queue_size = d.queue_size.unwrap_or(256);
    let lbs = d.logical_block_size.map_or(512, |s| s.0);
    let pbs = d.physical_block_size.map_or(lbs, |s| s.0);
    let to_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let opts = BlkOptions {
        num_queues,
        queue_size,
        logical_block_size: to_u32(lbs),
        physical_block_size: to_u32(pbs),
        read_only,
        discard: d.discard.unwrap_or(true),
        write_zeroes: d.write_zeroes.unwrap_or(true),
        config_wce: d.config_wce.unwrap_or(true),
        serial: d.serial.clone().unwrap_or_default(),
        werror: error_action(d.werror, ErrorAction::Enospc),
        rerror: error_action(d.rerror, ErrorAction::Report),
        io_status: Some(Arc::new(IoStatus::default())),
    };
    opts.check()?;
    Ok(opts)
}

/// One device ready to be given a transport.
pub struct PreparedDevice {
    /// How messages name it.
    pub label: String,
    /// Its options.
    pub options: DeviceOptions,
    /// What serves its queues.
    pub backend: PreparedBackend,
}

/// What serves a prepared device's queues.
pub enum PreparedBackend {
    /// A node of our graph, on our IOThreads (virtio-blk).
    Node {
        /// Its node, attached in the graph on its behalf.
        node: Arc<dyn BlockNode>,
        /// Its virtio-blk configuration.
        config: BlkOptions,
        /// The IOThread of each queue (queue `i` runs on entry `i % len`);
        /// empty: a dedicated thread for the device.
        queue_threads: Vec<String>,
    },
    /// Another process, over vhost-user (vhost-user-blk).
    VhostUser(VhostUserBlkDeviceOptions),
}

/// A vhost-user-blk device's options, its chardev resolved; QEMU's
/// defaults (num-queues: the backend's, queue-size 128, config-wce on).
fn vhost_user_options(
    d: &DeviceOptions,
    index: usize,
    chardevs: &[ChardevSocketOptions],
) -> Result<VhostUserBlkDeviceOptions> {
    let id = d.chardev.as_deref().unwrap_or_default();
    let c = chardevs
        .iter()
        .find(|c| c.id == id)
        .with_context(|| format!("Property 'chardev' can't find value '{id}'"))?;
    if c.server == Some(true) {
        bail!(
            "chardev '{id}': a vhost-user backend's chardev must be a client socket (no server=on)"
        );
    }
    Ok(VhostUserBlkDeviceOptions {
        id: d.id.clone().unwrap_or_else(|| format!("vublk{index}")),
        path: c.path.clone().into(),
        reconnect: c.reconnect_ms.map(std::time::Duration::from_millis),
        num_queues: d.num_queues,
        queue_size: d.queue_size.unwrap_or(128),
        config_wce: d.config_wce.unwrap_or(true),
    })
}

/// The IOThread ids a device's queues run on, one per queue (or one for
/// all): from `iothread` or QEMU's `iothread-vq-mapping`, checked as QEMU
/// checks them (virtio-blk's `validate_iothread_vq_mapping_list`).
fn queue_threads(
    d: &DeviceOptions,
    num_queues: u16,
    iothreads: &HashMap<String, IothreadProperties>,
) -> Result<Vec<String>> {
    let map = match (&d.iothread, &d.iothread_vq_mapping) {
        (Some(_), Some(_)) => {
            bail!("iothread and iothread-vq-mapping properties cannot be set at the same time")
        }
        (Some(io), None) if !iothreads.contains_key(io) => bail!("Cannot find iothread '{io}'"),
        (Some(io), None) => return Ok(vec![io.clone()]),
        (None, None) => return Ok(Vec::new()),
        (None, Some(map)) => map,
    };
    if map.is_empty() {
        bail!("iothread-vq-mapping must list at least one IOThread");
    }
    for (i, m) in map.iter().enumerate() {
        if !iothreads.contains_key(&m.iothread) {
            bail!("IOThread \"{}\" object does not exist", m.iothread);
        }
        if map[..i].iter().any(|o| o.iothread == m.iothread) {
            bail!(
                "duplicate IOThread name \"{}\" in iothread-vq-mapping",
                m.iothread
            );
        }
    }
    if map.iter().all(|m| m.vqs.is_none()) {
        // Round-robin, as QEMU assigns them.
        return Ok((0..usize::from(num_queues))
            .map(|q| map[q % map.len()].iothread.clone())
            .collect());
    }
    let mut out: Vec<Option<String>> = vec![None; usize::from(num_queues)];
    for m in map {
        let Some(vqs) = &m.vqs else {
            bail!("either all items in iothread-vq-mapping must have vqs or none of them must have it");
        };
        for &vq in vqs {
            let slot = out.get_mut(usize::from(vq)).ok_or_else(|| {
                anyhow::anyhow!(
                    "vq index {vq} for IOThread \"{}\" must be less than num_queues {num_queues} in iothread-vq-mapping",
                    m.iothread
                )
            })?;
            if slot.is_some() {
                bail!(
                    "cannot assign vq {vq} to IOThread \"{}\" because it is already assigned",
                    m.iothread
                );
            }
            *slot = Some(m.iothread.clone());
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(vq, t)| {
            t.ok_or_else(|| {
                anyhow::anyhow!("missing vq {vq} IOThread assignment in iothread-vq-mapping")
            })
        })
        .collect()
}

/// Resolves every device's node and IOThread (or its backend's socket)
/// and checks its options.
pub fn prepare_devices(
    graph: &mut BlockGraph,
    devices: &[DeviceOptions],
    iothreads: &HashMap<String, IothreadProperties>,
    chardevs: &[ChardevSocketOptions],
) -> Result<Vec<PreparedDevice>> {
    let mut out = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let label = device_label(d, i);
        let backend = if d.driver.is_vhost_user() {
            PreparedBackend::VhostUser(
                vhost_user_options(d, i, chardevs).map_err(|e| e.context(label.clone()))?,
            )
        } else {
            let queue_threads = queue_threads(d, d.num_queues.unwrap_or(1), iothreads)
                .map_err(|e| e.context(label.clone()))?;
            let node = graph
                .attach(d.drive(), &label)
                .map_err(|e| anyhow::Error::new(e).context(label.clone()))?;
            let config = blk_options(d, node.read_only()).map_err(|e| e.context(label.clone()))?;
            PreparedBackend::Node {
                node,
                config,
                queue_threads,
            }
        };
        out.push(PreparedDevice {
            label,
            options: d.clone(),
            backend,
        });
    }
    Ok(out)
}

/// A device's transport, kept for what QMP does to a running device
/// (`block_resize` raises its config-change interrupt).
pub enum Transport {
    /// virtio-blk on virtio-mmio.
    Mmio(Arc<Mutex<MmioTransport<VirtioBlk>>>),
    /// virtio-blk on virtio-pci.
    Pci(Arc<Mutex<VirtioPciDevice<VirtioBlk>>>),
    /// vhost-user-blk on virtio-mmio.
    VhostUserMmio(Arc<Mutex<MmioTransport<VhostUserBlk>>>),
    /// vhost-user-blk on virtio-pci.
    VhostUserPci(Arc<Mutex<VirtioPciDevice<VhostUserBlk>>>),
}

/// One device on the VM's buses.
pub struct AttachedDevice {
    /// How messages name it.
    pub label: String,
    /// Its `id`, if it has one.
    pub id: Option<String>,
    /// Its node (`None`: another process serves it, vhost-user-blk).
    pub node: Option<Arc<dyn BlockNode>>,
    /// Its attachment to the node (its own statistics), with the node.
    pub backend: Option<Arc<BlockBackend>>,
    /// Its transport.
    pub transport: Transport,
    /// Its I/O status (`werror`/`rerror` stop; QMP `io-status`), when it
    /// serves its queues itself.
    pub io_status: Option<Arc<IoStatus>>,
}

impl AttachedDevice {
    /// Re-reads the node's capacity into the config space and raises the
    /// config-change interrupt, so the guest sees a resized disk.
    pub fn config_changed(&self) {
        match &self.transport {
            Transport::Mmio(t) => lock(t).config_changed(),
            Transport::Pci(t) => lock(t).config_changed(),
            // The backend announces its own changes (CONFIG_CHANGE_MSG).
            Transport::VhostUserMmio(_) | Transport::VhostUserPci(_) => {}
        }
    }

    /// Reports the device's host I/O errors to `hook` (QMP's
    /// `BLOCK_IO_ERROR`) from the driver's next activation on.
    pub fn set_io_error_hook(&self, hook: Option<devices::virtio_blk::IoErrorHook>) {
        match &self.transport {
            Transport::Mmio(t) => lock(t).device_mut().set_io_error_hook(hook),
            Transport::Pci(t) => lock(t).device_mut().set_io_error_hook(hook),
            Transport::VhostUserMmio(_) | Transport::VhostUserPci(_) => {}
        }
    }

    /// Whether `node` is the device's node or one below it, so that its
    /// size is what the device shows.
    pub fn uses_node(&self, node: &str) -> bool {
        fn below(n: &dyn BlockNode, name: &str) -> bool {
            n.node_name() == name || n.children().iter().any(|c| below(c.as_ref(), name))
        }
        self.node.as_ref().is_some_and(|n| below(n.as_ref(), node))
    }

    /// The device's virtio-blk state (queues served, counters), if it
    /// serves its queues itself.
    pub fn with_device<R>(&self, f: impl FnOnce(&VirtioBlk) -> R) -> Option<R> {
        match &self.transport {
            Transport::Mmio(t) => Some(f(lock(t).device())),
            Transport::Pci(t) => Some(f(lock(t).device())),
            Transport::VhostUserMmio(_) | Transport::VhostUserPci(_) => None,
        }
    }

    /// Reports the device's backend disconnects and reconnects to `hook`
    /// (vhost-user-blk only).
    pub fn set_backend_event_hook(
        &self,
        hook: Option<devices::vhost_user_blk::device::BackendEventHook>,
    ) {
        self.with_vhost_user(|d| d.set_event_hook(hook));
    }

    /// The device's vhost-user state, if another process serves it.
    pub fn with_vhost_user<R>(&self, f: impl FnOnce(&VhostUserBlk) -> R) -> Option<R> {
        match &self.transport {
            Transport::VhostUserMmio(t) => Some(f(lock(t).device())),
            Transport::VhostUserPci(t) => Some(f(lock(t).device())),
            Transport::Mmio(_) | Transport::Pci(_) => None,
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The devices and IOThreads of a VM.
pub struct Attached {
    /// Every device, in `--device` order.
    pub devices: Vec<AttachedDevice>,
    /// The named IOThreads (`--object iothread`), by id.
    pub iothreads: Vec<Arc<IoThread>>,
    /// The PCI segment, when a device is on PCI.
    pub pci: Option<PciSegment>,
}

/// The PCI BAR window on the MMIO bus: BARs move when the guest programs
/// them, so the window keeps its own bus of BARs and applies the moves
/// the segment queued before each access. (vCPUs hold the MMIO bus's
/// read lock while they dispatch, so the main bus cannot change then.)
struct BarWindow {
    base: u64,
    segment: PciSegment,
    bars: Bus,
}

impl BarWindow {
    fn sync(&mut self) {
        if self.segment.has_bar_reprograms() {
            if let Err(e) = self.segment.apply_bar_reprograms(&mut self.bars) {
                eprintln!("blkvm: PCI BAR move refused: {e}");
            }
        }
    }
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.sync();
        if !self.bars.read(self.base + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.sync();
        self.bars.write(self.base + offset, data);
    }
}

/// An `--object iothread`'s options as the IOThread takes them (QEMU's
/// defaults where a property is not given).
pub fn iothread_config(p: &IothreadProperties) -> IoThreadConfig {
    IoThreadConfig {
        poll_max_ns: p
            .poll_max_ns
            .unwrap_or(devices::iothread::DEFAULT_POLL_MAX_NS),
        poll_grow: p.poll_grow.unwrap_or(0),
        poll_shrink: p.poll_shrink.unwrap_or(0),
    }
}

/// Starts the named IOThreads, creates each device's transport, and
/// places it on the VM's buses: virtio-blk-device on a virtio-mmio slot
/// (which also puts it in the DSDT and on the command line), and
/// virtio-blk-pci as a function behind the PCI host bridge, whose ECAM
/// and 0xcf8 ports go on the buses when the first PCI device does.
pub fn attach_devices(
    dm: &mut DeviceManager,
    mem: &Arc<GuestMem>,
    devices: Vec<PreparedDevice>,
    iothread_props: &HashMap<String, IothreadProperties>,
) -> Result<Attached> {
    let mut names: Vec<&String> = iothread_props.keys().collect();
    names.sort();
    let mut iothreads = Vec::new();
    for id in names {
        let cfg = iothread_config(&iothread_props[id]);
        iothreads.push(
            IoThread::new(id, cfg).with_context(|| format!("could not start iothread '{id}'"))?,
        );
    }
    let mut pci: Option<PciSegment> = None;
    let mut out = Vec::new();
    for (i, d) in devices.into_iter().enumerate() {
        let label = d.label.clone();
        let mut io_status = None;
        let mut backend = None;
        let (node, transport) = match d.backend {
            PreparedBackend::Node {
                node,
                config,
                queue_threads,
            } => {
                io_status = config.io_status.clone();
                let threads = queue_threads
                    .iter()
                    .filter_map(|id| iothreads.iter().find(|t| t.id() == id.as_str()).cloned())
                    .collect();
                let blk = VirtioBlk::new(
                    VirtioBlkConfig {
                        id: d.options.id.clone().unwrap_or_else(|| format!("blk{i}")),
                        node: node.clone(),
                        opts: config,
                        iothreads: threads,
                    },
                    mem.clone(),
                )
                .with_context(|| label.clone())?;
                backend = Some(blk.backend().clone());
                let t = if d.options.driver.is_pci() {
                    Transport::Pci(place_pci(dm, &mut pci, blk, &label)?)
                } else {
                    Transport::Mmio(place_mmio(dm, blk, &label)?)
                };
                (Some(node), t)
            }
            PreparedBackend::VhostUser(opts) => {
                let dev = VhostUserBlk::new(opts, mem.clone()).with_context(|| label.clone())?;
                let t = if d.options.driver.is_pci() {
                    Transport::VhostUserPci(place_pci(dm, &mut pci, dev, &label)?)
                } else {
                    Transport::VhostUserMmio(place_mmio(dm, dev, &label)?)
                };
                (None, t)
            }
        };
        out.push(AttachedDevice {
            label,
            id: d.options.id.clone(),
            node,
            backend,
            transport,
            io_status,
        });
    }
    Ok(Attached {
        devices: out,
        iothreads,
        pci,
    })
}

/// Puts `device` on a virtio-mmio slot (which also puts it in the DSDT
/// and on the command line).
fn place_mmio<D: VirtioDevice + 'static>(
    dm: &mut DeviceManager,
    device: D,
    label: &str,
) -> Result<Arc<Mutex<MmioTransport<D>>>> {
    let slot = dm.add_mmio_device(MMIO_LEN).context(label.to_string())?;
    let t = MmioTransport::new(device, dm.hooks(), slot.base, slot.gsi)
        .with_context(|| format!("{label}: virtio-mmio transport"))?;
    let t = Arc::new(Mutex::new(t));
    dm.insert_mmio_device(&slot, t.clone())
        .context(label.to_string())?;
    Ok(t)
}

/// Puts `device` behind the PCI host bridge as a virtio-pci function,
/// creating the bridge with the first one.
fn place_pci<D: VirtioDevice + 'static>(
    dm: &mut DeviceManager,
    pci: &mut Option<PciSegment>,
    device: D,
    label: &str,
) -> Result<Arc<Mutex<VirtioPciDevice<D>>>> {
    let seg = match pci {
        Some(s) => s.clone(),
        None => {
            let s = add_pci_segment(dm)?;
            *pci = Some(s.clone());
            s
        }
    };
    let bar = seg
        .allocate_bar(PCI_BAR_SIZE)
        .with_context(|| format!("{label}: the PCI BAR window is full"))?;
    let t = VirtioPciDevice::new(device, dm.hooks(), bar)
        .with_context(|| format!("{label}: virtio-pci transport"))?;
    let t = Arc::new(Mutex::new(t));
    seg.add_device(t.clone())
        .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
    Ok(t)
}

/// The PCI host bridge: ECAM on the MMIO bus, 0xcf8 ports on the PIO bus,
/// and the BAR window.
fn add_pci_segment(dm: &mut DeviceManager) -> Result<PciSegment> {
    let l = dm.pci_layout();
    let seg = PciSegment::new(l.mmio_window_base, l.mmio_window_size);
    dm.mmio_bus()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(l.ecam_base, l.ecam_size, Arc::new(Mutex::new(seg.ecam())))
        .context("PCI ECAM")?;
    dm.pio_bus()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            l.config_io_port,
            l.config_io_len,
            Arc::new(Mutex::new(seg.config_io())),
        )
        .context("PCI configuration ports")?;
    let window = BarWindow {
        base: l.mmio_window_base,
        segment: seg.clone(),
        bars: Bus::new(),
    };
    dm.mmio_bus()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            l.mmio_window_base,
            l.mmio_window_size,
            Arc::new(Mutex::new(window)),
        )
        .context("PCI BAR window")?;
    Ok(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(arg: &str) -> DeviceOptions {
        qapi::device::parse_device(arg).unwrap()
    }

    #[test]
    fn defaults_match_qemus() {
        let o = blk_options(&dev("virtio-blk-pci,drive=d0"), false).unwrap();
        assert_eq!(
            (
                o.num_queues,
                o.queue_size,
                o.logical_block_size,
                o.physical_block_size
            ),
            (1, 256, 512, 512)
        );
        assert!(o.discard && o.write_zeroes && o.config_wce && !o.read_only);
        assert_eq!(o.serial, "");
    }

    #[test]
    fn every_option_reaches_the_config() {
        let o = blk_options(
            &dev(
                "virtio-blk-device,drive=d0,num-queues=4,queue-size=128,serial=s1,\
                  logical_block_size=4096,physical_block_size=4096,discard=off,\
                  write-zeroes=off,config-wce=off",
            ),
            true,
        )
        .unwrap();
        assert_eq!(
            (
                o.num_queues,
                o.queue_size,
                o.logical_block_size,
                o.physical_block_size
            ),
            (4, 128, 4096, 4096)
        );
        assert!(!o.discard && !o.write_zeroes && !o.config_wce && o.read_only);
        assert_eq!(o.serial, "s1");
    }

    #[test]
    fn bad_values_are_refused_in_qemus_words() {
        let e = |a: &str| blk_options(&dev(a), false).unwrap_err().to_string();
        assert_eq!(
            e("virtio-blk-pci,drive=d,num-queues=0"),
            "num-queues property must be larger than 0"
        );
        assert_eq!(
            e("virtio-blk-pci,drive=d,num-queues=65"),
            "num-queues property must be <= 64"
        );
        assert_eq!(
            e("virtio-blk-pci,drive=d,queue-size=100"),
            "invalid queue-size property (100), must be a power of 2 (max 1024)"
        );
        assert_eq!(
            e("virtio-blk-pci,drive=d,queue-size=2"),
            "invalid queue-size property (2), must be > 2"
        );
        assert!(
            e("virtio-blk-pci,drive=d,logical_block_size=1000").starts_with("logical_block_size")
        );
        assert_eq!(
            e("virtio-blk-pci,drive=d,logical_block_size=4096,physical_block_size=512"),
            "logical_block_size > physical_block_size not supported"
        );
    }

    #[test]
    fn devices_are_labelled_by_id_or_position() {
        assert_eq!(
            device_label(&dev("virtio-blk-pci,drive=d,id=x"), 0),
            "device 'x'"
        );
        assert_eq!(
            device_label(&dev("virtio-blk-device,drive=d"), 2),
            "device 2 (virtio-blk-device, drive 'd')"
        );
    }

    #[test]
    fn missing_iothread_or_node_names_the_device() {
        let mut g = BlockGraph::new();
        g.add(&qapi::parse_blockdev("null-co,node-name=n0,size=1M").unwrap())
            .unwrap();
        let io = HashMap::new();
        let e = prepare_devices(
            &mut g,
            &[dev("virtio-blk-pci,drive=n0,iothread=io9")],
            &io,
            &[],
        )
        .err()
        .unwrap();
        assert_eq!(
            format!("{e:#}"),
            "device 0 (virtio-blk-pci, drive 'n0'): Cannot find iothread 'io9'"
        );
        let e = prepare_devices(
            &mut g,
            &[dev("virtio-blk-pci,drive=nope,id=disk")],
            &io,
            &[],
        )
        .err()
        .unwrap();
        assert!(format!("{e:#}").starts_with("device 'disk': "), "{e:#}");
        let p = prepare_devices(&mut g, &[dev("virtio-blk-device,drive=n0")], &io, &[]).unwrap();
        let PreparedBackend::Node {
            config,
            queue_threads,
            ..
        } = &p[0].backend
        else {
            panic!("a virtio-blk device is served by its node");
        };
        assert_eq!(config.num_queues, 1);
        assert!(queue_threads.is_empty());
    }

    #[test]
    fn vhost_user_devices_resolve_their_chardev_with_qemus_defaults() {
        let mut g = BlockGraph::new();
        let io = HashMap::new();
        let chardevs: Vec<ChardevSocketOptions> = [
            "socket,id=vu0,path=/run/vu.sock,reconnect-ms=250",
            "socket,id=mon,path=/run/qmp.sock,server=on,wait=off",
        ]
        .iter()
        .map(|c| qapi::parse_option_as(c, Some("backend")).unwrap())
        .collect();
        let p = prepare_devices(
            &mut g,
            &[dev("vhost-user-blk-pci,chardev=vu0,id=vd0")],
            &io,
            &chardevs,
        )
        .unwrap();
        let PreparedBackend::VhostUser(o) = &p[0].backend else {
            panic!("a vhost-user-blk device is served over its chardev");
        };
        assert_eq!(o.id, "vd0");
        assert_eq!(o.path, std::path::PathBuf::from("/run/vu.sock"));
        assert_eq!(o.reconnect, Some(std::time::Duration::from_millis(250)));
        assert_eq!(
            (o.num_queues, o.queue_size, o.config_wce),
            (None, 128, true)
        );
        let e = prepare_devices(
            &mut g,
            &[dev("vhost-user-blk,chardev=nope")],
            &io,
            &chardevs,
        )
        .err()
        .unwrap();
        assert_eq!(
            format!("{e:#}"),
            "device 0 (vhost-user-blk, chardev 'nope'): Property 'chardev' can't find value 'nope'"
        );
        let e = prepare_devices(&mut g, &[dev("vhost-user-blk,chardev=mon")], &io, &chardevs)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("must be a client socket"),
            "{e:#}"
        );
    }

    fn iothreads(ids: &[&str]) -> HashMap<String, IothreadProperties> {
        ids.iter()
            .map(|id| (id.to_string(), IothreadProperties::default()))
            .collect()
    }

    #[test]
    fn iothread_vq_mapping_spreads_queues_round_robin_or_as_listed() {
        let io = iothreads(&["io0", "io1"]);
        let q = |a: &str| queue_threads(&dev(a), dev(a).num_queues.unwrap_or(1), &io).unwrap();
        assert_eq!(
            q("virtio-blk-pci,drive=d,num-queues=4,iothread=io1"),
            ["io1"]
        );
        assert_eq!(
            q("virtio-blk-pci,drive=d,num-queues=3,\
               iothread-vq-mapping.0.iothread=io0,iothread-vq-mapping.1.iothread=io1"),
            ["io0", "io1", "io0"]
        );
        assert_eq!(
            q("virtio-blk-pci,drive=d,num-queues=3,\
               iothread-vq-mapping.0.iothread=io0,iothread-vq-mapping.0.vqs.0=2,\
               iothread-vq-mapping.1.iothread=io1,iothread-vq-mapping.1.vqs.0=0,\
               iothread-vq-mapping.1.vqs.1=1"),
            ["io1", "io1", "io0"]
        );
        assert!(q("virtio-blk-pci,drive=d").is_empty());
    }

    #[test]
    fn bad_iothread_vq_mappings_are_refused_in_qemus_words() {
        let io = iothreads(&["io0", "io1"]);
        let e = |a: &str| {
            queue_threads(&dev(a), dev(a).num_queues.unwrap_or(1), &io)
                .unwrap_err()
                .to_string()
        };
        let m = "virtio-blk-pci,drive=d,num-queues=2,iothread-vq-mapping.0.iothread";
        assert_eq!(
            e(&format!("{m}=io0,iothread=io1")),
            "iothread and iothread-vq-mapping properties cannot be set at the same time"
        );
        assert_eq!(
            e(&format!("{m}=io7")),
            "IOThread \"io7\" object does not exist"
        );
        assert_eq!(
            e(&format!("{m}=io0,iothread-vq-mapping.1.iothread=io0")),
            "duplicate IOThread name \"io0\" in iothread-vq-mapping"
        );
        assert_eq!(
            e(&format!(
                "{m}=io0,iothread-vq-mapping.0.vqs.0=0,iothread-vq-mapping.1.iothread=io1"
            )),
            "either all items in iothread-vq-mapping must have vqs or none of them must have it"
        );
        assert_eq!(
            e(&format!("{m}=io0,iothread-vq-mapping.0.vqs.0=2")),
            "vq index 2 for IOThread \"io0\" must be less than num_queues 2 in iothread-vq-mapping"
        );
        assert_eq!(
            e(&format!(
                "{m}=io0,iothread-vq-mapping.0.vqs.0=0,iothread-vq-mapping.0.vqs.1=0"
            )),
            "cannot assign vq 0 to IOThread \"io0\" because it is already assigned"
        );
        assert_eq!(
            e(&format!("{m}=io0,iothread-vq-mapping.0.vqs.0=1")),
            "missing vq 0 IOThread assignment in iothread-vq-mapping"
        );
    }
}
