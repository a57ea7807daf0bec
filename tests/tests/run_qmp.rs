//! `blkvm run` over QMP with the `qemu.qmp` package from PyPI, the client
//! QEMU's own tools are built on, booting the tiny assembly guest of
//! `tests/guests/tiny.S` on this host's /dev/kvm. The scenarios live in
//! `tests/qmp/run.py`; `resources/setup.sh` installs the package into
//! `resources/out/venv`. What only a real guest shows (the resize seen by
//! the guest, the power button obeyed) is in `nested_run_qmp.rs`.

use std::process::Command;

use anyhow::{bail, Context, Result};
use tests::{blkvm_binary, workspace_root};

fn scenario(name: &str) -> Result<()> {
    let root = workspace_root();
    let python = root.join("resources/out/venv/bin/python");
    if !python.exists() {
        bail!(
            "{} is missing: run resources/setup.sh (it installs qemu.qmp)",
            python.display()
        );
    }
    let work = tempfile::tempdir()?;
    let out = Command::new(&python)
        .arg(root.join("tests/qmp/run.py"))
        .arg(name)
        .arg("--blkvm")
        .arg(blkvm_binary()?)
        .arg("--workdir")
        .arg(work.path())
        .arg("--tiny")
        .arg(root.join("tests/guests/tiny.S"))
        .output()
        .context("could not run the qemu.qmp scenario")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !text.contains(&format!("{name}: ok")) {
        let mut logs = String::new();
        for entry in std::fs::read_dir(work.path())?.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log" || e == "console") {
                logs += &format!(
                    "--- {}:\n{}\n",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap_or_default()
                );
            }
        }
        bail!("scenario {name} failed ({}):\n{text}\n{logs}", out.status);
    }
    Ok(())
}

#[test]
fn stop_parks_the_vcpus_and_cont_resumes_them_with_events() -> Result<()> {
    scenario("stop_and_cont")
}

#[test]
fn block_queries_node_management_and_resize_on_a_running_vm() -> Result<()> {
    scenario("block_devices")
}

#[test]
fn system_powerdown_presses_the_button_and_emits_powerdown() -> Result<()> {
    scenario("powerdown_event")
}

#[test]
fn guest_poweroff_emits_shutdown_before_exit() -> Result<()> {
    scenario("guest_poweroff_event")
}
