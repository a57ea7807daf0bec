//! The fixed newstyle handshake of an NBD server: blocking, on the
//! server's accept thread (with a timeout set by the caller), against the
//! exports on offer. It ends with the export the client chose and what
//! else was negotiated (structured replies, `base:allocation`), or with
//! the client gone. Option payloads are untrusted: malformed ones get an
//! error reply, oversized ones are skipped and refused.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

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
    /// Transmission flags for this export.
    pub fn flags(&self) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_CACHE;
        if self.writable && !self.node.read_only() {
            f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
        } else {
            f |= tflag::READ_ONLY;
        }
        if self.multi_conn {
            f |= tflag::CAN_MULTI_CONN;
        }
        f
    }
}

/// What the handshake settled besides the export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// NBD_OPT_STRUCTURED_REPLY: READ answers in chunks.
    pub structured: bool,
    /// `base:allocation` was selected (NBD_OPT_SET_META_CONTEXT).
    pub base_allocation: bool,
}

/// How the handshake ended.
pub enum Handshake {
    /// The client chose this export: go to transmission.
    Export(String, NbdExportInfo, Negotiated),
    /// The client aborted or went away (or sent something that ends it).
    Closed,
}

fn read_exact(s: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Runs the fixed newstyle handshake on `s` against `exports`. Errors
/// are I/O errors or protocol violations; either way the caller drops
/// the connection.
pub fn handshake(
    s: &mut (impl Read + Write),
    exports: &HashMap<String, NbdExportInfo>,
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
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut neg = Negotiated::default();
    loop {
        let h = read_exact(s, 16)?;
        let magic = u64::from_be_bytes(h[..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(bad("bad option magic"));
        }
        let option = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION {
            // Skip it, then refuse it: the stream stays in step.
            io::copy(&mut (&mut *s).take(u64::from(len)), &mut io::sink())?;
            let mut r = Vec::new();
            option_reply(&mut r, option, rep::ERR_TOO_BIG, b"option too long");
            s.write_all(&r)?;
            continue;
        }
        let data = read_exact(s, len as usize)?;
        let mut r = Vec::new();
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(e) = find(exports, &name) else {
                    // The protocol has no way to refuse EXPORT_NAME.
                    return Ok(Handshake::Closed);
                };
                r.extend_from_slice(&e.node.capacity().to_be_bytes());
                r.extend_from_slice(&e.flags().to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&r)?;
                return Ok(Handshake::Export(name, e.clone(), neg));
            }
            opt::ABORT => {
                option_reply(&mut r, option, rep::ACK, &[]);
                let _ = s.write_all(&r);
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
            opt::INFO | opt::GO => match info_reply(&mut r, option, &data, exports) {
                Some((name, e)) if option == opt::GO => {
                    s.write_all(&r)?;
                    return Ok(Handshake::Export(name, e, neg));
                }
                _ => {}
            },
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(&mut r, option, rep::ERR_INVALID, b"takes no data");
                } else {
                    neg.structured = true;
                    option_reply(&mut r, option, rep::ACK, &[]);
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set && !neg.structured {
                    option_reply(
                        &mut r,
                        option,
                        rep::ERR_INVALID,
                        b"structured replies first",
                    );
                } else {
                    match meta_queries(&data) {
                        None => {
                            option_reply(&mut r, option, rep::ERR_INVALID, b"malformed request")
                        }
                        Some((name, _)) if find(exports, &name).is_none() => option_reply(
                            &mut r,
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
                                option_reply(&mut r, option, rep::META_CONTEXT, &d);
                            }
                            option_reply(&mut r, option, rep::ACK, &[]);
                        }
                    }
                }
            }
            _ => option_reply(&mut r, option, rep::ERR_UNSUP, b"option not supported"),
        }
        s.write_all(&r)?;
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

/// Answers NBD_OPT_INFO/GO into `r`; returns the export when it is one.
fn info_reply(
    r: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    exports: &HashMap<String, NbdExportInfo>,
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
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.node.capacity().to_be_bytes());
    d.extend_from_slice(&e.flags().to_be_bytes());
    option_reply(r, option, rep::INFO, &d);
    for i in infos {
        match i {
            info::NAME => {
                let mut d = info::NAME.to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                option_reply(r, option, rep::INFO, &d);
            }
            info::DESCRIPTION => {
                if let Some(desc) = &e.description {
                    let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(desc.as_bytes());
                    option_reply(r, option, rep::INFO, &d);
                }
            }
            info::BLOCK_SIZE => {
                let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&4096u32.to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                option_reply(r, option, rep::INFO, &d);
            }
            _ => {}
        }
    }
    option_reply(r, option, rep::ACK, &[]);
    Some((name, e.clone()))
}
