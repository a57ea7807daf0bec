//! The handshake and the transmission phase byte by byte, over in-memory
//! streams and a null-co node: extended headers, the replies' shapes,
//! FORCEDTLS's refusals, and requests that must not stall the stream.

use std::collections::HashMap;
use std::io::Cursor;

use super::*;
use crate::BlockGraph;

/// A socket with scripted input that keeps what is written to it.
#[derive(Default)]
struct Mem {
    input: Cursor<Vec<u8>>,
    out: Vec<u8>,
}

impl Read for Mem {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self.input.read(b)? {
            // Like a non-blocking socket with nothing more.
            0 if !b.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }
}

impl Write for Mem {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A 1 MiB writable null-co export that reads zeroes (block status:
/// one hole).
fn export() -> NbdExportInfo {
    let mut graph = BlockGraph::new();
    let opts =
        qapi::parse_blockdev("driver=null-co,node-name=n0,size=1048576,read-zeroes=on").unwrap();
    NbdExportInfo {
        node: graph.add(&opts).unwrap(),
        writable: true,
        description: None,
        multi_conn: true,
    }
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The option replies in `b` after the 18-byte greeting: (option, type).
fn replies(b: &[u8]) -> Vec<(u32, u32)> {
    let mut at = 18;
    let mut out = Vec::new();
    while at + 20 <= b.len() {
        let be = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
        out.push((be(at + 8), be(at + 12)));
        at += 20 + be(at + 16) as usize;
    }
    out
}

fn go(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

#[test]
fn extended_headers_imply_structured_replies_and_refuse_them_after() {
    let exports: HashMap<String, NbdExportInfo> = [("n0".to_string(), export())].into();
    let mut script = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut script, opt::EXTENDED_HEADERS, &[]);
    option(&mut script, opt::STRUCTURED_REPLY, &[]);
    option(&mut script, opt::EXTENDED_HEADERS, &[]);
    let mut q = 1u32.to_be_bytes().to_vec();
    q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    q.extend_from_slice(BASE_ALLOCATION.as_bytes());
    let mut set = 2u32.to_be_bytes().to_vec();
    set.extend_from_slice(b"n0");
    set.extend_from_slice(&q);
    option(&mut script, opt::SET_META_CONTEXT, &set);
    option(&mut script, opt::GO, &go("n0"));
    let mut s = Mem {
        input: Cursor::new(script),
        ..Mem::default()
    };
    let Ok(Handshake::Export(session)) = handshake(&mut s, &exports, None) else {
        panic!("no export");
    };
    assert_eq!(
        session.neg,
        Negotiated {
            structured: true,
            extended: true,
            base_allocation: true
        }
    );
    let r = replies(&s.out);
    assert_eq!(r[0], (opt::EXTENDED_HEADERS, rep::ACK));
    assert_eq!(r[1], (opt::STRUCTURED_REPLY, rep::ERR_EXT_HEADER_REQD));
    assert_eq!(r[2], (opt::EXTENDED_HEADERS, rep::ERR_INVALID));
    assert_eq!(r[3], (opt::SET_META_CONTEXT, rep::META_CONTEXT));
    assert_eq!(*r.last().unwrap(), (opt::GO, rep::ACK));
    // The export's flags offer DF and FAST_ZERO.
    let flags = session.info.flags(&session.neg);
    assert_ne!(flags & tflag::SEND_DF, 0);
    assert_ne!(flags & tflag::SEND_FAST_ZERO, 0);
}

#[test]
fn with_tls_required_options_before_starttls_get_tls_reqd() {
    let dir = tempfile::tempdir().unwrap();
    crate::nbd::tls::tests::make_certs(dir.path());
    let config = crate::nbd::tls::server_config(dir.path(), true).unwrap();
    let exports: HashMap<String, NbdExportInfo> = [("n0".to_string(), export())].into();
    let mut script = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut script, opt::LIST, &[]);
    option(&mut script, opt::GO, &go("n0"));
    option(&mut script, opt::EXPORT_NAME, b"n0");
    let mut s = Mem {
        input: Cursor::new(script),
        ..Mem::default()
    };
    let r = handshake(&mut s, &exports, Some(&config)).unwrap();
    assert!(matches!(r, Handshake::Closed), "EXPORT_NAME before TLS");
    assert_eq!(
        replies(&s.out),
        vec![(opt::LIST, rep::ERR_TLS_REQD), (opt::GO, rep::ERR_TLS_REQD)]
    );
    // Without TLS configured, STARTTLS is refused by policy.
    let mut script = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut script, opt::STARTTLS, &[]);
    let mut s = Mem {
        input: Cursor::new(script),
        ..Mem::default()
    };
    assert!(handshake(&mut s, &exports, None).is_err(), "input ran out");
    assert_eq!(replies(&s.out), vec![(opt::STARTTLS, rep::ERR_POLICY)]);
}

/// An extended-mode connection fed `requests`; returns its output.
fn transmit(requests: &[u8]) -> (NbdConnection, Vec<u8>) {
    let info = export();
    let queue = info.node.open_queue().unwrap();
    let neg = Negotiated {
        structured: true,
        extended: true,
        base_allocation: true,
    };
    let mut conn = NbdConnection::new(info, neg, queue);
    let mut s = Mem {
        input: Cursor::new(requests.to_vec()),
        ..Mem::default()
    };
    conn.on_readable(&mut s);
    conn.on_completions();
    conn.on_writable(&mut s);
    (conn, s.out)
}

fn request(out: &mut Vec<u8>, kind: u16, flags: u16, cookie: u64, offset: u64, length: u64) {
    RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        length,
    }
    .encode(out, true);
}

/// One extended reply chunk: (flags, type, cookie, offset, payload).
fn chunks(mut b: &[u8]) -> Vec<(u16, u16, u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(&b[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
        let len = u64_at(24) as usize;
        out.push((
            u16::from_be_bytes([b[4], b[5]]),
            u16::from_be_bytes([b[6], b[7]]),
            u64_at(8),
            u64_at(16),
            b[32..32 + len].to_vec(),
        ));
        b = &b[32 + len..];
    }
    out
}

#[test]
fn extended_requests_get_extended_chunks() {
    let mut r = Vec::new();
    // A write without PAYLOAD_LEN (QEMU's client sends none) and with.
    request(&mut r, cmd::WRITE, 0, 1, 4096, 512);
    r.extend_from_slice(&[7; 512]);
    request(&mut r, cmd::WRITE, cflag::PAYLOAD_LEN, 2, 8192, 16);
    r.extend_from_slice(&[7; 16]);
    request(&mut r, cmd::READ, cflag::DF, 3, 4096, 512);
    request(&mut r, cmd::BLOCK_STATUS, 0, 4, 0, 1 << 20);
    // A payload READ does not take: skipped and refused; the stream goes on.
    request(&mut r, cmd::READ, cflag::PAYLOAD_LEN, 5, 0, 8);
    r.extend_from_slice(&[0xee; 8]);
    request(
        &mut r,
        cmd::WRITE_ZEROES,
        cflag::FAST_ZERO | cflag::NO_HOLE,
        6,
        0,
        1 << 20,
    );
    // A length past 32 bits: beyond the export, refused.
    request(&mut r, cmd::TRIM, 0, 7, 0, 5 << 32);
    request(&mut r, cmd::FLUSH, cflag::REQ_ONE, 8, 0, 0);
    let (conn, out) = transmit(&r);
    assert!(!conn.is_closed());
    let mut got = chunks(&out);
    got.sort_by_key(|c| c.2);
    let done = chunk::FLAG_DONE;
    assert_eq!(got[0], (done, chunk::NONE, 1, 4096, vec![]));
    assert_eq!(got[1], (done, chunk::NONE, 2, 8192, vec![]));
    let (flags, kind, _, offset, data) = &got[2];
    assert_eq!((*flags, *kind, *offset), (done, chunk::OFFSET_DATA, 4096));
    assert_eq!(&data[..8], &4096u64.to_be_bytes());
    assert_eq!(data.len(), 8 + 512);
    // Context id, one descriptor: 1 MiB of hole and zeroes, 64-bit.
    let mut status = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    status.extend_from_slice(&1u32.to_be_bytes());
    status.extend_from_slice(&(1u64 << 20).to_be_bytes());
    status.extend_from_slice(&u64::from(state::HOLE | state::ZERO).to_be_bytes());
    assert_eq!(got[3], (done, chunk::BLOCK_STATUS_EXT, 4, 0, status));
    let einval = [&err::EINVAL.to_be_bytes()[..], &[0, 0]].concat();
    assert_eq!(got[4], (done, chunk::ERROR, 5, 0, einval.clone()));
    assert_eq!(got[5], (done, chunk::NONE, 6, 0, vec![]));
    let enospc = [&err::ENOSPC.to_be_bytes()[..], &[0, 0]].concat();
    assert_eq!(got[6], (done, chunk::ERROR, 7, 0, enospc));
    // REQ_ONE is not FLUSH's.
    assert_eq!(got[7], (done, chunk::ERROR, 8, 0, einval));
    assert_eq!(got.len(), 8);
}

#[test]
fn an_oversized_extended_payload_ends_the_connection() {
    let mut r = Vec::new();
    request(&mut r, cmd::WRITE, cflag::PAYLOAD_LEN, 1, 0, 1 << 40);
    let (conn, out) = transmit(&r);
    assert!(conn.is_closed());
    assert!(out.is_empty());
    // A compact header where an extended one is due is a bad magic.
    let mut r = Vec::new();
    RequestHeader {
        flags: 0,
        kind: cmd::READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode(&mut r, false);
    r.extend_from_slice(&[0; 4]);
    assert!(transmit(&r).0.is_closed());
}

#[test]
fn fast_zero_is_served_by_a_node_that_zeroes_for_free() {
    // null-co stores nothing: zeroing costs nothing, so it is fast.
    let mut r = Vec::new();
    request(&mut r, cmd::WRITE_ZEROES, cflag::FAST_ZERO, 9, 512, 4096);
    let (_, out) = transmit(&r);
    assert_eq!(
        chunks(&out),
        vec![(chunk::FLAG_DONE, chunk::NONE, 9, 512, vec![])]
    );
}

#[test]
fn zeroes_are_answered_as_a_hole_unless_the_client_says_df() {
    let mut r = Vec::new();
    // null-co read-zeroes: every READ reads zeroes.
    request(&mut r, cmd::READ, 0, 1, 8192, 4096);
    request(&mut r, cmd::READ, cflag::DF, 2, 8192, 4096);
    let (conn, out) = transmit(&r);
    assert!(!conn.is_closed());
    let mut got = chunks(&out);
    got.sort_by_key(|c| c.2);
    let hole = [&8192u64.to_be_bytes()[..], &4096u32.to_be_bytes()].concat();
    assert_eq!(
        got[0],
        (chunk::FLAG_DONE, chunk::OFFSET_HOLE, 1, 8192, hole)
    );
    let (flags, kind, _, _, data) = &got[1];
    assert_eq!((*flags, *kind), (chunk::FLAG_DONE, chunk::OFFSET_DATA));
    assert_eq!(data.len(), 8 + 4096);
    assert!(data[8..].iter().all(|&b| b == 0));
}

#[test]
fn is_zero_sees_one_byte_anywhere() {
    let mut b = vec![0u8; 4096 + 13];
    assert!(is_zero(&b));
    for i in [0, 63, 64, 4095, 4096 + 12] {
        b[i] = 1;
        assert!(!is_zero(&b), "byte {i}");
        b[i] = 0;
    }
}

#[test]
fn data_buffers_come_from_a_registered_pool_while_the_connection_lives() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let mut graph = BlockGraph::new();
    let opts = qapi::parse_blockdev(&format!(
        "driver=file,node-name=f0,aio=io_uring,filename={}",
        img.display()
    ))
    .unwrap();
    let node = graph.add(&opts).unwrap();
    let info = NbdExportInfo {
        node: node.clone(),
        writable: true,
        description: None,
        multi_conn: true,
    };
    let neg = Negotiated {
        structured: true,
        extended: true,
        base_allocation: true,
    };
    let mut conn = NbdConnection::new(info, neg, node.open_queue().unwrap());
    conn.use_registered_buffers(graph.registrar()).unwrap();
    assert_eq!(graph.registrar().regions().len(), 1);
    let mut r = Vec::new();
    request(&mut r, cmd::WRITE, 0, 1, 4096, 4096);
    r.extend_from_slice(&[9; 4096]);
    // In flight together with the WRITE: unordered, so elsewhere.
    request(&mut r, cmd::READ, cflag::DF, 2, 8192, 4096);
    // Larger than a pool buffer: a heap buffer, still served.
    request(&mut r, cmd::READ, cflag::DF, 3, 0, 512 << 10);
    let mut s = Mem {
        input: Cursor::new(r),
        ..Mem::default()
    };
    conn.on_readable(&mut s);
    while conn.in_flight() > 0 {
        crate::sys::wait_readable(conn.completion_fd());
        conn.on_completions();
    }
    conn.on_completions();
    conn.on_writable(&mut s);
    let mut got = chunks(&s.out);
    got.sort_by_key(|c| c.2);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[1].4[8..].iter().all(|&b| b == 7), "READ data");
    assert_eq!(got[2].4.len(), 8 + (512 << 10));
    let st = node.stats().snapshot();
    assert!(
        st.registered_ops >= 2,
        "the pool's buffers were not used as registered memory: {st:?}"
    );
    drop(conn);
    assert!(
        graph.registrar().regions().is_empty(),
        "the pool stayed registered after the connection"
    );
    let data = std::fs::read(&img).unwrap();
    assert!(data[4096..8192].iter().all(|&b| b == 9), "the WRITE");
}
