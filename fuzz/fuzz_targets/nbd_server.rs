//! The NBD server's parsing of untrusted client bytes: the handshake
//! (first part of the input, through an in-memory stream) and the
//! transmission phase (the rest, fed to a connection over a null-co node
//! in arbitrary splits), in the mode the handshake settled or, by the
//! first byte's bits, with extended headers (32-byte requests, 64-bit
//! lengths, PAYLOAD_LEN payloads) and `base:allocation` forced on.
//! Nothing may panic; every reply must be well formed enough to have
//! been written.

#![no_main]

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};

use block::nbd::server::{handshake, Handshake, NbdConnection, NbdExportInfo};
use block::BlockGraph;
use libfuzzer_sys::fuzz_target;

/// An in-memory socket: reads from the input, swallows writes.
struct Mem<'a> {
    input: Cursor<&'a [u8]>,
    out: usize,
}

impl Read for Mem<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(b)?;
        if n == 0 && !b.is_empty() {
            // Like a non-blocking socket with nothing more.
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.out += b.len();
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = usize::from(data[0]) * 4 % data.len();
    let (hs, rest) = data[1..].split_at(split.min(data.len() - 1));
    let mut graph = BlockGraph::new();
    let node = graph
        .add(&qapi::parse_blockdev("driver=null-co,node-name=n0,size=1048576").unwrap())
        .unwrap();
    let info = NbdExportInfo {
        node: node.clone(),
        writable: data[0] & 1 == 1,
        description: Some("fuzz".into()),
        multi_conn: true,
    };
    let exports: HashMap<String, NbdExportInfo> = [("n0".to_string(), info.clone())].into();
    let mut s = Mem {
        input: Cursor::new(hs),
        out: 0,
    };
    let mut neg = match handshake(&mut s, &exports, None) {
        Ok(Handshake::Export(session)) => session.neg,
        _ => Default::default(),
    };
    if data[0] & 2 != 0 {
        neg.extended = true;
        neg.structured = true;
    }
    if data[0] & 4 != 0 {
        neg.base_allocation = true;
    }
    let mut conn = NbdConnection::new(info, neg, node.open_queue().unwrap());
    // Arbitrary splits of the stream.
    for chunk in rest.chunks(usize::from(data[0]).max(1)) {
        let mut m = Mem {
            input: Cursor::new(chunk),
            out: 0,
        };
        conn.on_readable(&mut m);
        conn.on_completions();
        conn.on_writable(&mut m);
        conn.resume(&mut m);
        if conn.is_closed() {
            break;
        }
    }
});
