//! The export against a frontend that writes vhost-user messages by hand,
//! over a socketpair served by `serve_connection`: the requests the
//! `vhost` crate's own frontend never sends. What the fuzz target
//! (fuzz/fuzz_targets/vhost_user_messages.rs) found is kept here, its
//! input minimized.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use block::BlockGraph;
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserVirtioFeatures;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{VhostUserBlkExport, VhostUserBlkExportConfig};
use crate::virtio_blk::BlkOptions;

const VERSION_1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

struct Rig {
    export: VhostUserBlkExport,
    _graph: BlockGraph,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut graph = BlockGraph::new();
    let opts = qapi::parse_blockdev("null-co,node-name=n0,size=1M").unwrap();
    let node = graph.add(&opts).unwrap();
    let export = VhostUserBlkExport::start(VhostUserBlkExportConfig {
        id: "e0".into(),
        node,
        opts: BlkOptions::default(),
        registrar: graph.registrar().clone(),
        iothread: None,
        path: dir.path().join("vu.sock").display().to_string(),
        writethrough: false,
        io_error: None,
    })
    .unwrap();
    Rig {
        export,
        _graph: graph,
        _dir: dir,
    }
}

/// One request: header and payload.
fn msg(code: FrontendReq, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend((code as u32).to_le_bytes());
    m.extend(flags.to_le_bytes());
    m.extend((payload.len() as u32).to_le_bytes());
    m.extend(payload);
    m
}

/// Writes `requests` (each with its fd), then serves them to the end of
/// the stream and returns the codes and payloads of the replies.
fn exchange(rig: &Rig, requests: &[(Vec<u8>, Option<&File>)]) -> Vec<(u32, Vec<u8>)> {
    let (frontend, backend) = UnixStream::pair().unwrap();
    for (m, file) in requests {
        let fds: Vec<i32> = file.iter().map(|f| f.as_raw_fd()).collect();
        let n = frontend.send_with_fds(&[&m[..]], &fds).unwrap();
        assert_eq!(n, m.len());
    }
    frontend.shutdown(std::net::Shutdown::Write).unwrap();
    rig.export.serve_connection(backend).unwrap();
    read_replies(frontend)
}

fn read_replies(mut frontend: UnixStream) -> Vec<(u32, Vec<u8>)> {
    frontend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut bytes = Vec::new();
    match frontend.read_to_end(&mut bytes) {
        // The export closed its end with requests left unread.
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading replies: {e}"),
    }
    let mut out = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap());
        let (code, size) = (word(0), word(8) as usize);
        out.push((code, rest[12..12 + size].to_vec()));
        rest = &rest[12 + size..];
    }
    out
}

fn u64_payload(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// GET_FEATURES, then SET_PROTOCOL_FEATURES with `protocol`.
fn negotiate<'a>(protocol: u64) -> Vec<(Vec<u8>, Option<&'a File>)> {
    vec![
        (msg(FrontendReq::GET_FEATURES, VERSION_1, &[]), None),
        (
            msg(
                FrontendReq::SET_PROTOCOL_FEATURES,
                VERSION_1,
                &u64_payload(protocol),
            ),
            None,
        ),
    ]
}

#[test]
fn a_request_rejected_before_it_reaches_the_session_ends_the_connection() {
    // Found by the fuzz target: SET_LOG_BASE without LOG_SHMFD is refused
    // by the vhost crate before any answer, so the frontend, which waits
    // for one, would hang while the session served the next request.
    let rig = rig();
    let replies = exchange(
        &rig,
        &[
            (msg(FrontendReq::SET_LOG_BASE, VERSION_1, &[0]), None),
            (msg(FrontendReq::GET_FEATURES, VERSION_1, &[]), None),
        ],
    );
    assert_eq!(replies, vec![], "the connection ended at SET_LOG_BASE");
    assert!(!rig.export.connected());
}

#[test]
fn a_refused_request_of_an_unoffered_feature_ends_the_connection() {
    // The crate keeps whatever protocol features the frontend acked, so a
    // request of one that was never offered reaches the session; the
    // crate sends no reply when the session refuses it.
    let rig = rig();
    let devnull = File::open("/dev/null").unwrap();
    let protocol = VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::SHMEM;
    for last in [
        (
            msg(FrontendReq::SET_LOG_BASE, VERSION_1, &[0; 16]),
            Some(&devnull),
        ),
        (msg(FrontendReq::GET_SHMEM_CONFIG, VERSION_1, &[]), None),
    ] {
        let mut requests: Vec<(Vec<u8>, Option<&File>)> = negotiate(protocol.bits());
        requests.push(last);
        requests.push((msg(FrontendReq::GET_QUEUE_NUM, VERSION_1, &[]), None));
        let replies = exchange(&rig, &requests);
        let codes: Vec<u32> = replies.iter().map(|r| r.0).collect();
        assert_eq!(codes, vec![FrontendReq::GET_FEATURES as u32]);
    }
}

#[test]
fn a_request_the_session_refuses_is_acked_and_the_session_goes_on() {
    let rig = rig();
    let mut requests =
        negotiate((VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ).bits());
    // Not offered: refused by the session, which answers and goes on.
    let features = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | (1 << 63);
    requests.push((
        msg(
            FrontendReq::SET_FEATURES,
            VERSION_1 | NEED_REPLY,
            &u64_payload(features),
        ),
        None,
    ));
    // A vring size that is not a power of two, and one that is.
    let mut state = 0u32.to_le_bytes().to_vec();
    state.extend(3u32.to_le_bytes());
    requests.push((
        msg(FrontendReq::SET_VRING_NUM, VERSION_1 | NEED_REPLY, &state),
        None,
    ));
    state[4..].copy_from_slice(&16u32.to_le_bytes());
    requests.push((
        msg(FrontendReq::SET_VRING_NUM, VERSION_1 | NEED_REPLY, &state),
        None,
    ));
    requests.push((msg(FrontendReq::GET_QUEUE_NUM, VERSION_1, &[]), None));
    let replies = exchange(&rig, &requests);
    let failed = u64_payload(1);
    let ok = u64_payload(0);
    assert_eq!(
        replies,
        vec![
            (FrontendReq::GET_FEATURES as u32, replies[0].1.clone()),
            (FrontendReq::SET_FEATURES as u32, failed.clone()),
            (FrontendReq::SET_VRING_NUM as u32, failed),
            (FrontendReq::SET_VRING_NUM as u32, ok),
            (FrontendReq::GET_QUEUE_NUM as u32, u64_payload(1)),
        ]
    );
}

/// A VhostUserMemoryRegion: guest address, size, frontend address, offset.
fn region(size: u64) -> Vec<u8> {
    let mut r = Vec::new();
    for v in [0, size, 0x7f00_0000_0000, 0] {
        r.extend(u64_payload(v));
    }
    r
}

#[test]
fn a_memory_region_beyond_the_end_of_its_file_is_refused() {
    // Found by the fuzz target: a 1 MiB memfd sent as a region of
    // 256 GiB was mapped, and SET_VRING_ENABLE's check of the used ring
    // past the end of the file killed the daemon with SIGBUS.
    let rig = rig();
    let file = tempfile::tempfile().unwrap();
    file.set_len(64 << 10).unwrap();
    let mut requests = negotiate(
        (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
            .bits(),
    );
    let mut table = u64_payload(1); // one region, no padding
    table.extend(region(1 << 20));
    requests.push((
        msg(FrontendReq::SET_MEM_TABLE, VERSION_1 | NEED_REPLY, &table),
        Some(&file),
    ));
    let mut single = u64_payload(0); // padding
    single.extend(region(1 << 20));
    requests.push((
        msg(FrontendReq::ADD_MEM_REG, VERSION_1 | NEED_REPLY, &single),
        Some(&file),
    ));
    // The file's own size is a region that fits.
    let mut fits = u64_payload(0);
    fits.extend(region(64 << 10));
    requests.push((
        msg(FrontendReq::ADD_MEM_REG, VERSION_1 | NEED_REPLY, &fits),
        Some(&file),
    ));
    let replies = exchange(&rig, &requests);
    let acks: Vec<(u32, Vec<u8>)> = replies[1..].to_vec();
    assert_eq!(
        acks,
        vec![
            (FrontendReq::SET_MEM_TABLE as u32, u64_payload(1)),
            (FrontendReq::ADD_MEM_REG as u32, u64_payload(1)),
            (FrontendReq::ADD_MEM_REG as u32, u64_payload(0)),
        ]
    );
}
