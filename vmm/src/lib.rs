//! The `vmm` crate's library half: the KVM VM ([`vm`]) and the wiring of
//! `--device` options to devices on its buses ([`attach`]). The `blkvm`
//! binary (`main.rs`) holds the subcommands.

pub mod attach;
pub mod vm;
