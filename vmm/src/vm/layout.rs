//! The guest physical address map of an x86_64 VM, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (RAM)
//! 0x0000_0500  GDT, then IDT                 boot structures the VMM writes
//! 0x0000_6000  PVH start_info + memory map
//! 0x0000_7000  boot_params (the zero page)
//! 0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4, PDPT, PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line (64 KiB)
//! 0x0009_fc00  EBDA .. 1 MiB: reserved; ACPI tables at 0xe0000
//! 0x0010_0000  kernel (bzImage protected-mode code or ELF segments), RAM
//!   ...        RAM up to min(size, 3 GiB)
//! 0xc000_0000  32-bit hole: virtio-mmio device windows (256 MiB)
//! 0xd000_0000  PCI 32-bit MMIO window for BARs (256 MiB)
//! 0xe000_0000  PCI ECAM, segment 0, bus 0 (1 MiB)
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  LAPIC
//! 0xfffb_c000  KVM identity-map page, TSS (3 pages)
//! 0x1_0000_0000 RAM above 4 GiB (what did not fit below the hole)
//! ```
//!
//! The hole starts at 3 GiB as on QEMU's q35 with more than 2.75 GiB, so
//! the 32-bit-only parts (IOAPIC, LAPIC, 32-bit BARs, ECAM) all live in it.

/// Where guest RAM below 4 GiB must end: the start of the 32-bit hole.
pub const HOLE_START: u64 = 0xc000_0000;
/// The end of the 32-bit hole (4 GiB).
pub const HOLE_END: u64 = 1 << 32;

/// Base of the window virtio-mmio devices are allocated from.
pub const MMIO_DEVICES_START: u64 = 0xc000_0000;
/// Size of that window.
pub const MMIO_DEVICES_SIZE: u64 = 0x1000_0000;
/// Base of the PCI 32-bit MMIO window (BARs).
pub const PCI_MMIO_START: u64 = 0xd000_0000;
/// Size of the PCI 32-bit MMIO window.
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// Base of the PCI Express ECAM of segment 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM: bus 0 only (32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// Last PCI bus number the ECAM covers.
pub const PCI_ECAM_LAST_BUS: u8 = 0;
/// The legacy PCI configuration ports (0xcf8 address, 0xcfc data).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Length of the legacy PCI configuration port range.
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's real-mode identity-map page (one page before the TSS).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's TSS (three pages).
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// The GDT the VMM writes for the boot vCPU state.
pub const GDT_START: u64 = 0x500;
/// An empty IDT (limit 0) loaded at boot.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (follows the module list).
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The PML4 of the boot page tables (PDPT and PD follow, one page each).
pub const PML4_START: u64 = 0x9000;
/// The boot PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// The boot page directory (512 x 2 MiB pages = the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// The end of conventional memory; the EBDA starts here.
pub const EBDA_START: u64 = 0x9_fc00;
/// The ACPI tables (the RSDP first, where Linux also scans for it).
pub const ACPI_START: u64 = 0xe_0000;
/// The end of the area the tables may use (the end of the BIOS area).
pub const ACPI_END: u64 = 0x10_0000;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;

/// A range of guest RAM: start address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Splits `size` bytes of RAM around the 32-bit hole: everything below
/// [`HOLE_START`], the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= HOLE_START {
        return vec![RamRange {
            start: 0,
            len: size,
        }];
    }
    vec![
        RamRange {
            start: 0,
            len: HOLE_START,
        },
        RamRange {
            start: HOLE_END,
            len: size - HOLE_START,
        },
    ]
}

/// The e820 memory types the VMM uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM the OS may use.
    Reserved = 2,
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type.
    pub kind: E820Type,
}

/// The e820 map for `ram`: conventional memory below the EBDA, the EBDA
/// and BIOS area reserved (the ACPI tables live there), RAM from 1 MiB,
/// the ECAM reserved (Linux wants MCFG areas reserved before it uses
/// them), and RAM above 4 GiB.
pub fn e820_map(ram: &[RamRange]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let low_end = ram.first().map_or(0, RamRange::end);
    map.push(E820Entry {
        addr: 0,
        size: EBDA_START.min(low_end),
        kind: E820Type::Ram,
    });
    map.push(E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820Type::Reserved,
    });
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820Type::Reserved,
    });
    for r in ram.iter().skip(1) {
        map.push(E820Entry {
            addr: r.start,
            size: r.len,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range_below_the_hole() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                start: 0,
                len: 512 << 20
            }]
        );
        assert_eq!(ram_ranges(HOLE_START).len(), 1);
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRange {
                start: 0,
                len: 3 << 30
            }
        );
        assert_eq!(
            r[1],
            RamRange {
                start: 4 << 30,
                len: 1 << 30
            }
        );
        assert_eq!(r.iter().map(|r| r.len).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn the_hole_holds_every_device_window_and_no_ram() {
        let windows = [
            (MMIO_DEVICES_START, MMIO_DEVICES_SIZE),
            (PCI_MMIO_START, PCI_MMIO_SIZE),
            (PCI_ECAM_START, PCI_ECAM_SIZE),
            (IOAPIC_START, 0x1000),
            (LAPIC_START, 0x1000),
            (KVM_IDENTITY_MAP_START, 0x4000),
        ];
        let mut sorted = windows.to_vec();
        sorted.sort();
        for w in sorted.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:x?} overlap");
        }
        for (base, len) in windows {
            assert!(base >= HOLE_START && base + len <= HOLE_END);
            for r in ram_ranges(8 << 30) {
                assert!(base + len <= r.start || base >= r.end());
            }
        }
    }

    #[test]
    fn e820_covers_ram_and_reserves_bios_area_and_ecam() {
        let map = e820_map(&ram_ranges(6 << 30));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
        assert!(map.contains(&E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Type::Reserved
        }));
        assert!(map.contains(&E820Entry {
            addr: PCI_ECAM_START,
            size: PCI_ECAM_SIZE,
            kind: E820Type::Reserved
        }));
        assert!(map.contains(&E820Entry {
            addr: HOLE_END,
            size: 3 << 30,
            kind: E820Type::Ram
        }));
        // Sorted, no overlap.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:x?}");
        }
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut v = [
            (GDT_START, 0x20),
            (IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x40),
            (PVH_MEMMAP_START, 0x20 * 8),
            (ZERO_PAGE_START, 0x1000),
            (BOOT_STACK_POINTER - 0x800, 0x800),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END - ACPI_START),
        ];
        v.sort();
        for w in v.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:x?} overlap");
        }
        assert!(v.last().map(|l| l.0 + l.1).unwrap() <= HIMEM_START);
    }
}
