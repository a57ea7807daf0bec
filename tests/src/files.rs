//! Small helpers of the peer tests: run a tool and keep its output, make
//! an image with known data.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Runs `cmd`, failing with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `dir/name`: an image of `size_mib` MiB whose first `data_mib` MiB are
/// pseudo-random bytes from `seed` (the rest a hole).
pub fn data_image(
    dir: &Path,
    name: &str,
    data_mib: u64,
    size_mib: u64,
    seed: u64,
) -> Result<PathBuf> {
    let p = dir.join(name);
    let mut data = vec![0u8; (data_mib << 20) as usize];
    let mut x = seed | 1;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&p, &data)?;
    std::fs::File::options()
        .write(true)
        .open(&p)?
        .set_len(size_mib << 20)?;
    Ok(p)
}
