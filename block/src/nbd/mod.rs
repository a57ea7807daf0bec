//! NBD: the protocol ([`proto`]) and the server side ([`server`]): the
//! handshake and a connection's transmission phase on a node queue. The
//! event loop that drives connections lives with the IOThreads
//! (`devices`); this module knows nothing of threads or virtio.

pub mod proto;
pub mod server;
