//! `--export` / `block-export-add` options, shaped like QEMU's
//! `BlockExportOptions` (qapi/block-export.json): common members and the
//! vhost-user-blk ones. `type` is the implied key, as in
//! qemu-storage-daemon (`--export vhost-user-blk,id=e0,...`).

use serde::{Deserialize, Serialize};

use crate::size::Size;

/// Export types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportType {
    /// A vhost-user-blk server on a unix socket.
    VhostUserBlk,
    /// An export of the NBD server (`--nbd-server`).
    Nbd,
}

/// `SocketAddress`: a unix socket, or TCP (`inet`, the NBD server only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SocketAddress {
    /// A unix domain socket.
    Unix {
        /// Its path.
        path: String,
    },
    /// A TCP host and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port (a string, as QEMU's `InetSocketAddress`).
        port: String,
    },
}

/// `--nbd-server` / `nbd-server-start` options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerOptions {
    /// Where to listen.
    pub addr: SocketAddress,
    /// Clients at once (unlimited when absent or 0).
    pub max_connections: Option<u32>,
    /// TLS credentials (an `--object tls-creds-x509` id).
    pub tls_creds: Option<String>,
}

/// A block export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportOptions {
    /// Export type.
    #[serde(rename = "type")]
    pub export_type: BlockExportType,
    /// Export id.
    pub id: String,
    /// The node exported.
    pub node_name: String,
    /// Allow writes (default off, as QEMU).
    #[serde(default)]
    pub writable: bool,
    /// Make every write durable before completing it.
    #[serde(default)]
    pub writethrough: bool,
    /// The iothread serving the export (all its queues on that thread).
    pub iothread: Option<String>,
    /// Where the vhost-user server listens (vhost-user-blk only).
    pub addr: Option<SocketAddress>,
    /// What a failed write does (vhost-user-blk; a blkvm extension with
    /// the devices' values, default `report` as qemu-storage-daemon).
    pub werror: Option<crate::BlockdevOnError>,
    /// What a failed read does (vhost-user-blk; default `report`).
    pub rerror: Option<crate::BlockdevOnError>,
    /// The NBD export's name (default: the node name; nbd only).
    pub name: Option<String>,
    /// The NBD export's description (nbd only).
    pub description: Option<String>,
    /// Logical block size the guest sees (default 512).
    pub logical_block_size: Option<Size>,
    /// Number of virtqueues (default 1).
    pub num_queues: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_and_json_forms_agree() {
        let k: BlockExportOptions = crate::parse_option_as(
            "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/s,writable=on,num-queues=2,logical-block-size=4k",
            Some("type"),
        )
        .unwrap();
        let j: BlockExportOptions = crate::parse_option_as(
            r#"{"type":"vhost-user-blk","id":"e0","node-name":"d0","addr":{"type":"unix","path":"/tmp/s"},"writable":true,"num-queues":2,"logical-block-size":4096}"#,
            Some("type"),
        )
        .unwrap();
        assert_eq!(k, j);
        assert_eq!(k.logical_block_size, Some(Size(4096)));
        assert_eq!(
            k.addr,
            Some(SocketAddress::Unix {
                path: "/tmp/s".into()
            })
        );
    }

    #[test]
    fn bad_export_options_name_the_key() {
        let e = crate::parse_option_as::<BlockExportOptions>(
            "fuse,id=e0,node-name=d0,addr.type=unix,addr.path=s",
            Some("type"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'type' does not accept value 'fuse'"
        );
        let n: BlockExportOptions = crate::parse_option_as(
            "nbd,id=e1,node-name=d0,name=disk,description=a disk,writable=on",
            Some("type"),
        )
        .unwrap();
        assert_eq!(n.export_type, BlockExportType::Nbd);
        assert_eq!(n.name.as_deref(), Some("disk"));
        let s: NbdServerOptions =
            crate::parse_option_as("addr.type=inet,addr.host=127.0.0.1,addr.port=10809", None)
                .unwrap();
        assert_eq!(
            s.addr,
            SocketAddress::Inet {
                host: "127.0.0.1".into(),
                port: "10809".into()
            }
        );
        let e = crate::parse_option_as::<BlockExportOptions>(
            "vhost-user-blk,id=e0,addr.type=unix,addr.path=s",
            Some("type"),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'node-name' is missing");
    }
}
