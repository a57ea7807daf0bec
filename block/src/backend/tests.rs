use super::*;
use crate::BlockGraph;

fn graph(arg: &str) -> (BlockGraph, Arc<dyn BlockNode>) {
    let mut g = BlockGraph::new();
    let n = g.add(&qapi::parse_blockdev(arg).unwrap()).unwrap();
    (g, n)
}

fn run(q: &mut dyn NodeQueue, req: Request) -> Result<u64, RequestError> {
    match q.submit(req) {
        Err(e) => Err(e.error),
        Ok(()) => {
            let mut out = Vec::new();
            q.wait_completions(1, &mut out);
            assert_eq!(out.len(), 1);
            out.pop().unwrap().result
        }
    }
}

fn read(q: &mut dyn NodeQueue, off: u64, buf: &mut [u8]) -> Result<u64, RequestError> {
    let iov = vec![libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` outlives the request, which completes inside `run`.
    run(q, unsafe { Request::read(off, iov) })
}

fn write(q: &mut dyn NodeQueue, off: u64, buf: &[u8]) -> Result<u64, RequestError> {
    let iov = vec![libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` outlives the request, which completes inside `run`.
    run(q, unsafe { Request::write(off, iov, false) })
}

#[test]
fn each_user_counts_its_own_requests_and_the_node_counts_all() {
    let (_g, node) = graph("null-co,node-name=n0,size=1M");
    let a = BlockBackend::new("a", node.clone(), BackendOptions::default());
    let b = BlockBackend::new("b", node.clone(), BackendOptions::default());
    let (mut qa, mut qb) = (a.open_queue().unwrap(), b.open_queue().unwrap());
    let mut buf = [0u8; 4096];

    for _ in 0..3 {
        read(&mut qa, 0, &mut buf).unwrap();
    }
    write(&mut qb, 4096, &buf).unwrap();

    let (sa, sb, sn) = (
        a.stats().snapshot(),
        b.stats().snapshot(),
        node.stats().snapshot(),
    );
    assert_eq!((sa.read.ops, sa.read.bytes, sa.write.ops), (3, 3 * 4096, 0));
    assert_eq!((sb.read.ops, sb.write.ops, sb.write.bytes), (0, 1, 4096));
    assert_eq!((sn.read.ops, sn.write.ops), (3, 1));
}

#[test]
fn the_backend_refuses_what_its_user_may_not_do_and_counts_it() {
    let (_g, node) = graph("null-co,node-name=n0,size=64K");
    let ro = BlockBackend::new(
        "ro",
        node.clone(),
        BackendOptions {
            read_only: true,
            ..BackendOptions::default()
        },
    );
    assert!(ro.read_only() && !node.read_only());
    let mut q = ro.open_queue().unwrap();
    let mut buf = [0u8; 4096];

    assert_eq!(write(&mut q, 0, &buf), Err(RequestError::ReadOnly));
    assert_eq!(
        read(&mut q, 62 * 1024, &mut buf),
        Err(RequestError::OutOfRange {
            offset: 62 * 1024,
            len: 4096,
            capacity: 64 * 1024
        })
    );
    assert_eq!(read(&mut q, 60 * 1024, &mut buf), Ok(4096));
    assert_eq!(run(&mut q, Request::flush()), Ok(0));

    let s = ro.stats().snapshot();
    assert_eq!((s.write.ops, s.write.errors), (1, 1));
    assert_eq!((s.read.ops, s.read.errors), (2, 1));
    assert_eq!(node.stats().snapshot().write.ops, 0, "the node saw none");
}

#[test]
fn a_read_only_node_makes_its_backends_read_only() {
    let (_g, node) = graph("null-co,node-name=n0,size=64K,read-only=on");
    let b = BlockBackend::new("b", node, BackendOptions::default());
    assert!(b.read_only());
    let mut q = b.open_queue().unwrap();
    assert_eq!(
        run(&mut q, Request::discard(0, 4096)),
        Err(RequestError::ReadOnly)
    );
}

#[test]
fn a_checked_request_is_not_checked_again_below() {
    // raw's window is checked by the backend against raw's size; the file
    // node below sees the request marked and the request reaches it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.img");
    std::fs::write(&path, vec![7u8; 128 * 1024]).unwrap();
    let (_g, node) = graph(&format!(
        "raw,node-name=r0,offset=65536,size=65536,file.driver=file,file.filename={}",
        path.display()
    ));
    let b = BlockBackend::new("b", node, BackendOptions::default());
    let mut q = b.open_queue().unwrap();
    let mut buf = [0u8; 4096];
    assert_eq!(read(&mut q, 61440, &mut buf), Ok(4096));
    assert!(buf.iter().all(|&x| x == 7));
    assert!(matches!(
        read(&mut q, 65536, &mut buf),
        Err(RequestError::OutOfRange { .. })
    ));

    // Without a backend, the first node checks, and marks the request.
    let mut req = Request::write_zeroes(0, 4096, false);
    let common = crate::node::NodeCommon::new("x".into(), &qapi::BlockdevCommon::default(), false);
    assert!(!req.checked);
    req = match common.precheck(req, 8192).unwrap() {
        crate::node::Precheck::Forward(r) => r,
        crate::node::Precheck::Done(_) => unreachable!(),
    };
    assert!(req.checked);
    // A smaller node below does not refuse it again.
    assert!(matches!(
        common.precheck(req, 1024),
        Ok(crate::node::Precheck::Forward(_))
    ));
}

#[test]
fn the_policy_applies_to_host_errors_and_stop_needs_a_status() {
    let (_g, node) = graph("null-co,node-name=n0,size=64K");
    let eio = RequestError::Os(libc::EIO);
    let nospc = RequestError::Os(libc::ENOSPC);
    let plain = BlockBackend::new(
        "plain",
        node.clone(),
        BackendOptions {
            werror: ErrorAction::Stop,
            rerror: ErrorAction::Ignore,
            ..BackendOptions::default()
        },
    );
    assert_eq!(
        plain.error_outcome(RequestOp::Write, &eio),
        ErrorOutcome::Report,
        "stop without a status reports"
    );
    assert_eq!(
        plain.error_outcome(RequestOp::Read, &eio),
        ErrorOutcome::Ignore
    );
    assert_eq!(
        plain.error_outcome(RequestOp::Read, &RequestError::ReadOnly),
        ErrorOutcome::Report,
        "what the user got wrong is always reported"
    );

    let status = Arc::new(IoStatus::default());
    let stopping = BlockBackend::new(
        "stopping",
        node,
        BackendOptions {
            werror: ErrorAction::Enospc,
            io_status: Some(status.clone()),
            ..BackendOptions::default()
        },
    );
    assert_eq!(
        stopping.error_outcome(RequestOp::Write, &eio),
        ErrorOutcome::Report
    );
    assert!(!status.is_stopped());
    assert_eq!(
        stopping.error_outcome(RequestOp::Write, &nospc),
        ErrorOutcome::Stop
    );
    assert!(status.is_stopped());
    assert_eq!(status.io_status(), "nospace");
}
