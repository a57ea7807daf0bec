//! Fuzzes the vhost-user-blk export's handling of a frontend's messages:
//! the input becomes a stream of vhost-user requests (header, payload and,
//! for any request, up to three fds: eventfds, memfds of 1 MiB or 4 KiB,
//! or a pipe), written on one end of a socketpair; the export serves the
//! other end (`VhostUserBlkExport::serve_connection`, the same session
//! code as a frontend that connected to its socket) until the stream ends.
//! Vrings that the messages start run on an IOThread against a null-co
//! node.
//!
//! No input may panic, hang or touch memory out of bounds. Replies must
//! be whole vhost-user replies, in order, one for each request that needs
//! one (GET_* always; the others when they ask with NEED_REPLY and
//! REPLY_ACK is on): a request that needs a reply either gets one or ends
//! the connection, never leaves the frontend waiting while the session
//! goes on.
//!
//! Record format, repeated: code (mod 48), flags (the low nibble xor 1,
//! so 0 is a valid version-1 request; a reserved bit when the high nibble
//! is all ones), fds (bits 0-1 the count, then 2 bits per fd: 0
//! eventfd, 1 memfd 1 MiB, 2 memfd 4 KiB, 3 pipe), payload length (u16
//! LE, mod 4101), payload.

#![no_main]

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use block::BlockGraph;
use devices::iothread::{IoThread, IoThreadConfig};
use devices::vhost_user_blk::{VhostUserBlkExport, VhostUserBlkExportConfig};
use devices::virtio_blk::BlkOptions;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR: usize = 12;
/// Largest payload the `vhost` crate takes (its MAX_MSG_SIZE).
const MAX_PAYLOAD: usize = 0x1000;
const MAX_MESSAGES: usize = 64;
const MEMFD_BIG: u64 = 1 << 20;
const MEMFD_SMALL: u64 = 4096;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Request codes the harness reasons about.
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_LOG_BASE: u32 = 6;
    pub const GET_VRING_BASE: u32 = 11;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const GET_CONFIG: u32 = 24;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const GET_SHARED_OBJECT: u32 = 41;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
    pub const CHECK_DEVICE_STATE: u32 = 43;
    pub const GET_SHMEM_CONFIG: u32 = 44;
}

/// Requests answered whatever the flags say.
const ALWAYS_ANSWERED: &[u32] = &[
    req::GET_FEATURES,
    req::SET_LOG_BASE,
    req::GET_VRING_BASE,
    req::GET_PROTOCOL_FEATURES,
    req::GET_QUEUE_NUM,
    req::GET_CONFIG,
    req::GET_INFLIGHT_FD,
    req::GET_MAX_MEM_SLOTS,
    req::GET_SHARED_OBJECT,
    req::SET_DEVICE_STATE_FD,
    req::CHECK_DEVICE_STATE,
    req::GET_SHMEM_CONFIG,
];

/// Requests acked (REPLY_ACK) when they ask with NEED_REPLY: SET_OWNER,
/// RESET_OWNER, SET_FEATURES, SET_MEM_TABLE, SET_VRING_*,
/// SET_PROTOCOL_FEATURES, SET_VRING_ENABLE, SET_BACKEND_REQ_FD,
/// SET_CONFIG, SET_INFLIGHT_FD, GPU_SET_SOCKET, RESET_DEVICE,
/// ADD_MEM_REG, REM_MEM_REG.
const ACKED: &[u32] = &[
    2, 3, 4, 5, 8, 9, 10, 12, 13, 14, 16, 18, 21, 25, 32, 33, 34, 37, 38,
];

/// Requests whose reply is one u64.
const FIXED_U64: &[u32] = &[
    req::GET_FEATURES,
    req::GET_PROTOCOL_FEATURES,
    req::GET_QUEUE_NUM,
    req::GET_MAX_MEM_SLOTS,
    req::SET_DEVICE_STATE_FD,
    req::CHECK_DEVICE_STATE,
];

/// REPLY_ACK in the protocol features.
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

struct Rig {
    export: VhostUserBlkExport,
    _graph: BlockGraph,
}

fn rig() -> &'static Mutex<Rig> {
    static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        let mut graph = BlockGraph::new();
        let opts = qapi::parse_blockdev("null-co,node-name=n0,size=1M,read-zeroes=on").unwrap();
        let node = graph.add(&opts).unwrap();
        let iothread = IoThread::new(
            "fuzz-io",
            IoThreadConfig {
                poll_max_ns: 0,
                ..IoThreadConfig::default()
            },
        )
        .unwrap();
        let path = std::env::temp_dir().join(format!("blkvm-fuzz-vu-{}.sock", std::process::id()));
        let export = VhostUserBlkExport::start(VhostUserBlkExportConfig {
            id: "fuzz".into(),
            node,
            opts: BlkOptions {
                num_queues: 2,
                queue_size: 64,
                ..BlkOptions::default()
            },
            registrar: graph.registrar().clone(),
            iothread: Some(iothread),
            path: path.display().to_string(),
            writethrough: false,
            io_error: None,
        })
        .unwrap();
        // Frontends come through serve_connection: nobody needs the path,
        // and the export is never dropped to remove it.
        let _ = std::fs::remove_file(&path);
        Mutex::new(Rig {
            export,
            _graph: graph,
        })
    })
}

/// One request as the input describes it.
struct Msg<'a> {
    code: u32,
    flags: u32,
    fds: u8,
    payload: &'a [u8],
}

/// Header flags from a byte: the version, REPLY and NEED_REPLY bits
/// (the low nibble xor 1, so 0 is a valid request), and a reserved bit when the high
/// nibble is all ones.
fn flags(b: u8) -> u32 {
    let reserved = if b & 0xf0 == 0xf0 { 0x10 } else { 0 };
    (u32::from(b & 0x0f) ^ FLAG_VERSION) | reserved
}

fn parse(mut data: &[u8]) -> Vec<Msg<'_>> {
    let mut out = Vec::new();
    while data.len() >= 5 && out.len() < MAX_MESSAGES {
        let len = usize::from(u16::from_le_bytes([data[3], data[4]])) % (MAX_PAYLOAD + 5);
        let rest = &data[5..];
        let payload = &rest[..len.min(rest.len())];
        out.push(Msg {
            code: u32::from(data[0] % 48),
            flags: flags(data[1]),
            fds: data[2],
            payload,
        });
        data = &rest[payload.len()..];
    }
    out
}

fn memfd(len: u64) -> OwnedFd {
    // SAFETY: a NUL-terminated name; memfd_create returns a new fd or -1
    // and touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"blkvm-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file.into()
}

fn make_fd(kind: u8) -> OwnedFd {
    match kind & 3 {
        0 => {
            // SAFETY: eventfd returns a new fd or -1 and touches no memory.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` was just created and nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
        1 => memfd(MEMFD_BIG),
        2 => memfd(MEMFD_SMALL),
        _ => {
            let (r, _w) = std::io::pipe().unwrap();
            r.into()
        }
    }
}

/// Sends `m` with its fds; false if the socket did not take all of it.
fn send(sock: &UnixStream, m: &Msg<'_>) -> bool {
    let nfds = usize::from(m.fds & 3);
    let fds: Vec<OwnedFd> = (0..nfds).map(|i| make_fd(m.fds >> (2 + 2 * i))).collect();
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut bytes = Vec::with_capacity(HDR + m.payload.len());
    bytes.extend(m.code.to_le_bytes());
    bytes.extend(m.flags.to_le_bytes());
    bytes.extend((m.payload.len() as u32).to_le_bytes());
    bytes.extend(m.payload);
    // The fds stay open until the kernel has taken its references.
    matches!(sock.send_with_fds(&[&bytes[..]], &raw), Ok(n) if n == bytes.len())
}

/// One reply's header.
#[derive(Debug)]
struct Reply {
    code: u32,
    size: u32,
}

fn read_replies(mut sock: &UnixStream) -> Vec<Reply> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            // The export closed its end with our requests unread.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading replies: {e}"),
        }
    }
    let mut out = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        assert!(rest.len() >= HDR, "a partial reply header: {rest:?}");
        let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap());
        let (code, flags, size) = (word(0), word(4), word(8));
        assert_eq!(
            flags,
            FLAG_REPLY | FLAG_VERSION,
            "reply flags of request {code}"
        );
        assert!(size as usize <= MAX_PAYLOAD, "reply of {size} bytes");
        assert!(rest.len() >= HDR + size as usize, "a partial reply payload");
        out.push(Reply { code, size });
        rest = &rest[HDR + size as usize..];
    }
    out
}

/// The value of a well-formed SET_PROTOCOL_FEATURES.
fn protocol_features(m: &Msg<'_>) -> Option<u64> {
    let ok = m.code == req::SET_PROTOCOL_FEATURES
        && m.flags & !FLAG_NEED_REPLY == FLAG_VERSION
        && m.fds & 3 == 0
        && m.payload.len() == 8;
    ok.then(|| u64::from_le_bytes(m.payload.try_into().unwrap()))
}

/// Checks that every request that needed a reply got one, unless the
/// session ended there.
fn check_replies(sent: &[Msg<'_>], replies: &[Reply]) {
    let mut next = replies.iter().peekable();
    let mut got_features = false;
    let mut acked_protocol = 0u64;
    for (i, m) in sent.iter().enumerate() {
        if let Some(f) = protocol_features(m) {
            acked_protocol = f;
        }
        let reply_ack = got_features && acked_protocol & PROTOCOL_F_REPLY_ACK != 0;
        let needs = ALWAYS_ANSWERED.contains(&m.code)
            || (reply_ack && m.flags & FLAG_NEED_REPLY != 0 && ACKED.contains(&m.code));
        if !needs {
            continue;
        }
        match next.peek() {
            Some(&r) if r.code == m.code => {
                next.next();
                if !ALWAYS_ANSWERED.contains(&m.code) || FIXED_U64.contains(&m.code) {
                    assert_eq!(r.size, 8, "a u64 reply to request {i} ({})", m.code);
                }
                if m.code == req::GET_FEATURES {
                    got_features = true;
                }
            }
            other => {
                assert!(
                    other.is_none(),
                    "request {i} (code {}, flags {:#x}, {} bytes) got no reply but the \
                     session went on: {replies:?}",
                    m.code,
                    m.flags,
                    m.payload.len()
                );
                return;
            }
        }
    }
    let extra: Vec<_> = next.collect();
    assert!(extra.is_empty(), "replies nobody asked for: {extra:?}");
}

fuzz_target!(|data: &[u8]| {
    let msgs = parse(data);
    let rig = rig().lock().unwrap_or_else(|p| p.into_inner());
    let (frontend, backend) = UnixStream::pair().unwrap();
    frontend.set_nonblocking(true).unwrap();
    let mut sent = 0;
    for m in &msgs {
        if !send(&frontend, m) {
            break;
        }
        sent += 1;
    }
    frontend.set_nonblocking(false).unwrap();
    frontend.shutdown(std::net::Shutdown::Write).unwrap();
    rig.export
        .serve_connection(backend)
        .expect("no other frontend is connected");
    assert!(!rig.export.connected());
    let replies = read_replies(&frontend);
    check_replies(&msgs[..sent], &replies);
});
