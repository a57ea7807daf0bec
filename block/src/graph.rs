//! The block graph: named nodes opened from `--blockdev` options, children
//! by name or inline, with their parents and users tracked so a node in use
//! cannot be removed.
//!
//! Cycles cannot form: a child is either an existing node (so it was opened
//! before its parent) or defined inline (so it is new), and nodes are never
//! re-parented.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use qapi::{BlockdevDriver, BlockdevOptions, BlockdevRef};

use crate::blkio::{BlkioNode, BlkioOptions};
use crate::file::FileNode;
use crate::memory::RamRegistrar;
use crate::nbd::client::NbdNode;
use crate::nbd::tls::TlsCredsX509;
use crate::node::BlockNode;
use crate::null::NullNode;
use crate::raw::RawNode;
use crate::rbd::{RbdNode, Secret};
use crate::throttle::{ThrottleGroup, ThrottleNode};
use crate::BlockError;

/// Longest node name QEMU accepts.
const MAX_NAME_LEN: usize = 31;

pub(crate) struct Entry {
    pub(crate) node: Arc<dyn BlockNode>,
    /// Nodes that have this one as a child.
    parents: Vec<String>,
    /// Devices, exports and tools attached to this node.
    users: Vec<String>,
    /// Opened inline as part of its parent: removed with it.
    implicit: bool,
}

/// The graph of named nodes.
#[derive(Default)]
pub struct BlockGraph {
    nodes: BTreeMap<String, Entry>,
    next_auto: u32,
    registrar: RamRegistrar,
    /// `tls-creds-x509` objects nodes may name (`tls-creds=ID`).
    tls_creds: HashMap<String, TlsCredsX509>,
    /// `throttle-group` objects `throttle` nodes may name.
    throttle_groups: HashMap<String, Arc<ThrottleGroup>>,
    /// `secret` objects nodes may name (`key-secret=ID`).
    secrets: HashMap<String, Secret>,
}

/// Nodes opened by one `add`, inserted only when all of them opened.
pub(crate) struct Pending {
    pub(crate) entries: Vec<(String, Entry)>,
    /// Existing nodes that gain a parent: (child, parent).
    links: Vec<(String, String)>,
}

/// Whether `name` is a well-formed node name (QEMU's `id_wellformed`).
pub fn name_is_valid(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && name.len() <= MAX_NAME_LEN
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a `tls-creds-x509` object available to nodes as `tls-creds=id`.
    pub fn add_tls_creds(&mut self, id: String, creds: TlsCredsX509) {
        self.tls_creds.insert(id, creds);
    }

    /// Makes a `secret` object available to nodes as `key-secret=id`.
    pub fn add_secret(&mut self, id: String, secret: Secret) {
        self.secrets.insert(id, secret);
    }

    /// Makes a throttle group available to `throttle` nodes.
    pub fn add_throttle_group(&mut self, group: Arc<ThrottleGroup>) {
        self.throttle_groups.insert(group.name().to_string(), group);
    }

    /// A throttle group by id.
    pub fn throttle_group(&self, id: &str) -> Option<&Arc<ThrottleGroup>> {
        self.throttle_groups.get(id)
    }

    /// The RAM registrar every node of this graph follows.
    pub fn registrar(&self) -> &RamRegistrar {
        &self.registrar
    }

    /// Opens a node (and its inline children) and adds it to the graph.
    pub fn add(&mut self, opts: &BlockdevOptions) -> Result<Arc<dyn BlockNode>, BlockError> {
        let mut pending = Pending {
            entries: Vec::new(),
            links: Vec::new(),
        };
        let node = self.open(opts, false, &mut pending)?;
        for (child, parent) in pending.links {
            if let Some(e) = self.nodes.get_mut(&child) {
                e.parents.push(parent);
            }
        }
        for (name, entry) in pending.entries {
            self.nodes.insert(name, entry);
        }
        Ok(node)
    }

    fn name_for(
        &mut self,
        opts: &BlockdevOptions,
        pending: &Pending,
    ) -> Result<String, BlockError> {
        let taken =
            |n: &str| self.nodes.contains_key(n) || pending.entries.iter().any(|(p, _)| p == n);
        match &opts.common.node_name {
            Some(n) if !name_is_valid(n) => Err(BlockError::InvalidName(n.clone())),
            Some(n) if taken(n) => Err(BlockError::DuplicateName(n.clone())),
            Some(n) => Ok(n.clone()),
            None => loop {
                self.next_auto += 1;
                let n = format!("#block{:03}", self.next_auto);
                if !taken(&n) {
                    break Ok(n);
                }
            },
        }
    }

    /// A format or filter node's child: an existing node (which gains a
    /// parent) or one opened inline (read-only if the parent is).
    pub(crate) fn child(
        &mut self,
        r: &BlockdevRef,
        parent: &str,
        common: &qapi::BlockdevCommon,
        pending: &mut Pending,
        children: &mut Vec<String>,
    ) -> Result<Arc<dyn BlockNode>, BlockError> {
        match r {
            BlockdevRef::Reference(child) => {
                let c = self.lookup(child)?;
                pending.links.push((child.clone(), parent.to_string()));
                Ok(c)
            }
            BlockdevRef::Definition(def) => {
                let mut def = (**def).clone();
                def.common.read_only |= common.read_only;
                let c = self.open(&def, true, pending)?;
                children.push(c.node_name().to_string());
                Ok(c)
            }
        }
    }

    pub(crate) fn open(
        &mut self,
        opts: &BlockdevOptions,
        implicit: bool,
        pending: &mut Pending,
    ) -> Result<Arc<dyn BlockNode>, BlockError> {
        let name = self.name_for(opts, pending)?;
        let common = &opts.common;
        let mut children = Vec::new();
        let node: Arc<dyn BlockNode> = match &opts.driver {
            BlockdevDriver::File(f) => Arc::new(FileNode::open(
                name.clone(),
                common,
                f,
                self.registrar.clone(),
            )?),
            BlockdevDriver::NullCo(n) => Arc::new(NullNode::open(name.clone(), common, n)?),
            BlockdevDriver::Raw(r) => {
                let child = self.child(&r.file, &name, common, pending, &mut children)?;
                let (offset, size) = (r.offset.map(|s| s.0), r.size.map(|s| s.0));
                Arc::new(RawNode::open(name.clone(), common, child, offset, size)?)
            }
            BlockdevDriver::IoUring(o) => self.open_blkio(&name, common, o.into())?,
            BlockdevDriver::NvmeIoUring(o) => self.open_blkio(&name, common, o.into())?,
            BlockdevDriver::VirtioBlkVhostUser(o) => self.open_blkio(&name, common, o.into())?,
            BlockdevDriver::VirtioBlkVhostVdpa(o) => self.open_blkio(&name, common, o.into())?,
            BlockdevDriver::VirtioBlkVfioPci(o) => self.open_blkio(&name, common, o.into())?,
            BlockdevDriver::Throttle(t) => {
                let group = self
                    .throttle_groups
                    .get(&t.throttle_group)
                    .cloned()
                    .ok_or_else(|| {
                        BlockError::Invalid(format!(
                            "Throttle group '{}' does not exist",
                            t.throttle_group
                        ))
                    })?;
                let child = self.child(&t.file, &name, common, pending, &mut children)?;
                Arc::new(ThrottleNode::open(name.clone(), common, child, group)?)
            }
            BlockdevDriver::Nbd(o) => {
                let creds = o.tls_creds.as_ref().and_then(|id| self.tls_creds.get(id));
                Arc::new(NbdNode::open(name.clone(), common, o, creds)?)
            }
            BlockdevDriver::Qcow2(q) => {
                self.open_qcow2(&name, common, q, pending, &mut children)?
            }
            BlockdevDriver::Rbd(o) => {
                Arc::new(RbdNode::open(name.clone(), common, o, &self.secrets)?)
            }
        };
        for child in children {
            if let Some((_, e)) = pending.entries.iter_mut().find(|(n, _)| *n == child) {
                e.parents.push(name.clone());
            }
        }
        pending.entries.push((
            name,
            Entry {
                node: node.clone(),
                parents: Vec::new(),
                users: Vec::new(),
                implicit,
            },
        ));
        Ok(node)
    }

    /// Opens one of the libblkio drivers (they differ only in options).
    fn open_blkio(
        &self,
        name: &str,
        common: &qapi::BlockdevCommon,
        opts: BlkioOptions,
    ) -> Result<Arc<dyn BlockNode>, BlockError> {
        let node = BlkioNode::open(name.to_string(), common, opts, self.registrar.clone())?;
        Ok(Arc::new(node))
    }

    /// The node called `name`.
    pub fn lookup(&self, name: &str) -> Result<Arc<dyn BlockNode>, BlockError> {
        self.nodes
            .get(name)
            .map(|e| e.node.clone())
            .ok_or_else(|| BlockError::NotFound(name.to_string()))
    }

    /// Attaches a user (device, export, tool) to a node.
    pub fn attach(&mut self, name: &str, user: &str) -> Result<Arc<dyn BlockNode>, BlockError> {
        let e = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| BlockError::NotFound(name.to_string()))?;
        e.users.push(user.to_string());
        Ok(e.node.clone())
    }

    /// Detaches a user.
    pub fn detach(&mut self, name: &str, user: &str) {
        if let Some(e) = self.nodes.get_mut(name) {
            if let Some(i) = e.users.iter().position(|u| u == user) {
                e.users.remove(i);
            }
        }
    }

    /// Removes a node that nothing uses, with its inline children.
    pub fn remove(&mut self, name: &str) -> Result<(), BlockError> {
        let e = self
            .nodes
            .get(name)
            .ok_or_else(|| BlockError::NotFound(name.to_string()))?;
        if !e.parents.is_empty() || !e.users.is_empty() {
            let users: Vec<String> = e
                .parents
                .iter()
                .map(|p| format!("node '{p}'"))
                .chain(e.users.iter().cloned())
                .collect();
            return Err(BlockError::InUse {
                node: name.to_string(),
                users: users.join(", "),
            });
        }
        let Some(e) = self.nodes.remove(name) else {
            return Ok(());
        };
        for child in e.node.children() {
            let cname = child.node_name().to_string();
            let Some(c) = self.nodes.get_mut(&cname) else {
                continue;
            };
            c.parents.retain(|p| p != name);
            if c.implicit && c.parents.is_empty() && c.users.is_empty() {
                self.remove(&cname)?;
            }
        }
        Ok(())
    }

    /// The devices, exports and tools attached to node `name`.
    pub fn users(&self, name: &str) -> Vec<String> {
        self.nodes
            .get(name)
            .map_or_else(Vec::new, |e| e.users.clone())
    }

    /// Whether node `name` was opened inline as part of its parent (and
    /// so is not the user's to delete).
    pub fn is_implicit(&self, name: &str) -> bool {
        self.nodes.get(name).is_some_and(|e| e.implicit)
    }

    /// Every node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &Arc<dyn BlockNode>)> {
        self.nodes.iter().map(|(n, e)| (n.as_str(), &e.node))
    }

    /// The name of the last node added that has no parent (the default
    /// node a tool works on).
    pub fn roots(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|(_, e)| e.parents.is_empty())
            .map(|(n, _)| n.as_str())
    }
}
