//! The few legacy devices a microVM keeps, on the PIO bus: the 8250 UART
//! (COM1, vm-superio), the i8042 controller's reset line (vm-superio), and
//! the ACPI sleep control register of a hardware-reduced platform, whose S5
//! write is how Linux powers off, and the power button behind the ACPI
//! Generic Event Device (QMP `system_powerdown`).

use std::io::{self, Read, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::BusDevice;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's ports.
pub const SERIAL_PORT: u64 = 0x3f8;
/// COM1's port count.
pub const SERIAL_PORT_LEN: u64 = 8;
/// The i8042's data port; its command port is 4 bytes up (0x64).
pub const I8042_PORT: u64 = 0x60;
/// The i8042 range covers 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// The FADT's sleep control register (1 byte) and, next to it, the sleep
/// status register (1 byte).
pub const ACPI_SLEEP_PORT: u64 = 0x600;
/// Both sleep registers.
pub const ACPI_SLEEP_PORT_LEN: u64 = 2;
/// The `SLP_TYP` value of S5, as the DSDT's `_S5_` package says.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Why the VM stopped (the first reason wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExitReason {
    /// ACPI S5 (the guest's `poweroff`).
    PowerOff,
    /// The i8042 reset command (the guest's `reboot` with `reboot=k`).
    Reset,
    /// The host ended the VM (QMP `quit`).
    Quit,
    /// Something the VM cannot continue from (a triple fault, a KVM error).
    Failed(String),
}

/// Raises an interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Reports a VM exit to the thread that waits for it.
#[derive(Clone)]
pub struct ExitTrigger {
    tx: Sender<VmExitReason>,
    reason: VmExitReason,
}

impl ExitTrigger {
    /// A trigger that reports `reason` on `tx`.
    pub fn new(tx: Sender<VmExitReason>, reason: VmExitReason) -> Self {
        ExitTrigger { tx, reason }
    }
}

impl Trigger for ExitTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        // The receiver is gone only when the VM is already stopping.
        let _ = self.tx.send(self.reason.clone());
        Ok(())
    }
}

/// The power button of a hardware-reduced platform: an ACPI Generic
/// Event Device (`ACPI0013`) whose interrupt line runs its `_EVT` method,
/// which notifies the power button device (`PNP0C0C`) with 0x80, "button
/// pressed" (ACPI 6.5, 5.6.9 and 4.8.2.2.1.2). The DSDT part is in
/// [`super::acpi`]; this is the line.
pub struct PowerButton {
    irq: EventFd,
    gsi: u32,
}

impl PowerButton {
    /// A button whose GED interrupt is `irq`, an irqfd on line `gsi`.
    pub fn new(irq: EventFd, gsi: u32) -> Self {
        PowerButton { irq, gsi }
    }

    /// The GED's interrupt line.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Presses the button: raises the GED's (edge-triggered) interrupt.
    pub fn press(&self) -> io::Result<()> {
        self.irq.write(1)
    }
}

/// COM1 on the PIO bus.
pub struct SerialDevice(
    pub Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
);

impl SerialDevice {
    /// A UART whose output goes to `out` and whose interrupt is `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), out))
    }
}

impl SerialDevice {
    /// Queues guest input; returns how many bytes fit in the FIFO.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.0.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

/// Forwards `input` (blkvm's stdin) to the UART's receive FIFO on its own
/// thread, waiting while the guest has not drained the FIFO. The thread
/// ends at end of input.
pub fn forward_input<R: Read + Send + 'static>(
    mut input: R,
    serial: Arc<Mutex<SerialDevice>>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            sandbox::enter(sandbox::ThreadKind::SerialInput);
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut off = 0;
                while off < n {
                    let wrote = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue(&buf[off..n]);
                    off += wrote;
                    if wrote == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An output error (a closed stdout) loses console bytes, not
            // the VM.
            let _ = self.0.write(off, b);
        }
    }
}

/// The i8042: only its CPU reset command does anything.
pub struct I8042(pub I8042Device<ExitTrigger>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.0.write(off, b);
        }
    }
}

/// The hardware-reduced ACPI sleep registers (FADT `SLEEP_CONTROL_REG`
/// at offset 0, `SLEEP_STATUS_REG` at offset 1). Writing `SLP_EN` with
/// `SLP_TYP` = S5 powers the VM off; other sleep states are ignored.
pub struct AcpiSleep {
    power_off: ExitTrigger,
}

impl AcpiSleep {
    /// Sleep control bits (ACPI 6.5, 4.8.3.7): SLP_TYP in 4:2, SLP_EN bit 5.
    const SLP_EN: u8 = 1 << 5;

    /// Registers that report a power-off through `power_off`.
    pub fn new(power_off: ExitTrigger) -> Self {
        AcpiSleep { power_off }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake status to report.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & Self::SLP_EN != 0 && (v >> 2) & 7 == S5_SLEEP_TYPE {
            let _ = self.power_off.trigger();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_reach_the_output_and_raise_the_irq_when_enabled() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        // IER: THR empty interrupt.
        s.write(1, &[0x02]);
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn input_reaches_the_receive_fifo_past_its_capacity() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(io::sink()),
        )));
        // IER: received data available interrupt.
        serial.lock().unwrap().write(1, &[0x01]);
        let input: Vec<u8> = (0..200u8).collect();
        let t = forward_input(io::Cursor::new(input.clone()), serial.clone()).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < input.len() && std::time::Instant::now() < deadline {
            let mut s = serial.lock().unwrap();
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut b = [0u8];
                s.read(0, &mut b);
                got.push(b[0]);
            } else {
                drop(s);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        t.join().unwrap();
        assert_eq!(got, input);
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn i8042_reset_command_reports_a_reset() {
        let (tx, rx) = channel();
        let mut k = I8042(I8042Device::new(ExitTrigger::new(tx, VmExitReason::Reset)));
        k.write(0, &[0xfe]);
        assert!(rx.try_recv().is_err(), "data port writes do nothing");
        k.write(4, &[0xd1]);
        assert!(rx.try_recv().is_err(), "other commands do nothing");
        k.write(4, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(VmExitReason::Reset));
    }

    #[test]
    fn only_slp_en_with_s5_powers_off() {
        let (tx, rx) = channel();
        let mut d = AcpiSleep::new(ExitTrigger::new(tx, VmExitReason::PowerOff));
        d.write(0, &[5 << 2]); // no SLP_EN
        d.write(0, &[(3 << 2) | 0x20]); // S3
        d.write(1, &[(5 << 2) | 0x20]); // status register
        assert!(rx.try_recv().is_err());
        d.write(0, &[(5 << 2) | 0x20]);
        assert_eq!(rx.try_recv(), Ok(VmExitReason::PowerOff));
    }
}
