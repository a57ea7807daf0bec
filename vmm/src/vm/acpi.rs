//! ACPI tables (acpi_tables crate): RSDP, XSDT, a hardware-reduced FADT
//! whose sleep registers are [`ACPI_SLEEP_PORT`], a MADT (one local APIC
//! per vCPU and the IOAPIC), an MCFG for the ECAM of PCI segment 0, and a
//! DSDT that lists COM1, every virtio-mmio device (`LNRO0005`, which is
//! how a kernel without `VIRTIO_MMIO_CMDLINE_DEVICES` finds them), the PCI
//! host bridge with its windows, the ECAM as a motherboard resource, the
//! power button (`PNP0C0C`) behind a Generic Event Device (`ACPI0013`),
//! and `\_S5_` so that Linux's `poweroff` knows which `SLP_TYP` to write.
//!
//! The tables live in the BIOS area at [`ACPI_START`], the RSDP first, so
//! Linux finds them by scanning as well as through `boot_params`.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Arg, Device, EISAName, Equal, If, Interrupt,
    Memory32Fixed, Method, Name, Notify, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::device_manager::{MmioSlot, PciLayout};
use super::layout::{ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START};
use super::legacy::{ACPI_SLEEP_PORT, S5_SLEEP_TYPE, SERIAL_PORT, SERIAL_PORT_LEN};

const OEM_ID: [u8; 6] = *b"BLKVM ";
const OEM_TABLE_ID: [u8; 8] = *b"BLKVMTBL";
const OEM_REVISION: u32 = 1;

/// What the tables describe.
pub struct AcpiConfig<'a> {
    /// Number of vCPUs (APIC IDs 0..n).
    pub num_cpus: u8,
    /// The virtio-mmio devices.
    pub mmio_devices: &'a [MmioSlot],
    /// The PCI host bridge's resources.
    pub pci: PciLayout,
    /// The interrupt line of the power button's Generic Event Device
    /// (`None`: no power button).
    pub power_button_gsi: Option<u32>,
}

/// Why the tables could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// They do not fit between [`ACPI_START`] and [`ACPI_END`].
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(u64),
}

/// The tables and where each goes in guest memory.
pub struct AcpiTables {
    /// `(guest address, bytes)` of each table; the RSDP is first.
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// The RSDP's guest address.
    pub fn rsdp_addr(&self) -> u64 {
        self.tables[0].0
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Recomputes an SDT's checksum (byte 9) after the bytes were changed.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

/// AML already serialized (the builders borrow their children, so each
/// device is serialized in one statement and nested as bytes).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut sb = Vec::new();
    // COM1.
    Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(
                        SERIAL_PORT as u16,
                        SERIAL_PORT as u16,
                        1,
                        SERIAL_PORT_LEN as u8,
                    ),
                    &Interrupt::new(true, true, false, false, super::irq::SERIAL_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);

    // PCI host bridge: bus 0, config ports, IO from 0x1000 (below are the
    // legacy devices), the 32-bit BAR window.
    let p = &cfg.pci;
    Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &0u8),
            &Name::new("_SEG".into(), &0u8),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_BBN".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &AddressSpace::new_bus_number(0u16, u16::from(p.last_bus)),
                    &IO::new(
                        p.config_io_port as u16,
                        p.config_io_port as u16,
                        1,
                        p.config_io_len as u8,
                    ),
                    &AddressSpace::new_io(0x1000u16, 0xffffu16, None),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        p.mmio_window_base as u32,
                        (p.mmio_window_base + p.mmio_window_size - 1) as u32,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);

    // The ECAM, reserved as a motherboard resource (Linux checks MCFG
    // areas against these).
    Device::new(
        "MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Memory32Fixed::new(
                    true,
                    p.ecam_base as u32,
                    p.ecam_size as u32,
                )]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);

    // virtio-mmio devices: edge-triggered, active-high lines (irqfd
    // pulses).
    for (i, s) in cfg.mmio_devices.iter().enumerate() {
        Device::new(
            format!("VR{i:02X}").as_str().into(),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &(i as u32)),
                &Name::new(
                    "_CRS".into(),
                    &ResourceTemplate::new(vec![
                        &Memory32Fixed::new(true, s.base as u32, s.len as u32),
                        &Interrupt::new(true, true, false, false, s.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut sb);
    }

    if let Some(gsi) = cfg.power_button_gsi {
        power_button(gsi, &mut sb);
    }

    let mut body = Vec::new();
    Scope::new("\\_SB_".into(), vec![&Raw(sb)]).to_aml_bytes(&mut body);
    Name::new(
        "\\_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut body);
    let mut t = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The power button of a hardware-reduced platform (ACPI 6.5, 4.8.2.2.1.2:
/// a control-method button, notified with 0x80 when pressed) and the
/// Generic Event Device (5.6.9) whose interrupt on line `gsi` runs `_EVT`
/// with the line's number, which notifies the button. Linux's evged
/// driver serves the GED, its button driver turns the notification into
/// KEY_POWER.
fn power_button(gsi: u32, sb: &mut Vec<u8>) {
    Device::new(
        "PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &0u8),
        ],
    )
    .to_aml_bytes(sb);
    let button = Path::new("\\_SB_.PWRB");
    let pressed = 0x80u8;
    let notify = Notify::new(&button, &pressed);
    let is_ours = Equal::new(&Arg(0), &gsi);
    Device::new(
        "GED0".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Interrupt::new(true, true, false, false, gsi)]),
            ),
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&If::new(&is_ours, vec![&notify])],
            ),
        ],
    )
    .to_aml_bytes(sb);
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let sleep = |addr| GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, addr);
    f.sleep_control_reg = sleep(ACPI_SLEEP_PORT);
    f.sleep_status_reg = sleep(ACPI_SLEEP_PORT + 1);
    // IA-PC boot architecture: no VGA (bit 2), no CMOS RTC (bit 5); no
    // 8042 flag, so Linux does not probe a keyboard (the reset command
    // still works).
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"BLKVM\0\0\0").into();
    bytes(&f.finalize())
}

fn madt(num_cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for i in 0..num_cpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut v = bytes(&m);
    // Flags: PCAT_COMPAT, the in-kernel 8259s exist (the crate has no
    // setter for it).
    v[40..44].copy_from_slice(&1u32.to_le_bytes());
    fix_checksum(&mut v);
    v
}

fn mcfg(p: &PciLayout) -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(p.ecam_base, 0, 0, p.last_bus);
    bytes(&m)
}

/// Builds the tables for `cfg`, laid out from [`ACPI_START`].
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut place = |t: Vec<u8>, out: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = align(at + t.len() as u64);
        out.push((at, t));
        at
    };
    let mut tables = Vec::new();
    let dsdt_addr = place(dsdt(cfg), &mut tables);
    let fadt_addr = place(fadt(dsdt_addr), &mut tables);
    let madt_addr = place(madt(cfg.num_cpus), &mut tables);
    let mcfg_addr = place(mcfg(&cfg.pci), &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(a);
    }
    let xsdt_addr = place(bytes(&xsdt), &mut tables);
    let end = next;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    tables.insert(0, (rsdp_addr, rsdp));
    Ok(AcpiTables { tables })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::vm::device_manager::PciLayout;

    fn config(slots: &[MmioSlot]) -> AcpiConfig<'_> {
        AcpiConfig {
            num_cpus: 2,
            mmio_devices: slots,
            pci: PciLayout::default(),
            power_button_gsi: Some(9),
        }
    }

    fn slots() -> Vec<MmioSlot> {
        vec![
            MmioSlot {
                base: 0xc000_0000,
                len: 0x1000,
                gsi: 5,
            },
            MmioSlot {
                base: 0xc000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ]
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn every_table_checksums_to_zero_and_rsdp_points_at_xsdt() {
        let s = slots();
        let t = build(&config(&s)).unwrap();
        let (rsdp_at, rsdp) = &t.tables[0];
        assert_eq!(*rsdp_at, ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = &t.tables.iter().find(|(a, _)| *a == xsdt_addr).unwrap().1;
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut sigs = Vec::new();
        for (addr, table) in &t.tables[1..] {
            assert_eq!(sum(table), 0, "{:?}", std::str::from_utf8(&table[..4]));
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert!(*addr >= ACPI_START && addr + len as u64 <= ACPI_END);
            sigs.push(table[..4].to_vec());
        }
        assert_eq!(
            sigs,
            [b"DSDT", b"FACP", b"APIC", b"MCFG", b"XSDT"].map(|s| s.to_vec())
        );
        // The XSDT lists the FADT, MADT and MCFG.
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, vec![t.tables[2].0, t.tables[3].0, t.tables[4].0]);
        // Tables do not overlap.
        for w in t.tables.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_registers_at_the_port() {
        let f = fadt(0xe_1000);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        // X_DSDT at offset 140.
        assert_eq!(
            u64::from_le_bytes(f[140..148].try_into().unwrap()),
            0xe_1000
        );
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256: system I/O,
        // 8 bits, the port.
        assert_eq!(f[244], 1);
        assert_eq!(f[245], 8);
        let ctl = u64::from_le_bytes(f[248..256].try_into().unwrap());
        assert_eq!(ctl, ACPI_SLEEP_PORT);
        let sts = u64::from_le_bytes(f[260..268].try_into().unwrap());
        assert_eq!(sts, ACPI_SLEEP_PORT + 1);
    }

    #[test]
    fn madt_has_one_lapic_per_cpu_and_the_ioapic() {
        let m = madt(3);
        assert_eq!(sum(&m), 0);
        assert_eq!(
            u32::from_le_bytes(m[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let mut types = Vec::new();
        let mut at = 44;
        while at < m.len() {
            types.push((m[at], m[at + 3]));
            at += m[at + 1] as usize;
        }
        assert_eq!(types, vec![(0, 0), (0, 1), (0, 2), (1, 0)]);
    }

    /// Disassembles `table` with `iasl -d` and returns the .dsl text.
    fn disassemble(name: &str, table: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let dat = dir.path().join(format!("{name}.dat"));
        std::fs::write(&dat, table).unwrap();
        let out = Command::new("iasl")
            .current_dir(dir.path())
            .arg("-d")
            .arg(&dat)
            .output()
            .expect("iasl (Debian package acpica-tools, see resources/setup.sh)");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {name}: {log}");
        assert!(!log.contains("Error"), "iasl -d {name}: {log}");
        std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap()
    }

    #[test]
    fn iasl_disassembles_the_dsdt_with_every_device() {
        let s = slots();
        let dsl = disassemble("dsdt", &dsdt(&config(&s)));
        for want in [
            "Device (VR00)",
            "Device (VR01)",
            "\"LNRO0005\"",
            "0xC0001000",
            "Device (PCI0)",
            "EisaId (\"PNP0A08\")",
            "EisaId (\"PNP0A03\")",
            "0xD0000000",
            "0xDFFFFFFF",
            "Device (COM1)",
            "Device (MBRD)",
            "0xE0000000",
            "Name (\\_S5, Package (0x02)",
            "Device (PWRB)",
            "EisaId (\"PNP0C0C\")",
            "Device (GED0)",
            "\"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "If ((Arg0 == 0x09))",
            "Notify (\\_SB.PWRB, 0x80)",
        ] {
            assert!(dsl.contains(want), "{want} missing from:\n{dsl}");
        }
        // Interrupt lines 5 and 6 for the two mmio devices.
        assert!(dsl.contains("0x00000005"), "{dsl}");
        assert!(dsl.contains("0x00000006"), "{dsl}");
    }

    #[test]
    fn iasl_disassembles_the_other_tables() {
        let s = slots();
        let t = build(&config(&s)).unwrap();
        let fadt = disassemble("facp", &t.tables[2].1);
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
        assert!(fadt.contains("0000000000000600"), "{fadt}");
        let madt = disassemble("apic", &t.tables[3].1);
        assert!(madt.contains("I/O APIC"), "{madt}");
        assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
        let mcfg = disassemble("mcfg", &t.tables[4].1);
        assert!(mcfg.contains("00000000E0000000"), "{mcfg}");
    }
}
