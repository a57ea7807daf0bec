//! The seccomp policy of `blkvm run` and `blkvm storage-daemon`: which
//! system calls each [`ThreadKind`] may make. The mechanism (the registry
//! that threads [`sandbox::enter`], the SIGSYS report) is the `sandbox`
//! crate; this module only says what is allowed, in groups named for the
//! job that needs them, and compiles one BPF program per kind once at
//! start-up.
//!
//! Two rules shape the lists:
//! - Filters stack, so a kind that starts threads after entering its own
//!   sandbox (QMP starts sessions, IOThreads, exports; an IOThread starts
//!   the NBD client's reconnect thread) gets its children's rules too
//!   ([`children`]), plus what a new thread does before it enters its own
//!   (glibc's and std's thread start, `prctl`, `seccomp`).
//! - Generous within a job, strict across jobs: a file worker cannot open
//!   anything; an IOThread cannot open files for writing, listen, or (in
//!   the storage daemon) run KVM ioctls, and its connect and read-only
//!   opens are there for the NBD reconnect thread it starts; nothing can
//!   `execve`, `ptrace`, `kill` another process, change file modes or
//!   owners, or mount. Opening a node queue (io_uring set-up, a bounce
//!   pool's memfd, an NBD connection) happens where a device is activated
//!   or an export starts (vCPU, QMP, export and NBD handshake threads), so
//!   those kinds may do it.

use std::collections::BTreeMap;

use sandbox::seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use sandbox::{Filters, SandboxError, ThreadKind};

/// Syscall number to the rules of its arguments (empty: any arguments).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// The environment variable of the test hook: the kind (e.g. `iothread`)
/// whose threads make a forbidden call right after entering the sandbox.
/// Read only from blkvm's own environment, which its operator controls;
/// no guest, client or QMP command reaches it.
pub const TEST_FORBIDDEN_SYSCALL_ENV: &str = "BLKVM_TEST_FORBIDDEN_SYSCALL";

/// The ioctl type bytes (`_IOC_TYPE`) the lists allow: TTY and FIO
/// (`FIONBIO` from std's `set_nonblocking`, `TCGETS` from `isatty`) to
/// every kind, block devices (`BLKGETSIZE64`, `BLKDISCARD`, `BLKZEROOUT`,
/// ...) to the kinds that do block I/O.
const IOCTL_TYPE_TTY: u64 = 0x54;
const IOCTL_TYPE_BLOCK: u64 = 0x12;
/// `KVMIO`: every KVM ioctl.
const IOCTL_TYPE_KVM: u64 = 0xAE;

/// Which command the filters are for: only `blkvm run` drives a VM, so
/// only its threads may run KVM ioctls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `blkvm run`.
    Run,
    /// `blkvm storage-daemon`.
    StorageDaemon,
}

/// The threads each kind starts after entering its sandbox.
pub fn children(profile: Profile, kind: ThreadKind) -> &'static [ThreadKind] {
    use ThreadKind::*;
    match kind {
        // Sessions and writers; blockdev-add/block-export-add/
        // nbd-server-start/device hot-plug start IOThreads, exports, NBD
        // servers and file workers.
        Monitor => &[Monitor, IoThread, Export, NbdServer, FileWorker],
        // The NBD client reconnects off the data plane; werror=stop pauses
        // the VM off it; a queue may start file workers.
        IoThread if profile == Profile::Run => &[NbdReconnect, VmControl, FileWorker],
        IoThread => &[NbdReconnect, FileWorker],
        // A connection's own IOThreads and its queues.
        Export => &[IoThread, FileWorker],
        // A handshake thread per client; the server's queues.
        NbdServer => &[NbdServer, IoThread, FileWorker],
        // Activating a device opens its queues.
        Vcpu => &[FileWorker],
        Main | VhostUserFrontend | NbdReconnect | FileWorker | Signals | SerialInput
        | VmControl => &[],
    }
}

/// The kind's own rules, without its children's.
fn own_rules(profile: Profile, kind: ThreadKind) -> Rules {
    use ThreadKind::*;
    let mut r = base();
    let kvm = |r: &mut Rules| {
        if profile == Profile::Run {
            kvm(r);
        }
    };
    match kind {
        Main => {
            // Shutdown: flush and close nodes, stop exports and servers
            // (wake their listeners, remove their sockets), stop vCPUs.
            block_io(&mut r);
            open_files(&mut r);
            open_queue(&mut r);
            serve_sockets(&mut r);
            kvm(&mut r);
        }
        Vcpu => {
            kvm(&mut r);
            block_io(&mut r);
            open_queue(&mut r);
        }
        IoThread => block_io(&mut r),
        Monitor => {
            block_io(&mut r);
            open_files(&mut r);
            open_queue(&mut r);
            serve_sockets(&mut r);
            kvm(&mut r);
            ceph_client(&mut r);
        }
        Export | NbdServer => {
            block_io(&mut r);
            open_queue(&mut r);
            serve_sockets(&mut r);
            // vhost-user: a vring fd is checked to be an eventfd by its
            // /proc/self/fd link.
            allow(&mut r, &[libc::SYS_readlink, libc::SYS_readlinkat]);
        }
        VhostUserFrontend => {
            connect(&mut r);
            kvm(&mut r);
            allow(&mut r, &[libc::SYS_eventfd2, libc::SYS_memfd_create]);
        }
        NbdReconnect => connect(&mut r),
        FileWorker => block_io(&mut r),
        Signals => allow(&mut r, &[libc::SYS_rt_sigtimedwait]),
        SerialInput => {}
        VmControl => kvm(&mut r),
    }
    r
}

/// The kind's rules and, for a kind that starts threads, theirs and what
/// starting them takes.
pub fn rules(profile: Profile, kind: ThreadKind) -> Rules {
    let mut r = own_rules(profile, kind);
    let mut todo: Vec<ThreadKind> = children(profile, kind).to_vec();
    let mut seen = vec![kind];
    if !todo.is_empty() {
        spawn_threads(&mut r);
    }
    while let Some(k) = todo.pop() {
        if seen.contains(&k) {
            continue;
        }
        seen.push(k);
        merge(&mut r, own_rules(profile, k));
        if !children(profile, k).is_empty() {
            spawn_threads(&mut r);
        }
        todo.extend_from_slice(children(profile, k));
    }
    r
}

/// Compiles every kind's program; with `forbid_on_entry`, the test hook
/// for that kind.
pub fn filters(
    profile: Profile,
    forbid_on_entry: Option<ThreadKind>,
) -> Result<Filters, SandboxError> {
    let mut f = Filters::default();
    for kind in ThreadKind::ALL {
        f.set(kind, sandbox::compile(rules(profile, kind))?);
    }
    if let Some(k) = forbid_on_entry {
        f.forbid_on_entry(k);
    }
    Ok(f)
}

/// Compiles and installs the sandbox for every thread that starts from
/// now on (and the main thread when it calls `sandbox::enter(Main)`).
/// Call before the first thread starts.
pub fn install(profile: Profile) -> anyhow::Result<()> {
    let hook = match std::env::var(TEST_FORBIDDEN_SYSCALL_ENV) {
        Ok(name) => Some(ThreadKind::from_name(&name).ok_or_else(|| {
            anyhow::anyhow!("{TEST_FORBIDDEN_SYSCALL_ENV}={name}: not a thread kind")
        })?),
        Err(_) => None,
    };
    sandbox::install(filters(profile, hook)?)?;
    Ok(())
}

fn allow(r: &mut Rules, calls: &[i64]) {
    for &c in calls {
        r.insert(c, Vec::new());
    }
}

/// Adds `rule` to `call`'s rules (a call already allowed with any
/// arguments stays so; a rule already there is not repeated).
fn allow_if(r: &mut Rules, call: i64, rule: SeccompRule) {
    match r.get_mut(&call) {
        Some(rules) if rules.is_empty() || rules.contains(&rule) => {}
        Some(rules) => rules.push(rule),
        None => {
            r.insert(call, vec![rule]);
        }
    }
}

/// The union of two allow-lists.
fn merge(r: &mut Rules, other: Rules) {
    for (call, rules) in other {
        if rules.is_empty() {
            r.insert(call, rules);
        } else {
            for rule in rules {
                allow_if(r, call, rule);
            }
        }
    }
}

/// `arg` (32 bits) & `mask` == `value`.
fn arg_masked(arg: u8, mask: u64, value: u64) -> SeccompRule {
    let c = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .expect("a valid argument index");
    SeccompRule::new(vec![c]).expect("one condition")
}

/// `arg` (32 bits) == `value`.
fn arg_eq(arg: u8, value: u64) -> SeccompRule {
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("a valid argument index");
    SeccompRule::new(vec![c]).expect("one condition")
}

/// ioctls of type `ty` (the command's bits 8..16).
fn ioctl_type(r: &mut Rules, ty: u64) {
    allow_if(r, libc::SYS_ioctl, arg_masked(1, 0xff00, ty << 8));
}

/// Every thread: I/O on fds it has, memory (the allocator, thread stacks),
/// waiting (futex, epoll, poll, sleeps), time, signals' return, thread
/// exit, `getrandom` (hash maps, rustls), and what the SIGSYS report and
/// a panic's abort need.
fn base() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_mprotect,
            libc::SYS_brk,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
            libc::SYS_epoll_ctl,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettimeofday,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_getrandom,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    ioctl_type(&mut r, IOCTL_TYPE_TTY);
    // Signals to our own threads only (abort, vCPU kicks).
    allow_if(
        &mut r,
        libc::SYS_tgkill,
        arg_eq(0, u64::from(std::process::id())),
    );
    r
}

/// The data plane's I/O on open files and devices, io_uring included.
fn block_io(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_sync_file_range,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            libc::SYS_fstatfs,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_eventfd2,
        ],
    );
    ioctl_type(r, IOCTL_TYPE_BLOCK);
}

/// Opening a node queue: io_uring, eventfds, epoll and timers, a bounce
/// pool's memfd, an NBD client connection.
fn open_queue(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_register,
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_timerfd_create,
            libc::SYS_memfd_create,
            libc::SYS_dup3,
        ],
    );
    connect(r);
}

/// Connecting a socket (NBD client, vhost-user frontend), name resolution
/// included: glibc reads /etc/hosts and friends (read-only opens) and may
/// ask netlink or DNS.
fn connect(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_uname,
        ],
    );
    // O_RDONLY, without O_CREAT or O_TRUNC.
    let write_bits = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    allow_if(r, libc::SYS_openat, arg_masked(2, write_bits, 0));
}

/// Opening images, certificates and sockets by path (blockdev-add,
/// block-export-add, nbd-server-start) and removing sockets.
fn open_files(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_openat,
            libc::SYS_getdents64,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_statfs,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_getcwd,
        ],
    );
}

/// Listening and accepting (QMP, exports, the NBD server).
fn serve_sockets(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_socket,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept,
            libc::SYS_accept4,
            libc::SYS_socketpair,
        ],
    );
}

/// A Ceph client (the rbd driver's librados and librbd). `blockdev-add`
/// of an rbd node connects on the monitor's thread, and the threads
/// librados starts there (messenger workers, timers, librbd's finisher)
/// keep its filter. Beyond the monitor's own calls they make only the
/// messengers' `epoll_create` (not `epoll_create1`) and their wake-up
/// `pipe2`s: found with `strace -f` over blockdev-add, I/O through an
/// export, blockdev-del and quit. The rbd nodes of `--blockdev` open
/// before any thread enters its sandbox.
fn ceph_client(r: &mut Rules) {
    allow(r, &[libc::SYS_epoll_create, libc::SYS_pipe2]);
}

/// KVM ioctls (vCPU runs, ioeventfds, irqfds, MSI routing); vCPUs are
/// kicked out of `KVM_RUN` with `tgkill`, which [`base`] allows within
/// the process.
fn kvm(r: &mut Rules) {
    ioctl_type(r, IOCTL_TYPE_KVM);
}

/// What starting a thread takes, in the parent and in the child before it
/// enters its own sandbox: clone, glibc's thread set-up, std's guard page
/// and signal stack, naming the thread, and entering the sandbox.
fn spawn_threads(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_seccomp,
        ],
    );
    for op in [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
    ] {
        allow_if(r, libc::SYS_prctl, arg_eq(0, op as u64));
    }
}

#[cfg(test)]
mod tests;
