//! One open RBD image: the cluster connection (`rados_t`), the pool's I/O
//! context and the image handle, made in QEMU's order (`qemu_rbd_connect`)
//! and closed in reverse when the last user lets go.
//!
//! librbd's image handle is thread-safe: every queue of a node submits on
//! the same handle from its own thread, as QEMU's IOThreads do.

use std::ffi::{c_int, CString};
use std::io;
use std::ptr;

use super::ffi::{ceph, CephLib, RadosIoctxT, RadosT, RbdImageT};
use super::RbdError;

/// What to connect to and how (the node's options, resolved).
#[derive(Debug, Default)]
pub(crate) struct ConnectConfig {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snapshot: Option<String>,
    pub conf: Option<String>,
    pub user: Option<String>,
    /// The cephx key, base64.
    pub key: Option<String>,
    /// `auth_client_required`, `;`-separated.
    pub auth_client_required: Option<String>,
    /// `mon_host`, from `server`.
    pub mon_host: Option<String>,
    /// librbd's own write-back cache (`rbd_cache`): off with
    /// `cache.direct=on`, as QEMU.
    pub rbd_cache: bool,
    pub read_only: bool,
}

/// An open image and the connection it came from.
pub(crate) struct RbdImage {
    pub lib: &'static CephLib,
    cluster: RadosT,
    ioctx: RadosIoctxT,
    pub handle: RbdImageT,
}

// SAFETY: librados' cluster and I/O context handles and librbd's image
// handle may be used from any thread (librbd locks internally; QEMU and
// fio submit from several threads on one handle). The pointers are only
// freed in `Drop`, when no other reference exists.
unsafe impl Send for RbdImage {}
// SAFETY: as above; every shared use goes through librbd's thread-safe API.
unsafe impl Sync for RbdImage {}

fn cstring(what: &'static str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what))
}

/// A librados/librbd return code as a result.
pub(crate) fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(())
    }
}

impl RbdImage {
    /// Connects to the cluster and opens the image (blocking: up to
    /// librados' `client_mount_timeout` when no monitor answers).
    pub fn open(cfg: &ConnectConfig) -> Result<Self, RbdError> {
        let lib = ceph().map_err(RbdError::Library)?;
        let user = cfg
            .user
            .as_deref()
            .map(|u| cstring("user", u))
            .transpose()?;
        let mut this = RbdImage {
            lib,
            cluster: ptr::null_mut(),
            ioctx: ptr::null_mut(),
            handle: ptr::null_mut(),
        };
        // SAFETY: `cluster` is a valid out-pointer; the id is a C string or
        // NULL (librados' default user).
        let r = unsafe {
            (lib.rados_create)(
                &mut this.cluster,
                user.as_ref().map_or(ptr::null(), |u| u.as_ptr()),
            )
        };
        check(r).map_err(RbdError::Create)?;

        match &cfg.conf {
            Some(path) => {
                let c = cstring("conf", path)?;
                // SAFETY: a live cluster handle and a C string.
                let r = unsafe { (lib.rados_conf_read_file)(this.cluster, c.as_ptr()) };
                check(r).map_err(|source| RbdError::Conf {
                    path: path.clone(),
                    source,
                })?;
            }
            None => {
                // The default search path; as QEMU, a missing file is fine.
                // SAFETY: a live cluster handle; NULL asks for the default.
                let _ = unsafe { (lib.rados_conf_read_file)(this.cluster, ptr::null()) };
            }
        }
        if let Some(hosts) = &cfg.mon_host {
            this.set("mon_host", hosts)?;
        }
        if let Some(key) = &cfg.key {
            this.set("key", key)?;
        }
        if let Some(modes) = &cfg.auth_client_required {
            this.set("auth_client_required", modes)?;
        }
        this.set("rbd_cache", if cfg.rbd_cache { "true" } else { "false" })?;

        // SAFETY: a live, configured cluster handle.
        let r = unsafe { (lib.rados_connect)(this.cluster) };
        check(r).map_err(RbdError::Connect)?;

        let pool = cstring("pool", &cfg.pool)?;
        // SAFETY: a connected cluster, a C string, a valid out-pointer.
        let r = unsafe { (lib.rados_ioctx_create)(this.cluster, pool.as_ptr(), &mut this.ioctx) };
        check(r).map_err(|source| RbdError::Pool {
            pool: cfg.pool.clone(),
            source,
        })?;
        if let Some(ns) = &cfg.namespace {
            let ns = cstring("namespace", ns)?;
            // SAFETY: a live I/O context and a C string librados copies.
            unsafe { (lib.rados_ioctx_set_namespace)(this.ioctx, ns.as_ptr()) };
        }

        let image = cstring("image", &cfg.image)?;
        let snap = cfg
            .snapshot
            .as_deref()
            .map(|s| cstring("snapshot", s))
            .transpose()?;
        let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let open = if cfg.read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // SAFETY: a live I/O context, C strings (or NULL for no snapshot)
        // and a valid out-pointer.
        let r = unsafe { open(this.ioctx, image.as_ptr(), &mut this.handle, snap_ptr) };
        check(r).map_err(|source| RbdError::Image {
            image: cfg.image.clone(),
            snapshot: cfg.snapshot.clone(),
            source,
        })?;
        Ok(this)
    }

    fn set(&self, option: &'static str, value: &str) -> Result<(), RbdError> {
        let o = cstring(option, option)?;
        let v = cstring(option, value)?;
        // SAFETY: a live cluster handle and two C strings librados copies.
        let r = unsafe { (self.lib.rados_conf_set)(self.cluster, o.as_ptr(), v.as_ptr()) };
        check(r).map_err(|source| RbdError::ConfSet { option, source })
    }

    /// The image's size in bytes, as librbd knows it now.
    pub fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        check(unsafe { (self.lib.rbd_get_size)(self.handle, &mut size) })?;
        Ok(size)
    }

    /// Grows or shrinks the image.
    pub fn resize(&self, size: u64) -> io::Result<()> {
        // SAFETY: an open image.
        check(unsafe { (self.lib.rbd_resize)(self.handle, size) })
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // SAFETY: each handle is the one librados/librbd gave us (or NULL,
        // never made) and nothing uses it any more: queues hold an `Arc`
        // of this image and wait for their requests before they go.
        unsafe {
            if !self.handle.is_null() {
                (self.lib.rbd_close)(self.handle);
            }
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.lib.rados_shutdown)(self.cluster);
            }
        }
    }
}
