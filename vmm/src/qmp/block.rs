//! The block commands both `run` and `storage-daemon` serve, over their
//! [`BlockGraph`]: node queries and statistics in QEMU's shapes,
//! `blockdev-add`, `blockdev-del` and `block_resize`.

use std::sync::Arc;

use block::throttle::{apply_limits, Bucket, BucketLimit, ThrottleConfig, ThrottleGroup};
use block::{
    children_with_roles, BlockBackend, BlockError, BlockGraph, BlockNode, ChildRole,
    FormatSpecific, NodeStatsSnapshot,
};
use qapi::qmp::{
    BlockResizeArgs, BlockSetIoThrottleArgs, BlockdevDelArgs, QomGetArgs, QueryBlockstatsArgs,
    QueryNamedBlockNodesArgs,
};
use qapi::throttle::ThrottleLimits;
use qapi::{BlockdevDetectZeroesOptions, BlockdevDiscardOptions};
use serde_json::{json, Map, Value};

use super::{args, QmpError};

/// QEMU's `BDRV_SECTOR_SIZE`, the unit of its node lengths.
const QEMU_SECTOR_SIZE: u64 = 512;

/// The block commands of this module.
pub const COMMANDS: &[&str] = &[
    "query-named-block-nodes",
    "query-blockstats",
    "blockdev-add",
    "blockdev-del",
    "block_resize",
    "block_set_io_throttle",
    "qom-get",
    "qom-set",
];

impl From<BlockError> for QmpError {
    fn from(e: BlockError) -> Self {
        let desc = error_chain(&e);
        match e {
            BlockError::NotFound(_) => QmpError::device_not_found(desc),
            _ => QmpError::generic(desc),
        }
    }
}

/// An error and its causes on one line, as QEMU's `error_prepend` reads.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The file name QEMU shows for a node: a protocol node's own, else its
/// file child's, else `driver://`.
fn filename(n: &dyn BlockNode) -> String {
    if let Some(f) = n.filename() {
        return f.to_string();
    }
    match file_child(n) {
        Some(c) => filename(c.as_ref()),
        None => format!("{}://", n.driver()),
    }
}

/// The first child in the `file` role (QEMU's primary child).
fn file_child(n: &dyn BlockNode) -> Option<Arc<dyn BlockNode>> {
    children_with_roles(n)
        .into_iter()
        .find_map(|(role, c)| (role == ChildRole::File).then_some(c))
}

fn detect_zeroes(d: BlockdevDetectZeroesOptions) -> &'static str {
    match d {
        BlockdevDetectZeroesOptions::Off => "off",
        BlockdevDetectZeroesOptions::On => "on",
        BlockdevDetectZeroesOptions::Unmap => "unmap",
    }
}

/// QEMU's `ImageInfoSpecific`.
fn format_specific(f: &FormatSpecific) -> Value {
    match f {
        FormatSpecific::Qcow2 {
            compat,
            compression_type,
            refcount_bits,
            v3,
        } => {
            let mut data = json!({
                "compat": compat,
                "compression-type": compression_type,
                "refcount-bits": refcount_bits,
            });
            if let Some(b) = v3 {
                data["lazy-refcounts"] = json!(b.lazy_refcounts);
                data["corrupt"] = json!(b.corrupt);
                data["extended-l2"] = json!(b.extended_l2);
            }
            json!({"type": "qcow2", "data": data})
        }
        FormatSpecific::File => json!({"type": "file", "data": {}}),
    }
}

/// QEMU's `ImageInfo` of a node; unless `flat`, with the image below it as
/// `backing-image`, down the whole chain.
fn image_info(n: &dyn BlockNode, flat: bool) -> Value {
    let d = n.image_details().unwrap_or_default();
    let mut v = json!({
        "filename": filename(n),
        "format": n.driver(),
        // QEMU counts a node's length in whole sectors, so an image file
        // whose length is not a multiple of 512 shows rounded up.
        "virtual-size": n.capacity().next_multiple_of(QEMU_SECTOR_SIZE),
        "dirty-flag": d.dirty,
    });
    if let Some(a) = n.allocated_size() {
        v["actual-size"] = json!(a);
    }
    if let Some(cs) = d.cluster_size {
        v["cluster-size"] = json!(cs);
    }
    if let Some(f) = d.backing_filename {
        v["backing-filename"] = json!(f);
    }
    if let Some(f) = d.full_backing_filename {
        v["full-backing-filename"] = json!(f);
    }
    if let Some(f) = d.backing_format {
        v["backing-filename-format"] = json!(f);
    }
    if let Some(s) = &d.specific {
        v["format-specific"] = format_specific(s);
    }
    if !flat {
        if let Some(b) = n.backing() {
            v["backing-image"] = image_info(b.as_ref(), false);
        }
    }
    v
}

/// How many images lie below `n` in its backing chain.
fn backing_depth(n: &dyn BlockNode) -> usize {
    n.backing().map_or(0, |b| 1 + backing_depth(b.as_ref()))
}

/// QEMU's `BlockDeviceInfo` of one node. `flat` (as
/// `query-named-block-nodes flat=true`) leaves out the backing chain
/// below: no `backing-image`, and a `backing_file_depth` of 0, as QEMU.
pub fn node_info(n: &dyn BlockNode, flat: bool) -> Value {
    let o = n.options();
    let depth = if flat { 0 } else { backing_depth(n) };
    let mut v = json!({
        "node-name": n.node_name(),
        "drv": n.driver(),
        "file": filename(n),
        "ro": n.read_only(),
        "encrypted": false,
        "backing_file_depth": depth,
        "detect_zeroes": detect_zeroes(o.detect_zeroes),
        "discard": matches!(o.discard, BlockdevDiscardOptions::Unmap),
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": n.cache_direct(), "no-flush": o.no_flush},
        "image": image_info(n, flat),
        "active": true,
    });
    if let Some(b) = n.backing() {
        v["backing_file"] = json!(filename(b.as_ref()));
    }
    v
}

/// QEMU's `BlockDeviceStats` of one node.
pub fn node_stats(n: &dyn BlockNode) -> Value {
    device_stats(&n.stats().snapshot())
}

/// QEMU's `BlockDeviceStats` from a snapshot of a node's or a user's
/// counters.
fn device_stats(s: &NodeStatsSnapshot) -> Value {
    json!({
        "rd_bytes": s.read.bytes,
        "wr_bytes": s.write.bytes + s.write_zeroes.bytes,
        "unmap_bytes": s.discard.bytes,
        "zone_append_bytes": 0,
        "rd_operations": s.read.ops,
        "wr_operations": s.write.ops + s.write_zeroes.ops,
        "flush_operations": s.flush.ops,
        "unmap_operations": s.discard.ops,
        "zone_append_operations": 0,
        "rd_total_time_ns": s.read.total_ns,
        "wr_total_time_ns": s.write.total_ns + s.write_zeroes.total_ns,
        "flush_total_time_ns": s.flush.total_ns,
        "unmap_total_time_ns": s.discard.total_ns,
        "zone_append_total_time_ns": 0,
        "wr_highest_offset": 0,
        "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0, "zone_append_merged": 0,
        "failed_rd_operations": s.read.errors,
        "failed_wr_operations": s.write.errors + s.write_zeroes.errors,
        "failed_flush_operations": s.flush.errors,
        "failed_unmap_operations": s.discard.errors,
        "failed_zone_append_operations": 0,
        "invalid_rd_operations": 0, "invalid_wr_operations": 0,
        "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
        "invalid_zone_append_operations": 0,
        "account_invalid": false,
        "account_failed": true,
        "timed_stats": [],
    })
}

/// `BlockStats` of a node with its file child as `parent`, as QEMU nests
/// them; at the level of a user (`with_backing`), with its backing child
/// as `backing` too, down the chain.
pub fn block_stats(n: &dyn BlockNode, with_backing: bool) -> Value {
    let mut v = json!({"node-name": n.node_name(), "stats": node_stats(n)});
    nest_children(&mut v, n, with_backing);
    v
}

/// Adds `parent` (the file child) and, when `with_backing`, `backing`.
fn nest_children(v: &mut Value, n: &dyn BlockNode, with_backing: bool) {
    if let Some(c) = file_child(n) {
        v["parent"] = block_stats(c.as_ref(), with_backing);
    }
    if with_backing {
        if let Some(b) = n.backing() {
            v["backing"] = block_stats(b.as_ref(), true);
        }
    }
}

/// `query-named-block-nodes [flat]`.
pub fn query_named_block_nodes(
    graph: &BlockGraph,
    a: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: QueryNamedBlockNodesArgs = args(a)?;
    Ok(graph
        .nodes()
        .map(|(_, n)| node_info(n.as_ref(), a.flat))
        .collect())
}

/// `query-blockstats [query-nodes]`. With `query-nodes`, one entry per
/// node, its own counters. Without it, one entry per user of the graph in
/// `users` (device or export, `qdev` naming it): the user's own counters
/// from its [`BlockBackend`], with its node's file child as `parent`, as
/// QEMU reports a BlockBackend.
pub fn query_blockstats(
    graph: &BlockGraph,
    users: &[(String, Arc<BlockBackend>)],
    a: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: QueryBlockstatsArgs = args(a)?;
    if a.query_nodes {
        return Ok(graph
            .nodes()
            .map(|(_, n)| block_stats(n.as_ref(), false))
            .collect());
    }
    Ok(users
        .iter()
        .map(|(qdev, b)| backend_stats(qdev, b))
        .collect())
}

/// `BlockStats` of one user: its own counters, its root node's name, the
/// root's file child as `parent` and its backing child as `backing`.
pub fn backend_stats(qdev: &str, b: &BlockBackend) -> Value {
    let node = b.node();
    let mut v = json!({
        "device": "",
        "qdev": qdev,
        "node-name": node.node_name(),
        "stats": device_stats(&b.stats().snapshot()),
    });
    nest_children(&mut v, node.as_ref(), true);
    v
}

/// `blockdev-add`: the same typed schema as `--blockdev`.
pub fn blockdev_add(graph: &mut BlockGraph, a: &Map<String, Value>) -> Result<Value, QmpError> {
    let opts = qapi::blockdev_from_json(&Value::Object(a.clone()))?;
    graph.add(&opts)?;
    Ok(json!({}))
}

/// `blockdev-del node-name=NAME`: refuses a node in use, naming its users.
pub fn blockdev_del(graph: &mut BlockGraph, a: &Map<String, Value>) -> Result<Value, QmpError> {
    let a: BlockdevDelArgs = args(a)?;
    if graph.lookup(&a.node_name).is_err() {
        return Err(QmpError::generic(format!(
            "Failed to find node with node-name='{}'",
            a.node_name
        )));
    }
    if graph.is_implicit(&a.node_name) {
        return Err(QmpError::generic(format!(
            "Node {} is not owned by the monitor",
            a.node_name
        )));
    }
    graph.remove(&a.node_name)?;
    Ok(json!({}))
}

/// `block_resize (device|node-name) size`: returns the resized node so the
/// caller can tell the devices and exports above it.
pub fn block_resize(
    graph: &BlockGraph,
    a: &Map<String, Value>,
) -> Result<Arc<dyn BlockNode>, QmpError> {
    let a: BlockResizeArgs = args(a)?;
    let name = match (&a.device, &a.node_name) {
        (Some(d), None) => d,
        (None, Some(n)) => n,
        _ => {
            return Err(QmpError::generic(
                "Need exactly one of 'device' and 'node-name'",
            ))
        }
    };
    if a.size < 0 {
        return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
    }
    let node = graph.lookup(name)?;
    node.truncate(a.size as u64)?;
    Ok(node)
}

/// The throttle group a `block_set_io_throttle` names: `group`, or that
/// of the `throttle` node `device`/`id` names.
fn throttle_group_of(
    graph: &BlockGraph,
    a: &BlockSetIoThrottleArgs,
) -> Result<Arc<ThrottleGroup>, QmpError> {
    if let Some(g) = &a.group {
        return graph
            .throttle_group(g)
            .cloned()
            .ok_or_else(|| QmpError::generic(format!("Throttle group '{g}' does not exist")));
    }
    let name = match (&a.device, &a.id) {
        (Some(d), None) | (None, Some(d)) => d,
        _ => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    };
    let node = graph.lookup(name)?;
    node.throttle_group().ok_or_else(|| {
        QmpError::generic(format!(
            "Node '{name}' is not a throttle node (driver '{}')",
            node.driver()
        ))
    })
}

/// `block_set_io_throttle`: replaces the group's limits with the
/// arguments' (QEMU's semantics: what is left out is unlimited).
pub fn block_set_io_throttle(
    graph: &BlockGraph,
    a: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: BlockSetIoThrottleArgs = args(a)?;
    let group = throttle_group_of(graph, &a)?;
    let mut c = ThrottleConfig::default();
    let mut set = |b: Bucket, avg: u64, max: Option<u64>, len: Option<u64>| {
        *c.bucket_mut(b) = BucketLimit {
            avg,
            max: max.unwrap_or(0),
            burst_length: len.unwrap_or(1),
        };
    };
    set(Bucket::BpsTotal, a.bps, a.bps_max, a.bps_max_length);
    set(Bucket::BpsRead, a.bps_rd, a.bps_rd_max, a.bps_rd_max_length);
    set(
        Bucket::BpsWrite,
        a.bps_wr,
        a.bps_wr_max,
        a.bps_wr_max_length,
    );
    set(Bucket::OpsTotal, a.iops, a.iops_max, a.iops_max_length);
    set(
        Bucket::OpsRead,
        a.iops_rd,
        a.iops_rd_max,
        a.iops_rd_max_length,
    );
    set(
        Bucket::OpsWrite,
        a.iops_wr,
        a.iops_wr_max,
        a.iops_wr_max_length,
    );
    c.op_size = a.iops_size.unwrap_or(0);
    group.set_config(c).map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// A throttle group's `limits` in QEMU's `ThrottleLimits` shape.
fn limits_json(c: &ThrottleConfig) -> Value {
    let mut m = Map::new();
    for (b, name) in [
        (Bucket::BpsTotal, "bps-total"),
        (Bucket::BpsRead, "bps-read"),
        (Bucket::BpsWrite, "bps-write"),
        (Bucket::OpsTotal, "iops-total"),
        (Bucket::OpsRead, "iops-read"),
        (Bucket::OpsWrite, "iops-write"),
    ] {
        let k = c.buckets[b as usize];
        m.insert(name.into(), json!(k.avg));
        m.insert(format!("{name}-max"), json!(k.max));
        m.insert(format!("{name}-max-length"), json!(k.burst_length));
    }
    m.insert("iops-size".into(), json!(c.op_size));
    Value::Object(m)
}

fn object_path(path: &str) -> &str {
    path.strip_prefix("/objects/").unwrap_or(path)
}

/// `qom-get` of a throttle group's `limits`.
pub fn qom_get(graph: &BlockGraph, a: &Map<String, Value>) -> Result<Value, QmpError> {
    let a: QomGetArgs = args(a)?;
    let id = object_path(&a.path);
    let g = graph
        .throttle_group(id)
        .ok_or_else(|| QmpError::device_not_found(format!("Device '{id}' not found")))?;
    match a.property.as_str() {
        "limits" => Ok(limits_json(&g.config())),
        p => Err(QmpError::generic(format!("Property '{p}' not found"))),
    }
}

/// `qom-set` of a throttle group's `limits`: the members given change,
/// the rest stay (QEMU's `throttle_group_set_limits`).
pub fn qom_set(graph: &BlockGraph, a: &Map<String, Value>) -> Result<Value, QmpError> {
    let field = |k: &str| {
        a.get(k)
            .ok_or_else(|| QmpError::generic(format!("Parameter '{k}' is missing")))
    };
    if let Some(k) = a
        .keys()
        .find(|k| !["path", "property", "value"].contains(&k.as_str()))
    {
        return Err(QmpError::generic(format!("Invalid parameter '{k}'")));
    }
    let (Some(path), Some(property)) = (field("path")?.as_str(), field("property")?.as_str())
    else {
        return Err(QmpError::generic(
            "Invalid parameter type for 'path' or 'property', expected: string",
        ));
    };
    let id = object_path(path);
    let g = graph
        .throttle_group(id)
        .ok_or_else(|| QmpError::device_not_found(format!("Device '{id}' not found")))?;
    if property != "limits" {
        return Err(QmpError::generic(format!(
            "Property '{property}' not found"
        )));
    }
    let limits: ThrottleLimits = match field("value")? {
        Value::Object(m) => args(m)?,
        _ => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'value', expected: object",
            ))
        }
    };
    let c = apply_limits(g.config(), &limits);
    g.set_config(c).map_err(QmpError::generic)?;
    Ok(json!({}))
}
