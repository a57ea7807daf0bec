//! Loading the kernel (linux-loader: ELF vmlinux or bzImage), the initrd
//! and the command line, and writing what the kernel reads at entry:
//! `boot_params` (the zero page, with the e820 map) for the Linux 64-bit
//! boot protocol, or `hvm_start_info` (with its memory map and the initrd
//! as a module) for PVH, which linux-loader reports when an ELF kernel has
//! the Xen PVH note.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::vm::layout::{
    E820Entry, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file could not be read.
    #[error("could not read '{0}'")]
    Read(String, #[source] std::io::Error),
    /// linux-loader refused the kernel.
    #[error("could not load the kernel '{0}'")]
    Kernel(String, #[source] linux_loader::loader::Error),
    /// A bzImage without the 64-bit entry point.
    #[error("the bzImage '{0}' has no 64-bit entry point (XLF_KERNEL_64)")]
    Not64Bit(String),
    /// The command line is too long or malformed.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("could not write the kernel command line")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    /// The initrd does not fit in low memory.
    #[error("the initrd ({0} bytes) does not fit in guest RAM below {1:#x}")]
    InitrdTooLarge(u64, u64),
    /// Writing a boot structure failed.
    #[error("could not write the {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// linux-loader could not write boot_params.
    #[error("could not write boot_params")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Too many e820 entries.
    #[error("too many memory map entries ({0})")]
    TooManyE820(usize),
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// Long mode at `entry`, `rsi` = zero page.
    Linux64(u64),
    /// 32-bit protected mode at `entry`, `ebx` = `hvm_start_info`.
    Pvh(u64),
}

/// A loaded kernel.
pub struct LoadedKernel {
    /// Where and how to enter it.
    pub entry: EntryPoint,
    /// linux-loader's report (setup header of a bzImage).
    pub result: KernelLoaderResult,
}

fn is_elf(f: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0))?;
    let n = f.read(&mut magic)?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Loads an ELF vmlinux (at its physical addresses; PVH entry if it has
/// the note) or a bzImage (at 1 MiB; entry at +0x200).
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::Read(name.clone(), e))?;
    let elf = is_elf(&mut f).map_err(|e| BootError::Read(name.clone(), e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    if elf {
        let result = Elf::load(mem, None, &mut f, himem).map_err(|e| BootError::Kernel(name, e))?;
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => EntryPoint::Pvh(a.0),
            _ => EntryPoint::Linux64(result.kernel_load.0),
        };
        Ok(LoadedKernel { entry, result })
    } else {
        let result = BzImage::load(mem, None, &mut f, himem)
            .map_err(|e| BootError::Kernel(name.clone(), e))?;
        let hdr = result.setup_header.unwrap_or_default();
        if hdr.xloadflags & 1 == 0 {
            return Err(BootError::Not64Bit(name));
        }
        Ok(LoadedKernel {
            entry: EntryPoint::Linux64(result.kernel_load.0 + 0x200),
            result,
        })
    }
}

/// Loads the initrd at the highest page-aligned address below `max_end`.
/// Returns its address and size.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    max_end: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::Read(name.clone(), e))?;
    let size = f
        .metadata()
        .map_err(|e| BootError::Read(name.clone(), e))?
        .len();
    let addr = max_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge(size, max_end))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::Write("initrd", e))?;
    Ok((addr, size))
}

/// Builds the command line: the user's, then one `virtio_mmio.device=`
/// entry per virtio-mmio device (`(size, base, irq)`).
pub fn build_cmdline(user: &str, mmio: &[(u64, u64, u32)]) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !user.trim().is_empty() {
        c.insert_str(user.trim()).map_err(BootError::Cmdline)?;
    }
    for &(size, base, irq) in mmio {
        c.add_virtio_mmio_device(size, GuestAddress(base), irq, None)
            .map_err(BootError::Cmdline)?;
    }
    Ok(c)
}

/// Writes the command line at [`CMDLINE_START`]; returns its length
/// without the NUL.
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, c: &Cmdline) -> Result<usize, BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), c).map_err(BootError::CmdlineLoad)?;
    Ok(c.as_cstring().map_err(BootError::Cmdline)?.as_bytes().len())
}

/// What the zero page or start_info describe besides the kernel.
pub struct BootInfo<'a> {
    /// The memory map.
    pub e820: &'a [E820Entry],
    /// Command line length (without NUL) at [`CMDLINE_START`].
    pub cmdline_len: usize,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// The RSDP's address.
    pub rsdp: u64,
}

/// The zero page for the 64-bit boot protocol. A bzImage's setup header
/// is kept (the kernel reads its own fields back); an ELF kernel gets a
/// minimal one.
pub fn boot_params(
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    info: &BootInfo,
) -> Result<boot_params, BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
    let mut p = boot_params::default();
    if let Some(h) = setup_header {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        p.hdr.header = KERNEL_HDR_MAGIC;
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = info.rsdp;
    if info.e820.len() > p.e820_table.len() {
        return Err(BootError::TooManyE820(info.e820.len()));
    }
    for (slot, e) in p.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    p.e820_entries = info.e820.len() as u8;
    Ok(p)
}

/// Writes `params` at [`ZERO_PAGE_START`].
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    params: &boot_params,
) -> Result<(), BootError> {
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct StartInfo(hvm_start_info);
// SAFETY: `hvm_start_info` is a repr(C) struct of integers with no
// padding holes that matter (any byte pattern is a valid value).
unsafe impl ByteValued for StartInfo {}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: a repr(C) struct of integers; any byte pattern is valid.
unsafe impl ByteValued for MemmapEntry {}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: a repr(C) struct of integers; any byte pattern is valid.
unsafe impl ByteValued for ModlistEntry {}

// Room for 32 memory map entries before the zero page.
const _: () = assert!(PVH_MEMMAP_START + 24 * 32 <= ZERO_PAGE_START);

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const PVH_START_MAGIC: u32 = 0x336e_c578;

/// Writes `hvm_start_info` at [`PVH_INFO_START`], the initrd module and
/// the memory map after it.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    info: &BootInfo,
) -> Result<(), BootError> {
    let w =
        |what, r: Result<(), vm_memory::GuestMemoryError>| r.map_err(|e| BootError::Write(what, e));
    let mut si = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: info.rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: info.e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = info.initrd {
        si.nr_modules = 1;
        si.modlist_paddr = PVH_MODLIST_START;
        let m = ModlistEntry(hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        });
        w(
            "PVH module list",
            mem.write_obj(m, GuestAddress(PVH_MODLIST_START)),
        )?;
    }
    for (i, e) in info.e820.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        });
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<MemmapEntry>()) as u64;
        w("PVH memory map", mem.write_obj(entry, GuestAddress(at)))?;
    }
    w(
        "PVH start info",
        mem.write_obj(StartInfo(si), GuestAddress(PVH_INFO_START)),
    )
}

#[cfg(test)]
mod tests {
    use devices::virtio_blk::GuestMem;

    use super::*;
    use crate::vm::layout::{e820_map, ram_ranges};

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn zero_page_has_e820_cmdline_initrd_and_rsdp() {
        let e820 = e820_map(&ram_ranges(16 << 20));
        let info = BootInfo {
            e820: &e820,
            cmdline_len: 12,
            initrd: Some((0xf0_0000, 0x1234)),
            rsdp: 0xe_0000,
        };
        let p = boot_params(None, &info).unwrap();
        let m = mem();
        write_boot_params(&m, &p).unwrap();
        let z = ZERO_PAGE_START;
        let r32 = |off| m.read_obj::<u32>(GuestAddress(z + off)).unwrap();
        let r64 = |off| m.read_obj::<u64>(GuestAddress(z + off)).unwrap();
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(r64(0x070), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(m.read_obj::<u8>(GuestAddress(z + 0x1e8)).unwrap(), 4);
        assert_eq!(m.read_obj::<u16>(GuestAddress(z + 0x1fe)).unwrap(), 0xaa55);
        assert_eq!(r32(0x202), 0x5372_6448, "HdrS");
        assert_eq!(m.read_obj::<u8>(GuestAddress(z + 0x210)).unwrap(), 0xff);
        assert_eq!(r32(0x218), 0xf0_0000, "ramdisk_image");
        assert_eq!(r32(0x21c), 0x1234, "ramdisk_size");
        assert_eq!(r32(0x228), CMDLINE_START as u32, "cmd_line_ptr");
        assert_eq!(r32(0x238), 12, "cmdline_size");
        // e820_table at 0x2d0, 20 bytes per entry.
        assert_eq!(r64(0x2d0), 0);
        assert_eq!(r64(0x2d8), 0x9_fc00);
        assert_eq!(r32(0x2e0), 1);
        assert_eq!(r64(0x2d0 + 20), 0x9_fc00);
        assert_eq!(r32(0x2d0 + 20 + 16), 2);
        assert_eq!(r64(0x2d0 + 40), HIMEM_START);
        assert_eq!(r64(0x2d0 + 48), (16 << 20) - HIMEM_START);
    }

    #[test]
    fn pvh_start_info_lists_memmap_and_initrd_module() {
        let e820 = e820_map(&ram_ranges(16 << 20));
        let info = BootInfo {
            e820: &e820,
            cmdline_len: 4,
            initrd: Some((0xf0_0000, 0x2000)),
            rsdp: 0xe_0000,
        };
        let m = mem();
        write_pvh_start_info(&m, &info).unwrap();
        let si: StartInfo = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.0.magic, PVH_START_MAGIC);
        assert_eq!(si.0.memmap_entries as usize, e820.len());
        assert_eq!(
            (si.0.cmdline_paddr, si.0.rsdp_paddr),
            (CMDLINE_START, 0xe_0000)
        );
        assert_eq!(si.0.nr_modules, 1);
        let md: ModlistEntry = m.read_obj(GuestAddress(si.0.modlist_paddr)).unwrap();
        assert_eq!((md.0.paddr, md.0.size), (0xf0_0000, 0x2000));
        let third: MemmapEntry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24)).unwrap();
        assert_eq!((third.0.addr, third.0.type_), (HIMEM_START, 1));
    }

    #[test]
    fn cmdline_appends_virtio_mmio_devices() {
        let c = build_cmdline("console=ttyS0", &[(0x1000, 0xc000_0000, 5)]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xc0000000:5"
        );
        let m = mem();
        let n = write_cmdline(&m, &c).unwrap();
        let mut buf = vec![0u8; n + 1];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(buf[n], 0);
        assert!(buf.starts_with(b"console=ttyS0 virtio_mmio"));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![0x5a; 5000]).unwrap();
        let m = mem();
        let (addr, size) = load_initrd(&m, &p, 0x20_0000, 16 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr & 0xfff, 0);
        assert!(addr + size <= 16 << 20 && addr + 0x1000 + size > 16 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 0x5a);
        assert!(matches!(
            load_initrd(&m, &p, (16 << 20) - 4096, 16 << 20),
            Err(BootError::InitrdTooLarge(5000, _))
        ));
    }

    #[test]
    fn garbage_kernel_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let e = load_kernel(&mem(), &p).err().unwrap();
        assert!(e.to_string().contains("junk"), "{e}");
    }
}
