//! The vhost-user-blk backend a [`TestVm`](crate::TestVm) connects to: a
//! storage daemon process, qemu-storage-daemon or `blkvm storage-daemon`.
//! Both take the same QEMU-shaped options, so a test picks its backend
//! with one [`Backend`] value and keeps everything else.

use std::{
    ffi::OsString,
    fs::{self, File},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::{workspace_root, VhostUserBlkDisk};

/// How long a daemon may take to write its pid file (it does so once its
/// exports listen).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`StorageDaemon::stop`] waits after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Which storage daemon serves the exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// QEMU's `qemu-storage-daemon` from `PATH`.
    QemuStorageDaemon,
    /// `blkvm storage-daemon`: `$BLKVM_BIN`, or the `blkvm` of this
    /// workspace, built on first use into the test binary's target
    /// directory.
    Blkvm,
}

impl Backend {
    fn command(self) -> Result<Command> {
        match self {
            Backend::QemuStorageDaemon => Ok(Command::new("qemu-storage-daemon")),
            Backend::Blkvm => {
                let mut command = Command::new(blkvm_binary()?);
                command.arg("storage-daemon");
                Ok(command)
            }
        }
    }
}

/// `$BLKVM_BIN`, or `blkvm` built by cargo into the target directory and
/// profile of the running test binary (`target/<profile>/deps/<test>`).
/// `cargo nextest run --workspace` does not build it (bins are built only
/// for their own package's integration tests), so the first call in a
/// process runs `cargo build -p vmm --bin blkvm`: a no-op when it is
/// fresh.
pub fn blkvm_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    if let Some(path) = std::env::var_os("BLKVM_BIN") {
        return Ok(PathBuf::from(path));
    }
    BUILT
        .get_or_init(|| build_blkvm().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

fn build_blkvm() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the test binary")?;
    let (profile_dir, target_dir) = exe
        .parent()
        .and_then(|deps| deps.parent())
        .and_then(|profile| Some((profile, profile.parent()?)))
        .ok_or_else(|| anyhow!("no target directory above {}", exe.display()))?;
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => "dev",
        Some(name) => name,
    };
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--quiet",
            "-p",
            "vmm",
            "--bin",
            "blkvm",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .with_context(|| format!("running {cargo} build"))?;
    if !output.status.success() {
        bail!(
            "cargo build -p vmm --bin blkvm failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let blkvm = profile_dir.join("blkvm");
    if !blkvm.is_file() {
        bail!("cargo built no {}", blkvm.display());
    }
    Ok(blkvm)
}

/// A file-backed vhost-user-blk export: `file` node `fN` over `image`,
/// format node `dN` (`raw` unless [`VhostUserBlkExport::format`] says
/// otherwise) over it, export `eN` on `socket` (N is its position in the
/// list given to [`StorageDaemon::start`]).
#[derive(Debug, Clone)]
pub struct VhostUserBlkExport {
    /// The image file; it must exist.
    pub image: PathBuf,
    /// The driver of the format node over the file: `raw` or `qcow2`
    /// (whose backing chain the daemon opens from the image's header).
    pub format: &'static str,
    /// The unix socket the daemon listens on.
    pub socket: PathBuf,
    /// `writable=on|off`.
    pub writable: bool,
    /// `num-queues=N`: the most queues the frontend may use.
    pub num_queues: u16,
    /// `logical-block-size=N`, or the daemon's default (512).
    pub logical_block_size: Option<u32>,
    /// `aio=` of the file node: `threads` or `io_uring`.
    pub aio: &'static str,
    /// `cache.direct=on|off` of the file node.
    pub cache_direct: bool,
    /// `discard=unmap` on both nodes (guest discards reach the image).
    pub discard_unmap: bool,
    /// An `--object iothread` of its own with this `poll-max-ns`, serving
    /// all of the export's queues.
    pub iothread_poll_max_ns: Option<u64>,
}

impl VhostUserBlkExport {
    /// A writable one-queue export of `image` on `socket`, through
    /// `aio=io_uring,cache.direct=on`.
    pub fn new(image: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Self {
        VhostUserBlkExport {
            image: image.into(),
            format: "raw",
            socket: socket.into(),
            writable: true,
            num_queues: 1,
            logical_block_size: None,
            aio: "io_uring",
            cache_direct: true,
            discard_unmap: false,
            iothread_poll_max_ns: None,
        }
    }

    /// Serves the export from an iothread of its own that busy-polls for
    /// up to `poll_max_ns` (QEMU's `poll-max-ns`).
    pub fn iothread(mut self, poll_max_ns: u64) -> Self {
        self.iothread_poll_max_ns = Some(poll_max_ns);
        self
    }

    /// Opens the image with the `format` driver (`raw`, `qcow2`).
    pub fn format(mut self, format: &'static str) -> Self {
        self.format = format;
        self
    }

    /// Passes guest discards down to the image (`discard=unmap`).
    pub fn discard_unmap(mut self) -> Self {
        self.discard_unmap = true;
        self
    }

    /// Makes the export read-only (`writable=off`).
    pub fn read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    /// Sets `num-queues`.
    pub fn num_queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    /// Sets `logical-block-size`.
    pub fn logical_block_size(mut self, size: u32) -> Self {
        self.logical_block_size = Some(size);
        self
    }

    /// The daemon arguments for this export as number `n`.
    pub fn args(&self, n: usize) -> Vec<OsString> {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let image = self.image.to_string_lossy().replace(',', ",,");
        let socket = self.socket.to_string_lossy().replace(',', ",,");
        let mut export = format!(
            "type=vhost-user-blk,id=e{n},node-name=d{n},addr.type=unix,addr.path={socket},\
             writable={},num-queues={}",
            onoff(self.writable),
            self.num_queues
        );
        if let Some(size) = self.logical_block_size {
            export.push_str(&format!(",logical-block-size={size}"));
        }
        let mut object = Vec::new();
        if let Some(ns) = self.iothread_poll_max_ns {
            export.push_str(&format!(",iothread=io{n}"));
            object.push("--object".to_owned());
            object.push(format!("iothread,id=io{n},poll-max-ns={ns}"));
        }
        let discard = if self.discard_unmap {
            ",discard=unmap"
        } else {
            ""
        };
        object
            .into_iter()
            .chain([
                "--blockdev".to_owned(),
                format!(
                    "driver=file,node-name=f{n},filename={image},aio={},cache.direct={}{discard}",
                    self.aio,
                    onoff(self.cache_direct)
                ),
                "--blockdev".to_owned(),
                format!("driver={},node-name=d{n},file=f{n}{discard}", self.format),
                "--export".to_owned(),
                export,
            ])
            .map(OsString::from)
            .collect()
    }

    /// The guest disk that connects to this export, with as many queues
    /// as it offers.
    pub fn disk(&self) -> VhostUserBlkDisk {
        VhostUserBlkDisk::new(&self.socket).num_queues(self.num_queues)
    }
}

/// A running storage daemon, killed when dropped.
#[derive(Debug)]
pub struct StorageDaemon {
    child: Child,
    dir: TempDir,
}

impl StorageDaemon {
    /// Starts `backend` serving `exports` and waits until it is ready.
    pub fn start<'a>(
        backend: Backend,
        exports: impl IntoIterator<Item = &'a VhostUserBlkExport>,
    ) -> Result<Self> {
        let args: Vec<OsString> = exports
            .into_iter()
            .enumerate()
            .flat_map(|(n, export)| export.args(n))
            .collect();
        Self::start_with_args(backend, args)
    }

    /// Starts `backend` with `args` (plus `--pidfile`) and waits until it
    /// is ready: both daemons write the pid file once their exports listen.
    pub fn start_with_args(
        backend: Backend,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("blkvm-daemon-")
            .tempdir()
            .context("creating the daemon's temporary directory")?;
        let pidfile = dir.path().join("pid");
        let log = File::create(dir.path().join("log")).context("creating the daemon log")?;
        let mut command = backend.command()?;
        command
            .args(args.into_iter().map(Into::into))
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the daemon log")?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let mut daemon = StorageDaemon { child, dir };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if fs::read_to_string(&pidfile).is_ok_and(|pid| !pid.trim().is_empty()) {
                return Ok(daemon);
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("{command:?} exited with {status}:\n{}", daemon.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{command:?} wrote no pid file in {START_TIMEOUT:?}:\n{}",
                    daemon.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Like [`StorageDaemon::stop`], also returning everything the daemon
    /// printed (its exit report included).
    pub fn stop_with_log(self) -> Result<(ExitStatus, String)> {
        let log_path = self.dir.path().join("log");
        let dir = tempfile::tempdir().context("keeping the daemon log")?;
        let kept = dir.path().join("log");
        let status = {
            // The daemon writes to the log until it exits; the file stays
            // open through a hard link once `self.dir` is gone.
            fs::hard_link(&log_path, &kept).context("linking the daemon log")?;
            self.stop()?
        };
        Ok((status, fs::read_to_string(&kept).unwrap_or_default()))
    }

    /// Kills the daemon at once (SIGKILL: nothing is flushed or closed
    /// cleanly) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the daemon as a user would (SIGTERM) and returns its exit
    /// status; SIGKILL if it is still running after 20 s.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.child.id());
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!(
                    "the daemon ignored SIGTERM for {STOP_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
