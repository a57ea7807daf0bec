//! The protocol over a real socket, with a small monitor: greeting,
//! negotiation, ids, QEMU's error shapes, limits, events, many clients.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::*;

struct Echo {
    events: Events,
}

impl Monitor for Echo {
    fn commands(&self) -> Vec<&'static str> {
        vec!["echo", "typed", "emit"]
    }
    fn execute(&self, name: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(Value::Object(a.clone())),
            "typed" => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields, rename_all = "kebab-case")]
                struct A {
                    node_name: String,
                    #[serde(default)]
                    size: Option<u64>,
                }
                let a: A = args(a)?;
                Ok(json!({"node-name": a.node_name, "size": a.size}))
            }
            "emit" => {
                self.events.emit("TEST_EVENT", Some(json!({"n": 1})));
                Ok(json!({}))
            }
            _ => unreachable!("the server only passes our commands"),
        }
    }
}

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn open(path: &std::path::Path) -> (Conn, Value) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = c.recv();
        (c, greeting)
    }
    fn send_raw(&mut self, s: &[u8]) {
        self.w.write_all(s).unwrap();
    }
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "QMP lines end with CRLF: {line:?}");
        serde_json::from_str(&line).unwrap()
    }
    fn cmd(&mut self, v: Value) -> Value {
        self.send_raw(v.to_string().as_bytes());
        self.recv()
    }
}

fn server() -> (tempfile::TempDir, QmpServer, Events) {
    let dir = tempfile::tempdir().unwrap();
    let addr = parse_qmp_arg(&format!(
        "unix:{}/q.sock,server=on,wait=off",
        dir.path().display()
    ))
    .unwrap();
    let events = Events::default();
    let s = QmpServer::start(
        &addr,
        Arc::new(Echo {
            events: events.clone(),
        }),
        events.clone(),
    )
    .unwrap();
    (dir, s, events)
}

fn class(v: &Value) -> &str {
    v["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

fn desc(v: &Value) -> &str {
    v["error"]["desc"].as_str().unwrap()
}

#[test]
fn greeting_negotiation_and_ids() {
    let (dir, _s, _) = server();
    let (mut c, g) = Conn::open(&dir.path().join("q.sock"));
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
    assert!(g["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("blkvm"));
    let r = c.cmd(json!({"execute": "query-version"}));
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(
        desc(&r),
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    let r = c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}));
    assert_eq!(desc(&r), "Capability 'oob' not available");
    let r = c.cmd(json!({"execute": "qmp_capabilities", "id": "neg"}));
    assert_eq!(r, json!({"return": {}, "id": "neg"}));
    let r = c.cmd(json!({"execute": "qmp_capabilities"}));
    assert_eq!(class(&r), "CommandNotFound");
    // Any JSON value is an id, echoed as given, on errors too.
    let r = c.cmd(json!({"execute": "echo", "arguments": {"a": [1, 2]}, "id": {"x": 7}}));
    assert_eq!(r, json!({"return": {"a": [1, 2]}, "id": {"x": 7}}));
    let r = c.cmd(json!({"execute": "nope", "id": 3}));
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(desc(&r), "The command nope has not been found");
    assert_eq!(r["id"], json!(3));
    let r = c.cmd(json!({"execute": "query-commands"}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "echo",
        "typed",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
}

#[test]
fn bad_input_gets_qemu_errors_and_the_connection_goes_on() {
    let (dir, _s, _) = server();
    let (mut c, _) = Conn::open(&dir.path().join("q.sock"));
    c.cmd(json!({"execute": "qmp_capabilities"}));
    c.send_raw(b"{\"execute\": }");
    let r = c.recv();
    assert_eq!(class(&r), "GenericError");
    assert!(desc(&r).starts_with("JSON parse error"), "{r}");
    c.send_raw(b"garbage\n");
    assert!(desc(&c.recv()).starts_with("JSON parse error"));
    c.send_raw(b"[1, 2]");
    assert_eq!(desc(&c.recv()), "QMP input must be a JSON object");
    assert_eq!(
        desc(&c.cmd(json!({"arguments": {}}))),
        "QMP input lacks member 'execute'"
    );
    assert_eq!(
        desc(&c.cmd(json!({"execute": 1}))),
        "QMP input member 'execute' must be a string"
    );
    assert_eq!(
        desc(&c.cmd(json!({"execute": "echo", "arguments": 1}))),
        "QMP input member 'arguments' must be an object"
    );
    assert_eq!(
        desc(&c.cmd(json!({"execute": "echo", "extra": 1}))),
        "QMP input member 'extra' is unexpected"
    );
    // Typed arguments: missing, unknown, wrong type.
    assert_eq!(
        desc(&c.cmd(json!({"execute": "typed"}))),
        "Parameter 'node-name' is missing"
    );
    assert_eq!(
        desc(&c.cmd(json!({"execute": "typed", "arguments": {"node-name": "a", "bogus": 1}}))),
        "Parameter 'bogus' is unexpected"
    );
    assert_eq!(
        desc(&c.cmd(json!({"execute": "typed", "arguments": {"node-name": 5}}))),
        "Invalid parameter type for 'node-name', expected: string"
    );
    // A message over the limit is dropped as it streams in; the next works.
    let big = format!(
        "{{\"execute\": \"echo\", \"arguments\": {{\"x\": \"{}\"}}}}",
        "y".repeat(MAX_MESSAGE + 10)
    );
    c.send_raw(big.as_bytes());
    assert!(desc(&c.recv()).contains("too large"));
    // Two messages in one write, one message over two writes.
    c.send_raw(b"{\"execute\": \"echo\", \"id\": 1}{\"execute\": \"echo\",");
    assert_eq!(c.recv()["id"], json!(1));
    c.send_raw(b" \"id\": 2}");
    assert_eq!(c.recv(), json!({"return": {}, "id": 2}));
}

#[test]
fn events_reach_every_negotiated_client_with_timestamps() {
    let (dir, _s, events) = server();
    let path = dir.path().join("q.sock");
    let (mut a, _) = Conn::open(&path);
    let (mut b, _) = Conn::open(&path);
    let (mut late, _) = Conn::open(&path);
    a.cmd(json!({"execute": "qmp_capabilities"}));
    b.cmd(json!({"execute": "qmp_capabilities"}));
    // `late` has not negotiated: it gets no events, as in QEMU.
    let r = a.cmd(json!({"execute": "emit"}));
    let ev = if r.get("event").is_some() {
        r
    } else {
        a.recv()
    };
    assert_eq!(ev["event"], json!("TEST_EVENT"));
    assert_eq!(ev["data"], json!({"n": 1}));
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    assert_eq!(b.recv()["event"], json!("TEST_EVENT"));
    events.emit("OTHER", None);
    let ev = b.recv();
    assert_eq!(ev["event"], json!("OTHER"));
    assert!(ev.get("data").is_none());
    late.cmd(json!({"execute": "qmp_capabilities"}));
    let r = late.cmd(json!({"execute": "echo", "id": "after"}));
    assert_eq!(r["id"], json!("after"), "no event was queued for it: {r}");
    // A client that goes away does not disturb the others.
    drop(a);
    events.emit("THIRD", None);
    assert_eq!(b.recv()["event"], json!("THIRD"));
}

#[test]
fn qmp_and_chardev_arguments() {
    assert_eq!(
        parse_qmp_arg("unix:/tmp/a,,b.sock,server=on,wait=off")
            .unwrap()
            .path,
        std::path::PathBuf::from("/tmp/a,b.sock")
    );
    assert!(parse_qmp_arg("tcp:localhost:4444").is_err());
    assert!(parse_qmp_arg("unix:/tmp/x,wait=on").is_err());
    assert!(parse_qmp_arg("unix:/tmp/x,bogus=1").is_err());
    let m = monitors_from_chardevs(
        &["socket,id=c0,path=/tmp/q.sock,server=on,wait=off".into()],
        &["chardev=c0".into()],
    )
    .unwrap();
    assert_eq!(m[0].path, std::path::PathBuf::from("/tmp/q.sock"));
    let e = monitors_from_chardevs(&[], &["chardev=c9".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("chardev 'c9' not found"));
    // A client chardev (a vhost-user backend's) is no monitor.
    let e = monitors_from_chardevs(&["socket,id=c0,path=/x".into()], &["chardev=c0".into()])
        .unwrap_err();
    assert!(format!("{e:#}").contains("server=on"), "{e:#}");
    let d = parse_chardevs(&["socket,id=vu0,path=/x,reconnect-ms=500".into()]).unwrap();
    assert_eq!(d[0].reconnect_ms, Some(500));
    let e = parse_chardevs(&["socket,id=c0,path=/x,server=on,reconnect-ms=1".into()]).unwrap_err();
    assert!(
        format!("{e:#}").contains("incompatible with 'server'"),
        "{e:#}"
    );
    let e = parse_chardevs(&["socket,id=c0,path=/x,reconnect-ms=soon".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("reconnect-ms"), "{e:#}");
}
