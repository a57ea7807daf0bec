//! The client side of the fixed newstyle handshake, blocking (the
//! control plane opens connections; the data plane only uses them):
//! connect, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` for
//! `base:allocation`, then `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` on a
//! server without it).
//!
//! The server is untrusted: every length it sends is bounded before
//! anything is allocated for it, and a reply that does not fit the
//! protocol ends the attempt with an error that says what was wrong.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use qapi::export::SocketAddress;

use super::transport::{Socket, Transport};
use crate::nbd::proto::*;
use crate::nbd::tls::{ClientConfig, ClientConnection, TlsStream};

/// What a TLS connection needs: the configuration and the name the
/// server's certificate is checked against.
pub struct TlsClient {
    /// From the `tls-creds-x509` object (endpoint=client).
    pub config: Arc<ClientConfig>,
    /// The server's name.
    pub name: rustls::pki_types::ServerName<'static>,
}

/// Longest option reply payload taken from a server.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// How long one handshake step may wait for the server.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// NBD_REP_ERR_TLS_REQD.
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

/// What the server said about the export and the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`tflag`).
    pub flags: u16,
    /// Minimum block size (1 when the server did not say).
    pub min_block: u32,
    /// Preferred block size.
    pub pref_block: u32,
    /// Largest payload of one request.
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of `base:allocation`, when the server serves it.
    pub meta_id: Option<u32>,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A printable form of an address (`host:port` or the socket path).
pub fn describe(addr: &SocketAddress) -> String {
    match addr {
        SocketAddress::Unix { path } => path.clone(),
        SocketAddress::Inet { host, port } if host.contains(':') => format!("[{host}]:{port}"),
        SocketAddress::Inet { host, port } => format!("{host}:{port}"),
    }
}

/// Connects to `addr` (blocking).
pub fn connect_socket(addr: &SocketAddress) -> io::Result<Socket> {
    match addr {
        SocketAddress::Unix { path } => {
            let s = UnixStream::connect(path)?;
            Ok(Socket::from(OwnedFd::from(s)))
        }
        SocketAddress::Inet { host, port } => {
            let port: u16 = port.parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("bad port '{port}'"))
            })?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in (host.as_str(), port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, STEP_TIMEOUT) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Socket::from(OwnedFd::from(s)));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// One option reply: its type and payload.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

impl OptReply {
    fn is_error(&self) -> bool {
        self.kind & (1 << 31) != 0
    }

    /// The server's message, for an error reply.
    fn message(&self) -> String {
        let m = String::from_utf8_lossy(&self.data);
        if m.is_empty() {
            String::new()
        } else {
            format!(": {m}")
        }
    }
}

fn read_reply(s: &mut impl Read, option: u32) -> io::Result<OptReply> {
    let magic = read_u64(s)?;
    if magic != REPLY_MAGIC {
        return Err(protocol(format!("bad option reply magic {magic:#x}")));
    }
    let opt = read_u32(s)?;
    if opt != option {
        return Err(protocol(format!(
            "option reply for option {opt}, expected {option}"
        )));
    }
    let kind = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION_REPLY {
        return Err(protocol(format!(
            "option reply of {len} bytes (at most {MAX_OPTION_REPLY} taken)"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    if kind == REP_ERR_TLS_REQD {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the server requires TLS (set tls-creds)",
        ));
    }
    Ok(OptReply { kind, data })
}

fn name_and(data: &mut Vec<u8>, name: &str) {
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
}

/// Negotiates `export` on a connected socket (blocking, each step bounded
/// by a timeout), over TLS when `tls` is given (NBD_OPT_STARTTLS first,
/// as the protocol's TLS section says). The connection is left blocking
/// without timeouts.
pub fn negotiate(
    mut s: Socket,
    export: &str,
    tls: Option<&TlsClient>,
) -> io::Result<(Transport, ExportInfo)> {
    if export.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "export name longer than 4096 bytes",
        ));
    }
    s.set_timeout(Some(STEP_TIMEOUT))?;
    let no_zeroes = greeting(&mut s)?;
    let mut t = match tls {
        None => Transport::Plain(s),
        Some(tls) => {
            send_option(&mut s, opt::STARTTLS, &[])?;
            let r = read_reply(&mut s, opt::STARTTLS)?;
            if r.kind != rep::ACK {
                return Err(io::Error::other(format!(
                    "the server refused TLS (reply {:#x}){}",
                    r.kind,
                    r.message()
                )));
            }
            let conn = ClientConnection::new(tls.config.clone(), tls.name.clone())
                .map_err(io::Error::other)?;
            let mut t = TlsStream::new(conn, s);
            t.handshake()
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
            Transport::Tls(Box::new(t))
        }
    };
    let info = options(&mut t, export, no_zeroes)?;
    t.set_timeout(None)?;
    Ok((t, info))
}

/// The server's greeting and our flags; returns whether the server
/// leaves out the 124 zero bytes.
fn greeting(s: &mut Socket) -> io::Result<bool> {
    if read_u64(s)? != NBDMAGIC {
        return Err(protocol("not an NBD server (no NBDMAGIC)"));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(protocol(
            "the server speaks oldstyle NBD; only newstyle is supported",
        ));
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the server does not speak fixed newstyle NBD"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= CLIENT_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    Ok(no_zeroes)
}

/// The options after the greeting (and TLS): structured replies,
/// `base:allocation`, then the export.
fn options(s: &mut Transport, export: &str, no_zeroes: bool) -> io::Result<ExportInfo> {
    // Structured replies: READ data in chunks, holes, block status.
    send_option(s, opt::STRUCTURED_REPLY, &[])?;
    let r = read_reply(s, opt::STRUCTURED_REPLY)?;
    let structured = r.kind == rep::ACK;
    if !structured && !r.is_error() {
        return Err(protocol(format!(
            "unexpected reply {:#x} to NBD_OPT_STRUCTURED_REPLY",
            r.kind
        )));
    }

    let mut meta_id = None;
    if structured {
        let mut d = Vec::new();
        name_and(&mut d, export);
        d.extend_from_slice(&1u32.to_be_bytes());
        name_and(&mut d, BASE_ALLOCATION);
        send_option(s, opt::SET_META_CONTEXT, &d)?;
        loop {
            let r = read_reply(s, opt::SET_META_CONTEXT)?;
            match r.kind {
                rep::ACK => break,
                rep::META_CONTEXT if r.data.len() >= 4 => {
                    if &r.data[4..] == BASE_ALLOCATION.as_bytes() {
                        meta_id = Some(u32::from_be_bytes([
                            r.data[0], r.data[1], r.data[2], r.data[3],
                        ]));
                    }
                }
                k if r.is_error() => {
                    let _ = k;
                    break;
                }
                k => {
                    return Err(protocol(format!(
                        "unexpected reply {k:#x} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
    }

    let mut info = go(s, export, structured, meta_id)?;
    if info.is_none() {
        // A server without NBD_OPT_GO: the old way, which ends the
        // handshake with the size and flags.
        s.write_all(&IHAVEOPT.to_be_bytes())?;
        s.write_all(&opt::EXPORT_NAME.to_be_bytes())?;
        s.write_all(&(export.len() as u32).to_be_bytes())?;
        s.write_all(export.as_bytes())?;
        let size = read_u64(s)?;
        let flags = read_u16(s)?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            s.read_exact(&mut z)?;
        }
        info = Some(ExportInfo {
            size,
            flags,
            min_block: 1,
            pref_block: 4096,
            max_block: MAX_PAYLOAD,
            structured,
            meta_id,
        });
    }
    info.ok_or_else(|| protocol("no export information"))
}

/// `NBD_OPT_GO` with a request for block sizes; `None` when the server
/// does not know the option.
fn go(
    s: &mut Transport,
    export: &str,
    structured: bool,
    meta_id: Option<u32>,
) -> io::Result<Option<ExportInfo>> {
    let mut d = Vec::new();
    name_and(&mut d, export);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(s, opt::GO, &d)?;
    let mut size_flags = None;
    let mut blocks = (1u32, 4096u32, MAX_PAYLOAD);
    loop {
        let r = read_reply(s, opt::GO)?;
        match r.kind {
            rep::ACK => break,
            rep::INFO if r.data.len() >= 2 => {
                let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                let d = &r.data[2..];
                let be32 = |o: usize| u32::from_be_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]);
                match t {
                    info::EXPORT if d.len() == 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&d[..8]);
                        size_flags =
                            Some((u64::from_be_bytes(b), u16::from_be_bytes([d[8], d[9]])));
                    }
                    info::BLOCK_SIZE if d.len() == 12 => {
                        let (min, pref, max) = (be32(0), be32(4), be32(8));
                        let sane = min.is_power_of_two()
                            && min <= 65536
                            && pref.is_power_of_two()
                            && pref >= min
                            && max >= min;
                        if !sane {
                            return Err(protocol(format!(
                                "bad block sizes from the server: minimum {min}, \
                                 preferred {pref}, maximum {max}"
                            )));
                        }
                        blocks = (min, pref, max.min(MAX_PAYLOAD));
                    }
                    info::EXPORT | info::BLOCK_SIZE => {
                        return Err(protocol(format!(
                            "NBD_INFO type {t} with {} bytes",
                            d.len()
                        )))
                    }
                    _ => {}
                }
            }
            rep::ERR_UNSUP => return Ok(None),
            rep::ERR_UNKNOWN => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("export '{export}' not present on the server{}", r.message()),
                ))
            }
            k if r.is_error() => {
                return Err(io::Error::other(format!(
                    "the server refused export '{export}' (reply {k:#x}){}",
                    r.message()
                )))
            }
            k => return Err(protocol(format!("unexpected reply {k:#x} to NBD_OPT_GO"))),
        }
    }
    let (size, flags) =
        size_flags.ok_or_else(|| protocol("NBD_OPT_GO ended without NBD_INFO_EXPORT"))?;
    Ok(Some(ExportInfo {
        size,
        flags,
        min_block: blocks.0,
        pref_block: blocks.1,
        max_block: blocks.2,
        structured,
        meta_id,
    }))
}
