//! Fuzzes a QMP session as `blkvm storage-daemon` and `blkvm run` serve
//! it: the input is what a client writes on the socket, fed in pieces to
//! the session (`vmm::qmp::Session`, the server's own framing,
//! negotiation, dispatch and error shapes) over a monitor with the block
//! commands both subcommands share, on a graph with a null-co node that
//! an "export" uses.
//!
//! No input may panic. Every reply must be a QMP reply (`return`, or
//! `error` with a class and a description) and the greeting must come
//! first. When the input is JSON lines, each an object, there must be
//! exactly one reply per line, in order, echoing the line's `id`.
//!
//! blockdev-add is limited to null-co and raw nodes, so that no input can
//! make the harness open, create or truncate a host file or connect
//! anywhere.

#![no_main]

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};

use block::BlockGraph;
use libfuzzer_sys::fuzz_target;
use qapi::{BlockdevDriver, BlockdevOptions, BlockdevRef};
use serde_json::{json, Map, Value};
use vmm::qmp::{self, Events, Monitor, QmpError, Session};

/// Bytes fed per read: a socket delivers a message in pieces, and the
/// writer's queue (1024 replies) must be drained before it fills.
const CHUNK: usize = 251;

/// The exported node and the user that holds it.
const NODE: &str = "disk0";
const USER: &str = "export 'e0'";

struct FuzzMonitor {
    graph: Mutex<BlockGraph>,
}

impl FuzzMonitor {
    fn new() -> Self {
        let mut graph = BlockGraph::new();
        let opts = qapi::parse_blockdev(&format!("null-co,node-name={NODE},size=1M")).unwrap();
        graph.add(&opts).unwrap();
        graph.attach(NODE, USER).unwrap();
        FuzzMonitor {
            graph: Mutex::new(graph),
        }
    }

    fn graph(&self) -> MutexGuard<'_, BlockGraph> {
        self.graph.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether every node `o` defines is one the harness may open.
fn harmless(o: &BlockdevOptions) -> bool {
    match &o.driver {
        BlockdevDriver::NullCo(_) => true,
        BlockdevDriver::Raw(r) => match &r.file {
            BlockdevRef::Reference(_) => true,
            BlockdevRef::Definition(d) => harmless(d),
        },
        _ => false,
    }
}

impl Monitor for FuzzMonitor {
    fn commands(&self) -> Vec<&'static str> {
        let mut c = vec!["query-status", "query-block", "query-block-exports"];
        c.extend(qmp::block::COMMANDS);
        c
    }

    fn execute(&self, name: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "query-status" => {
                qmp::no_args(a)?;
                Ok(json!({"status": "running", "singlestep": false, "running": true}))
            }
            "query-block" => {
                qmp::no_args(a)?;
                let g = self.graph();
                let node = g.lookup(NODE)?;
                Ok(json!([{
                    "device": "",
                    "qdev": "e0",
                    "inserted": qmp::block::node_info(node.as_ref(), false),
                }]))
            }
            "query-block-exports" => {
                qmp::no_args(a)?;
                Ok(json!([{"type": "vhost-user-blk", "id": "e0", "node-name": NODE}]))
            }
            "query-named-block-nodes" => qmp::block::query_named_block_nodes(&self.graph(), a),
            "query-blockstats" => qmp::block::query_blockstats(&self.graph(), &[], a),
            "blockdev-add" => {
                if let Ok(o) = qapi::blockdev_from_json(&Value::Object(a.clone())) {
                    if !harmless(&o) {
                        return Err(QmpError::generic("not a driver the fuzz harness opens"));
                    }
                }
                qmp::block::blockdev_add(&mut self.graph(), a)
            }
            "blockdev-del" => qmp::block::blockdev_del(&mut self.graph(), a),
            "block_resize" => qmp::block::block_resize(&self.graph(), a).map(|_| json!({})),
            "block_set_io_throttle" => qmp::block::block_set_io_throttle(&self.graph(), a),
            "qom-get" => qmp::block::qom_get(&self.graph(), a),
            "qom-set" => qmp::block::qom_set(&self.graph(), a),
            _ => unreachable!("the session only passes the monitor's own commands"),
        }
    }
}

/// Checks that `r` is a QMP reply and returns its `id`.
fn check_reply(r: &Value) -> Option<&Value> {
    let obj = r
        .as_object()
        .unwrap_or_else(|| panic!("reply {r} is not an object"));
    if let Some(e) = obj.get("error") {
        let class = e["class"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}: no class"));
        assert!(
            matches!(class, "GenericError" | "CommandNotFound" | "DeviceNotFound"),
            "{r}: class {class}"
        );
        assert!(e["desc"].is_string(), "{r}: no desc");
        assert!(!obj.contains_key("return"), "{r}");
    } else {
        assert!(obj.contains_key("return"), "{r}: neither return nor error");
    }
    for k in obj.keys() {
        assert!(
            matches!(k.as_str(), "return" | "error" | "id"),
            "{r}: member {k}"
        );
    }
    obj.get("id")
}

fn drain(rx: &Receiver<Value>, out: &mut Vec<Value>) {
    while let Ok(v) = rx.try_recv() {
        out.push(v);
    }
}

/// The lines of `data` when every non-blank line is a JSON object.
fn json_lines(data: &[u8]) -> Option<Vec<Map<String, Value>>> {
    let mut lines = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        // JSON's whitespace (no form feed, unlike is_ascii_whitespace).
        if line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
            continue;
        }
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(m)) => lines.push(m),
            _ => return None,
        }
    }
    Some(lines)
}

fuzz_target!(|data: &[u8]| {
    let monitor: Arc<dyn Monitor> = Arc::new(FuzzMonitor::new());
    let (tx, rx) = sync_channel(1024);
    let mut session = Session::new(monitor, Events::default(), tx);
    session.greet();
    let mut replies = Vec::new();
    drain(&rx, &mut replies);
    let greeting = replies.pop().expect("a greeting");
    assert!(greeting["QMP"]["version"].is_object(), "{greeting}");
    for chunk in data.chunks(CHUNK) {
        session.feed(chunk);
        drain(&rx, &mut replies);
    }
    drop(session);
    drain(&rx, &mut replies);
    let ids: Vec<Option<&Value>> = replies.iter().map(check_reply).collect();
    if let Some(lines) = json_lines(data) {
        assert_eq!(
            replies.len(),
            lines.len(),
            "one reply per JSON line: {replies:?}"
        );
        for (line, id) in lines.iter().zip(ids) {
            assert_eq!(line.get("id"), id, "the reply echoes the line's id");
        }
    }
});
