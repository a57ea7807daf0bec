//! Fixtures for blkvm's integration tests (`tests/tests/*.rs`, one file
//! per feature).
//!
//! The real-Linux-guest fixture: on these machines `/dev/kvm` cannot boot
//! a stock kernel, so a real guest's virtio-blk driver reaches a
//! vhost-user-blk backend through QEMU with TCG. [`TestVm`] boots the
//! Debian kernel with the busybox initramfs of `resources/guest/`, hands
//! it a shell script, and collects the `BLKVM-RESULT key=value` lines the
//! script prints on the serial console; [`StorageDaemon`] runs the backend
//! (qemu-storage-daemon today, `blkvm storage-daemon` next) with the same
//! QEMU-shaped options, so swapping the backend is one [`Backend`] value.
//!
//! The nested fixture, [`NestedVm`], proves `blkvm run` itself: QEMU TCG
//! (`-cpu max`, which emulates AMD SVM) boots an L1 Debian kernel whose
//! kvm-amd gives real nested KVM, and `blkvm run` boots the L2 guest
//! inside it (`resources/nested/README.md`).
//!
//! ```no_run
//! # use tests::*;
//! # fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let export = VhostUserBlkExport::new(dir.path().join("disk.img"), dir.path().join("vhost.sock"));
//! std::fs::File::create(&export.image)?.set_len(64 << 20)?;
//! let _daemon = StorageDaemon::start(Backend::QemuStorageDaemon, [&export])?;
//! let out = TestVm::new("disk_info vda").disk(export.disk()).run()?;
//! assert_eq!(out.result("vda.size")?, "131072");
//! # Ok(())
//! # }
//! ```

mod cpio;
mod daemon;
pub mod files;
mod guest;
mod nested;
mod output;
pub mod qmp_client;
pub mod tls;
mod vm;

pub use daemon::{blkvm_binary, Backend, StorageDaemon, VhostUserBlkExport};
pub use guest::GuestImage;
pub use nested::{NestedImage, NestedOutput, NestedVm, RunningNestedVm, L2_PREFIX};
pub use output::GuestOutput;
pub use vm::{RunningVm, TestVm, VhostUserBlkDisk};

use std::path::PathBuf;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The bytes of `yes TEXT | head -c LEN` in the guest: `TEXT\n` repeated,
/// cut at `len`. A pattern both sides can make without sharing a file.
pub fn yes_pattern(text: &str, len: usize) -> Vec<u8> {
    let line = format!("{text}\n");
    line.bytes().cycle().take(len).collect()
}

/// The md5 of `data` as lowercase hex, as the guest's `md5sum` prints it
/// (computed by the host's `md5sum`, which coreutils always provides).
pub fn md5_hex(data: &[u8]) -> anyhow::Result<String> {
    use std::{
        io::Write,
        process::{Command, Stdio},
    };

    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = {
        let data = data.to_vec();
        std::thread::spawn(move || stdin.write_all(&data))
    };
    let output = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("md5sum writer panicked"))??;
    anyhow::ensure!(output.status.success(), "md5sum failed: {}", output.status);
    let text = String::from_utf8(output.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
