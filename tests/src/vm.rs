//! [`TestVm`]: a real Linux guest under QEMU (TCG) whose disks are
//! `vhost-user-blk-pci` devices connected to a backend's unix sockets.
//!
//! The test's shell script travels inside the initrd (a cpio archive
//! appended to the base initramfs, see [`GuestImage::initrd_with_script`]);
//! the guest's `/init` runs it under `sh -e` with the helpers of
//! `resources/guest/lib.sh`, then prints `BLKVM-DONE rc=N` and powers off.
//! Everything arrives on the serial console, which QEMU writes to its
//! stdout: `BLKVM-RESULT key=value` lines become [`GuestOutput::results`].

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use tempfile::TempDir;

use crate::{
    output::{console_block, GuestOutput},
    GuestImage,
};

/// Boot takes ~4-9 s under TCG; this leaves room for a slow, shared CI
/// machine and a test that moves a few hundred MiB.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long QEMU may take to exit once the guest has said `BLKVM-DONE`.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// One `vhost-user-blk-pci` device: QEMU connects to `socket` as the
/// vhost-user frontend.
#[derive(Debug, Clone)]
pub struct VhostUserBlkDisk {
    /// The backend's listening unix socket.
    pub socket: PathBuf,
    /// Virtqueues; the backend must offer at least this many. The guest
    /// driver uses at most one per vCPU (see [`TestVm::cpus`]).
    pub num_queues: u16,
}

impl VhostUserBlkDisk {
    /// A one-queue disk on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VhostUserBlkDisk {
            socket: socket.into(),
            num_queues: 1,
        }
    }

    /// Sets the number of virtqueues.
    pub fn num_queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }
}

/// A test guest, built up and then started with [`run`](Self::run) or
/// [`spawn`](Self::spawn). Disks appear in the guest as `vda`, `vdb`, ...
/// in the order they were added.
#[derive(Debug, Clone)]
pub struct TestVm {
    script: String,
    memory_mib: u64,
    cpus: u32,
    disks: Vec<VhostUserBlkDisk>,
    timeout: Duration,
    cmdline: Vec<String>,
    qemu_args: Vec<String>,
}

impl TestVm {
    /// A guest with 512 MiB, one vCPU and no disks that runs `script` (a
    /// busybox `sh -e` script; see `resources/guest/README.md` for its
    /// helpers: `result`, `disk_info`, `md5`).
    pub fn new(script: impl Into<String>) -> Self {
        TestVm {
            script: script.into(),
            memory_mib: 512,
            cpus: 1,
            disks: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            cmdline: Vec::new(),
            qemu_args: Vec::new(),
        }
    }

    /// Guest RAM in MiB (a shared memfd, so the backend can map it).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Adds a disk.
    pub fn disk(mut self, disk: VhostUserBlkDisk) -> Self {
        self.disks.push(disk);
        self
    }

    /// How long [`run`](Self::run) and [`RunningVm::wait`] wait, from the
    /// start of QEMU, for the guest to finish (default 120 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds a kernel command-line argument.
    pub fn cmdline(mut self, arg: impl Into<String>) -> Self {
        self.cmdline.push(arg.into());
        self
    }

    /// Adds a raw QEMU argument.
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }

    /// Boots the guest, waits for its script, and fails unless it ended
    /// with `BLKVM-DONE rc=0`. Errors carry the whole console log.
    pub fn run(&self) -> Result<GuestOutput> {
        let output = self.spawn()?.wait()?;
        output.check_success()?;
        Ok(output)
    }

    /// Starts QEMU and returns at once; the guest is killed when the
    /// returned [`RunningVm`] is dropped.
    pub fn spawn(&self) -> Result<RunningVm> {
        let image = GuestImage::get()?;
        let dir = tempfile::Builder::new()
            .prefix("blkvm-guest-")
            .tempdir()
            .context("creating the guest's temporary directory")?;
        let initrd = dir.path().join("initrd");
        image.initrd_with_script(&self.script, &initrd)?;

        let mut command = Command::new(qemu_binary());
        command.args(self.qemu_args(image, &initrd));
        RunningVm::start(command, dir, self.timeout, is_done)
    }

    fn qemu_args(&self, image: &GuestImage, initrd: &std::path::Path) -> Vec<String> {
        let mib = self.memory_mib;
        let mut args: Vec<String> = [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            "q35,memory-backend=mem0",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ]
        .map(String::from)
        .into();
        args.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{mib}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem0,size={mib}M,share=on"),
        ]);
        for (i, disk) in self.disks.iter().enumerate() {
            let path = disk.socket.to_string_lossy().replace(',', ",,");
            args.extend([
                "-chardev".into(),
                format!("socket,id=vhost{i},path={path}"),
                "-device".into(),
                format!(
                    "vhost-user-blk-pci,chardev=vhost{i},num-queues={}",
                    disk.num_queues
                ),
            ]);
        }
        let mut append = String::from("console=ttyS0 panic=-1");
        for arg in &self.cmdline {
            append.push(' ');
            append.push_str(arg);
        }
        args.extend([
            "-serial".into(),
            "stdio".into(),
            "-kernel".into(),
            image.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            initrd.to_string_lossy().into_owned(),
            "-append".into(),
            append,
        ]);
        args.extend(self.qemu_args.iter().cloned());
        args
    }
}

/// Whether a console line is the guest's `BLKVM-DONE rc=N`.
fn is_done(line: &str) -> bool {
    line.contains("BLKVM-DONE ")
}

/// `$QEMU_SYSTEM_X86_64` or `qemu-system-x86_64` from `PATH`.
pub(crate) fn qemu_binary() -> PathBuf {
    std::env::var_os("QEMU_SYSTEM_X86_64")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// Copies `stream` line by line into `log` and `tx` until EOF.
fn spawn_reader(
    stream: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
    tx: mpsc::Sender<String>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            {
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
            // The receiver may be gone (the VM was dropped): keep draining.
            let _ = tx.send(line);
        }
    })
}

/// A started guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct RunningVm {
    child: Child,
    _dir: TempDir,
    log: Arc<Mutex<String>>,
    lines: mpsc::Receiver<String>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    done: bool,
    is_done: fn(&str) -> bool,
    /// A line to time, and when (since the start) one first contained it.
    timed: Option<(&'static str, Option<Duration>)>,
}

impl RunningVm {
    /// Starts `command` (QEMU, its console on stdout) with `dir` kept
    /// until it is gone. `is_done` tells the console line that says the
    /// guest finished, after which QEMU has [`POWEROFF_GRACE`] to exit.
    pub(crate) fn start(
        mut command: Command,
        dir: TempDir,
        timeout: Duration,
        is_done: fn(&str) -> bool,
    ) -> Result<RunningVm> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {command:?} (run resources/setup.sh?)"))?;

        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![
            spawn_reader(stdout, Arc::clone(&log), tx.clone()),
            spawn_reader(stderr, Arc::clone(&log), tx),
        ];
        let started = Instant::now();
        Ok(RunningVm {
            child,
            _dir: dir,
            log,
            lines,
            readers,
            started,
            deadline: started + timeout,
            done: false,
            is_done,
            timed: None,
        })
    }

    /// Notes when a console line first contains `needle`, for
    /// [`line_time`](Self::line_time).
    pub(crate) fn time_line(&mut self, needle: &'static str) {
        self.timed = Some((needle, None));
    }

    /// When, since QEMU started, the line given to
    /// [`time_line`](Self::time_line) was first read (by
    /// [`wait_for`](Self::wait_for) or [`wait`](Self::wait)).
    pub(crate) fn line_time(&self) -> Option<Duration> {
        self.timed.and_then(|(_, at)| at)
    }

    fn note(&mut self, line: &str) {
        self.done |= (self.is_done)(line);
        if let Some((needle, at @ None)) = &mut self.timed {
            if line.contains(*needle) {
                *at = Some(self.started.elapsed());
            }
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console (and QEMU's stderr) so far.
    pub fn console(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until a console line contains `needle` and returns the line;
    /// fails if QEMU exits or `timeout` passes first. E.g.
    /// `wait_for("BLKVM-RESULT ready=", ...)` before killing the guest.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.note(&line);
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!(
                        "no console line with {needle:?} within {timeout:?}"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.failure(&format!("QEMU exited before printing {needle:?}")))
                }
            }
        }
    }

    /// Waits for the guest to finish and QEMU to exit, and returns what it
    /// printed, whatever its script's exit code. Fails (killing QEMU) if
    /// the timeout passes first.
    pub fn wait(mut self) -> Result<GuestOutput> {
        loop {
            let limit = if self.done {
                self.deadline.min(Instant::now() + POWEROFF_GRACE)
            } else {
                self.deadline
            };
            match self
                .lines
                .recv_timeout(limit.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.note(&line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if self.done => {
                    // The guest finished but did not power off.
                    self.stop();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.stop();
                    return Err(self.failure("the guest did not finish in time; QEMU killed"));
                }
            }
        }
        let status = self.reap();
        Ok(GuestOutput::parse(self.console(), status))
    }

    /// Kills QEMU at once (SIGKILL), as a crash would, and returns what
    /// the guest had printed.
    pub fn kill(mut self) -> GuestOutput {
        self.stop();
        let status = self.reap();
        GuestOutput::parse(self.console(), status)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits for QEMU and for the readers to drain its output.
    fn reap(&mut self) -> Option<ExitStatus> {
        let status = self.child.wait().ok();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    fn failure(&self, what: &str) -> anyhow::Error {
        anyhow!("{what}\n{}", console_block(&self.console()))
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
