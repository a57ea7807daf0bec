//! `blkvm storage-daemon`: block nodes and exports without a VM, shaped
//! like qemu-storage-daemon: its command line and QMP. The exports
//! themselves (listener, frontends, queues on IOThreads) live in
//! `devices::vhost_user_blk`. SIGTERM and SIGINT complete in-flight
//! requests, flush every exported node, remove the sockets and exit 0.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Context, Result};
use block::nbd::server::NbdExportInfo;
use block::nbd::tls::{TlsCredsX509, TlsEndpoint};
use block::{BackendOptions, BlockBackend, BlockGraph, RequestOp};
use clap::Args;
use devices::iothread::IoThread;
use devices::nbd_server::{NbdAddr, NbdServer, NbdServerExport};
use devices::vhost_user_blk::{VhostUserBlkExport, VhostUserBlkExportConfig};
use devices::virtio_blk::{BlkOptions, ErrorAction, IoErrorHook, IoStatus};
use qapi::export::{BlockExportOptions, BlockExportType, NbdServerOptions, SocketAddress};
use qapi::qmp::{BlockExportDelArgs, BlockExportRemoveMode};
use serde_json::{json, Map, Value};

use crate::qmp::{self, Events, Monitor, QmpError, QmpServer};
use crate::signals;
use crate::startup::{self, MonitorArgs, SandboxArgs};

/// `blkvm storage-daemon` arguments.
#[derive(Args, Debug)]
pub struct StorageDaemonArgs {
    /// A block node, QEMU's --blockdev syntax; repeatable.
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    blockdevs: Vec<String>,
    /// An object: `iothread,id=ID[,poll-max-ns=N]`,
    /// `tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]`,
    /// `throttle-group,id=ID[,limits.*=N]` or
    /// `secret,id=ID,data=D|file=F[,format=raw|base64]` (an rbd node's
    /// key-secret); repeatable.
    #[arg(long = "object", value_name = "OPTIONS")]
    objects: Vec<String>,
    /// An export: `type=vhost-user-blk,id=ID,node-name=NODE,addr.type=unix,addr.path=PATH[,writable=on][,num-queues=N][,iothread=ID][,logical-block-size=N]`.
    #[arg(long = "export", value_name = "OPTIONS")]
    exports: Vec<String>,
    /// The NBD server for `--export type=nbd`: `addr.type=unix,addr.path=PATH` or
    /// `addr.type=inet,addr.host=HOST,addr.port=PORT`, `[,max-connections=N]`,
    /// `[,tls-creds=ID]` (a `tls-creds-x509` object with endpoint=server).
    #[arg(long = "nbd-server", value_name = "OPTIONS")]
    nbd_server: Option<String>,
    #[command(flatten)]
    monitor: MonitorArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Write the daemon's pid to this file once every export listens.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

/// What ends the daemon.
enum Control {
    Signal(&'static str),
    Quit,
}

/// The daemon's state, shared by the main thread and the QMP clients.
struct Daemon {
    state: Mutex<State>,
    iothreads: HashMap<String, Arc<IoThread>>,
    /// `tls-creds-x509` objects by id.
    tls_creds: HashMap<String, TlsCredsX509>,
    events: Events,
    control: Mutex<mpsc::Sender<Control>>,
}

struct State {
    graph: BlockGraph,
    exports: Vec<VhostUserBlkExport>,
    /// The NBD server, once started.
    nbd: Option<NbdServer>,
    /// NBD exports.
    nbd_exports: Vec<NbdExportEntry>,
    /// The vhost-user-blk exports' I/O status by id (werror/rerror=stop,
    /// QMP `cont`).
    io_status: HashMap<String, Arc<IoStatus>>,
}

/// An NBD export of the daemon.
struct NbdExportEntry {
    id: String,
    /// The name clients ask for.
    name: String,
    node_name: String,
    backend: Arc<BlockBackend>,
}

impl State {
    /// The graph's users with their own statistics, for
    /// `query-blockstats`: the exports, named as the graph names them.
    fn users(&self) -> Vec<(String, Arc<BlockBackend>)> {
        let vhost = self
            .exports
            .iter()
            .map(|e| (user_name(e.id()), e.backend().clone()));
        let nbd = self
            .nbd_exports
            .iter()
            .map(|e| (user_name(&e.id), e.backend.clone()));
        vhost.chain(nbd).collect()
    }
}

/// Runs the daemon until SIGTERM, SIGINT or QMP `quit`.
pub fn run(args: StorageDaemonArgs) -> Result<()> {
    // Before any thread exists, so every thread inherits the mask and the
    // signals are taken only by `wait`.
    let signals = signals::block_termination()?;
    args.sandbox.install(vmm::sandbox::Profile::StorageDaemon)?;
    let qmp_addrs = args.monitor.addresses()?;
    let objects = startup::objects(&args.objects)?;
    let (graph, _) = startup::open_blockdevs(&args.blockdevs, &objects)?;
    let mut iothreads = HashMap::new();
    for (id, p) in objects.iothreads {
        let t = IoThread::new(&id, vmm::attach::iothread_config(&p))
            .with_context(|| format!("could not start iothread '{id}'"))?;
        iothreads.insert(id, t);
    }
    let (tx, rx) = mpsc::channel();
    let daemon = Arc::new(Daemon {
        state: Mutex::new(State {
            graph,
            exports: Vec::new(),
            nbd: None,
            nbd_exports: Vec::new(),
            io_status: HashMap::new(),
        }),
        iothreads,
        tls_creds: objects.tls_creds,
        events: Events::default(),
        control: Mutex::new(tx.clone()),
    });
    if let Some(arg) = &args.nbd_server {
        let o: NbdServerOptions =
            qapi::parse_option_as(arg, None).with_context(|| format!("--nbd-server {arg}"))?;
        daemon
            .nbd_server_start(&o)
            .map_err(|e| anyhow::anyhow!("{}", e.desc))
            .with_context(|| format!("--nbd-server {arg}"))?;
    }
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
        .spawn(move || {
            sandbox::enter(sandbox::ThreadKind::Signals);
            match signals.wait() {
                Ok(sig) => {
                    let _ = tx.send(Control::Signal(sig));
                }
                Err(e) => eprintln!("blkvm storage-daemon: {e:#}"),
            }
        })
        .context("could not start the signal thread")?;
    sandbox::enter(sandbox::ThreadKind::Main);
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
        if let Some(mut n) = st.nbd.take() {
            n.stop();
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

    fn nbd_server_start(&self, o: &NbdServerOptions) -> Result<(), QmpError> {
        let mut st = self.lock();
        if st.nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let tls = match &o.tls_creds {
            Some(id) => Some(self.nbd_tls(id)?),
            None => None,
        };
        let addr = match &o.addr {
            SocketAddress::Unix { path } => NbdAddr::Unix(path.clone()),
            SocketAddress::Inet { host, port } => {
                let port: u16 = port.parse().map_err(|_| {
                    QmpError::generic(format!(
                        "Parameter 'addr.port' expects a port number, not '{port}'"
                    ))
                })?;
                NbdAddr::Tcp(host.clone(), port)
            }
        };
        let max = o.max_connections.filter(|&m| m > 0).map(|m| m as usize);
        let server = NbdServer::start(addr, max, tls)
            .map_err(|e| QmpError::generic(format!("Failed to start the NBD server: {e}")))?;
        st.nbd = Some(server);
        Ok(())
    }

    /// The server configuration of `tls-creds-x509` object `id`.
    fn nbd_tls(&self, id: &str) -> Result<Arc<block::nbd::tls::ServerConfig>, QmpError> {
        let Some(creds) = self.tls_creds.get(id) else {
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            )));
        };
        if creds.endpoint != TlsEndpoint::Server {
            return Err(QmpError::generic(
                "Expecting TLS credentials with a server endpoint",
            ));
        }
        creds
            .server_config()
            .map_err(|e| QmpError::generic(format!("{:#}", anyhow::Error::new(e))))
    }

    fn add_nbd_export(&self, st: &mut State, e: &BlockExportOptions) -> Result<(), QmpError> {
        if e.addr.is_some() || e.num_queues.is_some() || e.logical_block_size.is_some() {
            return Err(QmpError::generic("an nbd export takes no addr, num-queues or logical-block-size (the server has the address)"));
        }
        let Some(server) = st.nbd.as_ref() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        let iothread = match &e.iothread {
            Some(io) => match self.iothreads.get(io) {
                Some(t) => Some(t.clone()),
                None => return Err(QmpError::generic(format!("Cannot find iothread '{io}'"))),
            },
            None => None,
        };
        let node = st
            .graph
            .lookup(&e.node_name)
            .map_err(|err| QmpError::generic(format!("{err}")))?;
        if e.writable && node.read_only() {
            return Err(QmpError::generic(format!(
                "Block node '{}' is read-only: the export cannot be writable",
                e.node_name
            )));
        }
        let name = e.name.clone().unwrap_or_else(|| e.node_name.clone());
        let backend = Arc::new(BlockBackend::new(
            e.id.clone(),
            node.clone(),
            BackendOptions {
                read_only: !e.writable,
                ..BackendOptions::default()
            },
        ));
        server
            .add_export(NbdServerExport {
                name: name.clone(),
                info: NbdExportInfo {
                    node,
                    writable: e.writable,
                    description: e.description.clone(),
                    multi_conn: true,
                },
                backend: backend.clone(),
                iothread,
                registrar: Some(st.graph.registrar().clone()),
            })
            .map_err(QmpError::generic)?;
        st.graph
            .attach(&e.node_name, &user_name(&e.id))
            .map_err(|err| QmpError::generic(format!("{err}")))?;
        st.nbd_exports.push(NbdExportEntry {
            id: e.id.clone(),
            name,
            node_name: e.node_name.clone(),
            backend,
        });
        Ok(())
    }

    fn add_export(&self, e: &BlockExportOptions) -> Result<(), QmpError> {
        let mut st = self.lock();
        if st.exports.iter().any(|x| x.id() == e.id) || st.nbd_exports.iter().any(|x| x.id == e.id)
        {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                e.id
            )));
        }
        if e.export_type == BlockExportType::Nbd {
            return self.add_nbd_export(&mut st, e);
        }
        if st.exports.iter().any(|x| x.id() == e.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                e.id
            )));
        }
        let iothread = match &e.iothread {
            Some(io) => match self.iothreads.get(io) {
                Some(t) => Some(t.clone()),
                None => return Err(QmpError::generic(format!("Cannot find iothread '{io}'"))),
            },
            None => None,
        };
        let (export, io_status) = start_export(&mut st.graph, e, iothread, &self.events)
            .map_err(|err| QmpError::generic(format!("{err:#}")))?;
        st.io_status.insert(e.id.clone(), io_status);
        st.exports.push(export);
        Ok(())
    }

    fn del_export(&self, id: &str, hard: bool) -> Result<(), QmpError> {
        let mut st = self.lock();
        if let Some(i) = st.nbd_exports.iter().position(|x| x.id == id) {
            let NbdExportEntry {
                id,
                name,
                node_name,
                ..
            } = st.nbd_exports.remove(i);
            if let Some(server) = st.nbd.as_ref() {
                server.remove_export(&name);
            }
            st.graph.detach(&node_name, &user_name(&id));
            drop(st);
            self.events
                .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
            return Ok(());
        }
        let Some(i) = st.exports.iter().position(|x| x.id() == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        let connected = st.exports[i].connected();
        if connected && !hard {
            return Err(QmpError::generic(format!(
                "export '{id}' still in use (use mode='hard' to force client disconnect)"
            )));
        }
        let mut e = st.exports.remove(i);
        st.io_status.remove(id);
        stop_export(&mut e);
        st.graph.detach(e.node().node_name(), &user_name(e.id()));
        drop(st);
        self.events
            .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": e.id()})));
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
            "nbd-server-start",
            "nbd-server-stop",
            "block-export-del",
            "query-block-exports",
            "cont",
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
                                "qdev": e.id(),
                                "type": "unknown",
                                "removable": false,
                                "locked": false,
                                "inserted": qmp::block::node_info(e.node().as_ref(), false),
                            })
                        })
                        .collect(),
                ))
            }
            "query-iothreads" => {
                qmp::no_args(a)?;
                let mut out = Vec::new();
                let mut ids: Vec<_> = self.iothreads.iter().collect();
                ids.sort_by(|a, b| a.0.cmp(b.0));
                for (id, t) in ids {
                    let c = t.config();
                    out.push(json!({
                        "id": id,
                        "thread-id": t.thread_id(),
                        "poll-max-ns": c.poll_max_ns,
                        "poll-grow": c.poll_grow,
                        "poll-shrink": c.poll_shrink,
                        "aio-max-batch": 0,
                    }));
                }
                Ok(Value::Array(out))
            }
            "nbd-server-start" => {
                let o: NbdServerOptions = qmp::args(a)?;
                self.nbd_server_start(&o)?;
                Ok(json!({}))
            }
            "nbd-server-stop" => {
                qmp::no_args(a)?;
                let mut st = self.lock();
                let Some(mut server) = st.nbd.take() else {
                    return Err(QmpError::generic("NBD server not running"));
                };
                server.stop();
                for e in std::mem::take(&mut st.nbd_exports) {
                    st.graph.detach(&e.node_name, &user_name(&e.id));
                    self.events
                        .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": e.id})));
                }
                Ok(json!({}))
            }
            "block-export-add" => {
                let e: BlockExportOptions = qmp::args(a)?;
                self.add_export(&e)?;
                Ok(json!({}))
            }
            "block-export-del" => {
                let a: BlockExportDelArgs = qmp::args(a)?;
                self.del_export(&a.id, a.mode == BlockExportRemoveMode::Hard)?;
                Ok(json!({}))
            }
            "query-block-exports" => {
                qmp::no_args(a)?;
                let st = self.lock();
                let mut v: Vec<Value> = st
                    .exports
                    .iter()
                    .map(|e| {
                        json!({
                            "type": "vhost-user-blk",
                            "id": e.id(),
                            "node-name": e.node().node_name(),
                            "shutting-down": false,
                        })
                    })
                    .collect();
                v.extend(st.nbd_exports.iter().map(|e| {
                    json!({
                        "type": "nbd",
                        "id": e.id,
                        "node-name": e.node_name,
                        "shutting-down": false,
                    })
                }));
                Ok(Value::Array(v))
            }
            "cont" => {
                // Requests the exports kept for werror/rerror=stop go again.
                qmp::no_args(a)?;
                for st in self.lock().io_status.values() {
                    st.resume();
                }
                Ok(json!({}))
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
            "query-blockstats" => {
                let st = self.lock();
                qmp::block::query_blockstats(&st.graph, &st.users(), a)
            }
            "blockdev-add" => qmp::block::blockdev_add(&mut self.lock().graph, a),
            "blockdev-del" => qmp::block::blockdev_del(&mut self.lock().graph, a),
            "block_set_io_throttle" => qmp::block::block_set_io_throttle(&self.lock().graph, a),
            "qom-get" => qmp::block::qom_get(&self.lock().graph, a),
            "qom-set" => qmp::block::qom_set(&self.lock().graph, a),
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
    iothread: Option<Arc<IoThread>>,
    events: &Events,
) -> Result<(VhostUserBlkExport, Arc<IoStatus>)> {
    let path = match &e.addr {
        Some(SocketAddress::Unix { path }) => path,
        Some(SocketAddress::Inet { .. }) => {
            bail!("a vhost-user-blk export listens on a unix socket")
        }
        None => bail!("Parameter 'addr' is missing"),
    };
    let lbs = e.logical_block_size.map_or(512, |s| s.0);
    let num_queues = e.num_queues.unwrap_or(1);
    let node = graph.lookup(&e.node_name)?;
    if e.writable && node.read_only() {
        bail!(
            "Block node '{}' is read-only: the export cannot be writable",
            e.node_name
        );
    }
    let io_status = Arc::new(IoStatus::default());
    let opts = BlkOptions {
        num_queues,
        queue_size: 256,
        logical_block_size: u32::try_from(lbs).unwrap_or(u32::MAX),
        read_only: !e.writable,
        serial: e.id.clone(),
        // qemu-storage-daemon's exports report every error to the client;
        // `werror`/`rerror` are a blkvm extension with that default.
        werror: vmm::attach::error_action(e.werror, ErrorAction::Report),
        rerror: vmm::attach::error_action(e.rerror, ErrorAction::Report),
        io_status: Some(io_status.clone()),
        ..BlkOptions::default()
    };
    let export = VhostUserBlkExport::start(VhostUserBlkExportConfig {
        id: e.id.clone(),
        node: node.clone(),
        opts,
        registrar: graph.registrar().clone(),
        iothread,
        path: path.clone(),
        writethrough: e.writethrough,
        io_error: Some(io_error_event(events, &e.id, &e.node_name)),
    })?;
    graph.attach(&e.node_name, &user_name(&e.id))?;
    Ok((export, io_status))
}

/// QMP's `BLOCK_IO_ERROR` for a failed request of export `id`.
fn io_error_event(events: &Events, id: &str, node_name: &str) -> IoErrorHook {
    let (ev, id, node_name) = (events.clone(), id.to_string(), node_name.to_string());
    Arc::new(move |op, err, outcome| {
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
                "action": outcome.as_str(),
                "nospace": errno == libc::ENOSPC,
                "reason": std::io::Error::from_raw_os_error(errno).to_string(),
            })),
        );
    })
}

/// Completes in-flight requests, flushes the node, closes the socket.
fn stop_export(e: &mut VhostUserBlkExport) {
    let flushed = e.stop();
    eprintln!("{}", stats_line(e));
    if let Err(err) = flushed {
        eprintln!("export '{}': final flush failed: {err}", e.id());
    }
}

/// One line of what the export did, for logs and tests.
fn stats_line(e: &VhostUserBlkExport) -> String {
    let s = e.node().stats().snapshot();
    // Which memory path requests took is known where the I/O happens: the
    // protocol node under any format nodes.
    let (mut registered, mut bounced) = (0, 0);
    let mut stack = vec![e.node().clone()];
    while let Some(n) = stack.pop() {
        let ns = n.stats().snapshot();
        registered += ns.registered_ops;
        bounced += ns.bounced_ops;
        stack.extend(n.children());
    }
    let errors =
        s.read.errors + s.write.errors + s.flush.errors + s.discard.errors + s.write_zeroes.errors;
    let c = e.counters();
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    format!(
        "blkvm storage-daemon: export {} stats: requests={} read_ops={} read_bytes={} write_ops={} \
         write_bytes={} flush_ops={} discard_ops={} write_zeroes_ops={} errors={} registered_ops={} \
         bounced_ops={} kicks={} completion_wakeups={} poll_hits={} interrupts={} late_entries={}",
        e.id(),
        e.requests(),
        s.read.ops,
        s.read.bytes,
        s.write.ops,
        s.write.bytes,
        s.flush.ops,
        s.discard.ops,
        s.write_zeroes.ops,
        errors,
        registered,
        bounced,
        n(&c.kicks),
        n(&c.completion_wakeups),
        n(&c.poll_hits),
        n(&c.interrupts),
        n(&c.late_entries),
    )
}
