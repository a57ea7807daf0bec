//! NBD: the protocol ([`proto`]) and the server side: the handshake
//! ([`handshake`]) and a connection's transmission phase on a node queue
//! ([`server`]). The event loop that drives connections lives with the
//! IOThreads (`devices`); this module knows nothing of threads or virtio.

pub mod client;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
