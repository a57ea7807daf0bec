//! Behaviour of the `file` driver and the graph beyond the conformance
//! suite: image locking, auto-read-only, resizes picked up on request,
//! block devices, and graph bookkeeping.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use block::{BlockError, BlockGraph, RequestError};
use common::{pattern, Disk, Image};

fn add(
    graph: &mut BlockGraph,
    arg: &str,
) -> Result<std::sync::Arc<dyn block::BlockNode>, BlockError> {
    graph.add(&qapi::parse_blockdev(arg).unwrap_or_else(|e| panic!("{arg}: {e}")))
}

#[test]
fn second_writer_of_an_image_is_refused_with_the_lock_named() {
    let img = Image::new(1 << 20);
    let mut g1 = BlockGraph::new();
    add(
        &mut g1,
        &format!("file,filename={},node-name=a", img.path()),
    )
    .unwrap();
    let mut g2 = BlockGraph::new();
    let err = add(
        &mut g2,
        &format!("file,filename={},node-name=b", img.path()),
    )
    .unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("Failed to get \"write\" lock"), "{chain}");
    // locking=off opts out, as in QEMU.
    add(
        &mut g2,
        &format!("file,filename={},locking=off,node-name=c", img.path()),
    )
    .unwrap();
}

#[test]
fn qemu_sees_our_write_lock() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    add(&mut g, &format!("file,filename={},node-name=a", img.path())).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", img.path()])
        .output()
        .expect("qemu-io (qemu-utils) is installed");
    assert!(
        !out.status.success(),
        "QEMU opened an image we hold for writing"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Failed to get \"write\" lock"),
        "qemu-io said: {err}"
    );
}

#[test]
fn auto_read_only_falls_back_when_the_image_is_not_writable() {
    let img = Image::new(1 << 20);
    // Root ignores permission bits, but not the immutable attribute.
    let immutable = unsafe_is_root();
    if immutable {
        let ok = Command::new("chattr")
            .args(["+i", img.path()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "chattr +i failed: the test host needs e2fsprogs and ext4 for root runs"
        );
    } else {
        std::fs::set_permissions(img.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let mut g = BlockGraph::new();
    let rw = add(&mut g, &format!("file,filename={},node-name=a", img.path()));
    let ro = add(
        &mut g,
        &format!("file,filename={},auto-read-only=on,node-name=b", img.path()),
    );
    if immutable {
        let _ = Command::new("chattr").args(["-i", img.path()]).status();
    }
    assert!(
        rw.is_err(),
        "a writable open of a read-only image succeeded"
    );
    assert!(ro.unwrap().read_only());
}

fn unsafe_is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

#[test]
fn closing_an_io_uring_node_releases_its_lock_at_once() {
    let img = Image::new(1 << 20);
    for _ in 0..20 {
        let mut g = BlockGraph::new();
        let n = add(
            &mut g,
            &format!("file,filename={},aio=io_uring,node-name=a", img.path()),
        )
        .unwrap();
        let mut d = Disk::new(g, n);
        assert_eq!(d.write(0, &[1; 512]), Ok(512));
        // Dropping the queue and the graph must leave the image unlocked,
        // although the kernel frees an io_uring ring asynchronously.
    }
}

#[test]
fn a_grown_file_is_picked_up_on_request() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let n = add(
        &mut g,
        &format!("file,filename={},aio=io_uring,node-name=a", img.path()),
    )
    .unwrap();
    let mut d = Disk::new(g, n);
    assert!(matches!(
        d.read(1 << 20, 4096),
        Err(RequestError::OutOfRange { .. })
    ));
    img.file().set_len(2 << 20).unwrap();
    assert_eq!(d.write(1 << 20, &pattern(1, 4096)), Ok(4096));
    assert_eq!(d.node.capacity(), 2 << 20);
    img.file().set_len(3 << 20).unwrap();
    assert_eq!(d.node.refresh_capacity().unwrap(), 3 << 20);
}

#[test]
fn truncate_resizes_file_raw_and_null_and_refuses_what_cannot_change() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    add(
        &mut g,
        &format!("file,filename={},aio=io_uring,node-name=f", img.path()),
    )
    .unwrap();
    let raw = add(&mut g, "raw,file=f,node-name=r,offset=4096").unwrap();
    let mut d = Disk::new(g, raw.clone());
    raw.truncate(2 << 20).unwrap();
    assert_eq!(raw.capacity(), 2 << 20);
    assert_eq!(img.file().metadata().unwrap().len(), (2 << 20) + 4096);
    // The grown area is there for the queue that was already open.
    assert_eq!(d.write((2 << 20) - 4096, &pattern(3, 4096)), Ok(4096));
    assert_eq!(d.read((2 << 20) - 4096, 4096).unwrap(), pattern(3, 4096));
    raw.truncate(1 << 20).unwrap();
    assert!(matches!(
        d.read((2 << 20) - 4096, 4096),
        Err(RequestError::OutOfRange { .. })
    ));
    drop((d, raw));

    let mut g = BlockGraph::new();
    add(&mut g, &format!("file,filename={},node-name=f", img.path())).unwrap();
    let fixed = add(&mut g, "raw,file=f,node-name=r,size=4096").unwrap();
    let e = fixed.truncate(8192).unwrap_err();
    assert_eq!(e.to_string(), "Cannot resize fixed-size raw disks");
    let img2 = Image::new(1 << 20);
    let ro = add(
        &mut g,
        &format!("file,filename={},node-name=ro,read-only=on", img2.path()),
    )
    .unwrap();
    assert!(ro
        .truncate(8192)
        .unwrap_err()
        .to_string()
        .contains("read-only"));

    let null = add(&mut g, "null-co,node-name=n,size=1M").unwrap();
    let mut d = Disk::new(g, null.clone());
    assert!(d.read(1 << 20, 512).is_err());
    null.truncate(2 << 20).unwrap();
    assert_eq!(null.capacity(), 2 << 20);
    assert_eq!(d.read(1 << 20, 512).map(|b| b.len()), Ok(512));
}

#[test]
fn missing_file_error_names_the_path() {
    let mut g = BlockGraph::new();
    let err = add(&mut g, "file,filename=/nonexistent/disk.img").unwrap_err();
    assert_eq!(err.to_string(), "Could not open '/nonexistent/disk.img'");
    assert!(std::error::Error::source(&err)
        .unwrap()
        .to_string()
        .contains("No such file"));
}

#[test]
fn block_device_reads_and_writes() {
    if !unsafe_is_root() {
        eprintln!("skipped: needs root for a loop device");
        return;
    }
    let img = Image::new(8 << 20);
    let out = Command::new("losetup")
        .args(["-f", "--show", img.path()])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        panic!("losetup failed: a root test host must provide loop devices");
    };
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let result = std::panic::catch_unwind(|| {
        for aio in ["threads", "io_uring"] {
            let mut g = BlockGraph::new();
            let n = add(
                &mut g,
                &format!("file,filename={dev},aio={aio},cache.direct=on,discard=unmap,node-name=d"),
            )
            .unwrap();
            assert_eq!(n.capacity(), 8 << 20);
            assert_eq!(n.limits().request_alignment, 512);
            let mut d = Disk::new(g, n);
            let data = pattern(9, 8192);
            assert_eq!(d.write(4096, &data), Ok(8192));
            assert!(d.read(4096, 8192).unwrap() == data);
            assert_eq!(d.write_zeroes(4096, 4096, false), Ok(4096));
            assert!(d.read(4096, 4096).unwrap().iter().all(|&b| b == 0));
            assert_eq!(d.op(block::RequestOp::Flush, 0, 0), Ok(0));
        }
    });
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(img.contents()[8192..12288] == pattern(9, 8192)[4096..]);
}

#[test]
fn graph_refuses_duplicate_and_malformed_names() {
    let mut g = BlockGraph::new();
    add(&mut g, "null-co,node-name=n0").unwrap();
    let e = add(&mut g, "null-co,node-name=n0").unwrap_err();
    assert_eq!(e.to_string(), "Duplicate nodes with node-name='n0'");
    let e = add(&mut g, "null-co,node-name=0bad").unwrap_err();
    assert_eq!(e.to_string(), "Invalid node-name: '0bad'");
}

#[test]
fn graph_generates_names_and_tracks_children() {
    let img = Image::new(4 << 20);
    let mut g = BlockGraph::new();
    let raw = add(
        &mut g,
        &format!(
            "raw,file.driver=file,file.filename={},node-name=r0",
            img.path()
        ),
    )
    .unwrap();
    let child = raw.children()[0].node_name().to_string();
    assert!(child.starts_with("#block"), "{child}");
    let e = g.remove(&child).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Node '{child}' is in use by node 'r0'")
    );
    g.attach("r0", "bench").unwrap();
    assert!(g.remove("r0").is_err());
    g.detach("r0", "bench");
    g.remove("r0").unwrap();
    assert!(
        g.lookup(&child).is_err(),
        "the inline child goes with its parent"
    );
}

#[test]
fn raw_by_reference_keeps_its_child_and_refuses_a_missing_one() {
    let mut g = BlockGraph::new();
    let e = add(&mut g, "raw,file=nope").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot find device='nope' nor node-name='nope'"
    );
    add(&mut g, "null-co,node-name=n0,size=1M").unwrap();
    add(&mut g, "raw,file=n0,node-name=r0,offset=512k").unwrap();
    assert_eq!(g.lookup("r0").unwrap().capacity(), 512 << 10);
    g.remove("r0").unwrap();
    assert!(g.lookup("n0").is_ok(), "a referenced child stays");
    g.remove("n0").unwrap();
}

#[test]
fn raw_window_must_fit_its_child() {
    let mut g = BlockGraph::new();
    add(&mut g, "null-co,node-name=n0,size=1M").unwrap();
    let e = add(&mut g, "raw,file=n0,offset=512k,size=1M").unwrap_err();
    assert!(e.to_string().contains("has to be smaller or equal"), "{e}");
    assert!(
        g.lookup("#block001").is_err(),
        "a failed add leaves nothing behind"
    );
}

#[test]
fn failed_add_leaves_no_inline_children() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let arg = format!(
        "raw,file.driver=file,file.filename={},file.node-name=f0,size=2M",
        img.path()
    );
    assert!(add(&mut g, &arg).is_err());
    assert!(g.lookup("f0").is_err());
    // The image is not left locked either.
    add(
        &mut g,
        &format!("file,filename={},node-name=f1", img.path()),
    )
    .unwrap();
}

#[test]
fn io_uring_queue_reports_whether_finished_requests_wait() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let node = add(
        &mut g,
        &format!("file,filename={},aio=io_uring,node-name=u0", img.path()),
    )
    .unwrap();
    let mut q = node.open_queue().unwrap();
    // Nothing in flight: a busy poller is told there is nothing to reap.
    assert!(!q.completions_ready());
    q.submit(block::Request::flush()).unwrap();
    q.kick();
    let start = std::time::Instant::now();
    while !q.completions_ready() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "never ready"
        );
        std::hint::spin_loop();
    }
    let mut out = Vec::new();
    assert_eq!(q.poll_completions(&mut out), 1);
    assert!(out[0].result.is_ok());
    assert!(!q.completions_ready());
}
