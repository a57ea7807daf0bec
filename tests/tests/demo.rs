//! README's first command, `resources/demo.sh`, run as a user runs it,
//! but with the `blkvm` the other tests use (`BLKVM`, so CI builds no
//! release binary) and its images in a temporary folder (`DEMO_OUT`). On
//! these PVM hosts it takes its nested path (resources/nested/), on a
//! VT-x/AMD-V host its direct one; the lines checked are the same.
//!
//! Two boots of the same images: each time the stock Debian kernel mounts
//! `/dev/vda` (virtio-blk-pci) as an ext4 root through the demo's
//! initramfs, sees both disks, writes a checksummed file to `/dev/vdb`
//! (virtio-blk-device) and reads every boot's file back; blkvm's
//! `query-blockstats` shows the I/O; `e2fsck -fn` finds both images clean
//! and the host reads back the boot counter and the data. The second boot
//! counts 2 and still reads the first boot's file: the disks persist.

use std::{
    io::Read,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context, Result};
use tests::{blkvm_binary, workspace_root};

/// Two nested boots take ~50 s here (L1 ~20 s each under TCG); the demo
/// gives each L1 up to 420 s itself, with two retries after a TCG crash.
const DEMO_TIMEOUT: Duration = Duration::from_secs(900);
/// How many boots the demo makes (its default).
const BOOTS: u32 = 2;
/// The images' sizes in 512-byte sectors (resources/demo/build.sh).
const ROOT_SECTORS: u64 = 64 << 11;
const DATA_SECTORS: u64 = 16 << 11;

/// What `resources/demo.sh` printed and how it ended.
struct Demo {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Demo {
    /// Runs the demo with its images in `images`, killing it (and QEMU or
    /// blkvm under it: its own process group) after [`DEMO_TIMEOUT`].
    fn run(images: &Path) -> Result<Demo> {
        let script = workspace_root().join("resources/demo.sh");
        let mut child = Command::new(&script)
            .env("BLKVM", blkvm_binary()?)
            .env("DEMO_OUT", images)
            .env("DEMO_BOOTS", BOOTS.to_string())
            .env_remove("DEMO_MODE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        let stdout = read_all(child.stdout.take());
        let stderr = read_all(child.stderr.take());
        let status = wait_or_kill(&mut child, DEMO_TIMEOUT);
        let demo = Demo {
            status: status?,
            stdout: join(stdout)?,
            stderr: join(stderr)?,
        };
        Ok(demo)
    }

    /// The lines of boot `n`, from its `== boot n of` header to the next.
    fn boot(&self, n: u32) -> Result<Boot<'_>> {
        let header = format!("== boot {n} of {BOOTS}:");
        let lines: Vec<&str> = self
            .stdout
            .lines()
            .skip_while(|l| !l.starts_with(&header))
            .take_while(|l| l.starts_with(&header) || !l.starts_with("== boot "))
            .collect();
        ensure!(!lines.is_empty(), self.error(&format!("no {header:?}")));
        Ok(Boot { demo: self, lines })
    }

    /// An error saying `what`, with everything the demo printed.
    fn error(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{what}\ndemo.sh: {}\n--- stdout\n{}\n--- stderr (last 60 lines)\n{}",
            self.status,
            self.stdout,
            last_lines(&self.stderr, 60)
        )
    }
}

fn read_all(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<std::io::Result<String>> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            pipe.read_to_string(&mut text)?;
        }
        Ok(text)
    })
}

fn join(reader: JoinHandle<std::io::Result<String>>) -> Result<String> {
    reader
        .join()
        .map_err(|_| anyhow!("output reader panicked"))?
        .context("reading demo.sh's output")
}

fn wait_or_kill(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= end {
            // The whole group: bash, and QEMU or blkvm under it.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let status = child.wait()?;
            eprintln!("demo.sh killed after {timeout:?}");
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The number `VALUE` of the word `KEY=VALUE` in `line`, if there is one.
fn number(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// One boot's lines of the demo's output.
struct Boot<'a> {
    demo: &'a Demo,
    lines: Vec<&'a str>,
}

impl<'a> Boot<'a> {
    /// The first line starting with `prefix`.
    fn line(&self, prefix: impl AsRef<str>) -> Result<&'a str> {
        let prefix = prefix.as_ref();
        self.lines
            .iter()
            .copied()
            .find(|l| l.starts_with(prefix))
            .ok_or_else(|| self.demo.error(&format!("no line starting {prefix:?}")))
    }

    /// An error saying `what`, with everything the demo printed.
    fn error(&self, what: &str) -> anyhow::Error {
        self.demo.error(what)
    }
}

/// What the guest of boot `n` printed about itself and its disks.
fn check_guest(boot: &Boot, n: u32, release: &str) -> Result<()> {
    boot.line(format!("guest| init: boot {n} of this root disk"))?;
    boot.line(format!("guest| init: uname -r: {release}"))?;
    boot.line("guest| init: mount: /dev/vda on / type ext4 (rw")?;
    boot.line("guest| init: mount: /dev/vdb on /data type ext4 (rw")?;
    for (disk, bus, serial, sectors) in [
        ("vda", "virtio-pci", "demo-root", ROOT_SECTORS),
        ("vdb", "virtio-mmio", "demo-data", DATA_SECTORS),
    ] {
        let l = boot.line(format!("guest| init: disk {disk}: {bus} serial={serial} "))?;
        ensure!(
            number(l, "size") == Some(sectors),
            boot.error(&format!("{disk} is not {sectors} sectors: {l}"))
        );
        ensure!(
            number(l, "queues").is_some_and(|q| q >= 1),
            boot.error(&format!("{disk} has no queue count: {l}"))
        );
    }
    // This boot's file written, every boot's read back after a remount.
    boot.line(format!("guest| init: data: wrote /data/boot-{n}.bin"))?;
    for i in 1..=n {
        boot.line(format!("guest| init: data: boot-{i}.md5 checks: ok"))?;
    }
    boot.line("guest| init: clean: ")?;
    Ok(())
}

/// What the host saw of boot `n`: blkvm's counters and exit, the images.
fn check_host(boot: &Boot, n: u32) -> Result<()> {
    for qdev in ["root", "data"] {
        let l = boot.line(format!("blockstats qdev={qdev} "))?;
        for key in ["rd_operations", "rd_bytes", "wr_operations", "wr_bytes"] {
            ensure!(
                number(l, key).is_some_and(|v| v > 0),
                boot.error(&format!("{qdev}: no {key}: {l}"))
            );
        }
        for key in ["failed_rd_operations", "failed_wr_operations"] {
            ensure!(
                number(l, key) == Some(0),
                boot.error(&format!("{qdev}: {key}: {l}"))
            );
        }
    }
    boot.line("boot: blkvm run exited 0 after ")?;
    boot.line("e2fsck -fn demo-root.img: clean: ")?;
    boot.line("e2fsck -fn demo-data.img: clean: ")?;
    boot.line(format!(
        "host: demo-root.img /var/lib/demo/boot-count = {n}"
    ))?;
    // The md5 the guest took of its file is the one the host reads in the
    // image.
    let wrote = boot.line(format!("guest| init: data: wrote /data/boot-{n}.bin"))?;
    let md5 = wrote.rsplit(' ').next().unwrap_or_default();
    boot.line(format!("host: demo-data.img /boot-{n}.bin md5 {md5}: ok"))?;
    Ok(())
}

#[test]
fn demo_boots_twice_from_its_ext4_root_disk_and_leaves_both_images_clean() -> Result<()> {
    let images = tempfile::Builder::new().prefix("blkvm-demo-").tempdir()?;
    let started = Instant::now();
    let demo = Demo::run(images.path())?;
    eprintln!("demo.sh took {:?}", started.elapsed());
    ensure!(demo.status.success(), demo.error("demo.sh failed"));

    let first = demo.stdout.lines().next().unwrap_or_default();
    ensure!(
        first.starts_with("blkvm demo: ")
            && (first.contains("nested") || first.contains("on this host")),
        demo.error("the first line does not say where the guest runs")
    );
    let release_file = workspace_root().join("resources/out/demo/guest/kernel-release");
    let release = std::fs::read_to_string(&release_file)
        .with_context(|| format!("reading {}", release_file.display()))?;
    for n in 1..=BOOTS {
        let boot = demo.boot(n)?;
        check_guest(&boot, n, release.trim())?;
        check_host(&boot, n)?;
    }
    ensure!(
        demo.stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("blkvm demo: done: ")),
        demo.error("no closing line")
    );

    // The images are clean by this test's own e2fsck too.
    for image in ["demo-root.img", "demo-data.img"] {
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(images.path().join(image))
            .output()
            .context("running e2fsck")?;
        ensure!(
            out.status.success(),
            demo.error(&format!(
                "e2fsck -fn {image}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            ))
        );
    }
    Ok(())
}
