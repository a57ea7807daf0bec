//! blkvm devices.
//!
//! This crate will hold the virtio-blk request handler and the IOThread
//! data-plane loop shared by the VMM's virtio-blk devices and the storage
//! daemon's vhost-user-blk export (see DESIGN.md, "Data plane"). It is
//! deliberately empty until that work lands: the block layer it builds on
//! comes first.
