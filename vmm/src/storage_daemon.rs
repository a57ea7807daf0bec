//! `blkvm storage-daemon`: block nodes and exports without a VM, shaped
//! like qemu-storage-daemon. Each vhost-user-blk export serves one
//! frontend at a time on its unix socket and takes the next one when a
//! frontend goes away. SIGTERM and SIGINT complete in-flight requests,
//! flush every exported node, remove the sockets and exit 0.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use block::{BlockGraph, BlockNode, RequestOp};
use clap::Args;
use devices::iothread::{IoThreadConfig, DEFAULT_POLL_MAX_NS};
use devices::vhost_user_blk::VhostUserBlkBackend;
use devices::virtio_blk::BlkOptions;
use qapi::export::{BlockExportOptions, SocketAddress};
use qapi::object::{IothreadProperties, ObjectOptions, ObjectProperties};
use serde_json::{json, Map, Value};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::EventSet;

use crate::qmp::{self, Events, Monitor, QmpError, QmpServer};
use crate::signals;

/// `blkvm storage-daemon` arguments.
#[derive(Args, Debug)]
pub struct StorageDaemonArgs {
    /// A block node, QEMU's --blockdev syntax; repeatable.
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    blockdevs: Vec<String>,
    /// An object: `iothread,id=ID[,poll-max-ns=N]`; repeatable.
    #[arg(long = "object", value_name = "OPTIONS")]
    objects: Vec<String>,
    /// An export: `type=vhost-user-blk,id=ID,node-name=NODE,addr.type=unix,addr.path=PATH[,writable=on][,num-queues=N][,iothread=ID][,logical-block-size=N]`.
    #[arg(long = "export", value_name = "OPTIONS")]
    exports: Vec<String>,
    /// A QMP monitor: `unix:PATH,server=on,wait=off`; repeatable.
    #[arg(long = "qmp", value_name = "ADDRESS")]
    qmp: Vec<String>,
    /// A character device for `--monitor`: `socket,id=ID,path=PATH,server=on,wait=off`.
    #[arg(long = "chardev", value_name = "OPTIONS")]
    chardevs: Vec<String>,
    /// A QMP monitor on a `--chardev`: `chardev=ID`.
    #[arg(long = "monitor", value_name = "OPTIONS")]
    monitors: Vec<String>,
    /// Write the daemon's pid to this file once every export listens.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

/// One running export.
struct Export {
    id: String,
    node_name: String,
    node: Arc<dyn BlockNode>,
    backend: VhostUserBlkBackend,
    path: String,
    iothread: Option<String>,
    stop: Arc<AtomicBool>,
    /// The current frontend's connection, while one is connected.
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
}

/// What ends the daemon.
enum Control {
    Signal(&'static str),
    Quit,
}

/// The daemon's state, shared by the main thread and the QMP clients.
struct Daemon {
    state: Mutex<State>,
    iothreads: HashMap<String, IothreadProperties>,
    events: Events,
    control: Mutex<mpsc::Sender<Control>>,
}

struct State {
    graph: BlockGraph,
    exports: Vec<Export>,
}

/// Runs the daemon until SIGTERM, SIGINT or QMP `quit`.
pub fn run(args: StorageDaemonArgs) -> Result<()> {
    // Before any thread exists, so every thread inherits the mask and the
    // signals are taken only by `wait`.
    let signals = signals::block_termination()?;
    let mut qmp_addrs = Vec::new();
    for q in &args.qmp {
        qmp_addrs.push(qmp::parse_qmp_arg(q)?);
    }
    qmp_addrs.extend(qmp::monitors_from_chardevs(&args.chardevs, &args.monitors)?);
    for a in &qmp_addrs {
        qmp::check_path(&a.path)?;
    }
    let mut graph = BlockGraph::new();
    for arg in &args.blockdevs {
        let opts = qapi::parse_blockdev(arg).with_context(|| format!("--blockdev {arg}"))?;
        graph.add(&opts)?;
    }
    let mut iothreads = HashMap::new();
    for arg in &args.objects {
        let o: ObjectOptions =
            qapi::object::parse_object(arg).with_context(|| format!("--object {arg}"))?;
        match o.properties {
            ObjectProperties::Iothread(p) => {
                if iothreads.insert(o.id.clone(), p).is_some() {
                    bail!("--object {arg}: duplicate ID '{}' for object", o.id);
                }
            }
        }
    }
    let (tx, rx) = mpsc::channel();
    let daemon = Arc::new(Daemon {
        state: Mutex::new(State {
            graph,
            exports: Vec::new(),
        }),
        iothreads,
        events: Events::default(),
        control: Mutex::new(tx.clone()),
    });
    for arg in &args.exports {
        let e: BlockExportOptions =
            qapi::parse_option_as(arg, Some("type")).with_context(|| format!("--export {arg}"))?;
        daemon
            .add_export(&e)
            .map_err(|e| anyhow::anyhow!("{}", e.desc))
            .with_context(|| format!("--export {arg}"))?;
    }
    let mut servers = Vec::new();
    for a in &qmp_addrs {
        servers.push(QmpServer::start(a, daemon.clone(), daemon.events.clone())?);
    }
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("--pidfile {}", p.display()))?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || match signals.wait() {
            Ok(sig) => {
                let _ = tx.send(Control::Signal(sig));
            }
            Err(e) => eprintln!("blkvm storage-daemon: {e:#}"),
        })
        .context("could not start the signal thread")?;
    let reason = match rx.recv() {
        Ok(Control::Signal(sig)) => {
            eprintln!("blkvm storage-daemon: {sig}: completing in-flight requests and exiting");
            "host-signal"
        }
        Ok(Control::Quit) | Err(_) => {
            eprintln!("blkvm storage-daemon: quit: completing in-flight requests and exiting");
            "host-qmp-quit"
        }
    };
    daemon
        .events
        .emit("SHUTDOWN", Some(json!({"guest": false, "reason": reason})));
    {
        let mut st = daemon.lock();
        for e in &mut st.exports {
            stop_export(e);
        }
    }
    for s in servers {
        s.close();
    }
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

impl Daemon {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_export(&self, e: &BlockExportOptions) -> Result<(), QmpError> {
        let mut st = self.lock();
        if st.exports.iter().any(|x| x.id == e.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                e.id
            )));
        }
        if let Some(io) = &e.iothread {
            if !self.iothreads.contains_key(io) {
                return Err(QmpError::generic(format!("Cannot find iothread '{io}'")));
            }
        }
        let iothread = e.iothread.as_ref().map(|io| {
            let p = &self.iothreads[io];
            IoThreadConfig {
                poll_max_ns: p.poll_max_ns.unwrap_or(DEFAULT_POLL_MAX_NS),
                poll_grow: p.poll_grow.unwrap_or(0),
                poll_shrink: p.poll_shrink.unwrap_or(0),
            }
        });
        let export = start_export(&mut st.graph, e, iothread, &self.events)
            .map_err(|err| QmpError::generic(format!("{err:#}")))?;
        st.exports.push(export);
        Ok(())
    }

    fn del_export(&self, id: &str, hard: bool) -> Result<(), QmpError> {
        let mut st = self.lock();
        let Some(i) = st.exports.iter().position(|x| x.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        let connected = st.exports[i]
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if connected && !hard {
            return Err(QmpError::generic(format!(
                "export '{id}' still in use (use mode='hard' to force client disconnect)"
            )));
        }
        let mut e = st.exports.remove(i);
        stop_export(&mut e);
        st.graph.detach(&e.node_name, &user_name(&e.id));
        drop(st);
        self.events
            .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": e.id})));
        Ok(())
    }
}

/// How an export is named among a node's users.
fn user_name(id: &str) -> String {
    format!("export '{id}'")
}

impl Monitor for Daemon {
    fn commands(&self) -> Vec<&'static str> {
        let mut c = vec![
            "query-status",
            "query-block",
            "query-iothreads",
            "block-export-add",
            "block-export-del",
            "query-block-exports",
            "quit",
        ];
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
                let st = self.lock();
                Ok(Value::Array(
                    st.exports
                        .iter()
                        .map(|e| {
                            json!({
                                "device": "",
                                "qdev": e.id,
                                "type": "unknown",
                                "removable": false,
                                "locked": false,
                                "inserted": qmp::block::node_info(e.node.as_ref()),
                            })
                        })
                        .collect(),
                ))
            }
            "query-iothreads" => {
                qmp::no_args(a)?;
                let st = self.lock();
                let mut out = Vec::new();
                let mut ids: Vec<_> = self.iothreads.iter().collect();
                ids.sort_by(|a, b| a.0.cmp(b.0));
                for (id, p) in ids {
                    // The export worker serving this iothread's queues.
                    let tid = st
                        .exports
                        .iter()
                        .filter(|e| e.iothread.as_deref() == Some(id.as_str()))
                        .find_map(|e| e.backend.worker_tid())
                        .unwrap_or(0);
                    out.push(json!({
                        "id": id,
                        "thread-id": tid,
                        "poll-max-ns": p.poll_max_ns.unwrap_or(32768),
                        "poll-grow": p.poll_grow.unwrap_or(0),
                        "poll-shrink": p.poll_shrink.unwrap_or(0),
                        "aio-max-batch": 0,
                    }));
                }
                Ok(Value::Array(out))
            }
            "block-export-add" => {
                let e: BlockExportOptions = qmp::args(a)?;
                self.add_export(&e)?;
                Ok(json!({}))
            }
            "block-export-del" => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Args {
                    id: String,
                    #[serde(default)]
                    mode: Option<DelMode>,
                }
                #[derive(serde::Deserialize)]
                #[serde(rename_all = "lowercase")]
                enum DelMode {
                    Safe,
                    Hard,
                }
                let a: Args = qmp::args(a)?;
                self.del_export(&a.id, matches!(a.mode, Some(DelMode::Hard)))?;
                Ok(json!({}))
            }
            "query-block-exports" => {
                qmp::no_args(a)?;
                let st = self.lock();
                Ok(Value::Array(
                    st.exports
                        .iter()
                        .map(|e| {
                            json!({
                                "type": "vhost-user-blk",
                                "id": e.id,
                                "node-name": e.node_name,
                                "shutting-down": false,
                            })
                        })
                        .collect(),
                ))
            }
            "quit" => {
                qmp::no_args(a)?;
                let _ = self
                    .control
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(Control::Quit);
                Ok(json!({}))
            }
            "query-named-block-nodes" => qmp::block::query_named_block_nodes(&self.lock().graph, a),
            "query-blockstats" => qmp::block::query_blockstats(&self.lock().graph, a),
            "blockdev-add" => qmp::block::blockdev_add(&mut self.lock().graph, a),
            "blockdev-del" => qmp::block::blockdev_del(&mut self.lock().graph, a),
            "block_resize" => {
                // The export's GET_CONFIG reads the node's capacity, so a
                // frontend that reads the config again sees the new size.
                // (vhost 0.18's backend channel cannot send CONFIG_CHANGE_MSG.)
                qmp::block::block_resize(&self.lock().graph, a)?;
                Ok(json!({}))
            }
            _ => Err(QmpError {
                class: qmp::ErrorClass::CommandNotFound,
                desc: format!("The command {name} has not been found"),
            }),
        }
    }
}

fn start_export(
    graph: &mut BlockGraph,
    e: &BlockExportOptions,
    iothread: Option<IoThreadConfig>,
    events: &Events,
) -> Result<Export> {
    let SocketAddress::Unix { path } = &e.addr;
    let lbs = e.logical_block_size.map_or(512, |s| s.0);
    if !(512..=65536).contains(&lbs) || !lbs.is_power_of_two() {
        bail!(
            "Parameter 'logical-block-size' must be a power of two between 512 and 64k, not {lbs}"
        );
    }
    let num_queues = e.num_queues.unwrap_or(1);
    if num_queues == 0 || num_queues > 64 {
        bail!("Parameter 'num-queues' must be between 1 and 64, not {num_queues}");
    }
    let node = graph.lookup(&e.node_name)?;
    if e.writable && node.read_only() {
        bail!(
            "Block node '{}' is read-only: the export cannot be writable",
            e.node_name
        );
    }
    let opts = BlkOptions {
        num_queues,
        queue_size: 256,
        logical_block_size: lbs as u32,
        read_only: !e.writable,
        serial: e.id.clone(),
        ..BlkOptions::default()
    };
    let backend = VhostUserBlkBackend::new(
        &e.id,
        node.clone(),
        opts,
        graph.registrar().clone(),
        iothread,
    )?;
    if e.writethrough {
        use vhost_user_backend::VhostUserBackend;
        let _ = backend.set_config(32, &[0]);
    }
    let (ev, id, node_name) = (events.clone(), e.id.clone(), e.node_name.clone());
    backend.set_io_error_hook(Some(Arc::new(move |op, err| {
        let operation = match op {
            RequestOp::Read => "read",
            _ => "write",
        };
        let errno = err.errno();
        ev.emit(
            "BLOCK_IO_ERROR",
            Some(json!({
                "device": "",
                "qdev": id,
                "node-name": node_name,
                "operation": operation,
                "action": "report",
                "nospace": errno == libc::ENOSPC,
                "reason": std::io::Error::from_raw_os_error(errno).to_string(),
            })),
        );
    })));
    let name = format!("export-{}", e.id);
    let mut daemon = new_daemon(&name, &backend)?;
    let _ = std::fs::remove_file(path);
    let mut listener =
        Listener::new(path, true).with_context(|| format!("could not listen on '{path}'"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let conn = Arc::new(Mutex::new(None));
    let (t_stop, t_conn, t_backend, id) =
        (stop.clone(), conn.clone(), backend.clone(), e.id.clone());
    let thread = std::thread::Builder::new()
        .name(format!("export-{}", e.id))
        .spawn(move || loop {
            let started = daemon.start(&mut listener);
            if t_stop.load(Ordering::SeqCst) {
                break;
            }
            if let Err(err) = started {
                eprintln!("export '{id}': could not accept a frontend: {err:?}");
                continue;
            }
            *t_conn.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
            if let Err(err) = daemon.wait() {
                eprintln!("export '{id}': frontend connection ended: {err:?}");
            }
            *t_conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
            if t_stop.load(Ordering::SeqCst) {
                break;
            }
            // The connection's state (owner, features, vrings) dies with
            // it: finish its requests, stop its workers, and serve the
            // next frontend with a fresh vhost-user handler.
            t_backend.stop_workers();
            t_backend.abandon_in_flight();
            daemon = match new_daemon(&name, &t_backend) {
                Ok(d) => d,
                Err(err) => {
                    eprintln!("export '{id}': cannot serve another frontend: {err:#}");
                    break;
                }
            };
        })
        .context("could not start the export thread")?;
    graph.attach(&e.node_name, &user_name(&e.id))?;
    Ok(Export {
        id: e.id.clone(),
        node_name: e.node_name.clone(),
        iothread: e.iothread.clone(),
        node,
        backend,
        path: path.clone(),
        stop,
        conn,
        thread: Some(thread),
    })
}

/// A vhost-user daemon for one frontend connection, with the node
/// queues' completion fds watched by its worker threads.
fn new_daemon(
    name: &str,
    backend: &VhostUserBlkBackend,
) -> Result<VhostUserDaemon<VhostUserBlkBackend>> {
    backend
        .renew_exit_events()
        .context("could not create exit events")?;
    let daemon = VhostUserDaemon::new(name.to_string(), backend.clone(), backend.memory())
        .map_err(|err| anyhow::anyhow!("could not create the vhost-user daemon: {err:?}"))?;
    for (handler, fds) in daemon
        .get_epoll_handlers()
        .iter()
        .zip(backend.completion_listeners())
    {
        for (fd, id) in fds {
            handler
                .register_listener(fd, EventSet::IN, id)
                .context("could not watch a node queue's completions")?;
        }
    }
    Ok(daemon)
}

/// Completes in-flight requests, flushes the node, closes the socket.
fn stop_export(e: &mut Export) {
    e.backend.quiesce();
    eprintln!("{}", stats_line(e));
    // Through the export's own node queue: a libblkio node may have no
    // queue to spare for a new one.
    if let Err(err) = e.backend.flush() {
        eprintln!("export '{}': final flush failed: {err}", e.id);
    }
    e.stop.store(true, Ordering::SeqCst);
    if let Some(h) = e.conn.lock().unwrap_or_else(|p| p.into_inner()).take() {
        h.shutdown();
    }
    // Wake an accept() that is waiting for a frontend.
    let _ = UnixStream::connect(&e.path);
    if let Some(t) = e.thread.take() {
        let _ = t.join();
    }
    e.backend.stop_workers();
    let _ = std::fs::remove_file(&e.path);
}

/// One line of what the export did, for logs and tests.
fn stats_line(e: &Export) -> String {
    let s = e.node.stats().snapshot();
    // Which memory path requests took is known where the I/O happens: the
    // protocol node under any format nodes.
    let (mut registered, mut bounced) = (0, 0);
    let mut stack = vec![e.node.clone()];
    while let Some(n) = stack.pop() {
        let ns = n.stats().snapshot();
        registered += ns.registered_ops;
        bounced += ns.bounced_ops;
        stack.extend(n.children());
    }
    let errors =
        s.read.errors + s.write.errors + s.flush.errors + s.discard.errors + s.write_zeroes.errors;
    format!(
        "blkvm storage-daemon: export {} stats: requests={} read_ops={} read_bytes={} write_ops={} \
         write_bytes={} flush_ops={} discard_ops={} write_zeroes_ops={} errors={} registered_ops={} \
         bounced_ops={}",
        e.id,
        e.backend.requests(),
        s.read.ops,
        s.read.bytes,
        s.write.ops,
        s.write.bytes,
        s.flush.ops,
        s.discard.ops,
        s.write_zeroes.ops,
        errors,
        registered,
        bounced
    )
}
