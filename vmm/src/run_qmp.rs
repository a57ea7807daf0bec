//! The QMP monitor of `blkvm run`: what `qemu.qmp` clients ask of a
//! QEMU VM, on blkvm's VM. The block graph is shared with the server's
//! client threads behind a mutex; the devices are its users, so
//! `blockdev-del` of a device's node is refused naming the device, and
//! `block_resize` raises the config-change interrupt of every device on
//! or above the resized node. `stop`/`cont` park and release the vCPUs
//! (devices and IOThreads go on, so requests in flight complete while
//! paused); `system_powerdown` presses the ACPI power button; `quit`
//! ends the VM. Events: STOP, RESUME, POWERDOWN, BLOCK_IO_ERROR (from the
//! devices' I/O threads); `run` emits SHUTDOWN as the VM ends.

use std::sync::{Arc, Mutex, MutexGuard};

use block::{BlockGraph, RequestOp};
use devices::vhost_user_blk::device::BackendEvent;
use devices::virtio_blk::ErrorOutcome;
use serde_json::{json, Map, Value};
use vmm::attach::{Attached, AttachedDevice};
use vmm::vm::VmControl;

use crate::qmp::{self, ErrorClass, Events, Monitor, QmpError};

/// The commands of `blkvm run`'s monitor beyond the block ones.
const COMMANDS: &[&str] = &[
    "query-status",
    "query-block",
    "query-iothreads",
    "stop",
    "cont",
    "system_powerdown",
    "quit",
    "x-query-virtio",
];

/// `blkvm run`'s [`Monitor`].
pub struct VmMonitor {
    graph: Arc<Mutex<BlockGraph>>,
    attached: Arc<Attached>,
    /// Each device's `qdev` (its id, else a QOM-style path), in device
    /// order.
    qdevs: Vec<String>,
    control: VmControl,
    events: Events,
}

/// A device's `qdev` as QEMU reports it: the id the user gave, else the
/// QOM path of the `n`th device without one.
pub fn qdev_names(devices: &[AttachedDevice]) -> Vec<String> {
    let mut anon = 0;
    devices
        .iter()
        .map(|d| match &d.id {
            Some(id) => id.clone(),
            None => {
                anon += 1;
                format!(
                    "/machine/peripheral-anon/device[{}]/virtio-backend",
                    anon - 1
                )
            }
        })
        .collect()
}

impl VmMonitor {
    /// A monitor over the VM's graph, devices and vCPUs; also hooks every
    /// device's host I/O errors to BLOCK_IO_ERROR on `events`.
    pub fn new(
        graph: Arc<Mutex<BlockGraph>>,
        attached: Arc<Attached>,
        control: VmControl,
        events: Events,
    ) -> Self {
        let qdevs = qdev_names(&attached.devices);
        for (d, qdev) in attached.devices.iter().zip(&qdevs) {
            let Some(node) = &d.node else {
                // A vhost-user-blk device: its backend's comings and goings.
                let (ev, qdev) = (events.clone(), qdev.clone());
                let path = d
                    .with_vhost_user(|v| v.path().display().to_string())
                    .unwrap_or_default();
                d.set_backend_event_hook(Some(Arc::new(move |e| {
                    let (name, reconnecting) = match e {
                        BackendEvent::Disconnected { reconnecting } => {
                            ("X_VHOST_USER_DISCONNECTED", Some(reconnecting))
                        }
                        BackendEvent::Reconnected => ("X_VHOST_USER_RECONNECTED", None),
                    };
                    let mut data = json!({"qdev": qdev, "path": path});
                    if let Some(r) = reconnecting {
                        data["reconnecting"] = json!(r);
                    }
                    ev.emit(name, Some(data));
                })));
                continue;
            };
            let (ev, qdev, node) = (events.clone(), qdev.clone(), node.node_name().to_string());
            let ctl = control.clone();
            d.set_io_error_hook(Some(Arc::new(move |op, err, outcome| {
                let errno = err.errno();
                ev.emit(
                    "BLOCK_IO_ERROR",
                    Some(json!({
                        "device": "",
                        "qdev": qdev,
                        "node-name": node,
                        "operation": match op {
                            RequestOp::Read => "read",
                            _ => "write",
                        },
                        "action": outcome.as_str(),
                        "nospace": errno == libc::ENOSPC,
                        "reason": std::io::Error::from_raw_os_error(errno).to_string(),
                    })),
                );
                if outcome == ErrorOutcome::Stop {
                    // werror/rerror=stop pauses the VM, off the data plane
                    // (pausing waits for the vCPUs to park).
                    let (ctl, ev) = (ctl.clone(), ev.clone());
                    std::thread::spawn(move || {
                        sandbox::enter(sandbox::ThreadKind::VmControl);
                        if let Ok(true) = ctl.pause() {
                            ev.emit("STOP", None);
                        }
                    });
                }
            })));
        }
        VmMonitor {
            graph,
            attached,
            qdevs,
            control,
            events,
        }
    }

    fn graph(&self) -> MutexGuard<'_, BlockGraph> {
        self.graph.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn query_status(&self) -> Value {
        let paused = self.control.is_paused();
        json!({
            "status": if paused { "paused" } else { "running" },
            "singlestep": false,
            "running": !paused,
        })
    }

    fn query_block(&self) -> Value {
        let v = self
            .attached
            .devices
            .iter()
            .zip(&self.qdevs)
            // vhost-user-blk devices have no block backend here (QEMU does
            // not list them either).
            .filter_map(|(d, qdev)| Some((d.node.as_ref()?, qdev, d)))
            .map(|(node, qdev, d)| {
                let mut v = json!({
                    "device": "",
                    "qdev": qdev,
                    "type": "unknown",
                    "removable": false,
                    "locked": false,
                    "inserted": qmp::block::node_info(node.as_ref(), false),
                });
                if let Some(st) = &d.io_status {
                    v["io-status"] = json!(st.io_status());
                }
                v
            })
            .collect();
        Value::Array(v)
    }

    /// Without `query-nodes`, one entry per device that serves its own
    /// queues, named by its `qdev`, with the device's own counters.
    fn query_blockstats(&self, a: &Map<String, Value>) -> Result<Value, QmpError> {
        let users: Vec<_> = self
            .attached
            .devices
            .iter()
            .zip(&self.qdevs)
            .filter_map(|(d, qdev)| Some((qdev.clone(), d.backend.clone()?)))
            .collect();
        qmp::block::query_blockstats(&self.graph(), &users, a)
    }

    /// QEMU's `x-query-virtio`: each virtio device's QOM path and name,
    /// here with what serves it (`blkvm-backend`: its node, or the
    /// vhost-user socket and whether it is connected).
    fn x_query_virtio(&self) -> Value {
        let v = self
            .attached
            .devices
            .iter()
            .zip(&self.qdevs)
            .map(|(d, qdev)| {
                let path = if qdev.starts_with('/') {
                    qdev.clone()
                } else {
                    format!("/machine/peripheral/{qdev}/virtio-backend")
                };
                let backend = match (
                    &d.node,
                    d.with_vhost_user(|v| (v.path().to_path_buf(), v.connected(), v.reconnects())),
                ) {
                    (_, Some((socket, connected, reconnects))) => json!({
                        "vhost-user": socket.display().to_string(),
                        "connected": connected,
                        "reconnects": reconnects,
                    }),
                    (Some(node), None) => json!({"node-name": node.node_name()}),
                    (None, None) => json!({}),
                };
                json!({
                    "path": path,
                    "name": if d.node.is_some() { "virtio-blk" } else { "vhost-user-blk" },
                    "blkvm-backend": backend,
                })
            })
            .collect();
        Value::Array(v)
    }

    fn query_iothreads(&self) -> Value {
        let v = self
            .attached
            .iothreads
            .iter()
            .map(|t| {
                let c = t.config();
                json!({
                    "id": t.id(),
                    "thread-id": t.thread_id(),
                    "poll-max-ns": c.poll_max_ns,
                    "poll-grow": c.poll_grow,
                    "poll-shrink": c.poll_shrink,
                    "aio-max-batch": 0,
                })
            })
            .collect();
        Value::Array(v)
    }

    fn block_resize(&self, a: &Map<String, Value>) -> Result<Value, QmpError> {
        let node = qmp::block::block_resize(&self.graph(), a)?;
        for d in &self.attached.devices {
            if d.uses_node(node.node_name()) {
                d.config_changed();
            }
        }
        Ok(json!({}))
    }
}

impl Monitor for VmMonitor {
    fn commands(&self) -> Vec<&'static str> {
        let mut c = COMMANDS.to_vec();
        c.extend(qmp::block::COMMANDS);
        c
    }

    fn execute(&self, name: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "query-status" => {
                qmp::no_args(a)?;
                Ok(self.query_status())
            }
            "query-block" => {
                qmp::no_args(a)?;
                Ok(self.query_block())
            }
            "x-query-virtio" => {
                qmp::no_args(a)?;
                Ok(self.x_query_virtio())
            }
            "query-iothreads" => {
                qmp::no_args(a)?;
                Ok(self.query_iothreads())
            }
            "stop" => {
                qmp::no_args(a)?;
                let paused = self
                    .control
                    .pause()
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                if paused {
                    self.events.emit("STOP", None);
                }
                Ok(json!({}))
            }
            "cont" => {
                qmp::no_args(a)?;
                // Requests kept by werror/rerror=stop go again, then the
                // vCPUs (QEMU's `cont`).
                for d in &self.attached.devices {
                    if let Some(st) = &d.io_status {
                        st.resume();
                    }
                }
                if self.control.resume() {
                    self.events.emit("RESUME", None);
                }
                Ok(json!({}))
            }
            "system_powerdown" => {
                qmp::no_args(a)?;
                self.control
                    .press_power_button()
                    .map_err(|e| QmpError::generic(qmp::block::error_chain(&e)))?;
                self.events.emit("POWERDOWN", None);
                Ok(json!({}))
            }
            "quit" => {
                qmp::no_args(a)?;
                self.control.quit();
                Ok(json!({}))
            }
            "query-named-block-nodes" => qmp::block::query_named_block_nodes(&self.graph(), a),
            "query-blockstats" => self.query_blockstats(a),
            "blockdev-add" => qmp::block::blockdev_add(&mut self.graph(), a),
            "blockdev-del" => qmp::block::blockdev_del(&mut self.graph(), a),
            "block_set_io_throttle" => qmp::block::block_set_io_throttle(&self.graph(), a),
            "qom-get" => qmp::block::qom_get(&self.graph(), a),
            "qom-set" => qmp::block::qom_set(&self.graph(), a),
            "block_resize" => self.block_resize(a),
            _ => Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: format!("The command {name} has not been found"),
            }),
        }
    }
}
