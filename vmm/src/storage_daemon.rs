//! `blkvm storage-daemon`: block nodes and exports without a VM, shaped
//! like qemu-storage-daemon. Each vhost-user-blk export serves one
//! frontend at a time on its unix socket and takes the next one when a
//! frontend goes away. SIGTERM and SIGINT complete in-flight requests,
//! flush every exported node, remove the sockets and exit 0.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use block::{BlockGraph, BlockNode, Request};
use clap::Args;
use devices::vhost_user_blk::VhostUserBlkBackend;
use devices::virtio_blk::BlkOptions;
use qapi::export::{BlockExportOptions, SocketAddress};
use qapi::object::{ObjectOptions, ObjectProperties};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::EventSet;

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
    /// Write the daemon's pid to this file once every export listens.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

/// One running export.
struct Export {
    id: String,
    node: Arc<dyn BlockNode>,
    backend: VhostUserBlkBackend,
    path: String,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: StorageDaemonArgs) -> Result<()> {
    // Before any thread exists, so every thread inherits the mask and the
    // signals are taken only by `wait_for_termination`.
    let signals = signals::block_termination()?;
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
    let mut exports = Vec::new();
    for arg in &args.exports {
        let e: BlockExportOptions =
            qapi::parse_option_as(arg, Some("type")).with_context(|| format!("--export {arg}"))?;
        if exports.iter().any(|x: &Export| x.id == e.id) {
            bail!(
                "--export {arg}: Block export id '{}' is already in use",
                e.id
            );
        }
        if let Some(io) = &e.iothread {
            if !iothreads.contains_key(io) {
                bail!("--export {arg}: Cannot find iothread '{io}'");
            }
        }
        exports.push(start_export(&mut graph, &e).with_context(|| format!("--export {arg}"))?);
    }
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("--pidfile {}", p.display()))?;
    }
    let sig = signals.wait()?;
    eprintln!("blkvm storage-daemon: {sig}: completing in-flight requests and exiting");
    for e in &mut exports {
        stop_export(e);
    }
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn start_export(graph: &mut BlockGraph, e: &BlockExportOptions) -> Result<Export> {
    let SocketAddress::Unix { path } = &e.addr;
    let node = graph.attach(&e.node_name, &format!("export '{}'", e.id))?;
    if e.writable && node.read_only() {
        bail!(
            "Block node '{}' is read-only: the export cannot be writable",
            e.node_name
        );
    }
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
        e.iothread.is_some(),
    )?;
    if e.writethrough {
        use vhost_user_backend::VhostUserBackend;
        let _ = backend.set_config(32, &[0]);
    }
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
    Ok(Export {
        id: e.id.clone(),
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
    flush(e.node.as_ref());
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

fn flush(node: &dyn BlockNode) {
    if node.read_only() {
        return;
    }
    let Ok(mut q) = node.open_queue() else { return };
    if q.submit(Request::flush()).is_ok() {
        let mut done = Vec::new();
        q.wait_completions(1, &mut done);
    }
}
