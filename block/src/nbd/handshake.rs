//! The fixed newstyle handshake of an NBD server: blocking, on the
//! server's accept thread (with a timeout set by the caller), against the
//! exports on offer. It ends with the export the client chose and what
//! else was negotiated (structured replies or extended headers,
//! `base:allocation`, the TLS session), or with the client gone. Option
//! payloads are untrusted: malformed ones get an error reply, oversized
//! ones are skipped and refused.
//!
//! With TLS credentials the server runs the protocol's FORCEDTLS mode
//! (QEMU's only one): before NBD_OPT_STARTTLS every option but ABORT gets
//! NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME, which cannot be refused,
//! ends the connection; after it the rest of the handshake and the
//! transmission phase run over TLS. A failed TLS handshake ends the
//! connection (the protocol: "too late to continue without TLS").

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use super::proto::*;
use crate::BlockNode;

/// One exported node, as the handshake offers it.
#[derive(Clone)]
pub struct NbdExportInfo {
    /// The node.
    pub node: Arc<dyn BlockNode>,
    /// Clients may write.
    pub writable: bool,
    /// Free text for NBD_INFO_DESCRIPTION and LIST.
    pub description: Option<String>,
    /// Several connections may serve one client (CAN_MULTI_CONN).
    pub multi_conn: bool,
}

impl NbdExportInfo {
    /// Transmission flags for this export on a connection that
    /// negotiated `neg`, as QEMU's: a writable export offers FAST_ZERO
    /// (its nodes refuse a zeroing they would do by hand, see
    /// `RequestFlags::no_fallback`), and structured replies bring DF (a
    /// READ always answers in one chunk here, so it costs nothing).
    pub fn flags(&self, neg: &Negotiated) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_CACHE;
        if self.writable && !self.node.read_only() {
            f |= tflag::SEND_FUA
                | tflag::SEND_TRIM
                | tflag::SEND_WRITE_ZEROES
                | tflag::SEND_FAST_ZERO;
        } else {
            f |= tflag::READ_ONLY;
        }
        if self.multi_conn {
            f |= tflag::CAN_MULTI_CONN;
        }
        if neg.structured {
            f |= tflag::SEND_DF;
        }
        f
    }
}

/// What the handshake settled besides the export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// NBD_OPT_STRUCTURED_REPLY (or implied by extended headers): replies
    /// with data come in chunks.
    pub structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests and reply chunks with
    /// 64-bit lengths; every reply is a chunk.
    pub extended: bool,
    /// `base:allocation` was selected (NBD_OPT_SET_META_CONTEXT).
    pub base_allocation: bool,
}

/// The export a client chose, and how it talks.
pub struct NbdSession {
    /// The export's name.
    pub name: String,
    /// The export.
    pub info: NbdExportInfo,
    /// What else was negotiated.
    pub neg: Negotiated,
    /// The TLS session everything after NBD_OPT_STARTTLS runs over. It
    /// may hold records already read from the socket.
    pub tls: Option<ServerConnection>,
}

/// How the handshake ended.
pub enum Handshake {
    /// The client chose an export: go to transmission.
    Export(Box<NbdSession>),
    /// The client aborted or went away (or sent something that ends it).
    Closed,
}

/// The handshake's byte stream: the socket, then TLS over it once
/// NBD_OPT_STARTTLS is done (rustls' blocking `Stream`, so the socket's
/// timeouts still bound every wait).
struct Channel<'a, S> {
    sock: &'a mut S,
    tls: Option<ServerConnection>,
}

impl<S: Read + Write> Read for Channel<'_, S> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(c) => rustls::Stream::new(c, &mut *self.sock).read(b),
            None => self.sock.read(b),
        }
    }
}

impl<S: Read + Write> Write for Channel<'_, S> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(c) => rustls::Stream::new(c, &mut *self.sock).write(b),
            None => self.sock.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            Some(c) => rustls::Stream::new(c, &mut *self.sock).flush(),
            None => self.sock.flush(),
        }
    }
}

impl<S: Read + Write> Channel<'_, S> {
    fn send(&mut self, r: &[u8]) -> io::Result<()> {
        self.write_all(r)?;
        self.flush()
    }

    /// Acknowledges NBD_OPT_STARTTLS and runs the TLS handshake.
    fn start_tls(&mut self, option: u32, config: &Arc<ServerConfig>) -> io::Result<()> {
        let mut r = Vec::new();
        option_reply(&mut r, option, rep::ACK, &[]);
        self.send(&r)?;
        let mut conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut *self.sock)?;
        }
        self.tls = Some(conn);
        // TLS 1.3 session tickets, if any.
        self.flush()
    }
}

fn read_exact(s: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Runs the fixed newstyle handshake on `s` against `exports`; with
/// `tls`, TLS is required (FORCEDTLS). Errors are I/O errors, protocol
/// violations or a failed TLS handshake; either way the caller drops the
/// connection.
pub fn handshake(
    s: &mut (impl Read + Write),
    exports: &HashMap<String, NbdExportInfo>,
    tls: Option<&Arc<ServerConfig>>,
) -> io::Result<Handshake> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&out)?;
    let cflags = be32(&read_exact(s, 4)?);
    if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(bad("unknown client flags"));
    }
    if tls.is_some() && cflags & CLIENT_FIXED_NEWSTYLE == 0 {
        // TLS needs fixed newstyle negotiation.
        return Err(bad("TLS required, but the client is not fixed newstyle"));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut ch = Channel { sock: s, tls: None };
    let mut neg = Negotiated::default();
    loop {
        let h = read_exact(&mut ch, 16)?;
        let magic = u64::from_be_bytes(h[..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(bad("bad option magic"));
        }
        let option = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        // Before STARTTLS, with TLS required.
        let tls_first = tls.filter(|_| ch.tls.is_none());
        let mut r = Vec::new();
        if len > MAX_OPTION {
            if option == opt::EXPORT_NAME || (tls_first.is_some() && option == opt::STARTTLS) {
                return Ok(Handshake::Closed);
            }
            // Skip it, then refuse it: the stream stays in step.
            io::copy(&mut (&mut ch).take(u64::from(len)), &mut io::sink())?;
            let (reply, msg) = match tls_first {
                Some(_) => (rep::ERR_TLS_REQD, "TLS required"),
                None => (rep::ERR_TOO_BIG, "option too long"),
            };
            option_reply(&mut r, option, reply, msg.as_bytes());
            ch.send(&r)?;
            continue;
        }
        let data = read_exact(&mut ch, len as usize)?;
        if let Some(config) = tls_first {
            match option {
                opt::STARTTLS if data.is_empty() => {
                    ch.start_tls(option, config)?;
                    // Nothing negotiated in the clear carries over.
                    neg = Negotiated::default();
                    continue;
                }
                opt::STARTTLS => {
                    // As QEMU: a client that cannot start TLS right is
                    // told so and dropped.
                    option_reply(&mut r, option, rep::ERR_INVALID, b"STARTTLS takes no data");
                    let _ = ch.send(&r);
                    return Ok(Handshake::Closed);
                }
                // It cannot be refused.
                opt::EXPORT_NAME => return Ok(Handshake::Closed),
                opt::ABORT => {
                    option_reply(&mut r, option, rep::ACK, &[]);
                    let _ = ch.send(&r);
                    return Ok(Handshake::Closed);
                }
                _ => {
                    let msg = format!("Option {option:#x} not permitted before TLS");
                    option_reply(&mut r, option, rep::ERR_TLS_REQD, msg.as_bytes());
                    ch.send(&r)?;
                    continue;
                }
            }
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(e) = find(exports, &name) else {
                    // The protocol has no way to refuse EXPORT_NAME.
                    return Ok(Handshake::Closed);
                };
                r.extend_from_slice(&e.node.capacity().to_be_bytes());
                r.extend_from_slice(&e.flags(&neg).to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                ch.send(&r)?;
                return Ok(session(name, e.clone(), neg, ch.tls));
            }
            opt::ABORT => {
                option_reply(&mut r, option, rep::ACK, &[]);
                let _ = ch.send(&r);
                return Ok(Handshake::Closed);
            }
            opt::LIST => {
                if !data.is_empty() {
                    option_reply(&mut r, option, rep::ERR_INVALID, b"LIST takes no data");
                } else {
                    let mut names: Vec<&String> = exports.keys().collect();
                    names.sort();
                    for n in names {
                        let mut d = (n.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(n.as_bytes());
                        if let Some(desc) = &exports[n].description {
                            d.extend_from_slice(desc.as_bytes());
                        }
                        option_reply(&mut r, option, rep::SERVER, &d);
                    }
                    option_reply(&mut r, option, rep::ACK, &[]);
                }
            }
            opt::INFO | opt::GO => match info_reply(&mut r, option, &data, exports, &neg) {
                Some((name, e)) if option == opt::GO => {
                    ch.send(&r)?;
                    return Ok(session(name, e, neg, ch.tls));
                }
                _ => {}
            },
            opt::STARTTLS => {
                let (reply, msg): (u32, &[u8]) = if !data.is_empty() {
                    (rep::ERR_INVALID, b"STARTTLS takes no data")
                } else if ch.tls.is_some() {
                    (rep::ERR_INVALID, b"TLS already enabled")
                } else {
                    (rep::ERR_POLICY, b"TLS not configured")
                };
                option_reply(&mut r, option, reply, msg);
            }
            opt::STRUCTURED_REPLY => {
                let (reply, msg): (u32, &[u8]) = if !data.is_empty() {
                    (rep::ERR_INVALID, b"takes no data")
                } else if neg.extended {
                    (
                        rep::ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    )
                } else if neg.structured {
                    (rep::ERR_INVALID, b"structured reply already negotiated")
                } else {
                    neg.structured = true;
                    (rep::ACK, b"")
                };
                option_reply(&mut r, option, reply, msg);
            }
            opt::EXTENDED_HEADERS => {
                let (reply, msg): (u32, &[u8]) = if !data.is_empty() {
                    (rep::ERR_INVALID, b"takes no data")
                } else if neg.extended {
                    (rep::ERR_INVALID, b"extended headers already negotiated")
                } else {
                    // Structured replies come with them.
                    neg.extended = true;
                    neg.structured = true;
                    (rep::ACK, b"")
                };
                option_reply(&mut r, option, reply, msg);
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(&mut r, option, &data, exports, &mut neg)
            }
            _ => option_reply(&mut r, option, rep::ERR_UNSUP, b"option not supported"),
        }
        ch.send(&r)?;
    }
}

fn session(
    name: String,
    info: NbdExportInfo,
    neg: Negotiated,
    tls: Option<ServerConnection>,
) -> Handshake {
    Handshake::Export(Box::new(NbdSession {
        name,
        info,
        neg,
        tls,
    }))
}

/// Answers LIST_META_CONTEXT and SET_META_CONTEXT into `r`.
fn meta_context(
    r: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    exports: &HashMap<String, NbdExportInfo>,
    neg: &mut Negotiated,
) {
    let set = option == opt::SET_META_CONTEXT;
    if set && !neg.structured {
        return option_reply(r, option, rep::ERR_INVALID, b"structured replies first");
    }
    match meta_queries(data) {
        None => option_reply(r, option, rep::ERR_INVALID, b"malformed request"),
        Some((name, _)) if find(exports, &name).is_none() => option_reply(
            r,
            option,
            rep::ERR_UNKNOWN,
            format!("export '{name}' not present").as_bytes(),
        ),
        Some((_, queries)) => {
            // LIST with no query lists everything.
            let wanted = queries
                .iter()
                .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
                || (!set && queries.is_empty());
            if set {
                neg.base_allocation = wanted;
            }
            if wanted {
                let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                option_reply(r, option, rep::META_CONTEXT, &d);
            }
            option_reply(r, option, rep::ACK, &[]);
        }
    }
}

/// A LIST/SET_META_CONTEXT request: the export name and the queries.
fn meta_queries(data: &[u8]) -> Option<(String, Vec<String>)> {
    let n = be32(data.get(..4)?) as usize;
    let name = String::from_utf8_lossy(data.get(4..4 + n)?).into_owned();
    let count = be32(data.get(4 + n..8 + n)?) as usize;
    let mut at = 8 + n;
    let mut out = Vec::new();
    for _ in 0..count {
        let l = be32(data.get(at..at + 4)?) as usize;
        out.push(String::from_utf8_lossy(data.get(at + 4..at + 4 + l)?).into_owned());
        at += 4 + l;
    }
    (at == data.len()).then_some((name, out))
}

/// An export by name; the empty name is the only export when there is one.
fn find<'a>(exports: &'a HashMap<String, NbdExportInfo>, name: &str) -> Option<&'a NbdExportInfo> {
    match exports.get(name) {
        Some(e) => Some(e),
        None if name.is_empty() && exports.len() == 1 => exports.values().next(),
        None => None,
    }
}

/// Answers NBD_OPT_INFO/GO into `r` as QEMU does (NAME when asked,
/// DESCRIPTION when there is one, BLOCK_SIZE and EXPORT always); returns
/// the export when it is one.
fn info_reply(
    r: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    exports: &HashMap<String, NbdExportInfo>,
    neg: &Negotiated,
) -> Option<(String, NbdExportInfo)> {
    let parsed = (|| {
        let n = be32(data.get(..4)?) as usize;
        let name = data.get(4..4 + n)?;
        let count = u16::from_be_bytes(data.get(4 + n..6 + n)?.try_into().ok()?) as usize;
        let reqs = data.get(6 + n..)?;
        if reqs.len() != 2 * count {
            return None;
        }
        let infos: Vec<u16> = reqs
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some((String::from_utf8_lossy(name).into_owned(), infos))
    })();
    let Some((name, infos)) = parsed else {
        option_reply(r, option, rep::ERR_INVALID, b"malformed INFO/GO request");
        return None;
    };
    let Some(e) = find(exports, &name) else {
        option_reply(
            r,
            option,
            rep::ERR_UNKNOWN,
            format!("export '{name}' not present").as_bytes(),
        );
        return None;
    };
    if infos.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        option_reply(r, option, rep::INFO, &d);
    }
    if let Some(desc) = &e.description {
        let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(desc.as_bytes());
        option_reply(r, option, rep::INFO, &d);
    }
    let asked_sizes = infos.contains(&info::BLOCK_SIZE);
    let sizes = BlockSizes::of(e, option == opt::INFO || asked_sizes);
    let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [sizes.minimum, sizes.preferred, sizes.maximum] {
        d.extend_from_slice(&x.to_be_bytes());
    }
    option_reply(r, option, rep::INFO, &d);
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.node.capacity().to_be_bytes());
    d.extend_from_slice(&e.flags(neg).to_be_bytes());
    option_reply(r, option, rep::INFO, &d);
    if option == opt::INFO && !asked_sizes && sizes.alignment > 1 {
        // A client that cannot learn the alignment would break it.
        option_reply(
            r,
            option,
            rep::ERR_BLOCK_SIZE_REQD,
            b"request NBD_INFO_BLOCK_SIZE to use this export",
        );
        return None;
    }
    option_reply(r, option, rep::ACK, &[]);
    Some((name, e.clone()))
}

/// NBD_INFO_BLOCK_SIZE as QEMU computes it.
struct BlockSizes {
    /// The node's request alignment.
    alignment: u32,
    minimum: u32,
    preferred: u32,
    maximum: u32,
}

impl BlockSizes {
    /// The minimum is the node's alignment only for a client that will
    /// obey it (it asked, or it is only asking, NBD_OPT_INFO); 1 for the
    /// rest, whose unaligned requests the node takes anyway.
    fn of(e: &NbdExportInfo, obeyed: bool) -> Self {
        let limits = e.node.limits();
        let alignment = limits.request_alignment.clamp(1, MAX_PAYLOAD);
        let minimum = if obeyed { alignment } else { 1 };
        let mut maximum = match limits.max_transfer {
            0 => MAX_PAYLOAD,
            m => m.min(MAX_PAYLOAD),
        };
        maximum = (maximum - maximum % minimum).max(minimum);
        BlockSizes {
            alignment,
            minimum,
            preferred: minimum.max(4096),
            maximum,
        }
    }
}
