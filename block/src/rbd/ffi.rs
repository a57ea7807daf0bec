//! librados' and librbd's C API, loaded at run time with `libloading`.
//!
//! blkvm is built and shipped without Ceph: the libraries are opened the
//! first time an `rbd` node is, and an installation without them gets a
//! clear error then and only then. The functions are looked up once into
//! [`CephLib`], which lives for the rest of the process (the libraries are
//! never closed: librados' threads may outlive any one node).
//!
//! Only the calls the driver makes are declared, with the prototypes of
//! `rados/librados.h` and `rbd/librbd.h` (stable C ABI since Luminous;
//! `rbd_aio_write_zeroes` since Octopus, so it is optional).

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`.
pub type RadosT = *mut c_void;
/// `rados_ioctx_t`.
pub type RadosIoctxT = *mut c_void;
/// `rbd_image_t`.
pub type RbdImageT = *mut c_void;
/// `rbd_completion_t`.
pub type RbdCompletionT = *mut c_void;
/// `rbd_callback_t`.
pub type RbdCallbackT = extern "C" fn(RbdCompletionT, *mut c_void);

/// The file names the dynamic loader is asked for (the runtime packages'
/// sonames: librados2, librbd1).
pub const LIBRADOS: &str = "librados.so.2";
/// See [`LIBRADOS`].
pub const LIBRBD: &str = "librbd.so.1";

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zeroes are written, not
/// deallocated.
pub const WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// The functions of librados and librbd the driver calls.
pub struct CephLib {
    pub rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(RadosT),
    pub rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut RadosIoctxT) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(RadosIoctxT),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(RadosIoctxT, *const c_char),

    pub rbd_open:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(RbdImageT) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(RbdImageT, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(RbdImageT, u64) -> c_int,

    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, RbdCallbackT, *mut RbdCompletionT) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(RbdCompletionT) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(RbdCompletionT),
    pub rbd_aio_readv:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(RbdImageT, u64, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(RbdImageT, RbdCompletionT) -> c_int,
    /// Absent before Octopus: write-zeroes then writes zero buffers.
    pub rbd_aio_write_zeroes:
        Option<unsafe extern "C" fn(RbdImageT, u64, usize, RbdCompletionT, c_int, c_int) -> c_int>,

    /// Keeps the code of the functions above mapped.
    _libs: (Library, Library),
}

/// Looks `name` up in `lib` as a function of type `T`.
///
/// # Safety
/// `T` must be the function pointer type of the C prototype of `name`.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller gives the symbol's true type; the library stays
    // loaded as long as the returned pointer is used (`CephLib` keeps it).
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{name} not found: {e}"))
}

impl CephLib {
    fn load() -> Result<Self, String> {
        // librbd first: it brings librados in, and its absence is the one
        // to report.
        // SAFETY: loading librbd runs its and librados' initialisers, which
        // have no requirements on the caller (the libraries are made to be
        // loaded into any process, as QEMU and fio do).
        let rbd = unsafe { Library::new(LIBRBD) }.map_err(|e| {
            format!("librbd ({LIBRBD}) was not found (install librbd1 to use rbd nodes): {e}")
        })?;
        // SAFETY: as above; librados is loaded already, as librbd's dependency.
        let rados = unsafe { Library::new(LIBRADOS) }
            .map_err(|e| format!("librados ({LIBRADOS}) was not found: {e}"))?;
        // SAFETY: every `sym` below is given the prototype of librados.h or
        // librbd.h for its symbol, transcribed in the field declarations.
        unsafe {
            Ok(CephLib {
                rados_create: sym(&rados, "rados_create")?,
                rados_conf_read_file: sym(&rados, "rados_conf_read_file")?,
                rados_conf_set: sym(&rados, "rados_conf_set")?,
                rados_connect: sym(&rados, "rados_connect")?,
                rados_shutdown: sym(&rados, "rados_shutdown")?,
                rados_ioctx_create: sym(&rados, "rados_ioctx_create")?,
                rados_ioctx_destroy: sym(&rados, "rados_ioctx_destroy")?,
                rados_ioctx_set_namespace: sym(&rados, "rados_ioctx_set_namespace")?,
                rbd_open: sym(&rbd, "rbd_open")?,
                rbd_open_read_only: sym(&rbd, "rbd_open_read_only")?,
                rbd_close: sym(&rbd, "rbd_close")?,
                rbd_get_size: sym(&rbd, "rbd_get_size")?,
                rbd_resize: sym(&rbd, "rbd_resize")?,
                rbd_aio_create_completion: sym(&rbd, "rbd_aio_create_completion")?,
                rbd_aio_get_return_value: sym(&rbd, "rbd_aio_get_return_value")?,
                rbd_aio_release: sym(&rbd, "rbd_aio_release")?,
                rbd_aio_readv: sym(&rbd, "rbd_aio_readv")?,
                rbd_aio_writev: sym(&rbd, "rbd_aio_writev")?,
                rbd_aio_discard: sym(&rbd, "rbd_aio_discard")?,
                rbd_aio_flush: sym(&rbd, "rbd_aio_flush")?,
                rbd_aio_write_zeroes: sym(&rbd, "rbd_aio_write_zeroes").ok(),
                _libs: (rados, rbd),
            })
        }
    }
}

static CEPH: OnceLock<Result<CephLib, String>> = OnceLock::new();

/// The loaded libraries, loading them on first use; the error says which
/// library is missing.
pub fn ceph() -> Result<&'static CephLib, String> {
    CEPH.get_or_init(CephLib::load)
        .as_ref()
        .map_err(Clone::clone)
}

/// The libraries if an earlier [`ceph`] loaded them (for completion
/// callbacks, which only run after a successful load).
pub fn loaded() -> Option<&'static CephLib> {
    CEPH.get().and_then(|r| r.as_ref().ok())
}
