//! Per-thread seccomp sandboxes: the mechanism, not the policy.
//!
//! The binary compiles one BPF program per [`ThreadKind`] at start-up
//! (the policy, `vmm::sandbox`) and hands them to [`install`]. Every
//! thread the process starts, in whichever crate spawns it, calls
//! [`enter`] with its kind as the first thing its body does; that applies
//! the kind's program to the calling thread only (no TSYNC), so each
//! thread is confined to what its own job needs, as Firecracker and Cloud
//! Hypervisor confine theirs. Without [`install`] (unit tests, `blkvm
//! bench`, library users) [`enter`] does nothing.
//!
//! Filters stack: a thread inherits the filter of the thread that spawned
//! it and adds its own, and the kernel takes the strictest answer. A kind
//! that spawns threads after it entered its sandbox must therefore allow
//! what those threads need; the policy builds each spawner's program from
//! the union of its own rules and its children's.
//!
//! A forbidden call traps (`SECCOMP_RET_TRAP`): the SIGSYS handler
//! installed by [`install`] writes which thread made which call, by name,
//! with async-signal-safe `write(2)`, and ends the process with
//! [`FORBIDDEN_CALL_EXIT_CODE`]. A killed thread alone would leave a
//! daemon half alive; a silent `SECCOMP_RET_KILL_PROCESS` would leave the
//! user guessing.

#[cfg(target_arch = "x86_64")]
mod syscall_names_x86_64;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

pub use seccompiler;
pub use seccompiler::BpfProgram;
use seccompiler::{SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The exit code of a process a filter stopped: 128 + SIGSYS, what a
/// shell reports for a process killed by SIGSYS.
pub const FORBIDDEN_CALL_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// What a thread does, which decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread, once start-up is over: waits for the end, then
    /// shuts down.
    Main,
    /// A vCPU: `KVM_RUN` and the device emulation it exits to.
    Vcpu,
    /// An IOThread: data planes (virtio-blk queues, NBD sessions).
    IoThread,
    /// QMP: the listener, each session and its writer.
    Monitor,
    /// A vhost-user-blk export's listener and protocol thread.
    Export,
    /// The NBD server's listener and handshake threads.
    NbdServer,
    /// The control thread of a `vhost-user-blk-pci` device (the VMM as a
    /// vhost-user frontend), which reconnects to the backend.
    VhostUserFrontend,
    /// The NBD client's reconnect thread.
    NbdReconnect,
    /// A worker of the `file` driver's thread pool (`aio=threads`).
    FileWorker,
    /// The storage daemon's SIGTERM/SIGINT thread.
    Signals,
    /// The thread that forwards stdin to the guest's serial port.
    SerialInput,
    /// A short-lived VM control thread (pausing the VM on an I/O error).
    VmControl,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 12] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::IoThread,
        ThreadKind::Monitor,
        ThreadKind::Export,
        ThreadKind::NbdServer,
        ThreadKind::VhostUserFrontend,
        ThreadKind::NbdReconnect,
        ThreadKind::FileWorker,
        ThreadKind::Signals,
        ThreadKind::SerialInput,
        ThreadKind::VmControl,
    ];

    /// The kind's name (messages, the test hook's variable).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::IoThread => "iothread",
            ThreadKind::Monitor => "qmp",
            ThreadKind::Export => "export",
            ThreadKind::NbdServer => "nbd-server",
            ThreadKind::VhostUserFrontend => "vhost-user-frontend",
            ThreadKind::NbdReconnect => "nbd-reconnect",
            ThreadKind::FileWorker => "file-worker",
            ThreadKind::Signals => "signals",
            ThreadKind::SerialInput => "serial-input",
            ThreadKind::VmControl => "vm-control",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Why a sandbox could not be built or entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The rules do not make a filter for this machine.
    #[error("could not compile the seccomp filter")]
    Compile(#[source] seccompiler::Error),
    /// The kernel refused the filter.
    #[error("could not apply the seccomp filter")]
    Apply(#[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("could not install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// [`install`] was called twice.
    #[error("the sandbox is already installed")]
    AlreadyInstalled,
}

/// Compiles an allow-list (system call number to the rules of its
/// arguments, none meaning any arguments) for this machine: a call on the
/// list is allowed, anything else traps.
pub fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Compile(e.into()))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| SandboxError::Compile(e.into()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Compile(e.into()))
}

/// The compiled program of each thread kind.
#[derive(Default)]
pub struct Filters {
    programs: BTreeMap<ThreadKind, BpfProgram>,
    forbidden_call_in: Option<ThreadKind>,
}

impl Filters {
    /// Sets `kind`'s program.
    pub fn set(&mut self, kind: ThreadKind, program: BpfProgram) {
        self.programs.insert(kind, program);
    }

    /// `kind`'s program.
    pub fn get(&self, kind: ThreadKind) -> Option<&BpfProgram> {
        self.programs.get(&kind)
    }

    /// Test hook: threads of `kind` make a forbidden call right after
    /// entering their sandbox, so a test can watch the process end with
    /// the message. The binary sets it only from its own environment
    /// (`BLKVM_TEST_FORBIDDEN_SYSCALL`), which no guest or client reaches.
    pub fn forbid_on_entry(&mut self, kind: ThreadKind) {
        self.forbidden_call_in = Some(kind);
    }
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Installs the SIGSYS handler and `filters` for every thread that
/// [`enter`]s from now on. Call once, before the first thread starts.
pub fn install(filters: Filters) -> Result<(), SandboxError> {
    install_sigsys_handler()?;
    FILTERS
        .set(filters)
        .map_err(|_| SandboxError::AlreadyInstalled)
}

/// Confines the calling thread to `kind`'s filter, if a sandbox was
/// installed. A thread that asked for a sandbox and cannot have it ends
/// the process: running it unconfined would be the worse failure.
pub fn enter(kind: ThreadKind) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    let Some(program) = filters.get(kind) else {
        return;
    };
    if let Err(e) = confine(kind, program) {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        eprintln!(
            "blkvm: seccomp: could not confine thread '{}': {text} \
             (--sandbox off runs without the sandbox)",
            kind.name()
        );
        std::process::abort();
    }
    if filters.forbidden_call_in == Some(kind) {
        make_forbidden_call();
    }
}

/// Applies `program` to the calling thread and remembers the thread's
/// name (or `kind`'s) for the SIGSYS message.
pub fn confine(kind: ThreadKind, program: &BpfProgram) -> Result<(), SandboxError> {
    let current = std::thread::current();
    remember_thread_name(current.name().unwrap_or(kind.name()));
    seccompiler::apply_filter(program).map_err(SandboxError::Apply)
}

/// A call that no filter allows (`fchmod` on an invalid fd: harmless if
/// it ever ran unconfined).
pub fn make_forbidden_call() {
    // SAFETY: fchmod on fd -1 touches no memory and fails with EBADF.
    unsafe { libc::syscall(libc::SYS_fchmod, -1, 0) };
}

/// The longest thread name the message keeps.
const NAME_MAX: usize = 48;

thread_local! {
    /// The thread's name for the SIGSYS message: plain bytes, readable
    /// from a signal handler (const-initialised, no destructor).
    static THREAD_NAME: Cell<([u8; NAME_MAX], usize)> = const { Cell::new(([0; NAME_MAX], 0)) };
}

fn remember_thread_name(name: &str) {
    let mut buf = [0u8; NAME_MAX];
    let n = name.len().min(NAME_MAX);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set((buf, n)));
}

/// The name of system call `nr` on this machine.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let table = syscall_names_x86_64::SYSCALL_NAMES;
        table
            .binary_search_by_key(&nr, |&(n, _)| n)
            .ok()
            .map(|i| table[i].1)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = nr;
        None
    }
}

/// The SIGSYS fields of `siginfo_t` (the kernel's `_sigsys`, after the
/// three ints and the padding of 64-bit machines), which the libc crate
/// does not expose.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A message built without allocating, for the signal handler.
struct Message {
    buf: [u8; 160],
    len: usize,
}

impl Message {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Builds the line the handler prints.
fn forbidden_call_message(thread: &[u8], nr: i64) -> Message {
    let mut m = Message {
        buf: [0; 160],
        len: 0,
    };
    m.push(b"blkvm: seccomp: thread '");
    m.push(if thread.is_empty() { b"?" } else { thread });
    m.push(b"' made a forbidden system call: ");
    m.push(syscall_name(nr).unwrap_or("unknown").as_bytes());
    m.push(b" (");
    m.push_number(nr as u64);
    m.push(b")\n");
    m
}

/// The file glibc's `free` reads once per process, from whichever thread
/// first gives memory of a thread arena back (`check_may_shrink_heap`).
/// A thread whose filter forbids opening files gets `EACCES` for it
/// instead of ending the process: glibc takes a failed open as "not
/// strict overcommit" and goes on (found when a file worker freed a
/// qcow2 copy-on-write buffer at shutdown).
const GLIBC_OVERCOMMIT_PROBE: &[u8] = b"/proc/sys/vm/overcommit_memory\0";

/// Answers the trapped call `nr` with `-EACCES` when it is glibc's
/// overcommit probe, by setting the return register in `ctx` (the call
/// did not run: `SECCOMP_RET_TRAP` skips it). Returns whether it did.
#[cfg(target_arch = "x86_64")]
fn refuse_glibc_probe(nr: libc::c_int, ctx: *mut libc::c_void) -> bool {
    if i64::from(nr) != libc::SYS_openat || ctx.is_null() {
        return false;
    }
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes the interrupted thread's ucontext_t to an
    // SA_SIGINFO handler; `ctx` is non-null and we are its only user.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    // openat(dirfd, path, flags, mode): the path is the second argument.
    let path = gregs[libc::REG_RSI as usize] as *const libc::c_char;
    if path.is_null() {
        return false;
    }
    // SAFETY: a trapped openat's path argument is a NUL-terminated string
    // of the calling thread (the kernel would have read it); the
    // comparison stops at the first differing byte or the NUL, so it
    // reads no further than `GLIBC_OVERCOMMIT_PROBE`'s length.
    let same = unsafe { libc::strcmp(path, GLIBC_OVERCOMMIT_PROBE.as_ptr().cast()) } == 0;
    if same {
        gregs[libc::REG_RAX as usize] = -i64::from(libc::EACCES);
    }
    same
}

#[cfg(not(target_arch = "x86_64"))]
fn refuse_glibc_probe(_nr: libc::c_int, _ctx: *mut libc::c_void) -> bool {
    false
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO
    // handler; for SIGSYS its union holds `_sigsys`, laid out as
    // `SigsysInfo`, and the read stays within the 128-byte siginfo_t.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    if refuse_glibc_probe(nr, ctx) {
        return;
    }
    let (name, len) = THREAD_NAME.with(Cell::get);
    let m = forbidden_call_message(&name[..len], i64::from(nr));
    // SAFETY: write(2) and _exit(2) are async-signal-safe and every
    // filter allows them; `m.buf[..m.len]` is initialised memory.
    unsafe {
        libc::write(libc::STDERR_FILENO, m.buf.as_ptr().cast(), m.len);
        libc::_exit(FORBIDDEN_CALL_EXIT_CODE);
    }
}

/// Installs the handler that reports a forbidden call and ends the
/// process.
pub fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: `act` is zeroed plain data, then filled: an SA_SIGINFO
    // handler with the right signature and an empty mask; sigaction reads
    // it and writes no memory of ours (old action null).
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SandboxError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(k.name()), Some(k));
        }
        assert_eq!(ThreadKind::from_name("nope"), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn syscalls_are_named_by_number() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(libc::SYS_fchmod), Some("fchmod"));
        assert_eq!(
            syscall_name(libc::SYS_io_uring_setup),
            Some("io_uring_setup")
        );
        assert_eq!(syscall_name(100_000), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_message_names_the_thread_and_the_call() {
        let m = forbidden_call_message(b"iothread-io0", libc::SYS_fchmod);
        assert_eq!(
            std::str::from_utf8(&m.buf[..m.len]).unwrap(),
            "blkvm: seccomp: thread 'iothread-io0' made a forbidden system call: fchmod (91)\n"
        );
    }

    #[test]
    fn a_long_name_is_cut_not_overflowed() {
        let long = [b'x'; 400];
        let m = forbidden_call_message(&long, 1);
        assert_eq!(m.len, m.buf.len());
    }

    #[test]
    fn enter_without_install_does_nothing() {
        enter(ThreadKind::IoThread);
        make_forbidden_call();
    }
}
