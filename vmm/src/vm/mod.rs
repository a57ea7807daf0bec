//! The KVM VM: guest RAM, the in-kernel irqchip and PIT, the buses and
//! legacy devices ([`device_manager`]), ACPI tables, the loaded guest, and
//! the vCPU threads.
//!
//! Building a VM has two steps so that devices can be attached between
//! them: [`Vm::new`] makes the VM, its RAM, its buses and legacy devices;
//! the caller attaches devices through [`Vm::devices`] (and the RAM
//! through [`Vm::memory`]); [`Vm::boot`] then loads the guest, writes the
//! boot structures and the ACPI tables that describe the attached devices,
//! and starts the vCPUs. [`RunningVm::wait`] returns why the VM stopped;
//! meanwhile [`RunningVm::control`] pauses and resumes the vCPUs, presses
//! the power button and ends the VM (what QMP's `stop`, `cont`,
//! `system_powerdown` and `quit` do).

pub mod acpi;
pub mod device_manager;
pub mod irq;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod pvm;
pub mod vcpu;
pub mod x86_64;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio_blk::GuestMem;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};

use self::device_manager::{DeviceManager, DeviceManagerError};
use self::irq::KvmVmHooks;
use self::layout::RamRange;
use self::legacy::{PowerButton, VmExitReason};
use self::memory::{GuestRam, GuestRamError};
use self::vcpu::{VcpuContext, VcpuError, VcpuPause, VcpuThread};
use self::x86_64::boot::{self, BootError, BootInfo, EntryPoint};

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// blkvm's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
}

/// What the VM is made of (devices aside).
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    pub kernel: PathBuf,
    /// An initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (virtio-mmio entries are appended).
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// The serial console.
    pub serial: SerialOutput,
}

/// Why the VM could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("could not open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest RAM.
    #[error(transparent)]
    Ram(#[from] GuestRamError),
    /// Interrupt routing.
    #[error("could not set up interrupt routing")]
    Irq(#[source] std::io::Error),
    /// Devices.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// The serial output file.
    #[error("could not open the serial output '{0}'")]
    SerialFile(String, #[source] std::io::Error),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Writing the ACPI tables.
    #[error("could not write the ACPI tables")]
    AcpiWrite(#[source] vm_memory::GuestMemoryError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The vCPU kick signal.
    #[error("could not install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The serial input thread.
    #[error("could not start the serial input thread")]
    Input(#[source] std::io::Error),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
}

/// A VM being assembled.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    vm: Arc<VmFd>,
    ram: GuestRam,
    ram_ranges: Vec<RamRange>,
    devices: DeviceManager,
    exits_tx: Sender<VmExitReason>,
    exits_rx: Receiver<VmExitReason>,
}

fn serial_output(s: &SerialOutput) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match s {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(p) => Box::new(
            std::fs::File::create(p)
                .map_err(|e| VmError::SerialFile(p.display().to_string(), e))?,
        ),
    })
}

impl Vm {
    /// Creates the VM, its RAM (memfd-backed, with the 32-bit hole), the
    /// in-kernel irqchip and PIT, the buses and the legacy devices.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if config.cpus == 0 || config.cpus > 254 {
            return Err(VmError::Config(format!(
                "--cpus must be between 1 and 254, not {}",
                config.cpus
            )));
        }
        if config.memory < (16 << 20) || !config.memory.is_multiple_of(4096) {
            return Err(VmError::Config(format!(
                "--memory must be a multiple of 4 KiB and at least 16 MiB, not {}",
                config.memory
            )));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?,
        );
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;

        let ram_ranges = layout::ram_ranges(config.memory);
        let ram = GuestRam::new(&ram_ranges)?;
        ram.register_with_kvm(&vm)?;

        let hooks = Arc::new(KvmVmHooks::new(vm.clone()).map_err(VmError::Irq)?);
        let mut devices = DeviceManager::new(hooks);
        let (exits_tx, exits_rx) = channel();
        devices.add_legacy_devices(serial_output(&config.serial)?, exits_tx.clone())?;
        devices.add_power_button()?;
        if config.serial == SerialOutput::Stdout {
            if let Some(serial) = devices.serial() {
                legacy::forward_input(std::io::stdin(), serial.clone()).map_err(VmError::Input)?;
            }
        }
        Ok(Vm {
            config,
            kvm,
            vm,
            ram,
            ram_ranges,
            devices,
            exits_tx,
            exits_rx,
        })
    }

    /// The buses, allocators and hooks devices are attached with.
    pub fn devices(&mut self) -> &mut DeviceManager {
        &mut self.devices
    }

    /// Guest RAM (the mapping, the memfd and the regions).
    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    /// The guest memory devices use.
    pub fn guest_memory(&self) -> Arc<GuestMem> {
        self.ram.mem.clone()
    }

    /// Where exits that end the VM are reported (for devices that can end
    /// it).
    pub fn exit_sender(&self) -> Sender<VmExitReason> {
        self.exits_tx.clone()
    }

    fn load_guest(&self) -> Result<EntryPoint, VmError> {
        let mem = &*self.ram.mem;
        let kernel = boot::load_kernel(mem, &self.config.kernel)?;
        let low_end = self.ram_ranges[0].end();
        let initrd = match &self.config.initrd {
            Some(p) => {
                let max = kernel
                    .result
                    .setup_header
                    .filter(|h| h.initrd_addr_max != 0)
                    .map_or(low_end, |h| low_end.min(u64::from(h.initrd_addr_max) + 1));
                Some(boot::load_initrd(mem, p, kernel.result.kernel_end, max)?)
            }
            None => None,
        };
        let mmio: Vec<_> = self
            .devices
            .mmio_devices()
            .iter()
            .map(|s| (s.len, s.base, s.gsi))
            .collect();
        let cmdline = boot::build_cmdline(&self.config.cmdline, &mmio)?;
        let cmdline_len = boot::write_cmdline(mem, &cmdline)?;

        let tables = acpi::build(&acpi::AcpiConfig {
            num_cpus: self.config.cpus,
            mmio_devices: self.devices.mmio_devices(),
            pci: self.devices.pci_layout(),
            power_button_gsi: self.devices.power_button().map(|b| b.gsi()),
        })?;
        for (addr, bytes) in &tables.tables {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(VmError::AcpiWrite)?;
        }
        let e820 = layout::e820_map(&self.ram_ranges);
        let info = BootInfo {
            e820: &e820,
            cmdline_len,
            initrd,
            rsdp: tables.rsdp_addr(),
        };
        match kernel.entry {
            EntryPoint::Linux64(_) => {
                let params = boot::boot_params(kernel.result.setup_header, &info)?;
                boot::write_boot_params(mem, &params)?;
            }
            EntryPoint::Pvh(_) => boot::write_pvh_start_info(mem, &info)?,
        }
        Ok(kernel.entry)
    }

    /// Loads the guest, writes its boot structures and ACPI tables, and
    /// starts the vCPUs.
    pub fn boot(self) -> Result<RunningVm, VmError> {
        let entry = self.load_guest()?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        vcpu::install_kick_handler().map_err(VmError::Signal)?;
        let ctx = VcpuContext {
            pio: self.devices.pio_bus().clone(),
            mmio: self.devices.mmio_bus().clone(),
            exits: self.exits_tx.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::new(VcpuPause::default()),
        };
        let mut fds = Vec::new();
        for id in 0..self.config.cpus {
            let fd = self
                .vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            vcpu::configure(&fd, id, self.config.cpus, &supported, &*self.ram.mem, entry)?;
            fds.push(fd);
        }
        let mut threads = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            threads.push(VcpuThread::spawn(id as u8, fd, ctx.clone())?);
        }
        let control = VmControl {
            threads: Arc::new(Mutex::new(threads)),
            pause: ctx.pause,
            exits: self.exits_tx.clone(),
            power_button: self.devices.power_button().cloned(),
        };
        Ok(RunningVm {
            vm: self,
            control,
            stop: ctx.stop,
        })
    }
}

/// Why the vCPUs could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum VmControlError {
    /// A vCPU did not leave `KVM_RUN` in time.
    #[error("{parked} of {total} vCPUs stopped within {timeout:?}")]
    PauseTimeout {
        /// vCPUs that parked.
        parked: usize,
        /// All vCPUs.
        total: usize,
        /// How long they were given.
        timeout: Duration,
    },
    /// The VM has no power button.
    #[error("the VM has no power button")]
    NoPowerButton,
    /// Raising the button's interrupt failed.
    #[error("could not press the power button")]
    PowerButton(#[source] std::io::Error),
}

/// What the host can do to a running VM, from any thread.
#[derive(Clone)]
pub struct VmControl {
    threads: Arc<Mutex<Vec<VcpuThread>>>,
    pause: Arc<VcpuPause>,
    exits: Sender<VmExitReason>,
    power_button: Option<Arc<PowerButton>>,
}

/// How long a pause waits for the vCPUs to leave `KVM_RUN`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VmControl {
    /// Pauses every vCPU: each is kicked out of `KVM_RUN` and parks
    /// before the next run. Devices (and their IOThreads) go on, so
    /// requests in flight still complete. Returns false (doing nothing)
    /// if the vCPUs were already paused.
    pub fn pause(&self) -> Result<bool, VmControlError> {
        if !self.pause.request() {
            return Ok(false);
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
            let total = threads.len();
            let parked = self.pause.parked();
            if parked >= total {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Err(VmControlError::PauseTimeout {
                    parked,
                    total,
                    timeout: PAUSE_TIMEOUT,
                });
            }
            // A kick that lands outside KVM_RUN is lost; kick again until
            // every thread has parked.
            for t in threads.iter() {
                t.kick();
            }
            drop(threads);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets paused vCPUs run again. Returns false if they were not paused.
    pub fn resume(&self) -> bool {
        self.pause.resume()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.pause.is_paused()
    }

    /// Presses the ACPI power button (the guest decides what to do).
    pub fn press_power_button(&self) -> Result<(), VmControlError> {
        self.power_button
            .as_ref()
            .ok_or(VmControlError::NoPowerButton)?
            .press()
            .map_err(VmControlError::PowerButton)
    }

    /// Ends the VM: [`RunningVm::wait`] returns [`VmExitReason::Quit`].
    pub fn quit(&self) {
        let _ = self.exits.send(VmExitReason::Quit);
    }
}

/// A VM whose vCPUs run.
pub struct RunningVm {
    // Keeps RAM, the VM fd and the devices alive while vCPUs run.
    vm: Vm,
    control: VmControl,
    stop: Arc<AtomicBool>,
}

impl RunningVm {
    /// What the host can do to the VM while it runs.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// Waits for the first reason to stop, then stops every vCPU (paused
    /// ones too).
    pub fn wait(self) -> VmExitReason {
        let reason = self
            .vm
            .exits_rx
            .recv()
            .unwrap_or_else(|_| VmExitReason::Failed("every vCPU thread ended".into()));
        self.stop.store(true, Ordering::Release);
        self.control.pause.wake_all();
        let threads = std::mem::take(
            &mut *self
                .control
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for t in threads {
            // A vCPU that does not leave KVM_RUN within the timeout is
            // left to the process exit.
            t.stop(Duration::from_secs(2));
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use vm_memory::GuestAddress;

    use super::*;

    /// The tiny test guest (tests/guests/tiny.S), built with gcc.
    fn tiny_kernel(dir: &std::path::Path) -> PathBuf {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/tiny.S");
        let out = dir.join("tiny.elf");
        let ok = Command::new("gcc")
            .args(["-nostdlib", "-static", "-no-pie", "-DPOWEROFF"])
            .args(["-Wl,--build-id=none", "-Wl,-Ttext=0x200000"])
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap()
            .success();
        assert!(ok, "gcc {}", src.display());
        out
    }

    fn read_cstr(mem: &GuestMem, at: u64) -> String {
        let mut v = Vec::new();
        for i in 0.. {
            let b: u8 = mem.read_obj(GuestAddress(at + i)).unwrap();
            if b == 0 {
                break;
            }
            v.push(b);
        }
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn mmio_devices_reach_the_cmdline_and_the_dsdt() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = Vm::new(VmConfig {
            kernel: tiny_kernel(dir.path()),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            memory: 64 << 20,
            cpus: 1,
            serial: SerialOutput::File(dir.path().join("serial")),
        })
        .unwrap();
        let slot = vm.devices().add_mmio_device(0x1000).unwrap();
        let entry = vm.load_guest().unwrap();
        assert_eq!(entry, EntryPoint::Linux64(0x20_0000));
        let mem = vm.guest_memory();
        assert_eq!(
            read_cstr(&mem, layout::CMDLINE_START),
            format!(
                "console=ttyS0 virtio_mmio.device=4K@{:#x}:{}",
                slot.base, slot.gsi
            )
        );
        // RSDP -> XSDT -> FADT -> DSDT, as the guest walks them.
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let xsdt = rd(layout::ACPI_START + 24);
        let fadt = rd(xsdt + 36);
        let dsdt = rd(fadt + 140);
        let len = mem.read_obj::<u32>(GuestAddress(dsdt + 4)).unwrap() as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(dsdt)).unwrap();
        assert_eq!(&table[..4], b"DSDT");
        let find = |needle: &[u8]| table.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"VR00"));
        assert!(find(b"LNRO0005"));
        assert!(find(&(slot.base as u32).to_le_bytes()));
        // The zero page points at the RSDP.
        assert_eq!(rd(layout::ZERO_PAGE_START + 0x70), layout::ACPI_START);
    }

    #[test]
    fn bad_sizes_and_counts_are_refused_before_kvm() {
        let cfg = |memory, cpus| VmConfig {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            memory,
            cpus,
            serial: SerialOutput::Stdout,
        };
        for (m, c) in [
            (1 << 20, 1),
            ((64 << 20) + 1, 1),
            (64 << 20, 0),
            (64 << 20, 255),
        ] {
            assert!(matches!(Vm::new(cfg(m, c)), Err(VmError::Config(_))));
        }
    }
}
