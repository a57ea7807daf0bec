//! QMP command arguments and the monitor's own options (`--chardev`,
//! `--monitor`), shaped like QEMU's schema (qapi/block-core.json,
//! qapi/block-export.json, qapi/control.json, qapi/char.json). Unknown
//! members are refused, as QEMU's generated visitors refuse them.

use serde::Deserialize;

/// `qmp_capabilities`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QmpCapabilitiesArgs {
    /// Capabilities to enable (none is offered).
    #[serde(default)]
    pub enable: Vec<String>,
}

/// `query-named-block-nodes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryNamedBlockNodesArgs {
    /// Omit each image's chain of children.
    #[serde(default)]
    pub flat: bool,
}

/// `query-blockstats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueryBlockstatsArgs {
    /// One entry per node instead of one per user.
    #[serde(default)]
    pub query_nodes: bool,
}

/// `blockdev-del`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevDelArgs {
    /// The node to delete.
    pub node_name: String,
}

/// `block_resize`: exactly one of `device` and `node-name`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockResizeArgs {
    /// The device (or export) whose node to resize.
    #[serde(default)]
    pub device: Option<String>,
    /// The node to resize.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The new size in bytes (QEMU's schema has it signed).
    pub size: i64,
}

/// `block-export-del`'s `mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockExportRemoveMode {
    /// Refuse while a client is connected.
    #[default]
    Safe,
    /// Disconnect the client.
    Hard,
}

/// `block-export-del`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockExportDelArgs {
    /// The export.
    pub id: String,
    /// What to do with a connected client.
    #[serde(default)]
    pub mode: BlockExportRemoveMode,
}

/// A `--chardev socket,...` definition (what `--monitor chardev=ID` names).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChardevSocketOptions {
    /// The backend (only `socket` is served).
    pub backend: String,
    /// Its id.
    pub id: String,
    /// The unix socket's path.
    pub path: String,
    /// Listen (`server=on`).
    #[serde(default)]
    pub server: Option<bool>,
    /// Wait for a client before going on (only `wait=off` is served).
    #[serde(default)]
    pub wait: Option<bool>,
    /// A client socket connects again this many ms after losing its peer
    /// (`reconnect-ms`; vhost-user-blk devices).
    #[serde(default, rename = "reconnect-ms")]
    pub reconnect_ms: Option<u64>,
}

/// A `--monitor` definition.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorOptions {
    /// The chardev it serves.
    pub chardev: String,
    /// `control` (QMP) or `readline` (HMP, not served).
    #[serde(default)]
    pub mode: Option<String>,
    /// Its id.
    #[serde(default)]
    pub id: Option<String>,
    /// Pretty-printed JSON.
    #[serde(default)]
    pub pretty: Option<bool>,
}

/// `block_set_io_throttle` (QEMU's `BlockIOThrottle`): the six average
/// limits are required, as in QEMU; `group`, or the throttle node named
/// by `device` or `id`, says whose limits change.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockSetIoThrottleArgs {
    /// A `throttle` node.
    #[serde(default)]
    pub device: Option<String>,
    /// A `throttle` node (QEMU: a device's qdev id).
    #[serde(default)]
    pub id: Option<String>,
    /// The throttle group.
    #[serde(default)]
    pub group: Option<String>,
    /// Average limit `bps` (0: none).
    pub bps: u64,
    /// Average limit `bps_rd` (0: none).
    pub bps_rd: u64,
    /// Average limit `bps_wr` (0: none).
    pub bps_wr: u64,
    /// Average limit `iops` (0: none).
    pub iops: u64,
    /// Average limit `iops_rd` (0: none).
    pub iops_rd: u64,
    /// Average limit `iops_wr` (0: none).
    pub iops_wr: u64,
    /// Burst rate of `bps`.
    #[serde(default)]
    pub bps_max: Option<u64>,
    /// Burst rate of `bps_rd`.
    #[serde(default)]
    pub bps_rd_max: Option<u64>,
    /// Burst rate of `bps_wr`.
    #[serde(default)]
    pub bps_wr_max: Option<u64>,
    /// Burst rate of `iops`.
    #[serde(default)]
    pub iops_max: Option<u64>,
    /// Burst rate of `iops_rd`.
    #[serde(default)]
    pub iops_rd_max: Option<u64>,
    /// Burst rate of `iops_wr`.
    #[serde(default)]
    pub iops_wr_max: Option<u64>,
    /// Seconds the `bps_max` burst may last.
    #[serde(default)]
    pub bps_max_length: Option<u64>,
    /// Seconds the `bps_rd_max` burst may last.
    #[serde(default)]
    pub bps_rd_max_length: Option<u64>,
    /// Seconds the `bps_wr_max` burst may last.
    #[serde(default)]
    pub bps_wr_max_length: Option<u64>,
    /// Seconds the `iops_max` burst may last.
    #[serde(default)]
    pub iops_max_length: Option<u64>,
    /// Seconds the `iops_rd_max` burst may last.
    #[serde(default)]
    pub iops_rd_max_length: Option<u64>,
    /// Seconds the `iops_wr_max` burst may last.
    #[serde(default)]
    pub iops_wr_max_length: Option<u64>,
    /// A request larger than this counts as several operations.
    #[serde(default)]
    pub iops_size: Option<u64>,
}

/// `qom-get`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QomGetArgs {
    /// The object's id (or `/objects/ID`).
    pub path: String,
    /// The property.
    pub property: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_export_del_defaults_to_safe_and_refuses_unknown_members() {
        let a: BlockExportDelArgs = serde_json::from_str(r#"{"id":"e0"}"#).unwrap();
        assert_eq!(a.mode, BlockExportRemoveMode::Safe);
        let a: BlockExportDelArgs = serde_json::from_str(r#"{"id":"e0","mode":"hard"}"#).unwrap();
        assert_eq!(a.mode, BlockExportRemoveMode::Hard);
        assert!(serde_json::from_str::<BlockExportDelArgs>(r#"{"id":"e0","x":1}"#).is_err());
    }

    #[test]
    fn monitor_options_read_from_keyval() {
        let m: MonitorOptions = crate::parse_keyval_as("chardev=c0,mode=control", None).unwrap();
        assert_eq!(m.chardev, "c0");
        assert_eq!(m.mode.as_deref(), Some("control"));
        let c: ChardevSocketOptions = crate::parse_option_as(
            "socket,id=c0,path=/tmp/q,server=on,wait=off",
            Some("backend"),
        )
        .unwrap();
        assert_eq!((c.server, c.wait), (Some(true), Some(false)));
    }
}
