//! From `--device` options to devices on the VM's buses.
//!
//! [`blk_options`] checks a device's options against its node and turns
//! them into the virtio-blk configuration the devices crate uses.
//! [`attach_devices`] is where each virtio-blk device gets its transport
//! (virtio-mmio: a slot from [`DeviceManager::add_mmio_device`];
//! virtio-pci: a function behind the PCI host bridge placed at
//! [`DeviceManager::pci_layout`]) and its IOThread.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use block::{BlockGraph, BlockNode};
use devices::virtio_blk::{BlkOptions, GuestMem};
use qapi::device::{DeviceDriver, DeviceOptions};
use qapi::object::IothreadProperties;

use crate::vm::device_manager::DeviceManager;

/// Largest virtqueue QEMU accepts (VIRTQUEUE_MAX_SIZE).
const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues a virtio-blk device may have (as `blkvm storage-daemon`).
const MAX_QUEUES: u16 = 64;

/// The name a device goes by in messages: its id, else its driver and
/// position.
pub fn device_label(d: &DeviceOptions, index: usize) -> String {
    match &d.id {
        Some(id) => format!("device '{id}'"),
        None => format!("device {index} ({}, drive '{}')", d.driver.name(), d.drive),
    }
}

/// Checks `d` (QEMU's messages for the same mistakes) and builds its
/// virtio-blk configuration for a node that is `read_only` or not.
pub fn blk_options(d: &DeviceOptions, read_only: bool) -> Result<BlkOptions> {
    let num_queues = d.num_queues.unwrap_or(1);
    if num_queues == 0 {
        bail!("num-queues property must be larger than 0");
    }
    if num_queues > MAX_QUEUES {
        bail!("num-queues property must be <= {MAX_QUEUES}");
    }
    let queue_size = d.queue_size.unwrap_or(256);
    if queue_size <= 2 {
        bail!("invalid queue-size property ({queue_size}), must be > 2");
    }
    if !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
        bail!(
            "invalid queue-size property ({queue_size}), must be a power of 2 (max {MAX_QUEUE_SIZE})"
        );
    }
    let lbs = d.logical_block_size.map_or(512, |s| s.0);
    let pbs = d.physical_block_size.map_or(lbs, |s| s.0);
    for (name, v) in [("logical_block_size", lbs), ("physical_block_size", pbs)] {
        if !(512..=65536).contains(&v) || !v.is_power_of_two() {
            bail!("{name} must be a power of 2 between 512 and 65536, not {v}");
        }
    }
    if lbs > pbs {
        bail!("logical_block_size > physical_block_size not supported");
    }
    Ok(BlkOptions {
        num_queues,
        queue_size,
        logical_block_size: lbs as u32,
        physical_block_size: pbs as u32,
        read_only,
        discard: d.discard.unwrap_or(true),
        write_zeroes: d.write_zeroes.unwrap_or(true),
        config_wce: d.config_wce.unwrap_or(true),
        serial: d.serial.clone().unwrap_or_default(),
    })
}

/// One device ready to be given a transport.
pub struct PreparedDevice {
    /// How messages name it.
    pub label: String,
    /// Its options.
    pub options: DeviceOptions,
    /// Its node, attached in the graph on its behalf.
    pub node: Arc<dyn BlockNode>,
    /// Its virtio-blk configuration.
    pub config: BlkOptions,
    /// Its IOThread's properties (`None`: a dedicated thread).
    pub iothread: Option<(String, IothreadProperties)>,
}

/// Resolves every device's node and IOThread and checks its options.
pub fn prepare_devices(
    graph: &mut BlockGraph,
    devices: &[DeviceOptions],
    iothreads: &HashMap<String, IothreadProperties>,
) -> Result<Vec<PreparedDevice>> {
    let mut out = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let label = device_label(d, i);
        let iothread = match &d.iothread {
            Some(io) => match iothreads.get(io) {
                Some(p) => Some((io.clone(), p.clone())),
                None => bail!("{label}: Cannot find iothread '{io}'"),
            },
            None => None,
        };
        let node = graph
            .attach(&d.drive, &label)
            .map_err(|e| anyhow::Error::new(e).context(label.clone()))?;
        let config = blk_options(d, node.read_only()).map_err(|e| e.context(label.clone()))?;
        out.push(PreparedDevice {
            label,
            options: d.clone(),
            node,
            config,
            iothread,
        });
    }
    Ok(out)
}

/// Creates each device's transport and IOThread and places it on the
/// VM's buses.
///
/// Not wired yet: the virtio-mmio and virtio-pci transports and the
/// IOThread loop are being written in the devices crate. Until they land,
/// a VM with a device refuses to start, naming the device. The wiring
/// will be, per device:
/// - virtio-blk-device: `dm.add_mmio_device(0x1000)` gives base and GSI;
///   the transport registers its QueueNotify ioeventfds at base + 0x50 and
///   its irqfd on the GSI through `dm.hooks()`, and goes on the bus with
///   `dm.insert_mmio_device(&slot, transport)`. The DSDT entry and the
///   `virtio_mmio.device=` command-line entry follow from the slot.
/// - virtio-blk-pci: a function on the host bridge, which goes once on the
///   MMIO bus at `dm.pci_layout().ecam_base` and on the PIO bus at
///   `config_io_port`; BARs come from the layout's MMIO window; MSI-X
///   vectors use `dm.hooks().allocate_gsi()` and `set_msi_route`.
pub fn attach_devices(
    _dm: &mut DeviceManager,
    _mem: &Arc<GuestMem>,
    devices: &[PreparedDevice],
) -> Result<()> {
    if let Some(d) = devices.first() {
        let transport = match d.options.driver {
            DeviceDriver::VirtioBlkPci => "virtio-pci",
            DeviceDriver::VirtioBlkDevice => "virtio-mmio",
        };
        bail!(
            "{}: the {transport} transport is not wired into blkvm run yet",
            d.label
        );
    }
    Ok(())
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
        let e = prepare_devices(&mut g, &[dev("virtio-blk-pci,drive=n0,iothread=io9")], &io)
            .err()
            .unwrap();
        assert_eq!(
            format!("{e:#}"),
            "device 0 (virtio-blk-pci, drive 'n0'): Cannot find iothread 'io9'"
        );
        let e = prepare_devices(&mut g, &[dev("virtio-blk-pci,drive=nope,id=disk")], &io)
            .err()
            .unwrap();
        assert!(format!("{e:#}").starts_with("device 'disk': "), "{e:#}");
        let p = prepare_devices(&mut g, &[dev("virtio-blk-device,drive=n0")], &io).unwrap();
        assert_eq!(p[0].config.num_queues, 1);
    }
}
