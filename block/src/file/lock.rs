//! Image locking with OFD locks, byte for byte the scheme of QEMU's
//! file-posix, so blkvm and QEMU tools see each other's locks: for every
//! permission a user holds it takes a shared lock on byte
//! `100 + bit`, and for every permission it does not share, a shared lock on
//! byte `200 + bit`. Opening fails when another open file description holds
//! a conflicting byte (QEMU: `raw_check_lock_bytes`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Base of the "permission held" lock bytes.
const PERM_BASE: i64 = 100;
/// Base of the "permission not shared" lock bytes.
const SHARED_BASE: i64 = 200;

/// QEMU's block permissions, by bit: consistent read, write, write
/// unchanged, resize.
pub const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// `BLK_PERM_CONSISTENT_READ`.
pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// `BLK_PERM_WRITE`.
pub const PERM_WRITE: u32 = 1 << 1;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u32 = 1 << 3;
const PERM_ALL: u32 = 0xf;

/// Why the locks could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FileLockError {
    /// Another process holds a conflicting lock.
    #[error("Failed to get {shared}\"{perm}\" lock")]
    Conflict {
        /// `"shared "` when the conflict is over a permission we refuse to share.
        shared: &'static str,
        /// The permission name.
        perm: &'static str,
    },
    /// fcntl failed.
    #[error("OFD lock operation failed")]
    Os(#[source] io::Error),
}

fn lock_op(file: &File, cmd: libc::c_int, ty: libc::c_short, byte: i64) -> io::Result<libc::flock> {
    let mut fl = libc::flock {
        l_type: ty,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: `fl` is a valid flock for the duration of the call; the fd is
    // open (borrowed from `file`); OFD commands only read/write `fl`.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

/// Whether another open file description holds a lock on `byte` that would
/// conflict with an exclusive lock.
fn locked_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let fl = lock_op(
        file,
        libc::F_OFD_GETLK,
        libc::F_WRLCK as libc::c_short,
        byte,
    )?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU-compatible locks for a user holding `perm` and sharing `shared`.
pub fn apply(file: &File, perm: u32, shared: u32) -> Result<(), FileLockError> {
    for bit in 0..4 {
        let mask = 1u32 << bit;
        if perm & mask != 0
            && locked_by_other(file, SHARED_BASE + bit).map_err(FileLockError::Os)?
        {
            return Err(FileLockError::Conflict {
                shared: "",
                perm: PERM_NAMES[bit as usize],
            });
        }
        if shared & mask == 0
            && locked_by_other(file, PERM_BASE + bit).map_err(FileLockError::Os)?
        {
            return Err(FileLockError::Conflict {
                shared: "shared ",
                perm: PERM_NAMES[bit as usize],
            });
        }
    }
    for bit in 0..4 {
        let mask = 1u32 << bit;
        if perm & mask != 0 {
            lock_op(
                file,
                libc::F_OFD_SETLK,
                libc::F_RDLCK as libc::c_short,
                PERM_BASE + bit,
            )
            .map_err(FileLockError::Os)?;
        }
        if (!shared & PERM_ALL) & mask != 0 {
            lock_op(
                file,
                libc::F_OFD_SETLK,
                libc::F_RDLCK as libc::c_short,
                SHARED_BASE + bit,
            )
            .map_err(FileLockError::Os)?;
        }
    }
    Ok(())
}

/// The permissions a writable or read-only user takes, as a QEMU device
/// does: a writer holds consistent-read and write and shares only
/// consistent-read, write-unchanged and resize; a reader holds
/// consistent-read and refuses to share write.
pub fn perms_for(read_only: bool) -> (u32, u32) {
    if read_only {
        (PERM_CONSISTENT_READ, PERM_ALL & !PERM_WRITE)
    } else {
        (
            PERM_CONSISTENT_READ | PERM_WRITE,
            PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_RESIZE,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn second_writer_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = open(f.path());
        let (p, s) = perms_for(false);
        apply(&a, p, s).unwrap();
        let b = open(f.path());
        let err = apply(&b, p, s).unwrap_err();
        assert_eq!(err.to_string(), "Failed to get \"write\" lock");
    }

    #[test]
    fn two_readers_share() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (p, s) = perms_for(true);
        let a = open(f.path());
        apply(&a, p, s).unwrap();
        let b = open(f.path());
        apply(&b, p, s).unwrap();
    }

    #[test]
    fn reader_blocks_a_writer_and_locks_drop_with_the_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (rp, rs) = perms_for(true);
        let (wp, ws) = perms_for(false);
        let a = open(f.path());
        apply(&a, rp, rs).unwrap();
        let b = open(f.path());
        assert!(apply(&b, wp, ws).is_err());
        drop(a);
        apply(&b, wp, ws).unwrap();
    }
}
