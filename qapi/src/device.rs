//! `--device` options for `blkvm run`, shaped like QEMU's `-device`
//! properties of the virtio-blk devices: `driver` is the implied key
//! (`--device virtio-blk-pci,drive=d0`), and the property names are QEMU's,
//! including its two underscored ones (`logical_block_size`,
//! `physical_block_size`, from `DEFINE_BLOCK_PROPERTIES`).
//!
//! This is the syntax only. Ranges that depend on the device (a queue size
//! that is a power of two, a block size the guest can use) are checked where
//! the options become a device's configuration.

use serde::{Deserialize, Serialize};

use crate::size::Size;

/// Device models `blkvm run` can create.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceDriver {
    /// virtio-blk behind a virtio-pci (modern) transport, MSI-X interrupts.
    VirtioBlkPci,
    /// virtio-blk behind a virtio-mmio transport, one interrupt line (QEMU
    /// microvm's name for it).
    VirtioBlkDevice,
    /// vhost-user-blk (queues served by another process) on virtio-pci.
    VhostUserBlkPci,
    /// vhost-user-blk on virtio-mmio.
    VhostUserBlk,
}

impl DeviceDriver {
    /// The driver name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::VirtioBlkPci => "virtio-blk-pci",
            Self::VirtioBlkDevice => "virtio-blk-device",
            Self::VhostUserBlkPci => "vhost-user-blk-pci",
            Self::VhostUserBlk => "vhost-user-blk",
        }
    }

    /// Whether another process serves the device's queues.
    pub fn is_vhost_user(self) -> bool {
        matches!(self, Self::VhostUserBlkPci | Self::VhostUserBlk)
    }

    /// Whether the device sits on virtio-pci.
    pub fn is_pci(self) -> bool {
        matches!(self, Self::VirtioBlkPci | Self::VhostUserBlkPci)
    }
}

/// One `--device` argument.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceOptions {
    /// The device model.
    pub driver: DeviceDriver,
    /// The device's id (defaults to one derived from its position).
    pub id: Option<String>,
    /// The block node the device serves (a `node-name`; virtio-blk).
    #[serde(default)]
    pub drive: Option<String>,
    /// The `--chardev` of the backend's socket (vhost-user-blk).
    #[serde(default)]
    pub chardev: Option<String>,
    /// The IOThread that runs the device's queues (an `--object iothread` id).
    pub iothread: Option<String>,
    /// QEMU's `iothread-vq-mapping`: the queues spread over several
    /// IOThreads, round-robin or as each entry's `vqs` say.
    pub iothread_vq_mapping: Option<Vec<IothreadVqMapping>>,
    /// Number of virtqueues.
    pub num_queues: Option<u16>,
    /// Size of each virtqueue.
    pub queue_size: Option<u16>,
    /// Serial number the guest reads with GET_ID.
    pub serial: Option<String>,
    /// Logical block size the guest sees.
    #[serde(rename = "logical_block_size")]
    pub logical_block_size: Option<Size>,
    /// Physical block size the guest sees.
    #[serde(rename = "physical_block_size")]
    pub physical_block_size: Option<Size>,
    /// Offer DISCARD.
    pub discard: Option<bool>,
    /// Offer WRITE_ZEROES.
    pub write_zeroes: Option<bool>,
    /// Offer CONFIG_WCE (the guest may switch the write cache).
    pub config_wce: Option<bool>,
    /// What a failed write does (virtio-blk).
    pub werror: Option<crate::BlockdevOnError>,
    /// What a failed read does (virtio-blk).
    pub rerror: Option<crate::BlockdevOnError>,
}

/// One entry of `iothread-vq-mapping` (QEMU's `IOThreadVirtQueueMapping`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IothreadVqMapping {
    /// An `--object iothread` id.
    pub iothread: String,
    /// The virtqueues it runs (all entries have them, or none does).
    pub vqs: Option<Vec<u16>>,
}

impl DeviceOptions {
    /// The node of a virtio-blk device (checked by [`parse_device`]).
    pub fn drive(&self) -> &str {
        self.drive.as_deref().unwrap_or_default()
    }

    /// The properties set that this device model does not have, by QEMU's
    /// names.
    fn foreign_properties(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.driver.is_vhost_user() {
            let set = [
                ("drive", self.drive.is_some()),
                ("iothread", self.iothread.is_some()),
                ("iothread-vq-mapping", self.iothread_vq_mapping.is_some()),
                ("serial", self.serial.is_some()),
                ("logical_block_size", self.logical_block_size.is_some()),
                ("physical_block_size", self.physical_block_size.is_some()),
                ("discard", self.discard.is_some()),
                ("write-zeroes", self.write_zeroes.is_some()),
            ];
            out.extend(set.iter().filter(|(_, on)| *on).map(|(n, _)| *n));
        } else if self.chardev.is_some() {
            out.push("chardev");
        }
        out
    }
}

/// Parses a `--device` argument: JSON if it starts with `{`, else keyval
/// with `driver` implied. A property the model does not have is refused,
/// and so is a missing `drive` (virtio-blk) or `chardev` (vhost-user-blk).
pub fn parse_device(arg: &str) -> Result<DeviceOptions, crate::QapiError> {
    let d: DeviceOptions = crate::parse_option_as(arg, Some("driver"))?;
    if let Some(p) = d.foreign_properties().first() {
        return Err(crate::QapiError::InvalidParameter { key: p.to_string() });
    }
    let needed = if d.driver.is_vhost_user() {
        d.chardev.is_none().then_some("chardev")
    } else {
        d.drive.is_none().then_some("drive")
    };
    if let Some(key) = needed {
        return Err(crate::QapiError::Missing { key: key.into() });
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implied_driver_and_every_property_parse() {
        let d = parse_device(
            "virtio-blk-pci,id=disk0,drive=d0,iothread=io0,num-queues=2,queue-size=128,\
             serial=abc,logical_block_size=4k,physical_block_size=4096,discard=off,\
             write-zeroes=on,config-wce=off",
        )
        .unwrap();
        assert_eq!(d.driver, DeviceDriver::VirtioBlkPci);
        assert_eq!(d.id.as_deref(), Some("disk0"));
        assert_eq!(d.drive(), "d0");
        assert_eq!(d.iothread.as_deref(), Some("io0"));
        assert_eq!(d.num_queues, Some(2));
        assert_eq!(d.queue_size, Some(128));
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.logical_block_size, Some(Size(4096)));
        assert_eq!(d.physical_block_size, Some(Size(4096)));
        assert_eq!(d.discard, Some(false));
        assert_eq!(d.write_zeroes, Some(true));
        assert_eq!(d.config_wce, Some(false));
    }

    #[test]
    fn vhost_user_blk_takes_a_chardev_and_not_the_node_properties() {
        let d = parse_device("vhost-user-blk-pci,chardev=vu0,num-queues=2,config-wce=off").unwrap();
        assert_eq!(d.driver, DeviceDriver::VhostUserBlkPci);
        assert!(d.driver.is_vhost_user() && d.driver.is_pci());
        assert_eq!(d.chardev.as_deref(), Some("vu0"));
        assert_eq!(d.num_queues, Some(2));
        let d = parse_device("vhost-user-blk,chardev=vu1,queue-size=128").unwrap();
        assert!(d.driver.is_vhost_user() && !d.driver.is_pci());
        let e = parse_device("vhost-user-blk-pci,chardev=vu0,serial=x").unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter 'serial'");
        let e = parse_device("vhost-user-blk-pci,chardev=vu0,drive=d0").unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter 'drive'");
        let e = parse_device("vhost-user-blk").unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'chardev' is missing");
        let e = parse_device("virtio-blk-pci,drive=d0,chardev=vu0").unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter 'chardev'");
        let e = parse_device("virtio-blk-pci,num-queues=2").unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'drive' is missing");
    }

    #[test]
    fn mmio_driver_with_only_a_drive() {
        let d = parse_device("virtio-blk-device,drive=d1").unwrap();
        assert_eq!(d.driver, DeviceDriver::VirtioBlkDevice);
        assert_eq!(d.driver.name(), "virtio-blk-device");
        assert_eq!(d.num_queues, None);
        assert_eq!(d.iothread, None);
    }

    #[test]
    fn iothread_vq_mapping_parses_as_keyval_list_and_as_json() {
        let k = parse_device(
            "virtio-blk-pci,drive=d0,num-queues=4,iothread-vq-mapping.0.iothread=io0,\
             iothread-vq-mapping.0.vqs.0=0,iothread-vq-mapping.0.vqs.1=2,\
             iothread-vq-mapping.1.iothread=io1,iothread-vq-mapping.1.vqs.0=1,\
             iothread-vq-mapping.1.vqs.1=3",
        )
        .unwrap();
        let j = parse_device(
            r#"{"driver": "virtio-blk-pci", "drive": "d0", "num-queues": 4,
                "iothread-vq-mapping": [{"iothread": "io0", "vqs": [0, 2]},
                                        {"iothread": "io1", "vqs": [1, 3]}]}"#,
        )
        .unwrap();
        assert_eq!(k, j);
        let m = k.iothread_vq_mapping.unwrap();
        assert_eq!(m[1].iothread, "io1");
        assert_eq!(m[1].vqs, Some(vec![1, 3]));
    }

    #[test]
    fn iothread_vq_mapping_rejects_unknown_members() {
        let e = parse_device("virtio-blk-pci,drive=d0,iothread-vq-mapping.0.thread=io0")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "Invalid parameter 'iothread-vq-mapping.0.thread'");
    }

    #[test]
    fn keyval_and_json_forms_agree() {
        let k = parse_device("driver=virtio-blk-pci,drive=d0,num-queues=4").unwrap();
        let j = parse_device(r#"{"driver": "virtio-blk-pci", "drive": "d0", "num-queues": 4}"#)
            .unwrap();
        assert_eq!(k, j);
    }

    #[test]
    fn errors_name_the_key_in_qemu_words() {
        let e = parse_device("virtio-net-pci,drive=d0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'driver' does not accept value 'virtio-net-pci'"
        );
        let e = parse_device("virtio-blk-pci").unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'drive' is missing");
        let e = parse_device("virtio-blk-pci,drive=d0,bogus=1").unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter 'bogus'");
        let e = parse_device("virtio-blk-pci,drive=d0,num-queues=many").unwrap_err();
        assert!(
            e.to_string().starts_with("Parameter 'num-queues' expects"),
            "{e}"
        );
        let e = parse_device("virtio-blk-pci,drive=d0,discard=maybe").unwrap_err();
        assert!(
            e.to_string().starts_with("Parameter 'discard' expects"),
            "{e}"
        );
        let e = parse_device("virtio-blk-pci,drive=d0,logical_block_size=4q").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Parameter 'logical_block_size' expects"),
            "{e}"
        );
        let e = parse_device("virtio-blk-pci,drive=d0,queue-size=70000").unwrap_err();
        assert!(
            e.to_string().starts_with("Parameter 'queue-size' expects"),
            "{e}"
        );
    }

    #[test]
    fn hyphenated_block_size_is_not_qemus_name() {
        let e = parse_device("virtio-blk-pci,drive=d0,logical-block-size=4096").unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter 'logical-block-size'");
    }
}
