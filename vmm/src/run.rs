//! `blkvm run`: boot a guest in a KVM microVM with virtio-blk disks on the
//! block layer. Options follow QEMU's (`--blockdev`, `--object iothread`,
//! `--device virtio-blk-pci|virtio-blk-device,drive=...`).
//!
//! The VM ends with exit code 0 when the guest powers off (ACPI S5) or
//! resets (i8042), or QMP's `quit` ends it, and non-zero with a message
//! naming the exit and the vCPU when it cannot continue (triple fault,
//! KVM error). With `--qmp` (or `--chardev` and `--monitor`), a QMP server
//! serves [`crate::run_qmp::VmMonitor`] and announces the end with a
//! SHUTDOWN event.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use clap::Args;
use qapi::device::DeviceOptions;
use serde_json::json;

use vmm::attach;
use vmm::vm::legacy::VmExitReason;
use vmm::vm::{pvm, SerialOutput, Vm, VmConfig};

use crate::qmp::{Events, QmpServer};
use crate::run_qmp::VmMonitor;
use crate::startup::{self, MonitorArgs, SandboxArgs};

/// The default kernel command line: serial console, reboot through the
/// i8042 (which ends the VM), no reboot loop after a panic.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// `blkvm run` arguments.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The guest kernel: a bzImage, or an ELF vmlinux (PVH entry when it
    /// has the Xen PVH note).
    #[arg(long)]
    kernel: PathBuf,
    /// An initrd.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM, QEMU size syntax (512M, 2G).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// A block node, QEMU's --blockdev syntax; repeatable.
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    blockdevs: Vec<String>,
    /// An object: `iothread,id=ID[,poll-max-ns=N]`, `throttle-group`,
    /// `tls-creds-x509` or `secret` (as for storage-daemon); repeatable.
    #[arg(long = "object", value_name = "OPTIONS")]
    objects: Vec<String>,
    /// A device: `virtio-blk-pci|virtio-blk-device,drive=NODE[,iothread=ID][,num-queues=N]
    /// [,queue-size=N][,serial=S][,logical_block_size=N][,physical_block_size=N]
    /// [,discard=on|off][,write-zeroes=on|off][,config-wce=on|off]`; repeatable.
    #[arg(long = "device", value_name = "OPTIONS")]
    devices: Vec<String>,
    /// The serial console: `stdio` or `file:PATH`.
    #[arg(long, default_value = "stdio")]
    serial: String,
    #[command(flatten)]
    monitor: MonitorArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

fn parse_serial(s: &str) -> Result<SerialOutput> {
    match s {
        "stdio" => Ok(SerialOutput::Stdout),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(p.into())),
            _ => bail!("--serial {s}: expected 'stdio' or 'file:PATH'"),
        },
    }
}

/// Runs the VM until the guest powers off or resets, or the VM fails.
pub fn run(args: RunArgs) -> Result<()> {
    // Before any thread starts: each enters its own filter.
    args.sandbox.install(vmm::sandbox::Profile::Run)?;
    let memory =
        qapi::parse_size(&args.memory).with_context(|| format!("--memory {}", args.memory))?;
    let serial = parse_serial(&args.serial)?;
    let qmp_addrs = args.monitor.addresses()?;
    let objects = startup::objects(&args.objects)?;
    let (mut graph, _) = startup::open_blockdevs(&args.blockdevs, &objects)?;
    let iothreads = objects.iothreads;
    let mut device_opts: Vec<DeviceOptions> = Vec::new();
    for arg in &args.devices {
        let d = qapi::device::parse_device(arg).with_context(|| format!("--device {arg}"))?;
        if let Some(id) = &d.id {
            if device_opts.iter().any(|o| o.id.as_ref() == Some(id)) {
                bail!("--device {arg}: Duplicate device ID '{id}'");
            }
        }
        device_opts.push(d);
    }
    let chardevs = args.monitor.chardevs()?;
    let prepared = attach::prepare_devices(&mut graph, &device_opts, &iothreads, &chardevs)?;

    if pvm::host_is_pvm() {
        eprintln!("{}", pvm::PVM_WARNING);
    }
    let mut vm = Vm::new(VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory,
        cpus: args.cpus,
        serial,
    })?;
    vm.memory().register_with_block_layer(graph.registrar());
    let mem = vm.guest_memory();
    let attached = Arc::new(attach::attach_devices(
        vm.devices(),
        &mem,
        prepared,
        &iothreads,
    )?);
    let graph = Arc::new(Mutex::new(graph));
    let events = Events::default();
    let running = vm.boot()?;
    let mut servers = Vec::new();
    if !qmp_addrs.is_empty() {
        let monitor = Arc::new(VmMonitor::new(
            graph.clone(),
            attached.clone(),
            running.control(),
            events.clone(),
        ));
        for a in &qmp_addrs {
            servers.push(QmpServer::start(a, monitor.clone(), events.clone())?);
        }
    }
    sandbox::enter(sandbox::ThreadKind::Main);
    let reason = running.wait();
    let shutdown = match &reason {
        VmExitReason::PowerOff => Some((true, "guest-shutdown")),
        VmExitReason::Reset => Some((true, "guest-reset")),
        VmExitReason::Quit => Some((false, "host-qmp-quit")),
        VmExitReason::Failed(_) => None,
    };
    if let Some((guest, reason)) = shutdown {
        events.emit("SHUTDOWN", Some(json!({"guest": guest, "reason": reason})));
    }
    for s in servers {
        s.close();
    }
    drop(attached);
    match reason {
        VmExitReason::PowerOff | VmExitReason::Reset | VmExitReason::Quit => Ok(()),
        VmExitReason::Failed(msg) => bail!("the VM stopped: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_takes_stdio_or_a_file() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialOutput::Stdout);
        assert_eq!(
            parse_serial("file:/tmp/x").unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("pty").is_err());
    }
}
