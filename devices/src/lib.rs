//! blkvm devices: the virtio-blk data plane ([`virtio_blk`]) shared by the
//! VMM's virtio-blk devices and the storage daemon's vhost-user-blk export
//! ([`vhost_user_blk`]).

pub mod bus;
pub mod iothread;
pub mod pci;
pub mod vhost_user_blk;
pub mod virtio;
pub mod virtio_blk;
