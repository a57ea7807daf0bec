//! `blkvm run` end to end on this host's /dev/kvm, with the tiny assembly
//! guest of `tests/guests/tiny.S` (built here with gcc): console output on
//! COM1, the boot structures the guest checks (boot_params' "HdrS", PVH's
//! start_info magic), and each way a VM ends: ACPI S5 and i8042 reset exit
//! 0, a triple fault exits non-zero naming the exit and the vCPU.
//!
//! The guest runs a few hundred instructions, so this is quick even on a
//! PVM host that emulates guest code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tests::{blkvm_binary, workspace_root};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Assembles and links the tiny guest with `-D<variant>`.
fn tiny_guest(dir: &Path, variant: &str) -> Result<PathBuf> {
    let src = workspace_root().join("tests/guests/tiny.S");
    let out = dir.join(format!("tiny-{variant}.elf"));
    let status = Command::new("gcc")
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-Ttext=0x200000",
        ])
        .arg(format!("-D{variant}"))
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .context("running gcc")?;
    ensure!(status.success(), "gcc failed on {}", src.display());
    Ok(out)
}

/// Runs `blkvm run` with `args`, killing it after [`RUN_TIMEOUT`].
fn blkvm_run(args: &[&str]) -> Result<Output> {
    blkvm_run_with_input(args, None)
}

/// Runs `blkvm run` with `args` and `input` on its stdin (else /dev/null).
fn blkvm_run_with_input(args: &[&str], input: Option<&[u8]>) -> Result<Output> {
    let mut child = Command::new(blkvm_binary()?)
        .arg("run")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        stdin.write_all(data)?;
    }
    let deadline = Instant::now() + RUN_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            let out = child.wait_with_output()?;
            bail!(
                "blkvm run did not end in {RUN_TIMEOUT:?}; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_variant(variant: &str, extra: &[&str]) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let kernel = tiny_guest(dir.path(), variant)?;
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--memory", "64M"];
    args.extend_from_slice(extra);
    blkvm_run(&args)
}

#[test]
fn acpi_power_off_ends_the_vm_with_exit_0() -> Result<()> {
    let out = run_variant("POWEROFF", &[])?;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(
        stdout,
        "tiny guest: hello from 64-bit mode\ntiny guest: boot_params has HdrS\n"
    );
    Ok(())
}

#[test]
fn i8042_reset_ends_the_vm_with_exit_0() -> Result<()> {
    let out = run_variant("RESET", &["--cpus", "2"])?;
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("boot_params has HdrS"));
    Ok(())
}

#[test]
fn stdin_reaches_the_guest_through_com1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kernel = tiny_guest(dir.path(), "ECHO")?;
    let out = blkvm_run_with_input(
        &["--kernel", kernel.to_str().unwrap(), "--memory", "64M"],
        Some(b"ping from stdin\n"),
    )?;
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).ends_with("boot_params has HdrS\nping from stdin\n"),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

#[test]
fn triple_fault_fails_naming_the_exit_and_vcpu() -> Result<()> {
    let out = run_variant("TRIPLE_FAULT", &[])?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(text(&out.stdout).contains("hello from 64-bit mode"));
    assert!(
        stderr.contains("vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn pvh_note_selects_the_pvh_entry_with_start_info() -> Result<()> {
    let out = run_variant("PVH", &[])?;
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        "tiny guest: PVH entry, start_info magic ok\n"
    );
    Ok(())
}

#[test]
fn serial_goes_to_a_file_and_ram_spans_the_hole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kernel = tiny_guest(dir.path(), "POWEROFF")?;
    let log = dir.path().join("console.txt");
    let serial = format!("file:{}", log.display());
    // 4 GiB: RAM below 3 GiB and from 4 GiB up (sparse memfd, costs nothing).
    let out = blkvm_run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "4G",
        "--cpus",
        "4",
        "--serial",
        &serial,
    ])?;
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "");
    assert!(std::fs::read_to_string(&log)?.contains("boot_params has HdrS"));
    Ok(())
}

#[test]
fn pvm_host_is_announced_before_the_vm_starts() -> Result<()> {
    let out = run_variant("POWEROFF", &[])?;
    let stderr = text(&out.stderr);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let pvm = Path::new("/sys/module/kvm_pvm").exists() || !hw_virt;
    assert_eq!(
        stderr.contains("this host's /dev/kvm is PVM"),
        pvm,
        "pvm={pvm}: {stderr}"
    );
    if pvm {
        assert!(stderr.contains("decompressor"), "{stderr}");
    }
    Ok(())
}

#[test]
fn devices_are_parsed_checked_and_named_in_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kernel = tiny_guest(dir.path(), "POWEROFF")?;
    let k = kernel.to_str().unwrap();
    let base = ["--kernel", k, "--memory", "64M"];
    let run = |extra: &[&str]| -> Result<String> {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let out = blkvm_run(&a)?;
        ensure!(!out.status.success(), "expected a failure for {extra:?}");
        Ok(text(&out.stderr))
    };
    let e = run(&["--device", "virtio-blk-pci,drive=nope"])?;
    assert!(e.contains("device 0 (virtio-blk-pci, drive 'nope')"), "{e}");
    let e = run(&["--device", "virtio-blk-pci,drive=d0,bogus=1"])?;
    assert!(e.contains("Invalid parameter 'bogus'"), "{e}");
    let e = run(&[
        "--blockdev",
        "null-co,node-name=d0,size=1M",
        "--device",
        "virtio-blk-device,drive=d0,queue-size=100",
    ])?;
    assert!(e.contains("invalid queue-size property (100)"), "{e}");
    // Well-formed devices on both transports are attached and the guest
    // (which never drives them) powers off as before.
    let mut a = base.to_vec();
    a.extend_from_slice(&[
        "--blockdev",
        "null-co,node-name=d0,size=1M",
        "--blockdev",
        "null-co,node-name=d1,size=1M",
        "--object",
        "iothread,id=io0",
        "--device",
        "virtio-blk-device,id=disk0,drive=d0,iothread=io0,num-queues=2",
        "--device",
        "virtio-blk-pci,id=disk1,drive=d1",
    ]);
    let out = blkvm_run(&a)?;
    ensure!(out.status.success(), "with devices: {}", text(&out.stderr));
    let out = blkvm_run(&["--kernel", k, "--memory", "1x"])?;
    let e = text(&out.stderr);
    assert!(!out.status.success() && e.contains("--memory 1x"), "{e}");
    Ok(())
}
