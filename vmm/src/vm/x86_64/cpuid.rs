//! CPUID for each vCPU: KVM's supported CPUID with the per-CPU fields
//! fixed up: the initial APIC ID (leaf 1, and the x2APIC ID of the
//! topology leaves 0xb and 0x1f), the logical processor count, the
//! hypervisor bit, and a minimal topology of one thread per core, all
//! cores in one package.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to hold an APIC ID below `n`.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_subleaves(function: u32, apic_id: u32, cpus: u32) -> Vec<kvm_cpuid_entry2> {
    let e = |index, eax, ebx, ecx| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    };
    vec![
        // SMT level: one thread per core, shift 0.
        e(0, 0, 1, 1 << 8),
        // Core level: all vCPUs in the package.
        e(1, id_bits(cpus), cpus, (2 << 8) | 1),
        // Invalid level ends the list.
        e(2, 0, 0, 2),
    ]
}

/// Fixes up KVM's supported CPUID `entries` for vCPU `apic_id` of `cpus`.
pub fn fixup(entries: &[kvm_cpuid_entry2], apic_id: u8, cpus: u8) -> Vec<kvm_cpuid_entry2> {
    let (id, n) = (u32::from(apic_id), u32::from(cpus));
    let mut out = Vec::with_capacity(entries.len() + 6);
    let mut topo_done = [false; 2];
    for e in entries {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((n & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            // Cores per package - 1 in eax[31:26]; one thread per cache
            // (a cache type of 0 ends the list).
            LEAF_CACHE if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x0000_3fff) | ((n - 1).min(63) << 26);
            }
            f @ (LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2) => {
                let i = usize::from(f == LEAF_TOPOLOGY_V2);
                if !topo_done[i] {
                    out.extend(topology_subleaves(f, id, n));
                    topo_done[i] = true;
                }
                continue;
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xaa00_0800,
            eax: 0x1c00_4121,
            ..Default::default()
        }
    }

    #[test]
    fn leaf_one_carries_apic_id_count_and_hypervisor_bit() {
        let out = fixup(&[leaf(1, 0)], 3, 4);
        assert_eq!(out[0].ebx >> 24, 3);
        assert_eq!((out[0].ebx >> 16) & 0xff, 4);
        assert_eq!(out[0].ebx & 0xffff, 0x0800);
        assert_ne!(out[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(out[0].edx & EDX_HTT, 0);
        let single = fixup(&[leaf(1, 0)], 0, 1);
        assert_eq!(single[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_are_rebuilt_once_per_leaf() {
        let out = fixup(&[leaf(0xb, 0), leaf(0xb, 1), leaf(0x1f, 0)], 2, 3);
        let b: Vec<_> = out.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|e| e.edx == 2));
        assert_eq!((b[0].ebx, b[0].ecx >> 8), (1, 1));
        assert_eq!((b[1].eax, b[1].ebx, b[1].ecx), (2, 3, 0x201));
        assert_eq!(b[2].ecx >> 8, 0);
        assert_eq!(out.iter().filter(|e| e.function == 0x1f).count(), 3);
    }

    #[test]
    fn topology_leaves_are_not_invented() {
        let out = fixup(&[leaf(0, 0), leaf(1, 0)], 0, 2);
        assert!(out.iter().all(|e| e.function != 0xb && e.function != 0x1f));
    }

    #[test]
    fn cache_leaf_reports_cores_per_package() {
        let out = fixup(&[leaf(4, 0)], 0, 8);
        assert_eq!(out[0].eax >> 26, 7);
        assert_eq!(out[0].eax & 0x3fff, 0x0121);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
