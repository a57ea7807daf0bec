//! NBD wire format (the NBD protocol document, `doc/proto.md` of the NBD
//! project): the fixed newstyle handshake's magics, options and replies,
//! the transmission phase's requests (compact, or extended once
//! NBD_OPT_EXTENDED_HEADERS is negotiated) and replies (simple,
//! structured chunks, extended chunks). Everything is big-endian.

/// "NBDMAGIC", the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and each option request's magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Request magic with extended headers (NBD_EXTENDED_REQUEST_MAGIC).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic (NBD_EXTENDED_REPLY_MAGIC).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Structured reply chunk types and flags.
pub mod chunk {
    /// NBD_REPLY_FLAG_DONE.
    pub const FLAG_DONE: u16 = 1;
    /// NBD_REPLY_TYPE_NONE.
    pub const NONE: u16 = 0;
    /// NBD_REPLY_TYPE_OFFSET_DATA.
    pub const OFFSET_DATA: u16 = 1;
    /// NBD_REPLY_TYPE_OFFSET_HOLE: 64-bit offset, 32-bit hole size (in
    /// both structured and extended replies).
    pub const OFFSET_HOLE: u16 = 2;
    /// NBD_REPLY_TYPE_BLOCK_STATUS: 32-bit descriptors (compact mode).
    pub const BLOCK_STATUS: u16 = 5;
    /// NBD_REPLY_TYPE_BLOCK_STATUS_EXT: a descriptor count and 64-bit
    /// descriptors; the only block status reply in extended mode.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// NBD_REPLY_TYPE_ERROR.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// base:allocation flags.
pub mod state {
    /// NBD_STATE_HOLE.
    pub const HOLE: u32 = 1;
    /// NBD_STATE_ZERO.
    pub const ZERO: u32 = 2;
}

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server omits the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client does not want the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    /// NBD_OPT_EXPORT_NAME.
    pub const EXPORT_NAME: u32 = 1;
    /// NBD_OPT_ABORT.
    pub const ABORT: u32 = 2;
    /// NBD_OPT_LIST.
    pub const LIST: u32 = 3;
    /// NBD_OPT_STARTTLS.
    pub const STARTTLS: u32 = 5;
    /// NBD_OPT_INFO.
    pub const INFO: u32 = 6;
    /// NBD_OPT_GO.
    pub const GO: u32 = 7;
    /// NBD_OPT_STRUCTURED_REPLY.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// NBD_OPT_LIST_META_CONTEXT.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// NBD_OPT_SET_META_CONTEXT.
    pub const SET_META_CONTEXT: u32 = 10;
    /// NBD_OPT_EXTENDED_HEADERS.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// NBD_REP_ACK.
    pub const ACK: u32 = 1;
    /// NBD_REP_SERVER.
    pub const SERVER: u32 = 2;
    /// NBD_REP_INFO.
    pub const INFO: u32 = 3;
    /// NBD_REP_META_CONTEXT.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// NBD_REP_ERR_UNSUP.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// NBD_REP_ERR_POLICY.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// NBD_REP_ERR_INVALID.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// NBD_REP_ERR_TLS_REQD: the server insists on NBD_OPT_STARTTLS first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// NBD_REP_ERR_UNKNOWN.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// NBD_REP_ERR_BLOCK_SIZE_REQD: NBD_OPT_INFO without NBD_INFO_BLOCK_SIZE
    /// on an export with an alignment.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// NBD_REP_ERR_TOO_BIG.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// NBD_REP_ERR_EXT_HEADER_REQD: NBD_OPT_STRUCTURED_REPLY after extended
    /// headers.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;
}

/// NBD_INFO types.
pub mod info {
    /// NBD_INFO_EXPORT.
    pub const EXPORT: u16 = 0;
    /// NBD_INFO_NAME.
    pub const NAME: u16 = 1;
    /// NBD_INFO_DESCRIPTION.
    pub const DESCRIPTION: u16 = 2;
    /// NBD_INFO_BLOCK_SIZE.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// NBD_FLAG_HAS_FLAGS.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// NBD_FLAG_READ_ONLY.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_FLAG_SEND_FLUSH.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_FLAG_SEND_FUA.
    pub const SEND_FUA: u16 = 1 << 3;
    /// NBD_FLAG_SEND_TRIM.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_FLAG_SEND_WRITE_ZEROES.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_FLAG_SEND_DF: READ takes NBD_CMD_FLAG_DF (structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// NBD_FLAG_CAN_MULTI_CONN.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// NBD_FLAG_SEND_CACHE.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_FLAG_SEND_FAST_ZERO: WRITE_ZEROES takes NBD_CMD_FLAG_FAST_ZERO.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands.
pub mod cmd {
    /// NBD_CMD_READ.
    pub const READ: u16 = 0;
    /// NBD_CMD_WRITE.
    pub const WRITE: u16 = 1;
    /// NBD_CMD_DISC.
    pub const DISC: u16 = 2;
    /// NBD_CMD_FLUSH.
    pub const FLUSH: u16 = 3;
    /// NBD_CMD_TRIM.
    pub const TRIM: u16 = 4;
    /// NBD_CMD_CACHE.
    pub const CACHE: u16 = 5;
    /// NBD_CMD_WRITE_ZEROES.
    pub const WRITE_ZEROES: u16 = 6;
    /// NBD_CMD_BLOCK_STATUS.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// NBD_CMD_FLAG_FUA.
    pub const FUA: u16 = 1 << 0;
    /// NBD_CMD_FLAG_NO_HOLE.
    pub const NO_HOLE: u16 = 1 << 1;
    /// NBD_CMD_FLAG_DF: READ answers in one chunk.
    pub const DF: u16 = 1 << 2;
    /// NBD_CMD_FLAG_REQ_ONE.
    pub const REQ_ONE: u16 = 1 << 3;
    /// NBD_CMD_FLAG_FAST_ZERO: fail WRITE_ZEROES with ENOTSUP rather than
    /// zero slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// NBD_CMD_FLAG_PAYLOAD_LEN: with extended headers, the length is the
    /// payload's (WRITE's data, or a payload the command does not take).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Error values of replies (the protocol's errno subset).
pub mod err {
    /// EPERM.
    pub const EPERM: u32 = 1;
    /// EIO.
    pub const EIO: u32 = 5;
    /// ENOMEM.
    pub const ENOMEM: u32 = 12;
    /// EINVAL.
    pub const EINVAL: u32 = 22;
    /// ENOSPC.
    pub const ENOSPC: u32 = 28;
    /// EOVERFLOW.
    pub const EOVERFLOW: u32 = 75;
    /// ENOTSUP.
    pub const ENOTSUP: u32 = 95;
    /// ESHUTDOWN.
    pub const ESHUTDOWN: u32 = 108;

    /// The protocol's value for a host errno (EIO for the rest).
    pub fn from_errno(e: i32) -> u32 {
        match e {
            libc::EPERM | libc::EROFS => EPERM,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            libc::ENOSPC | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        }
    }
}

/// Largest READ or WRITE payload served (QEMU's `NBD_MAX_BUFFER_SIZE`).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
pub const MAX_OPTION: u32 = 4096;
/// Bytes of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// A transmission-phase request header, compact or extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (32 bits on the wire unless extended).
    pub length: u64,
}

/// Why a request header is not one.
#[derive(Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

fn be64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(x)
}

impl RequestHeader {
    /// Bytes of a header in the negotiated mode.
    pub fn wire_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Parses the header at the start of `b` in the negotiated mode;
    /// `None` while `b` is shorter than a header.
    pub fn parse_prefix(b: &[u8], extended: bool) -> Option<Result<Self, BadMagic>> {
        if extended {
            let h: &[u8; EXTENDED_REQUEST_LEN] = b.get(..EXTENDED_REQUEST_LEN)?.try_into().ok()?;
            Some(Self::parse_extended(h))
        } else {
            let h: &[u8; REQUEST_LEN] = b.get(..REQUEST_LEN)?.try_into().ok()?;
            Some(Self::parse(h))
        }
    }

    /// Parses a compact header from its 28 bytes.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, BadMagic> {
        Self::parse_common(b, REQUEST_MAGIC)
            .map(|h| h.with_length(u64::from(u32::from_be_bytes([b[24], b[25], b[26], b[27]]))))
    }

    /// Parses an extended header from its 32 bytes.
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<Self, BadMagic> {
        Self::parse_common(b, EXTENDED_REQUEST_MAGIC).map(|h| h.with_length(be64_at(b, 24)))
    }

    fn parse_common(b: &[u8], magic: u32) -> Result<Self, BadMagic> {
        let got = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if got != magic {
            return Err(BadMagic(got));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64_at(b, 8),
            offset: be64_at(b, 16),
            length: 0,
        })
    }

    fn with_length(mut self, length: u64) -> Self {
        self.length = length;
        self
    }

    /// Appends the header in the negotiated mode to `out` (a compact
    /// header carries the low 32 bits of the length).
    pub fn encode(&self, out: &mut Vec<u8>, extended: bool) {
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            out.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
    }

    /// Bytes of payload that follow the header: WRITE's data, or with
    /// extended headers whatever NBD_CMD_FLAG_PAYLOAD_LEN announces.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.kind == cmd::WRITE || (extended && self.flags & cflag::PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }
}

/// Appends a simple reply header to `out`.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header to `out` (its payload of
/// `len` bytes follows).
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends an extended reply chunk header to `out` (its payload of `len`
/// bytes follows). `offset` echoes the request's.
pub fn extended_chunk_header(
    out: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a final error chunk to `out`.
pub fn error_chunk(out: &mut Vec<u8>, error: u32, cookie: u64) {
    chunk_header(out, chunk::FLAG_DONE, chunk::ERROR, cookie, 6);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Appends an option reply to `out`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_header_parses_and_a_bad_magic_is_refused() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&cflag::FUA.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let h = RequestHeader::parse(&b).unwrap();
        let mut again = Vec::new();
        h.encode(&mut again, false);
        assert_eq!(again, b);
        assert_eq!(
            h,
            RequestHeader {
                flags: cflag::FUA,
                kind: cmd::WRITE,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(h.payload_len(false), 512);
        b[0] = 0;
        assert!(RequestHeader::parse(&b).is_err());
    }

    #[test]
    fn an_extended_header_carries_a_64_bit_length() {
        let h = RequestHeader {
            flags: cflag::PAYLOAD_LEN,
            kind: cmd::BLOCK_STATUS,
            cookie: 9,
            offset: 1 << 40,
            length: 5 << 32,
        };
        let mut b = Vec::new();
        h.encode(&mut b, true);
        assert_eq!(b.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(&b[..4], &EXTENDED_REQUEST_MAGIC.to_be_bytes());
        let parsed = RequestHeader::parse_extended(&b.clone().try_into().unwrap()).unwrap();
        assert_eq!(parsed, h);
        // PAYLOAD_LEN means a payload only with extended headers.
        assert_eq!(parsed.payload_len(true), 5 << 32);
        assert_eq!(parsed.payload_len(false), 0);
        // A compact magic is not an extended one.
        let mut c = Vec::new();
        h.encode(&mut c, false);
        c.extend_from_slice(&[0; 4]);
        assert_eq!(
            RequestHeader::parse_extended(&c.try_into().unwrap()),
            Err(BadMagic(REQUEST_MAGIC))
        );
    }

    #[test]
    fn an_extended_chunk_header_is_32_bytes() {
        let mut out = Vec::new();
        extended_chunk_header(&mut out, chunk::FLAG_DONE, chunk::NONE, 3, 4096, 0);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..24], &4096u64.to_be_bytes());
        assert_eq!(&out[24..32], &0u64.to_be_bytes());
    }

    #[test]
    fn replies_are_big_endian() {
        let mut out = Vec::new();
        simple_reply(&mut out, err::EIO, 0x0102);
        assert_eq!(&out[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 0, 0, 5]);
        assert_eq!(&out[8..16], &[0, 0, 0, 0, 0, 0, 1, 2]);
        let mut o = Vec::new();
        option_reply(&mut o, opt::GO, rep::ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(err::from_errno(libc::EROFS), err::EPERM);
    }
}
