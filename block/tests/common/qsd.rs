//! A real vhost-user-blk server for tests: qemu-storage-daemon exporting
//! one node of its own block graph on a unix socket, killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the daemon may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running qemu-storage-daemon with a vhost-user-blk export.
pub struct Qsd {
    child: Child,
    dir: tempfile::TempDir,
    sock: String,
}

impl Qsd {
    /// Starts the daemon with `blockdevs` (its `--blockdev` arguments) and
    /// exports the last one (by its `node-name`) writable over
    /// vhost-user-blk with `num_queues` queues.
    pub fn start(blockdevs: &[String], num_queues: u32) -> Qsd {
        let node = blockdevs
            .last()
            .and_then(|b| b.split(',').find_map(|kv| kv.strip_prefix("node-name=")))
            .expect("the exported --blockdev names its node-name");
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("vhost-user-blk.sock");
        let sock = sock.to_str().expect("utf-8 path").to_string();
        let pidfile = dir.path().join("qsd.pid");
        let log = std::fs::File::create(dir.path().join("qsd.log")).expect("log file");
        let mut cmd = Command::new("qemu-storage-daemon");
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={sock},\
             writable=on,num-queues={num_queues}"
        ));
        cmd.arg("--pidfile").arg(&pidfile);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("spawn qemu-storage-daemon");
        let mut qsd = Qsd { child, dir, sock };
        qsd.wait_ready(&pidfile);
        qsd
    }

    /// Waits until the daemon wrote its pid file (after every export is
    /// listening) and the socket exists.
    fn wait_ready(&mut self, pidfile: &Path) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if pidfile.exists() && Path::new(&self.sock).exists() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("qemu-storage-daemon exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
    }

    /// The export's socket path.
    pub fn sock(&self) -> &str {
        &self.sock
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An NBD server for the client's tests (qemu-nbd or nbdkit) on a unix
/// socket, killed on drop.
pub struct NbdPeer {
    child: Child,
    dir: tempfile::TempDir,
    sock: String,
}

impl NbdPeer {
    /// Runs `program` with `args`, where `{sock}` becomes the socket path
    /// the server must listen on, and waits until it accepts.
    pub fn start(program: &str, args: &[String]) -> NbdPeer {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let sock = sock.to_str().expect("utf-8 path").to_string();
        let log = std::fs::File::create(dir.path().join("peer.log")).expect("log file");
        let child = Command::new(program)
            .args(args.iter().map(|a| a.replace("{sock}", &sock)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let mut peer = NbdPeer { child, dir, sock };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&peer.sock).is_ok() {
                break;
            }
            if let Ok(Some(status)) = peer.child.try_wait() {
                panic!("{program} exited ({status}): {}", peer.log());
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not start: {}",
                peer.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        peer
    }

    /// What the server wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("peer.log")).unwrap_or_default()
    }

    /// The socket path.
    pub fn sock(&self) -> &str {
        &self.sock
    }

    /// Kills the server (the client sees its connections drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NbdPeer {
    fn drop(&mut self) {
        self.kill();
    }
}
