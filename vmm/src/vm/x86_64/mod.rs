//! x86_64 specifics: CPUID, the boot vCPU state, and loading the guest.

pub mod boot;
pub mod cpuid;
pub mod regs;
