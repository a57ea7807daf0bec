//! Opening a qcow2 node in the graph: its file child, then its header,
//! then its backing node as QEMU does: `backing=NODE` (by name or inline),
//! `backing=null` for none, or, by default, the file the header names,
//! relative to the image's directory, in the header's backing format
//! (probed when absent), read-only, opened the same way to any depth.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use qapi::{
    BlockdevCommon, BlockdevDriver, BlockdevOptions, BlockdevOptionsFile, BlockdevOptionsQcow2,
    BlockdevOptionsRaw, BlockdevRef, Qcow2Backing,
};

use super::header::MAGIC;
use super::{Qcow2Image, Qcow2Node};
use crate::graph::{BlockGraph, Pending};
use crate::node::BlockNode;
use crate::BlockError;

/// Deepest backing chain opened from image headers (a guard against
/// images that name each other).
const MAX_CHAIN_DEPTH: usize = 64;

impl BlockGraph {
    pub(crate) fn open_qcow2(
        &mut self,
        name: &str,
        common: &BlockdevCommon,
        opts: &BlockdevOptionsQcow2,
        pending: &mut Pending,
        children: &mut Vec<String>,
    ) -> Result<Arc<dyn BlockNode>, BlockError> {
        let child = self.child(&opts.file, name, common, pending, children)?;
        let image = Qcow2Image::load(child.clone(), opts, common.read_only).map_err(|e| {
            BlockError::Invalid(format!(
                "Could not open qcow2 image '{}': {e}",
                child.filename().unwrap_or(child.node_name())
            ))
        })?;
        // Backing nodes are read-only whatever the top is.
        let ro = BlockdevCommon {
            read_only: true,
            node_name: None,
            ..common.clone()
        };
        let backing = match &opts.backing {
            Qcow2Backing::None => None,
            Qcow2Backing::Node(r) => Some(self.child(r, name, &ro, pending, children)?),
            Qcow2Backing::FromImage => match image.backing_file() {
                None => None,
                Some((file, fmt)) => {
                    let def = backing_options(&child, file, fmt, &ro, pending)?;
                    let b = self.open(&def, true, pending)?;
                    children.push(b.node_name().to_string());
                    Some(b)
                }
            },
        };
        Ok(Arc::new(Qcow2Node::new(
            name.to_string(),
            common,
            opts,
            image,
            backing,
        )?))
    }
}

/// The `--blockdev` options of the backing file `file` of the image in
/// `child`.
fn backing_options(
    child: &Arc<dyn BlockNode>,
    file: &str,
    fmt: Option<&str>,
    ro: &BlockdevCommon,
    pending: &Pending,
) -> Result<BlockdevOptions, BlockError> {
    if file.starts_with("json:") || file.contains("://") {
        return Err(BlockError::Invalid(format!(
            "Backing file '{file}': only plain file names are supported"
        )));
    }
    let path = resolve_backing(child.filename(), file).ok_or_else(|| {
        BlockError::Invalid(format!(
            "Cannot resolve the relative backing file '{file}': the image has no file name"
        ))
    })?;
    // The file children of every level above are in `pending` already.
    let canonical = std::fs::canonicalize(&path).ok();
    let mut depth = 0;
    for (_, e) in &pending.entries {
        let Some(f) = e.node.filename() else { continue };
        depth += 1;
        if canonical.is_some() && std::fs::canonicalize(f).ok() == canonical {
            return Err(BlockError::Invalid(format!(
                "Backing file '{path}' is already in the chain (a loop)"
            )));
        }
    }
    if depth > MAX_CHAIN_DEPTH {
        return Err(BlockError::Invalid(format!(
            "Backing chain deeper than {MAX_CHAIN_DEPTH} images"
        )));
    }
    let fmt = match fmt {
        Some(f) => f.to_string(),
        None => probe(&path)?,
    };
    let file_ref = BlockdevRef::Definition(Box::new(BlockdevOptions {
        common: ro.clone(),
        driver: BlockdevDriver::File(BlockdevOptionsFile {
            filename: path.clone(),
            aio: Default::default(),
            locking: Default::default(),
        }),
    }));
    let driver = match fmt.as_str() {
        "qcow2" => BlockdevDriver::Qcow2(BlockdevOptionsQcow2 {
            file: file_ref,
            backing: Qcow2Backing::FromImage,
            cache_size: None,
            l2_cache_size: None,
            discard_no_unref: false,
            lazy_refcounts: None,
        }),
        "raw" => BlockdevDriver::Raw(BlockdevOptionsRaw {
            file: file_ref,
            offset: None,
            size: None,
        }),
        f => {
            return Err(BlockError::Invalid(format!(
                "Backing file '{path}' has format '{f}', which blkvm cannot open"
            )))
        }
    };
    Ok(BlockdevOptions {
        common: ro.clone(),
        driver,
    })
}

/// The backing file `file` of the image in `image_file`: absolute as
/// written, or relative to the image's directory (`None` when relative
/// and the image has no file name).
pub(super) fn resolve_backing(image_file: Option<&str>, file: &str) -> Option<String> {
    if Path::new(file).is_absolute() {
        return Some(file.to_string());
    }
    let dir = Path::new(image_file?).parent().unwrap_or(Path::new(""));
    Some(dir.join(file).to_string_lossy().into_owned())
}

/// `qcow2` when the file starts with the qcow2 magic, else `raw` (QEMU's
/// probe, for the two formats blkvm knows).
fn probe(path: &str) -> Result<String, BlockError> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|source| BlockError::Open {
        path: path.to_string(),
        source,
    })?;
    let n = f.read(&mut magic).unwrap_or(0);
    Ok(if n == 4 && u32::from_be_bytes(magic) == MAGIC {
        "qcow2".into()
    } else {
        "raw".into()
    })
}
