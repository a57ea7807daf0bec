//! The boot vCPU's architectural state: GDT, identity-mapped long-mode
//! page tables, segment and control registers, general registers, FPU,
//! the MSRs Linux expects at entry, and the local APIC's LINT pins.
//!
//! Two entry states: the Linux 64-bit boot protocol (long mode, paging on,
//! `rsi` = the zero page) and PVH (32-bit protected mode, paging off,
//! `ebx` = `hvm_start_info`).

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vm::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START,
};

/// Why boot state could not be written to guest memory.
#[derive(Debug, thiserror::Error)]
#[error("could not write the boot {0} to guest memory")]
pub struct BootStateError(pub &'static str, #[source] pub vm_memory::GuestMemoryError);

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from its flags (type, S, DPL, P in 7:0; AVL, L, D/B, G
/// in 15:12), base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The KVM segment register a GDT entry at `index` loads.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Null, 64-bit code, data, TSS.
pub fn long_mode_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Null, 32-bit flat code, data, TSS.
pub fn pvh_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

fn write_gdt_idt<M: GuestMemoryBackend>(
    mem: &M,
    gdt: &[u64; 4],
    sregs: &mut kvm_sregs,
) -> Result<(), BootStateError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(|e| BootStateError("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| BootStateError("IDT", e))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 0;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages: PML4[0] -> PDPT,
/// PDPT[0] -> PD, PD[i] -> i * 2 MiB.
pub fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootStateError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| BootStateError("page tables", e))
    };
    w(PDPTE_START | 0x03, PML4_START)?;
    w(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        w((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}

/// Long mode with paging on the identity map, for the 64-bit entry.
pub fn setup_long_mode<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
) -> Result<(), BootStateError> {
    write_gdt_idt(mem, &long_mode_gdt(), sregs)?;
    write_page_tables(mem)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// 32-bit protected mode, paging off, for the PVH entry.
pub fn setup_pvh_mode<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
) -> Result<(), BootStateError> {
    write_gdt_idt(mem, &pvh_gdt(), sregs)?;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}

/// General registers for the 64-bit entry: `rsi` is the zero page.
pub fn long_mode_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    }
}

/// General registers for the PVH entry: `rbx` is the start_info.
pub fn pvh_regs(entry: u64, start_info: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: start_info,
        ..Default::default()
    }
}

/// The FPU as after FNINIT, SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs set before entry (Firecracker's and Cloud Hypervisor's set):
/// syscall MSRs cleared, TSC at 0, fast strings on, MTRRs enabled with
/// write-back as the default type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const SYSENTER_CS: u32 = 0x174;
    const SYSENTER_ESP: u32 = 0x175;
    const SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const TSC: u32 = 0x10;
    const MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(SYSENTER_CS, 0),
        e(SYSENTER_ESP, 0),
        e(SYSENTER_EIP, 0),
        e(STAR, 0),
        e(CSTAR, 0),
        e(KERNEL_GS_BASE, 0),
        e(SYSCALL_MASK, 0),
        e(LSTAR, 0),
        e(TSC, 0),
        e(MISC_ENABLE, 1),
        e(MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a PC's BIOS
/// leaves them.
pub fn set_lint(l: &mut kvm_lapic_state) {
    const LVT0: usize = 0x350;
    const LVT1: usize = 0x360;
    const EXTINT: u32 = 7;
    const NMI: u32 = 4;
    let mode = |reg: u32, m: u32| (reg & !0x700) | (m << 8);
    let v0 = lapic_reg(l, LVT0);
    set_lapic_reg(l, LVT0, mode(v0, EXTINT));
    let v1 = lapic_reg(l, LVT1);
    set_lapic_reg(l, LVT1, mode(v1, NMI));
}

#[cfg(test)]
mod tests {
    use devices::virtio_blk::GuestMem;

    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = long_mode_gdt();
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!((cs.selector, cs.base, cs.limit), (8, 0, 0xffff_ffff));
        assert_eq!((cs.l, cs.db, cs.type_, cs.present, cs.s), (1, 0, 0xb, 1, 1));
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.l), (16, 1, 3, 0));
        let tr = segment_from_gdt(gdt[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (24, 0xb, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
        let pvh_cs = segment_from_gdt(pvh_gdt()[1], 1);
        assert_eq!((pvh_cs.l, pvh_cs.db, pvh_cs.limit), (0, 1, 0xffff_ffff));
        let pvh_tr = segment_from_gdt(pvh_gdt()[3], 3);
        assert_eq!((pvh_tr.limit, pvh_tr.g), (0x67, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let m = mem();
        write_page_tables(&m).unwrap();
        let r = |a| m.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4_START), PDPTE_START | 3);
        assert_eq!(r(PML4_START + 8), 0);
        assert_eq!(r(PDPTE_START), PDE_START | 3);
        assert_eq!(r(PDE_START), 0x83);
        assert_eq!(r(PDE_START + 8), (2 << 20) | 0x83);
        assert_eq!(r(PDE_START + 511 * 8), (511 << 21) | 0x83);
    }

    #[test]
    fn long_mode_sregs_enable_paging_pae_and_lma() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_long_mode(&m, &mut s).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_START, 31));
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.tr.selector, 24);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(GDT_START + 8)).unwrap(),
            long_mode_gdt()[1]
        );
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let m = mem();
        let mut s = kvm_sregs {
            cr4: CR4_PAE,
            efer: EFER_LME,
            ..Default::default()
        };
        setup_pvh_mode(&m, &mut s).unwrap();
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!(s.cs.db, 1);
    }

    #[test]
    fn entry_registers_carry_the_boot_structure() {
        let r = long_mode_regs(0x100_0000, 0x7000);
        assert_eq!(
            (r.rip, r.rsi, r.rflags, r.rsp),
            (0x100_0000, 0x7000, 2, 0x8ff0)
        );
        let p = pvh_regs(0x100_0200, 0x6000);
        assert_eq!((p.rip, p.rbx), (0x100_0200, 0x6000));
    }

    #[test]
    fn lint_pins_become_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, 0x350, 0x1_0000);
        set_lint(&mut l);
        assert_eq!(lapic_reg(&l, 0x350), 0x1_0700);
        assert_eq!(lapic_reg(&l, 0x360), 0x400);
    }

    #[test]
    fn boot_msrs_enable_mtrrs_and_fast_strings() {
        let m = boot_msrs();
        assert!(m.iter().any(|e| e.index == 0x2ff && e.data == 0x806));
        assert!(m.iter().any(|e| e.index == 0x1a0 && e.data == 1));
    }
}
