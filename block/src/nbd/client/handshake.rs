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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qapi::export::SocketAddress;

use crate::nbd::proto::*;

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

/// A connected socket, blocking or not.
#[derive(Debug)]
pub struct Socket(OwnedFd);

impl Socket {
    /// Makes reads and writes return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let fd = self.0.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets the receive and send timeouts of blocking calls.
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(t) => libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: a valid timeval of the size given, on our socket.
            let r = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Ends both directions (the peer sees EOF).
    pub fn shutdown(&self) {
        // SAFETY: shutdown on our socket; errors (not connected) are moot.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of its length. MSG_NOSIGNAL:
        // a closed peer is an error, not a SIGPIPE.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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
            Ok(Socket(s.into()))
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
                        return Ok(Socket(s.into()));
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
/// by a timeout). The socket is left blocking without timeouts.
pub fn negotiate(s: &mut Socket, export: &str) -> io::Result<ExportInfo> {
    if export.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "export name longer than 4096 bytes",
        ));
    }
    s.set_timeout(Some(STEP_TIMEOUT))?;
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
    s.set_timeout(None)?;
    info.ok_or_else(|| protocol("no export information"))
}

/// `NBD_OPT_GO` with a request for block sizes; `None` when the server
/// does not know the option.
fn go(
    s: &mut Socket,
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
