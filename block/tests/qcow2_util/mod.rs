//! Helpers of the qcow2 tests: scratch directories, QEMU's tools, and
//! reading or writing a whole node through a [`Disk`].

#![allow(dead_code)]

use std::process::Command;

use block::BlockGraph;

use crate::common::Disk;

/// A scratch directory in the target dir, removed on drop.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn new() -> Self {
        let dir = std::env::var("CARGO_TARGET_TMPDIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string() + "/../target");
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(
            tempfile::Builder::new()
                .prefix("qcow2")
                .tempdir_in(dir)
                .unwrap(),
        )
    }
    pub fn path(&self, name: &str) -> String {
        self.0.path().join(name).to_str().unwrap().to_string()
    }
}

/// Runs a QEMU tool; panics with its output unless it succeeds.
fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (qemu-utils) is installed: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn qemu_img(args: &[&str]) -> std::process::Output {
    run("qemu-img", args)
}

/// Runs qemu-io commands on a qcow2 image.
pub fn qemu_io(img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    run("qemu-io", &args);
}

/// What QEMU reads from `img`: `qemu-img convert -O raw`.
pub fn raw_of(s: &Scratch, img: &str) -> Vec<u8> {
    let raw = s.path("converted.raw");
    qemu_img(&["convert", "-U", "-O", "raw", img, &raw]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

/// `qemu-img check` exit code and output.
pub fn check(img: &str) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", img])
        .output()
        .expect("qemu-img is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Opens the last of `args` (earlier ones first) in a new graph.
pub fn open_all(args: &[&str]) -> Disk {
    let mut g = BlockGraph::new();
    let mut node = None;
    for a in args {
        let o = qapi::parse_blockdev(a).unwrap_or_else(|e| panic!("{a}: {e}"));
        node = Some(g.add(&o).unwrap_or_else(|e| panic!("{a}: {e}")));
    }
    Disk::new(g, node.unwrap())
}

pub fn open(arg: &str) -> Disk {
    open_all(&[arg])
}

/// Reads the whole node in chunks of varying size and iovec layout.
pub fn read_all(d: &mut Disk, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0u64;
    let mut k = 0usize;
    while at < size {
        let len = [300_000u64, 4096, 70_000, 1 << 20][k % 4].min(size - at) as usize;
        let splits = [&[][..], &[512, 1000][..], &[4096][..], &[7, 9000][..]][k % 4];
        let data = d
            .readv(at, len, splits)
            .unwrap_or_else(|e| panic!("read at {at} len {len}: {e}"));
        out.extend_from_slice(&data);
        at += len as u64;
        k += 1;
    }
    out
}
