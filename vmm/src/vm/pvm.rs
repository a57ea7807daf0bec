//! Noticing a PVM `/dev/kvm`: a software hypervisor module (`kvm_pvm`)
//! that answers every KVM ioctl but runs guest code emulated, slowly, and
//! cannot boot a stock Linux kernel (it spins in the decompressor). Users
//! deserve to be told before they wait for a boot that never comes.

use std::path::Path;

/// The warning `blkvm run` prints on a PVM host.
pub const PVM_WARNING: &str = "\
blkvm: warning: this host's /dev/kvm is PVM (the kvm_pvm software hypervisor; \
the CPU has no vmx/svm). A stock Linux kernel cannot boot under it: it spins \
in the decompressor. Use a PVM-enabled guest kernel, a host with hardware \
virtualization, or the nested-KVM test harness. Continuing.";

/// Whether the flags lines of `/proc/cpuinfo` text name vmx or svm.
pub fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Whether `/dev/kvm` is PVM, judging by `sys_module` (normally
/// `/sys/module`) and `cpuinfo` (the text of `/proc/cpuinfo`).
pub fn is_pvm(sys_module: &Path, cpuinfo: &str) -> bool {
    sys_module.join("kvm_pvm").exists() || !cpu_has_hw_virt(cpuinfo)
}

/// Whether this host's `/dev/kvm` is PVM.
pub fn host_is_pvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    is_pvm(Path::new("/sys/module"), &cpuinfo)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme de pse vmx ssse3\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm lahf_lm\n";
    const NONE: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor\nvmx flags\t: none\n";

    #[test]
    fn hardware_virtualization_is_read_from_flags_lines_only() {
        assert!(cpu_has_hw_virt(INTEL));
        assert!(cpu_has_hw_virt(AMD));
        assert!(!cpu_has_hw_virt(NONE));
        assert!(!cpu_has_hw_virt("flags : fpu svmx vmxe\n"));
    }

    #[test]
    fn kvm_pvm_module_or_missing_flags_mean_pvm() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_pvm(dir.path(), INTEL));
        assert!(is_pvm(dir.path(), NONE));
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert!(is_pvm(dir.path(), INTEL));
    }

    #[test]
    fn warning_says_what_to_do() {
        for w in [
            "PVM",
            "stock Linux kernel",
            "decompressor",
            "hardware",
            "nested",
        ] {
            assert!(PVM_WARNING.contains(w), "{w}");
        }
    }
}
