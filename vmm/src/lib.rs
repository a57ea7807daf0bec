//! The `vmm` crate's library half: the KVM VM ([`vm`]), the wiring of
//! `--device` options to devices on its buses ([`attach`]) and the QMP
//! server both subcommands serve ([`qmp`]; in the library so that its
//! session can be driven in-process, as the fuzz target does). The `blkvm`
//! binary (`main.rs`) holds the subcommands.

pub mod attach;
pub mod qmp;
pub mod sandbox;
pub mod vm;
