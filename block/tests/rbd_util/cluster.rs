//! A Ceph cluster for tests, started with the project's own
//! `resources/ceph/start.sh` and ended with `stop.sh`.
//!
//! - [`Cluster::shared`]: one cluster in `target/ceph-shared` for every
//!   test process that wants one (nextest runs each test in its own
//!   process). A test holds a shared `flock` on `users.lock` while it runs;
//!   `start.lock` serialises starting and stopping. The first test starts
//!   the cluster, the last one to leave stops it, so nothing outlives the
//!   run and tests never wait on one another's I/O.
//! - [`Cluster::private`]: a cluster of one test's own (one that stops
//!   daemons on purpose), ended when dropped.
//!
//! Ceph must be installed (`resources/setup.sh`); without it the tests
//! fail, saying so, rather than pass unchecked.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The workspace root (the test crates sit one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("a workspace member")
        .to_path_buf()
}

fn script(name: &str) -> PathBuf {
    root().join("resources/ceph").join(name)
}

fn flock(f: &File, op: libc::c_int) -> bool {
    loop {
        // SAFETY: a valid open file descriptor; flock has no memory
        // arguments.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return true;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

fn lock_file(path: &Path) -> File {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether the daemons of the cluster in `dir` are alive.
fn running(dir: &Path) -> bool {
    ["mon.a.pid", "osd.0.pid"].iter().all(|f| {
        std::fs::read_to_string(dir.join("run").join(f))
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
            // SAFETY: signal 0 only checks that the process exists.
            .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
    })
}

fn start(dir: &Path) {
    let out = Command::new(script("start.sh"))
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("resources/ceph/start.sh: {e}"));
    assert!(
        out.status.success(),
        "resources/ceph/start.sh failed (is Ceph installed? run resources/setup.sh):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stop(dir: &Path) {
    let out = Command::new(script("stop.sh"))
        .arg(dir)
        .output()
        .expect("resources/ceph/stop.sh");
    assert!(
        out.status.success(),
        "resources/ceph/stop.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running cluster this test may use.
pub struct Cluster {
    dir: PathBuf,
    /// The shared cluster's lease (a shared flock on `users.lock`); `None`
    /// for a private cluster.
    lease: Option<File>,
    _tmp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// The shared cluster, started if no other test runs one.
    pub fn shared() -> Cluster {
        let dir = root().join("target/ceph-shared");
        std::fs::create_dir_all(&dir).unwrap();
        let start_lock = lock_file(&dir.join("start.lock"));
        assert!(flock(&start_lock, libc::LOCK_EX));
        if !running(&dir) {
            stop(&dir);
            start(&dir);
        }
        let lease = lock_file(&dir.join("users.lock"));
        assert!(flock(&lease, libc::LOCK_SH));
        Cluster {
            dir,
            lease: Some(lease),
            _tmp: None,
        }
    }

    /// A cluster of this test's own.
    pub fn private() -> Cluster {
        // Short paths: the daemons' admin sockets live under it.
        let tmp = tempfile::Builder::new()
            .prefix("ceph")
            .tempdir_in("/tmp")
            .unwrap();
        start(tmp.path());
        Cluster {
            dir: tmp.path().to_path_buf(),
            lease: None,
            _tmp: Some(tmp),
        }
    }

    /// The cluster's ceph.conf (client.admin's keyring named in it).
    pub fn conf(&self) -> String {
        self.dir.join("ceph.conf").display().to_string()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// client.blkvm's cephx key, base64 (as `ceph auth print-key`).
    pub fn blkvm_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("blkvm.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The pid of a daemon (`mon.a`, `osd.0`).
    pub fn pid(&self, daemon: &str) -> libc::pid_t {
        let f = self.dir.join("run").join(format!("{daemon}.pid"));
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .trim()
            .parse()
            .unwrap()
    }

    /// Runs `rbd` as client.admin; panics with its output on failure.
    pub fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new image of `size` bytes in pool `rbd`, removed when dropped.
    pub fn image(&self, size: u64) -> RbdTestImage<'_> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.rbd(&[
            "create",
            "--size",
            &format!("{size}B"),
            &format!("rbd/{name}"),
        ]);
        RbdTestImage {
            cluster: self,
            name,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            stop(&self.dir);
            return;
        };
        let start_lock = lock_file(&self.dir.join("start.lock"));
        if !flock(&start_lock, libc::LOCK_EX) {
            return;
        }
        drop(lease);
        // Nobody else holds a lease (and nobody can take one while we hold
        // start.lock): the last user stops the cluster.
        let users = lock_file(&self.dir.join("users.lock"));
        if flock(&users, libc::LOCK_EX | libc::LOCK_NB) {
            stop(&self.dir);
        }
    }
}

/// An image of the test's own; removed (with its snapshots) on drop.
pub struct RbdTestImage<'a> {
    pub cluster: &'a Cluster,
    pub name: String,
}

impl RbdTestImage<'_> {
    /// `rbd/NAME`.
    pub fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    /// `--blockdev` options for it as client.blkvm with key-secret `s0`
    /// (see [`secret_object`]), plus `extra`.
    pub fn blockdev(&self, extra: &str) -> String {
        format!(
            "rbd,pool=rbd,image={},conf={},user=blkvm,key-secret=s0{extra}",
            self.name,
            self.cluster.conf()
        )
    }

    /// The `--object` holding client.blkvm's key.
    pub fn secret_object(&self) -> String {
        format!(
            "secret,id=s0,format=base64,data={}",
            self.cluster.blkvm_key()
        )
    }
}

impl Drop for RbdTestImage<'_> {
    fn drop(&mut self) {
        let conf = self.cluster.conf();
        let _ = Command::new("rbd")
            .args(["-c", &conf, "snap", "purge", &self.spec()])
            .output();
        let _ = Command::new("rbd")
            .args(["-c", &conf, "rm", "--no-progress", &self.spec()])
            .output();
    }
}
