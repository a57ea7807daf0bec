//! Control-plane errors of the block layer: opening nodes and editing the
//! graph. Messages follow QEMU's wording where QEMU has one, so scripts
//! written against QEMU read the same text.

use std::io;

use crate::file::FileLockError;

/// Why a node could not be opened or the graph could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image or device could not be opened.
    #[error("Could not open '{path}'")]
    Open {
        /// The file name.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A libblkio driver could not reach or set up its device.
    #[error("Could not open '{driver}' at '{path}'")]
    Driver {
        /// The driver name (`virtio-blk-vhost-user`...).
        driver: &'static str,
        /// The file, socket or device path.
        path: String,
        /// What failed, with libblkio's message.
        #[source]
        source: io::Error,
    },
    /// Another user holds a conflicting image lock.
    #[error("Could not lock '{path}': is another process using the image?")]
    Lock {
        /// The file name.
        path: String,
        /// The conflict.
        #[source]
        source: FileLockError,
    },
    /// A host resource could not be set up.
    #[error("Could not {what}")]
    Os {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Options that make no sense together, with QEMU's message.
    #[error("{0}")]
    Invalid(String),
    /// A node name that is taken.
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateName(String),
    /// A node name that is not well formed.
    #[error("Invalid node-name: '{0}'")]
    InvalidName(String),
    /// A reference to a node that does not exist.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NotFound(String),
    /// A node that cannot be removed while something uses it.
    #[error("Node '{node}' is in use by {users}")]
    InUse {
        /// The node.
        node: String,
        /// Who uses it (parent nodes, devices, exports).
        users: String,
    },
}
