//! blkvm devices: the virtio-blk data plane ([`virtio_blk`]) shared by the
//! VMM's virtio-blk devices and the storage daemon's vhost-user-blk export
//! ([`vhost_user_blk`]).
//!
//! For the VMM: IOThreads that run data planes ([`iothread`]), the
//! virtio-blk device ([`virtio_blk::VirtioBlk`]) on virtio-mmio or
//! virtio-pci ([`virtio`]), and a PCI segment with a host bridge, ECAM and
//! 0xCF8 config access, and MSI-X ([`pci`]). Devices reach KVM only
//! through [`bus::VmHooks`], so this crate does not depend on kvm-ioctls.

pub mod bus;
pub mod iothread;
pub mod nbd_server;
pub mod pci;
pub mod vhost_user_blk;
pub mod virtio;
pub mod virtio_blk;
