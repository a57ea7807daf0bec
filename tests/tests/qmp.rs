//! `blkvm storage-daemon` over QMP with the `qemu.qmp` package from PyPI,
//! the client QEMU's own tools are built on. The scenarios live in
//! `tests/qmp/storage_daemon.py`; `resources/setup.sh` installs the
//! package into `resources/out/venv`.

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
        .arg(root.join("tests/qmp/storage_daemon.py"))
        .arg(name)
        .arg("--blkvm")
        .arg(blkvm_binary()?)
        .arg("--workdir")
        .arg(work.path())
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
            if entry.path().extension().is_some_and(|e| e == "log") {
                logs += &format!(
                    "--- {}:\n{}\n",
                    entry.path().display(),
                    std::fs::read_to_string(entry.path()).unwrap_or_default()
                );
            }
        }
        bail!("scenario {name} failed ({}):\n{text}\n{logs}", out.status);
    }
    Ok(())
}

#[test]
fn add_and_export_a_node_while_a_client_does_io() -> Result<()> {
    scenario("add_and_export_during_io")
}

#[test]
fn resized_node_shows_its_new_capacity_through_the_export() -> Result<()> {
    scenario("resize_is_seen_through_the_export")
}

#[test]
fn export_del_sends_block_export_deleted() -> Result<()> {
    scenario("export_del_sends_the_event")
}

#[test]
fn failed_host_write_raises_block_io_error() -> Result<()> {
    scenario("io_error_event")
}

#[test]
fn bad_qmp_input_gets_qemu_errors_and_nothing_stops() -> Result<()> {
    scenario("bad_input_keeps_everything_working")
}

#[test]
fn query_iothreads_lists_objects_and_threads() -> Result<()> {
    scenario("iothreads_are_listed")
}

#[test]
fn throttle_limits_change_live_over_qmp() -> Result<()> {
    scenario("throttle_limits_change_live")
}

#[test]
fn qcow2_backing_chain_is_shown_as_qemu_storage_daemon_shows_it() -> Result<()> {
    scenario("qcow2_chain_shown_as_qemu_shows_it")
}
