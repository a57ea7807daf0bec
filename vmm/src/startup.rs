//! The start-up prelude `run`, `storage-daemon` and `bench` share: the
//! block graph from `--blockdev`, IOThread and TLS credentials objects
//! from `--object`, and QMP monitors from `--qmp` or `--chardev` +
//! `--monitor`, each refused with the option's text in the message, as
//! QEMU names the bad argument.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use block::nbd::tls::{TlsCredsX509, TlsEndpoint};
use block::throttle::ThrottleGroup;
use block::BlockGraph;
use clap::Args;
use qapi::object::{
    IothreadProperties, ObjectOptions, ObjectProperties, TlsCredsEndpoint, TlsCredsX509Properties,
};

use crate::qmp::{self, QmpAddr};

/// The QMP monitor options of a long-running command.
#[derive(Args, Debug, Default)]
pub struct MonitorArgs {
    /// A QMP monitor: `unix:PATH,server=on,wait=off`; repeatable.
    #[arg(long = "qmp", value_name = "ADDRESS")]
    qmp: Vec<String>,
    /// A character device for `--monitor`: `socket,id=ID,path=PATH,server=on,wait=off`.
    #[arg(long = "chardev", value_name = "OPTIONS")]
    chardevs: Vec<String>,
    /// A QMP monitor on a `--chardev`: `chardev=ID`.
    #[arg(long = "monitor", value_name = "OPTIONS")]
    monitors: Vec<String>,
}

impl MonitorArgs {
    /// Every `--chardev`, checked (monitors' and vhost-user backends').
    pub fn chardevs(&self) -> Result<Vec<qapi::qmp::ChardevSocketOptions>> {
        qmp::parse_chardevs(&self.chardevs)
    }

    /// Every monitor's socket address, checked.
    pub fn addresses(&self) -> Result<Vec<QmpAddr>> {
        let mut out = Vec::new();
        for q in &self.qmp {
            out.push(qmp::parse_qmp_arg(q)?);
        }
        out.extend(qmp::monitors_from_chardevs(&self.chardevs, &self.monitors)?);
        for a in &out {
            qmp::check_path(&a.path)?;
        }
        Ok(out)
    }
}

/// `--sandbox on|off`, shared by the long-running commands.
#[derive(Args, Debug)]
pub struct SandboxArgs {
    /// Confine each thread with a seccomp filter of the system calls its
    /// job needs (`on`, the default), or not (`off`).
    #[arg(
        long = "sandbox",
        value_name = "on|off",
        default_value = "on",
        value_parser = parse_on_off,
        action = clap::ArgAction::Set
    )]
    enabled: bool,
}

impl SandboxArgs {
    /// Compiles and installs the filters, when on; before any thread
    /// starts.
    pub fn install(&self, profile: vmm::sandbox::Profile) -> Result<()> {
        if self.enabled {
            vmm::sandbox::install(profile).context("--sandbox on")?;
        }
        Ok(())
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected 'on' or 'off', not '{s}'")),
    }
}

/// A graph of the `--blockdev` nodes, in order, that may use the TLS
/// credentials (`tls-creds=ID`) and throttle groups of `objects`; also
/// returns the name of the last node.
pub fn open_blockdevs(args: &[String], objects: &Objects) -> Result<(BlockGraph, Option<String>)> {
    let mut graph = BlockGraph::new();
    for (id, c) in &objects.tls_creds {
        graph.add_tls_creds(id.clone(), c.clone());
    }
    for g in objects.throttle_groups.values() {
        graph.add_throttle_group(g.clone());
    }
    for (id, s) in &objects.secrets {
        graph.add_secret(id.clone(), s.clone());
    }
    let mut last = None;
    for arg in args {
        let opts = qapi::parse_blockdev(arg).with_context(|| format!("--blockdev {arg}"))?;
        let node = graph.add(&opts)?;
        last = Some(node.node_name().to_string());
    }
    Ok((graph, last))
}

/// The `--object` definitions by kind and id.
#[derive(Default)]
pub struct Objects {
    /// `iothread` objects.
    pub iothreads: HashMap<String, IothreadProperties>,
    /// `tls-creds-x509` objects, their files loaded once to check them.
    pub tls_creds: HashMap<String, TlsCredsX509>,
    /// `throttle-group` objects.
    pub throttle_groups: HashMap<String, Arc<ThrottleGroup>>,
    /// `secret` objects, read and decoded.
    pub secrets: HashMap<String, block::rbd::Secret>,
}

/// Every `--object` (a duplicate id refused, TLS credentials that cannot
/// be loaded refused naming the file, as QEMU does at creation).
pub fn objects(args: &[String]) -> Result<Objects> {
    let mut out = Objects::default();
    for arg in args {
        let o: ObjectOptions =
            qapi::object::parse_object(arg).with_context(|| format!("--object {arg}"))?;
        if out.iothreads.contains_key(&o.id)
            || out.tls_creds.contains_key(&o.id)
            || out.throttle_groups.contains_key(&o.id)
            || out.secrets.contains_key(&o.id)
        {
            bail!("--object {arg}: duplicate ID '{}' for object", o.id);
        }
        match o.properties {
            ObjectProperties::Iothread(p) => {
                out.iothreads.insert(o.id, p);
            }
            ObjectProperties::ThrottleGroup(p) => {
                let config = block::throttle::apply_limits(Default::default(), &p.merged());
                let g = ThrottleGroup::new(&o.id, config)
                    .map_err(|e| anyhow::anyhow!(e))
                    .with_context(|| format!("--object {arg}"))?;
                out.throttle_groups.insert(o.id, Arc::new(g));
            }
            ObjectProperties::Secret(p) => {
                let secret =
                    block::rbd::Secret::load(&p).with_context(|| format!("--object {arg}"))?;
                out.secrets.insert(o.id, secret);
            }
            ObjectProperties::TlsCredsX509(p) => {
                let creds = tls_creds(&p);
                creds.check().with_context(|| format!("--object {arg}"))?;
                out.tls_creds.insert(o.id, creds);
            }
        }
    }
    Ok(out)
}

/// The block layer's view of a `tls-creds-x509` object.
pub fn tls_creds(p: &TlsCredsX509Properties) -> TlsCredsX509 {
    TlsCredsX509 {
        dir: p.dir.clone().into(),
        endpoint: match p.endpoint {
            TlsCredsEndpoint::Client => TlsEndpoint::Client,
            TlsCredsEndpoint::Server => TlsEndpoint::Server,
        },
        verify_peer: p.verify_peer,
    }
}
