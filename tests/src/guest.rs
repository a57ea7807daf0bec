//! The guest's kernel and base initramfs, built by `resources/guest/build.sh`
//! under `resources/out/guest/` the first time a test needs them, and the
//! per-test initrd: the base initramfs with the test's script appended as a
//! second cpio archive.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{bail, Context, Result};

use crate::{cpio, workspace_root};

/// Where the guest's script lands in its root file system; `/init` runs it.
const SCRIPT_PATH: &str = "test.sh";

/// The kernel and base initramfs every test guest boots.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The Debian bzImage.
    pub kernel: PathBuf,
    /// busybox, `/init`, the virtio modules; no test script.
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// The guest image, built on first use in this process (the build
    /// script is idempotent and takes a lock, so parallel test processes
    /// may all call it).
    pub fn get() -> Result<&'static GuestImage> {
        static IMAGE: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| Self::build().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn build() -> Result<GuestImage> {
        let resources = workspace_root().join("resources");
        let script = resources.join("guest/build.sh");
        let out = resources.join("out/guest");
        let output = Command::new(&script)
            .env("GUEST_OUT", &out)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} failed ({}); run resources/setup.sh first?\n{}{}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let image = GuestImage {
            kernel: out.join("vmlinuz"),
            initramfs: out.join("initramfs.cpio.gz"),
        };
        for path in [&image.kernel, &image.initramfs] {
            if !path.is_file() {
                bail!("{} did not make {}", script.display(), path.display());
            }
        }
        Ok(image)
    }

    /// Writes to `path` the base initramfs followed by a cpio archive
    /// holding `/test.sh` with `script`. The base is padded to a 512-byte
    /// boundary first: the kernel skips zeros between archives, and an
    /// uncompressed archive must start 4-byte aligned.
    pub fn initrd_with_script(&self, script: &str, path: &Path) -> Result<()> {
        let initrd = self.initrd_bytes_with_script(script)?;
        fs::write(path, initrd).with_context(|| format!("writing {}", path.display()))
    }

    /// The initrd of [`initrd_with_script`](Self::initrd_with_script), in
    /// memory.
    pub fn initrd_bytes_with_script(&self, script: &str) -> Result<Vec<u8>> {
        let mut initrd = fs::read(&self.initramfs)
            .with_context(|| format!("reading {}", self.initramfs.display()))?;
        cpio::pad_for_next_archive(&mut initrd);
        initrd.extend(cpio::archive(&[(SCRIPT_PATH, 0o755, script.as_bytes())]));
        Ok(initrd)
    }
}
