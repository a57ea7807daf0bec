//! The virtio-blk data plane shared by the VMM's devices and the storage
//! daemon's vhost-user-blk export: features and config space
//! ([`config`]), checked request parsing ([`request`]), and the per-queue
//! handler ([`handler`]).

pub mod config;
pub mod device;
pub mod handler;
pub mod inflight;
pub mod request;
mod ring;
pub mod worker;

/// Guest memory as both front ends map it.
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

pub use block::backend::{ErrorAction, ErrorOutcome, IoStatus};
pub use config::BlkOptions;
pub use device::{VirtioBlk, VirtioBlkConfig, VirtioBlkDeviceError};
pub use handler::{BlkHandlerError, BlkQueueCounters, BlkQueueHandler, IoErrorHook};
pub use request::{BlkRequest, BlkRequestType, VirtioBlkError};
pub use worker::{QueueWorker, QueueWorkerConfig, WorkerCounters};

#[cfg(test)]
mod tests;
