//! blkvm's block layer: a graph of named nodes opened from `--blockdev`
//! options, with QEMU's driver names and semantics, and a data plane of
//! per-thread node queues whose completions arrive on an eventfd.
//!
//! Layout (DESIGN.md, "Block layer shapes"):
//! - [`request`]: requests, completions, data-path errors;
//! - [`node`]: the [`BlockNode`] control plane and [`NodeQueue`] data plane;
//! - [`backend`]: [`BlockBackend`], a user's attachment to its root node
//!   (the request check, per-user stats, the error policy);
//! - [`graph`]: [`BlockGraph`], names, children, users;
//! - drivers: [`file`] (threads and io_uring engines), [`raw`], [`null`],
//!   [`qcow2`], [`rbd`];
//! - [`memory`]: the RAM registrar; [`bounce`]: per-queue bounce pools;
//! - [`limits`], [`stats`]; system calls live in `sys` and the engines.

#![deny(missing_docs)]

pub mod backend;
pub mod blkio;
pub mod bounce;
mod completion;
mod error;
pub mod file;
pub mod graph;
pub mod limits;
pub mod memory;
pub mod nbd;
pub mod node;
pub mod null;
pub mod qcow2;
pub mod raw;
pub mod rbd;
pub mod request;
pub mod stats;
mod sys;
pub mod throttle;

pub use backend::{BackendOptions, BackendQueue, BlockBackend};
pub use error::BlockError;
pub use graph::BlockGraph;
pub use limits::BlockLimits;
pub use memory::{MemoryRegion, RamRegistrar, RegionId};
pub use node::{
    children_with_roles, BlockNode, BlockStatus, ChildRole, FormatSpecific, ImageDetails,
    NodeOptions, NodeQueue, Qcow2V3Bits,
};
pub use request::{
    Completion, IovecPool, Request, RequestError, RequestFlags, RequestOp, SubmitError,
};
pub use stats::{NodeStats, NodeStatsSnapshot, OpStatsSnapshot};
