use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::*;

const PROFILES: [Profile; 2] = [Profile::Run, Profile::StorageDaemon];

#[test]
fn every_thread_kind_has_a_filter_that_compiles() {
    for profile in PROFILES {
        let f = filters(profile, None).unwrap();
        for kind in ThreadKind::ALL {
            let len = f.get(kind).map_or(0, |p| p.len());
            // Filters stack (QMP session, export, IOThread, reconnect):
            // the kernel takes at most 32768 instructions on one path.
            assert!(len > 0 && len < 32768 / 6, "{kind:?}: {len} instructions");
        }
    }
}

#[test]
fn a_spawner_allows_every_call_its_children_may_make() {
    for (profile, kind) in PROFILES
        .into_iter()
        .flat_map(|p| ThreadKind::ALL.map(|k| (p, k)))
    {
        let mine = rules(profile, kind);
        for &child in children(profile, kind) {
            for (call, child_rules) in rules(profile, child) {
                let Some(my_rules) = mine.get(&call) else {
                    panic!("{kind:?} starts {child:?}, which may make call {call}, but {kind:?} may not");
                };
                assert!(
                    my_rules.is_empty() || !child_rules.is_empty(),
                    "{kind:?} allows call {call} with conditions, {child:?} without"
                );
            }
        }
        if !children(profile, kind).is_empty() {
            assert!(mine.contains_key(&libc::SYS_clone3), "{kind:?}");
            assert!(mine.contains_key(&libc::SYS_seccomp), "{kind:?}");
        }
    }
}

#[test]
fn no_thread_may_exec_trace_or_change_file_modes() {
    for kind in ThreadKind::ALL {
        let r = rules(Profile::Run, kind);
        for call in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_fchmod,
            libc::SYS_chmod,
            libc::SYS_chown,
            libc::SYS_mount,
            libc::SYS_kill,
        ] {
            assert!(!r.contains_key(&call), "{kind:?} may make call {call}");
        }
    }
}

#[test]
fn threads_may_signal_only_threads_of_this_process() {
    let own = arg_eq(0, u64::from(std::process::id()));
    for kind in ThreadKind::ALL {
        assert_eq!(
            rules(Profile::Run, kind)[&libc::SYS_tgkill],
            vec![own.clone()]
        );
    }
}

#[test]
fn the_data_plane_cannot_open_files_or_listen() {
    for kind in [ThreadKind::FileWorker, ThreadKind::Signals] {
        let r = rules(Profile::Run, kind);
        assert!(!r.contains_key(&libc::SYS_openat), "{kind:?}");
        assert!(!r.contains_key(&libc::SYS_socket), "{kind:?}");
    }
    let io = rules(Profile::Run, ThreadKind::IoThread);
    // Only the reconnect thread's read-only opens (name resolution).
    assert!(!io[&libc::SYS_openat].is_empty());
    assert!(!io.contains_key(&libc::SYS_listen));
    assert!(!io.contains_key(&libc::SYS_accept4));
}

#[test]
fn only_vm_threads_may_run_kvm_ioctls() {
    // ioctl is allowed by type everywhere; KVM's type only where a VM is
    // driven (the IOThread of `run` through its werror=stop child).
    let kvm_rule = arg_masked(1, 0xff00, IOCTL_TYPE_KVM << 8);
    let has_kvm = |p: Profile, k: ThreadKind| rules(p, k)[&libc::SYS_ioctl].contains(&kvm_rule);
    assert!(has_kvm(Profile::Run, ThreadKind::Vcpu));
    assert!(has_kvm(Profile::Run, ThreadKind::Monitor));
    assert!(!has_kvm(Profile::Run, ThreadKind::FileWorker));
    for kind in ThreadKind::ALL {
        assert!(!has_kvm(Profile::StorageDaemon, kind), "{kind:?}");
    }
}

/// Runs `child` in a forked process with its stderr on a pipe; returns
/// the exit status and what it wrote. `child` must only make
/// async-signal-safe calls (the test harness has other threads).
fn in_child(child: impl FnOnce()) -> (i32, String) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only runs `child` (async-signal-safe by contract)
    // and _exit; the parent goes on with its own copy of everything.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: dup2 onto stderr of fds we own; _exit ends the child
        // without running the parent's atexit handlers or destructors.
        unsafe {
            libc::dup2(w.as_raw_fd(), libc::STDERR_FILENO);
            child();
            libc::_exit(0);
        }
    }
    drop(w);
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "status {status:#x}: {out}");
    (libc::WEXITSTATUS(status), out)
}

#[test]
fn a_forbidden_call_ends_the_process_with_a_message_naming_it() {
    let f = filters(Profile::StorageDaemon, None).unwrap();
    let program = f.get(ThreadKind::IoThread).unwrap().clone();
    let (code, out) = in_child(move || {
        sandbox::install_sigsys_handler().unwrap();
        sandbox::confine(ThreadKind::IoThread, &program).unwrap();
        sandbox::make_forbidden_call();
    });
    assert_eq!(code, sandbox::FORBIDDEN_CALL_EXIT_CODE, "{out}");
    assert!(out.contains("blkvm: seccomp: thread '"), "{out}");
    assert!(
        out.contains("made a forbidden system call: fchmod ("),
        "{out}"
    );
}

#[test]
fn a_confined_thread_goes_on_with_allowed_calls() {
    let f = filters(Profile::StorageDaemon, None).unwrap();
    let program = f.get(ThreadKind::FileWorker).unwrap().clone();
    let (code, out) = in_child(move || {
        sandbox::install_sigsys_handler().unwrap();
        sandbox::confine(ThreadKind::FileWorker, &program).unwrap();
        let msg = b"still here";
        // SAFETY: writes `msg` to stderr.
        unsafe { libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len()) };
    });
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "still here");
}

#[test]
fn a_file_worker_may_not_open_files() {
    let f = filters(Profile::StorageDaemon, None).unwrap();
    let program = f.get(ThreadKind::FileWorker).unwrap().clone();
    let (code, out) = in_child(move || {
        sandbox::install_sigsys_handler().unwrap();
        sandbox::confine(ThreadKind::FileWorker, &program).unwrap();
        // SAFETY: a NUL-terminated path; the result is not used.
        unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    });
    assert_eq!(code, sandbox::FORBIDDEN_CALL_EXIT_CODE, "{out}");
    assert!(out.contains("forbidden system call: openat ("), "{out}");
}

#[test]
fn glibc_overcommit_probe_is_refused_without_ending_the_process() {
    let f = filters(Profile::StorageDaemon, None).unwrap();
    let program = f.get(ThreadKind::FileWorker).unwrap().clone();
    let (code, out) = in_child(move || {
        sandbox::install_sigsys_handler().unwrap();
        sandbox::confine(ThreadKind::FileWorker, &program).unwrap();
        // SAFETY: a NUL-terminated path; the result is only compared.
        let fd = unsafe { libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        let msg: &[u8] = if fd == -1 && errno == Some(libc::EACCES) {
            b"refused"
        } else {
            b"not refused"
        };
        // SAFETY: writes `msg` to stderr.
        unsafe { libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len()) };
    });
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "refused");
}

#[test]
fn only_the_monitor_gains_what_a_ceph_client_needs() {
    for profile in PROFILES {
        let monitor = rules(profile, ThreadKind::Monitor);
        for call in [libc::SYS_epoll_create, libc::SYS_pipe2] {
            assert!(monitor.contains_key(&call), "monitor lacks call {call}");
        }
        for kind in [
            ThreadKind::IoThread,
            ThreadKind::Export,
            ThreadKind::FileWorker,
        ] {
            let r = rules(profile, kind);
            for call in [libc::SYS_epoll_create, libc::SYS_pipe2] {
                assert!(!r.contains_key(&call), "{kind:?} may make call {call}");
            }
        }
    }
}
