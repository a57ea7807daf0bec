//! The `rbd` driver: a node whose data is a Ceph RBD image, reached
//! through librbd's C API (`--blockdev driver=rbd,pool=P,image=I[,
//! namespace=N][,snapshot=S][,conf=C][,user=U][,key-secret=ID]
//! [,auth-client-required.0=cephx][,server.0.host=H,server.0.port=P]`,
//! QEMU's `BlockdevOptionsRbd`).
//!
//! Shape:
//! - librados and librbd are opened at run time ([`ffi`]), so blkvm builds
//!   and runs without Ceph; opening an `rbd` node without them fails
//!   saying which library was not found;
//! - opening the node connects, opens the pool and the image once
//!   ([`image`]); every data-plane queue submits on that one handle;
//! - each queue ([`queue`]) runs requests asynchronously with `rbd_aio_*`:
//!   librbd calls back on its threads, the callback signals the queue's
//!   eventfd, and the queue's thread completes the request. A FUA write is
//!   a write and then a flush; write-zeroes is `rbd_aio_write_zeroes`
//!   (Octopus and later), else writes from a zero buffer;
//! - librbd copies request data (or reads into the caller's iovecs) on its
//!   own, so the RAM registrar has nothing to register: a no-op here;
//! - how long a request may wait for a cluster that does not answer is
//!   librados' business (`rados_osd_op_timeout`, `client_mount_timeout`
//!   in the `conf` file, as QEMU users set them); past it the request
//!   fails with EIO rather than holding the IOThread, which never blocks
//!   on librbd.

mod ffi;
mod image;
mod queue;
mod secret;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qapi::{BlockdevCommon, BlockdevOptionsRbd};

use self::image::{ConnectConfig, RbdImage};
use self::queue::RbdQueue;
pub use self::secret::Secret;
use crate::limits::BlockLimits;
use crate::node::{BlockNode, NodeCommon, NodeOptions, NodeQueue};
use crate::stats::NodeStats;
use crate::BlockError;

/// The environment variable of a test hook: set, write-zeroes takes the
/// fallback of librbd versions without `rbd_aio_write_zeroes`. Read from
/// blkvm's own environment only, which its operator controls.
pub const TEST_NO_WRITE_ZEROES_ENV: &str = "BLKVM_TEST_RBD_NO_WRITE_ZEROES";

/// librbd's default `rbd_discard_granularity_bytes`: smaller discards of a
/// partial object are skipped, so a guest need not send them.
const DISCARD_GRANULARITY: u32 = 64 << 10;

/// Why an rbd image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// librados or librbd could not be loaded.
    #[error("{0}")]
    Library(String),
    /// An option holds a NUL byte.
    #[error("Parameter '{0}' must not contain a NUL byte")]
    Nul(&'static str),
    /// `rados_create` failed.
    #[error("error initializing librados")]
    Create(#[source] io::Error),
    /// The `conf` file could not be read.
    #[error("error reading conf file {path}")]
    Conf {
        /// The file.
        path: String,
        /// librados' error.
        #[source]
        source: io::Error,
    },
    /// librados refused a setting.
    #[error("error setting {option}")]
    ConfSet {
        /// The librados option.
        option: &'static str,
        /// librados' error.
        #[source]
        source: io::Error,
    },
    /// No monitor could be reached or authentication failed.
    #[error("error connecting to the cluster (wrong key or user, or no monitor answered)")]
    Connect(#[source] io::Error),
    /// The pool could not be opened.
    #[error("error opening pool {pool}")]
    Pool {
        /// The pool.
        pool: String,
        /// librados' error.
        #[source]
        source: io::Error,
    },
    /// The image (or its snapshot) could not be opened.
    #[error("error opening image {image}{}", snapshot.as_ref().map(|s| format!(" at snapshot {s}")).unwrap_or_default())]
    Image {
        /// The image.
        image: String,
        /// The snapshot asked for.
        snapshot: Option<String>,
        /// librbd's error.
        #[source]
        source: io::Error,
    },
    /// The image's size could not be read.
    #[error("error getting the image size")]
    Size(#[source] io::Error),
}

/// The `rbd` node.
pub struct RbdNode {
    common: NodeCommon,
    image: Arc<RbdImage>,
    capacity: Arc<AtomicU64>,
    filename: String,
    cache_direct: bool,
    native_zeroes: bool,
    stats: Arc<NodeStats>,
}

/// `pool/[namespace/]image[@snapshot]`, as `rbd` spells an image.
fn image_spec(o: &BlockdevOptionsRbd) -> String {
    let mut s = o.pool.clone();
    if let Some(ns) = &o.namespace {
        s = format!("{s}/{ns}");
    }
    s = format!("{s}/{}", o.image);
    if let Some(snap) = &o.snapshot {
        s = format!("{s}@{snap}");
    }
    s
}

/// `mon_host` from `server`: `host:port` joined by commas, IPv6 hosts in
/// brackets.
fn mon_host(servers: &[qapi::rbd::InetSocketAddressBase]) -> String {
    servers
        .iter()
        .map(|s| {
            if s.host.contains(':') && !s.host.starts_with('[') {
                format!("[{}]:{}", s.host, s.port)
            } else {
                format!("{}:{}", s.host, s.port)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl RbdNode {
    pub(crate) fn open(
        name: String,
        common: &BlockdevCommon,
        opts: &BlockdevOptionsRbd,
        secrets: &HashMap<String, Secret>,
    ) -> Result<Self, BlockError> {
        for (field, value) in [("pool", &opts.pool), ("image", &opts.image)] {
            if value.is_empty() {
                return Err(BlockError::Invalid(format!(
                    "Parameter '{field}' must not be empty"
                )));
            }
        }
        let mut read_only = common.read_only;
        if opts.snapshot.is_some() && !read_only {
            if !common.auto_read_only {
                return Err(BlockError::Invalid(
                    "Parameter 'snapshot': rbd snapshots are read-only (set read-only=on)".into(),
                ));
            }
            read_only = true;
        }
        let key = match &opts.key_secret {
            None => None,
            Some(id) => Some(
                secrets
                    .get(id)
                    .ok_or_else(|| {
                        BlockError::Invalid(format!(
                            "Parameter 'key-secret': no secret with id '{id}'"
                        ))
                    })?
                    .as_base64(),
            ),
        };
        let cfg = ConnectConfig {
            pool: opts.pool.clone(),
            namespace: opts.namespace.clone(),
            image: opts.image.clone(),
            snapshot: opts.snapshot.clone(),
            conf: opts.conf.clone(),
            user: opts.user.clone(),
            key,
            auth_client_required: opts
                .auth_client_required
                .as_ref()
                .map(|modes| modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(";")),
            mon_host: opts.server.as_deref().map(mon_host),
            rbd_cache: !common.cache.direct,
            read_only,
        };
        let spec = image_spec(opts);
        let failed = |e: RbdError| BlockError::Driver {
            driver: "rbd",
            path: spec.clone(),
            source: io::Error::other(e),
        };
        let image = RbdImage::open(&cfg).map_err(failed)?;
        let size = image.size().map_err(|e| failed(RbdError::Size(e)))?;
        let native_zeroes = image.lib.rbd_aio_write_zeroes.is_some()
            && std::env::var_os(TEST_NO_WRITE_ZEROES_ENV).is_none();
        Ok(RbdNode {
            common: NodeCommon::new(name, common, read_only),
            image: Arc::new(image),
            capacity: Arc::new(AtomicU64::new(size)),
            filename: format!("rbd:{spec}"),
            cache_direct: common.cache.direct,
            native_zeroes,
            stats: Arc::default(),
        })
    }
}

impl BlockNode for RbdNode {
    fn node_name(&self) -> &str {
        &self.common.name
    }
    fn driver(&self) -> &'static str {
        "rbd"
    }
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }
    fn refresh_capacity(&self) -> Result<u64, BlockError> {
        let size = self.image.size().map_err(|e| BlockError::Os {
            what: format!("read the size of {}", self.filename),
            source: e,
        })?;
        self.capacity.store(size, Ordering::Relaxed);
        Ok(size)
    }
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.common.read_only {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                self.common.name
            )));
        }
        self.image.resize(size).map_err(|e| BlockError::Os {
            what: format!("resize {}", self.filename),
            source: e,
        })?;
        self.capacity.store(size, Ordering::Relaxed);
        Ok(())
    }
    fn limits(&self) -> BlockLimits {
        BlockLimits {
            discard_granularity: DISCARD_GRANULARITY,
            ..BlockLimits::default()
        }
    }
    fn read_only(&self) -> bool {
        self.common.read_only
    }
    fn filename(&self) -> Option<&str> {
        Some(&self.filename)
    }
    fn cache_direct(&self) -> bool {
        self.cache_direct
    }
    fn options(&self) -> NodeOptions {
        self.common.options()
    }
    fn stats(&self) -> &NodeStats {
        &self.stats
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        Ok(Box::new(RbdQueue::new(
            self.common.clone(),
            self.image.clone(),
            self.capacity.clone(),
            self.stats.queue(),
            self.native_zeroes,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use qapi::rbd::InetSocketAddressBase;

    use super::*;

    fn opts(arg: &str) -> BlockdevOptionsRbd {
        match qapi::parse_blockdev(arg).unwrap().driver {
            qapi::BlockdevDriver::Rbd(o) => o,
            _ => unreachable!("rbd options"),
        }
    }

    #[test]
    fn image_spec_reads_like_the_rbd_tool() {
        assert_eq!(image_spec(&opts("rbd,pool=p,image=i")), "p/i");
        assert_eq!(
            image_spec(&opts("rbd,pool=p,namespace=n,image=i,snapshot=s")),
            "p/n/i@s"
        );
    }

    #[test]
    fn mon_host_brackets_ipv6() {
        let s = |host: &str, port: &str| InetSocketAddressBase {
            host: host.into(),
            port: port.into(),
        };
        assert_eq!(
            mon_host(&[s("10.0.0.1", "3300"), s("::1", "6789")]),
            "10.0.0.1:3300,[::1]:6789"
        );
    }

    fn open_err(arg: &str) -> String {
        let o = qapi::parse_blockdev(arg).unwrap();
        let qapi::BlockdevDriver::Rbd(r) = &o.driver else {
            unreachable!("rbd options");
        };
        match RbdNode::open("n".into(), &o.common, r, &HashMap::new()) {
            Ok(_) => panic!("{arg} opened"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn options_are_checked_before_any_connection() {
        assert_eq!(
            open_err("rbd,pool=p,image=i,key-secret=nope"),
            "Parameter 'key-secret': no secret with id 'nope'"
        );
        assert_eq!(
            open_err("rbd,pool=p,image=i,snapshot=s"),
            "Parameter 'snapshot': rbd snapshots are read-only (set read-only=on)"
        );
        assert_eq!(
            open_err("rbd,pool=,image=i"),
            "Parameter 'pool' must not be empty"
        );
    }
}
