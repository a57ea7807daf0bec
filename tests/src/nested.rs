//! [`NestedVm`]: `blkvm run` on real (nested) KVM. `/dev/kvm` on these
//! machines is PVM and cannot boot a stock kernel, but QEMU's TCG with
//! `-cpu max` emulates AMD SVM: an L1 Debian kernel with kvm-amd gets a
//! real `/dev/kvm` with nested paging, and `blkvm run` inside L1 boots the
//! L2 guest (the same Debian kernel and the test guest's initramfs).
//!
//! L1's initrd is cpio archives one after the other: the base of
//! `resources/nested/` (busybox, `/init`, the KVM and virtio modules,
//! `kvm-smoke`, the L2 kernel), `blkvm` with its shared libraries (and,
//! with [`NestedVm::with_qemu`], `qemu-system-x86_64`; with
//! [`NestedVm::with_qsd`], `qemu-storage-daemon`), and the test's own
//! (`/test.sh`, the L2 initrd with the L2 script appended,
//! [`NestedVm::file`]s). L1's `/init` loads the modules, prints
//! `BLKVM-L1-READY` once `/dev/kvm` is there, runs `/test.sh` and prints
//! `BLKVM-DONE rc=N`. The L1 script's `l2_run`/`l2_boot` helpers
//! (`resources/nested/lib.sh`) print L2's serial console with each line
//! marked `L2| `, so one console carries both guests and
//! [`NestedOutput`] sorts them apart.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    cpio, daemon::blkvm_binary, output::console_block, vm::qemu_binary, vm::RunningVm, GuestImage,
    GuestOutput,
};

/// How L1's console marks a line of L2's console (`resources/nested/lib.sh`).
pub const L2_PREFIX: &str = "L2| ";
/// The line L1's `/init` prints once the KVM modules are loaded and
/// `/dev/kvm` is there, before the test script.
const READY_MARKER: &str = "BLKVM-L1-READY";
/// L1 boots in ~3-6 s and an L2 boot takes ~15 s; this leaves room for a
/// slow, shared CI machine. L1's own limit on `blkvm run` (`L2_TIMEOUT`,
/// 200 s) is below it, so a hung L2 is reported by L1.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// What the nested harness boots, built by `resources/nested/build.sh`
/// under `resources/out/` the first time a test needs it.
#[derive(Debug, Clone)]
pub struct NestedImage {
    /// The Debian bzImage, L1's kernel and (inside L1) L2's.
    pub kernel: PathBuf,
    /// L1's base initramfs (uncompressed cpio).
    pub l1_initramfs: PathBuf,
    /// `blkvm` and its shared libraries (uncompressed cpio).
    pub programs: PathBuf,
    /// `qemu-system-x86_64`, its libraries and firmware (uncompressed
    /// cpio, ~60 MB), for [`NestedVm::with_qemu`].
    pub qemu: PathBuf,
    /// `qemu-storage-daemon` and its libraries (uncompressed cpio,
    /// ~16 MB), for [`NestedVm::with_qsd`].
    pub qsd: PathBuf,
    /// The test guest's kernel and initramfs: L2's.
    pub l2: GuestImage,
}

impl NestedImage {
    /// The image, built on first use in this process with the `blkvm` of
    /// [`StorageDaemon`](crate::StorageDaemon) (`$BLKVM_BIN`, or this
    /// workspace's, built on demand). The build script is idempotent and
    /// takes a lock, so parallel test processes may all call it.
    pub fn get() -> Result<&'static NestedImage> {
        static IMAGE: OnceLock<std::result::Result<NestedImage, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| Self::build().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn build() -> Result<NestedImage> {
        let blkvm = blkvm_binary()?;
        let resources = crate::workspace_root().join("resources");
        let script = resources.join("nested/build.sh");
        let guest = resources.join("out/guest");
        let out = resources.join("out/nested");
        let output = Command::new(&script)
            .arg(&blkvm)
            .env("QEMU", "1")
            .env("QSD", "1")
            .env("GUEST_OUT", &guest)
            .env("NESTED_OUT", &out)
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
        let image = NestedImage {
            kernel: guest.join("vmlinuz"),
            l1_initramfs: out.join("initramfs.cpio"),
            programs: out.join("programs.cpio"),
            qemu: out.join("qemu.cpio"),
            qsd: out.join("qsd.cpio"),
            l2: GuestImage {
                kernel: guest.join("vmlinuz"),
                initramfs: guest.join("initramfs.cpio.gz"),
            },
        };
        for path in [
            &image.kernel,
            &image.l1_initramfs,
            &image.programs,
            &image.qemu,
            &image.qsd,
            &image.l2.initramfs,
        ] {
            if !path.is_file() {
                bail!("{} did not make {}", script.display(), path.display());
            }
        }
        Ok(image)
    }
}

/// An L1 guest under QEMU TCG with real nested KVM, built up and then
/// started with [`run`](Self::run) or [`spawn`](Self::spawn).
///
/// ```no_run
/// # use tests::*;
/// # fn main() -> anyhow::Result<()> {
/// let out = NestedVm::new()
///     .l1_script("kvm-smoke")
///     .run()?;
/// assert!(out.l1_lines().any(|l| l == "KVM-SMOKE ok exit=HLT rip=0x100f"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct NestedVm {
    l1_script: String,
    l2_script: Option<String>,
    files: Vec<(String, Vec<u8>)>,
    with_qemu: bool,
    with_qsd: bool,
    memory_mib: u64,
    cpus: u32,
    timeout: Duration,
    cmdline: Vec<String>,
    qemu_args: Vec<String>,
}

impl Default for NestedVm {
    fn default() -> Self {
        Self::new()
    }
}

impl NestedVm {
    /// L1 with 2 GiB and two vCPUs whose script does nothing.
    pub fn new() -> Self {
        NestedVm {
            l1_script: String::new(),
            l2_script: None,
            files: Vec::new(),
            with_qemu: false,
            with_qsd: false,
            memory_mib: 2048,
            cpus: 2,
            timeout: DEFAULT_TIMEOUT,
            cmdline: Vec::new(),
            qemu_args: Vec::new(),
        }
    }

    /// L1's `/test.sh`: a busybox `sh -e` script with the helpers of
    /// `resources/guest/lib.sh` (`result`, `md5`, `disk_info`) and
    /// `resources/nested/lib.sh` (`l2_boot`, `l2_run`, `l2_boot_qemu`,
    /// `l2_exec`, `image`, `loop_image`, `image_md5`, `wait_line`,
    /// `wait_socket`, `pid_of`, `thread_io`, `process_io`).
    pub fn l1_script(mut self, script: impl Into<String>) -> Self {
        self.l1_script = script.into();
        self
    }

    /// L2's `/test.sh`, appended to the test guest's initramfs as
    /// [`TestVm`](crate::TestVm) does; the result is `/l2/initrd` in L1
    /// (without this, the plain initramfs, whose `/init` reports that it
    /// has no script).
    pub fn l2_script(mut self, script: impl Into<String>) -> Self {
        self.l2_script = Some(script.into());
        self
    }

    /// Puts `data` at `path` (relative to the root, e.g. `data/d0.img`) in
    /// L1's root file system (a tmpfs: no `O_DIRECT` on Linux 6.1).
    pub fn file(mut self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        let path: String = path.into();
        self.files
            .push((path.trim_start_matches('/').to_owned(), data.into()));
        self
    }

    /// Puts `qemu-system-x86_64` (with its libraries and firmware) in L1,
    /// for the script's `l2_boot_qemu`: QEMU with KVM is the known-good
    /// VMM that proves a test before it is pointed at `blkvm run`. Costs
    /// ~60 MB of initrd, about a second of L1 boot.
    pub fn with_qemu(mut self) -> Self {
        self.with_qemu = true;
        self
    }

    /// Puts `qemu-storage-daemon` (with its libraries) in L1: QEMU's own
    /// vhost-user-blk backend, to serve `blkvm run`'s vhost-user-blk
    /// devices beside `blkvm storage-daemon`. Costs ~16 MB of initrd.
    pub fn with_qsd(mut self) -> Self {
        self.with_qsd = true;
        self
    }

    /// L1's RAM in MiB (default 2048).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// L1's vCPUs (default 2).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// How long [`run`](Self::run) waits, from the start of QEMU, for L1 to
    /// finish (default 300 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds an L1 kernel command-line argument.
    pub fn cmdline(mut self, arg: impl Into<String>) -> Self {
        self.cmdline.push(arg.into());
        self
    }

    /// Adds a raw QEMU argument.
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }

    /// Boots L1, waits for it, and fails unless L1's script ended with
    /// `BLKVM-DONE rc=0`. Errors carry the whole console.
    ///
    /// L1's own kernel, under QEMU's TCG emulation of nested SVM, now and
    /// then dies in its exception entry (seen: "ENTRY_TRAMPOLINE stack
    /// guard page was hit" in a plain `grep`, with a bad GS base) or resets
    /// without a word, with QEMU/KVM as L1's VMM as with blkvm: TCG's
    /// doing, not anything L1 or L2 ran. Such a run says nothing about
    /// blkvm, so it is run again, up to [`L1_CRASH_RETRIES`] times, with
    /// the crash printed; every other failure counts. So is an L1 that
    /// does not get ready within [`L1_BOOT_TIMEOUT`]: TCG has also been
    /// seen to stop L1's kernel mid-boot, before any test code ran.
    pub fn run(&self) -> Result<NestedOutput> {
        let mut attempt = 0;
        loop {
            let mut vm = self.spawn()?;
            if let Err(e) = vm.wait_ready_within(L1_BOOT_TIMEOUT) {
                let console = vm.console();
                // L1's /init says BLKVM-ERROR when it cannot go on (no
                // /dev/kvm, a module that will not load): that is no
                // accident of TCG, and booting again would not change it.
                if attempt < L1_CRASH_RETRIES && !console.contains("BLKVM-ERROR") {
                    attempt += 1;
                    let lines: Vec<&str> = console.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(3)..];
                    eprintln!(
                        "L1 did not get ready (TCG); running L1 again ({attempt}/{L1_CRASH_RETRIES}): {}\n  last lines: {:?}",
                        e.to_string().lines().next().unwrap_or(""),
                        tail
                    );
                    continue;
                }
                return Err(e);
            }
            let output = vm.wait()?;
            if output.l1_kernel_crashed() && attempt < L1_CRASH_RETRIES {
                attempt += 1;
                eprintln!(
                    "L1's kernel crashed (TCG); running L1 again ({attempt}/{L1_CRASH_RETRIES}):\n{}",
                    output.l1_crash_lines()
                );
                continue;
            }
            if output.l2_faulted_in_early_boot() && attempt < L1_CRASH_RETRIES {
                attempt += 1;
                let lines: Vec<&str> = output.l2_lines().collect();
                eprintln!(
                    "L2 triple-faulted in its kernel's early boot, before its /init (seen \
                     under TCG's nested SVM only, with L2 in setup code no device has \
                     touched yet); running L1 again ({attempt}/{L1_CRASH_RETRIES}); L2's \
                     last lines: {:?}",
                    &lines[lines.len().saturating_sub(2)..]
                );
                continue;
            }
            output.check_success()?;
            return Ok(output);
        }
    }

    /// Starts QEMU and returns at once; L1 is killed when the returned
    /// [`RunningNestedVm`] is dropped.
    pub fn spawn(&self) -> Result<RunningNestedVm> {
        let image = NestedImage::get()?;
        let dir = tempfile::Builder::new()
            .prefix("blkvm-nested-")
            .tempdir()
            .context("creating L1's temporary directory")?;
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, self.initrd(image)?)
            .with_context(|| format!("writing {}", initrd.display()))?;
        let mut command = Command::new(qemu_binary());
        command.args(self.qemu_args(image, &initrd));
        let mut vm = RunningVm::start(command, dir, self.timeout, is_l1_done)?;
        vm.time_line(READY_MARKER);
        Ok(RunningNestedVm {
            vm,
            started: Instant::now(),
            timeout: self.timeout,
        })
    }

    /// L1's initrd: the base, the programs, and this test's archive, each
    /// archive starting on a 512-byte boundary.
    fn initrd(&self, image: &NestedImage) -> Result<Vec<u8>> {
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let l2_initrd = match &self.l2_script {
            Some(script) => image.l2.initrd_bytes_with_script(script)?,
            None => read(&image.l2.initramfs)?,
        };
        let mut files: Vec<(&str, u32, &[u8])> = vec![
            ("test.sh", 0o755, self.l1_script.as_bytes()),
            ("l2/initrd", 0o644, &l2_initrd),
        ];
        files.extend(
            self.files
                .iter()
                .map(|(path, data)| (path.as_str(), 0o644, data.as_slice())),
        );

        let mut initrd = read(&image.l1_initramfs)?;
        cpio::pad_for_next_archive(&mut initrd);
        initrd.extend(read(&image.programs)?);
        cpio::pad_for_next_archive(&mut initrd);
        for (wanted, archive) in [(self.with_qemu, &image.qemu), (self.with_qsd, &image.qsd)] {
            if wanted {
                initrd.extend(read(archive)?);
                cpio::pad_for_next_archive(&mut initrd);
            }
        }
        initrd.extend(cpio::archive(&files));
        Ok(initrd)
    }

    fn qemu_args(&self, image: &NestedImage, initrd: &Path) -> Vec<String> {
        let mut args: Vec<String> = [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            // TCG's max CPU is an AMD one with SVM (and NPT): kvm-amd loads.
            "-cpu",
            "max",
        ]
        .map(String::from)
        .into();
        args.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
        ]);
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

/// How many times [`NestedVm::run`] boots L1 again after its kernel
/// crashed or stopped under TCG.
pub const L1_CRASH_RETRIES: u32 = 2;

/// How long [`NestedVm::run`] gives L1 to load KVM and get ready (it
/// takes about 10 s here) before it counts the boot as stopped.
pub const L1_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A kernel's line telling of an oops or a panic.
fn is_kernel_crash(line: &str) -> bool {
    ["] BUG: ", "] Oops: ", "Kernel panic - not syncing"]
        .iter()
        .any(|m| line.contains(m))
}

/// L1's `BLKVM-DONE rc=N`, not L2's (which reaches L1's console marked).
fn is_l1_done(line: &str) -> bool {
    !line.starts_with(L2_PREFIX) && line.contains("BLKVM-DONE ")
}

/// A started L1. Dropping it kills QEMU.
#[derive(Debug)]
pub struct RunningNestedVm {
    vm: RunningVm,
    started: Instant,
    timeout: Duration,
}

impl RunningNestedVm {
    /// Waits until L1 has loaded KVM and is about to run its script, and
    /// returns the time since QEMU started.
    pub fn wait_ready(&mut self) -> Result<Duration> {
        self.wait_ready_within(self.timeout)
    }

    /// As [`wait_ready`](Self::wait_ready), but fails once `limit` has
    /// passed since QEMU started (or the whole timeout, if sooner).
    pub fn wait_ready_within(&mut self, limit: Duration) -> Result<Duration> {
        if let Some(time) = self.vm.line_time() {
            return Ok(time);
        }
        let end = self.started + limit.min(self.timeout);
        let left = end.saturating_duration_since(Instant::now());
        self.vm.wait_for(READY_MARKER, left)?;
        self.vm
            .line_time()
            .ok_or_else(|| anyhow!("{READY_MARKER} seen but not timed"))
    }

    /// Waits until a console line (L1's or L2's, marked) contains `needle`
    /// and returns the line; fails if QEMU exits or `timeout` passes first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.vm.wait_for(needle, timeout)
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.vm.console()
    }

    /// Kills QEMU at once (SIGKILL) and returns what the guests had
    /// printed.
    pub fn kill(self) -> NestedOutput {
        let boot_time = self.vm.line_time().unwrap_or_default();
        let output = self.vm.kill();
        NestedOutput::parse(output.console, output.status, boot_time)
    }

    /// Waits for L1 to finish and QEMU to exit, and returns what both
    /// guests printed, whatever the scripts' exit codes. Fails (killing
    /// QEMU) if L1 never gets ready or the timeout passes.
    pub fn wait(mut self) -> Result<NestedOutput> {
        let boot_time = self.wait_ready()?;
        let output = self.vm.wait()?;
        Ok(NestedOutput::parse(
            output.console,
            output.status,
            boot_time,
        ))
    }
}

/// What L1 and L2 printed.
#[derive(Debug, Clone)]
pub struct NestedOutput {
    /// L1: its console without L2's lines, its `BLKVM-RESULT`s, and its
    /// script's exit code.
    pub l1: GuestOutput,
    /// L2: the lines of L1's console marked as L2's, unmarked, their
    /// `BLKVM-RESULT`s, and L2's script's exit code (if L2 got that far).
    pub l2: GuestOutput,
    /// The whole console, both guests and QEMU's stderr.
    pub console: String,
    /// From QEMU's start to L1's `BLKVM-L1-READY` (KVM loaded), on the
    /// host's clock (zero if L1 was killed before it was seen).
    pub boot_time: Duration,
}

impl NestedOutput {
    fn parse(
        console: String,
        status: Option<std::process::ExitStatus>,
        boot_time: Duration,
    ) -> Self {
        let mut l1 = String::new();
        let mut l2 = String::new();
        for line in console.lines() {
            let (text, into) = match line.strip_prefix(L2_PREFIX) {
                Some(rest) => (rest, &mut l2),
                None => (line, &mut l1),
            };
            into.push_str(text);
            into.push('\n');
        }
        NestedOutput {
            l1: GuestOutput::parse(l1, status),
            l2: GuestOutput::parse(l2, None),
            console,
            boot_time,
        }
    }

    /// L1's console lines (L2's left out).
    pub fn l1_lines(&self) -> impl Iterator<Item = &str> {
        self.l1.console.lines()
    }

    /// The per-thread I/O counters L1's `thread_io` reported, in order:
    /// each thread's name and its seven counters (rchar wchar syscr syscw
    /// read_bytes write_bytes cancelled_write_bytes). A malformed line is
    /// an error naming it.
    pub fn thread_io(&self) -> Result<Vec<(String, [u64; 7])>> {
        let mut out = Vec::new();
        for line in self.l1_lines() {
            let Some(rest) = line.strip_prefix("BLKVM-RESULT thread.") else {
                continue;
            };
            let Some((key, text)) = rest.split_once('=') else {
                continue;
            };
            let comm = key.split_once('.').map_or("", |(_, c)| c).to_owned();
            let c: Vec<u64> = text
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            let c: [u64; 7] = c
                .try_into()
                .map_err(|_| self.error(&format!("bad counters: {line}")))?;
            out.push((comm, c));
        }
        Ok(out)
    }

    /// Whether L2 died of a triple fault before its `/init` started (no
    /// `BLKVM-BOOT` from L2): the kernel's own early setup, which runs no
    /// device code of ours.
    pub fn l2_faulted_in_early_boot(&self) -> bool {
        self.l1_lines()
            .any(|l| l.contains("triple fault (KVM_EXIT_SHUTDOWN)"))
            && !self.l2_lines().any(|l| l.contains("BLKVM-BOOT"))
    }

    /// Whether L1's own kernel (not L2's) oopsed or panicked, or L1 reset
    /// without a word: QEMU (`-no-reboot`) exited by itself, successfully,
    /// before L1's script finished. A timeout kills QEMU instead, so it
    /// does not count.
    pub fn l1_kernel_crashed(&self) -> bool {
        let silent_reset = self.l1.rc.is_none() && self.l1.status.is_some_and(|s| s.success());
        silent_reset || self.l1_lines().any(is_kernel_crash)
    }

    /// The lines of L1's console that tell of its kernel's crash.
    fn l1_crash_lines(&self) -> String {
        self.l1_lines()
            .filter(|l| is_kernel_crash(l) || l.contains(" RIP: ") || l.contains(" Comm: "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// L2's console lines, unmarked.
    pub fn l2_lines(&self) -> impl Iterator<Item = &str> {
        self.l2.console.lines()
    }

    /// The value of L1's result `key`; an error (with the console) if L1
    /// did not report it.
    pub fn result(&self, key: &str) -> Result<&str> {
        self.l1
            .results
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.error(&format!("L1 reported no {key:?}")))
    }

    /// The value of L2's result `key`.
    pub fn l2_result(&self, key: &str) -> Result<&str> {
        self.l2
            .results
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.error(&format!("L2 reported no {key:?}")))
    }

    /// Fails unless L1's script ended with exit code 0.
    pub fn check_success(&self) -> Result<()> {
        match self.l1.rc {
            Some(0) => Ok(()),
            Some(rc) => Err(self.error(&format!("L1's script failed: rc={rc}"))),
            None => Err(self.error(&format!(
                "L1 never finished its script (QEMU: {})",
                self.l1
                    .status
                    .map_or_else(|| "no status".to_owned(), |s| s.to_string())
            ))),
        }
    }

    /// Fails unless L2's script ended with exit code 0.
    pub fn check_l2_success(&self) -> Result<()> {
        match self.l2.rc {
            Some(0) => Ok(()),
            Some(rc) => Err(self.error(&format!("L2's script failed: rc={rc}"))),
            None => Err(self.error("L2 never finished its script")),
        }
    }

    /// An error that says `what` and shows both guests' results and the
    /// whole console.
    pub fn error(&self, what: &str) -> anyhow::Error {
        let mut results = String::new();
        for (guest, out) in [("L1", &self.l1), ("L2", &self.l2)] {
            for (key, value) in &out.results {
                results.push_str(&format!("  {guest} {key}={value}\n"));
            }
        }
        anyhow!(
            "{what}\nresults:\n{results}{}",
            console_block(&self.console)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sorts_l1_and_l2_lines_and_their_results_apart() {
        let console = "BLKVM-L1-READY uptime=2.1\n\
                       L2| [    0.0] Linux version 6.1\r\n\
                       L2| BLKVM-RESULT vda.size=131072\n\
                       L2| BLKVM-DONE rc=0\n\
                       BLKVM-RESULT l2.rc=0\n\
                       BLKVM-DONE rc=3\n";

        let out = NestedOutput::parse(console.to_owned(), None, Duration::from_secs(3));

        assert_eq!(out.result("l2.rc").unwrap(), "0");
        assert_eq!(out.l2_result("vda.size").unwrap(), "131072");
        assert!(out.result("vda.size").is_err());
        assert!(out.l2_result("l2.rc").is_err());
        assert_eq!(out.l1.rc, Some(3));
        assert_eq!(out.l2.rc, Some(0));
        assert!(out.check_success().is_err());
        assert!(out.check_l2_success().is_ok());
        assert_eq!(out.l2_lines().next(), Some("[    0.0] Linux version 6.1"));
        assert_eq!(out.l1_lines().count(), 3);
    }

    #[test]
    fn only_l1s_own_kernel_crash_counts_as_one() {
        let l1_crash = "BLKVM-L1-READY uptime=2.1\n\
                        [   16.9] BUG: ENTRY_TRAMPOLINE stack guard page was hit\n\
                        [   16.9] Kernel panic - not syncing: Fatal exception in interrupt\n";
        let l2_crash = "BLKVM-L1-READY uptime=2.1\n\
                        L2| [    3.0] Kernel panic - not syncing: VFS: Unable to mount root\n\
                        BLKVM-DONE rc=1\n";
        let parse = |c: &str| NestedOutput::parse(c.to_owned(), None, Duration::ZERO);
        assert!(parse(l1_crash).l1_kernel_crashed());
        assert!(!parse(l2_crash).l1_kernel_crashed());
        assert!(parse(l1_crash)
            .l1_crash_lines()
            .contains("ENTRY_TRAMPOLINE"));
        // L1 reset silently: QEMU exited 0 with no BLKVM-DONE; a run that
        // QEMU never ended on its own (no status: killed or timed out) is
        // not one.
        let ok = std::process::Command::new("true").status().unwrap();
        let reset = "BLKVM-L1-READY uptime=2.1\nL2| line 967 0123\n";
        let out = NestedOutput::parse(reset.to_owned(), Some(ok), Duration::ZERO);
        assert!(out.l1_kernel_crashed());
        assert!(!parse(reset).l1_kernel_crashed());
    }

    #[test]
    fn only_l1s_done_line_ends_the_run() {
        assert!(is_l1_done("BLKVM-DONE rc=0"));
        assert!(!is_l1_done("L2| BLKVM-DONE rc=0"));
        assert!(!is_l1_done("BLKVM-RESULT l2.rc=0"));
    }
}
