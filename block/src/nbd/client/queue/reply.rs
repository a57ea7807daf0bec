//! The reply side of a queue: parses simple replies and structured
//! chunks from the receive buffer (or reads READ data straight into the
//! caller's buffers) and finishes requests. Everything a server says is
//! checked before it is used: a cookie not in flight, data or a hole
//! outside the request, an unknown chunk or an oversized one is an error
//! that ends the connection.

use std::io::{self, Read};

use super::*;

/// Where the reply parser is.
#[derive(Clone, Copy)]
pub(super) enum Rx {
    Header,
    /// OFFSET_DATA: its 8-byte offset comes next.
    Offset {
        slot: u32,
        flags: u16,
        len: u32,
    },
    /// READ data into the request's buffers.
    Data {
        slot: u32,
        pos: usize,
        left: usize,
        done: bool,
    },
    /// A chunk whose whole payload is parsed at once.
    Small {
        slot: u32,
        flags: u16,
        kind: u16,
        len: usize,
    },
}

impl NbdQueue {
    /// Looks up a reply's cookie.
    pub(super) fn slot_for(&self, cookie: u64) -> Result<u32, String> {
        let i = cookie as usize;
        if cookie < self.slots.len() as u64 && self.slots[i].is_some() {
            Ok(i as u32)
        } else {
            Err(format!("reply for cookie {cookie}, which is not in flight"))
        }
    }

    /// A request's last reply came.
    pub(super) fn finish(&mut self, i: u32, out: &mut Vec<Completion>) {
        let s = self.slot_mut(i);
        if s.error == 0 && s.then_flush && s.cmd == cmd::WRITE {
            s.cmd = cmd::FLUSH;
            s.flags = 0;
            self.send(i);
            return;
        }
        let s = self.release(i);
        let result = if s.error != 0 {
            Err(RequestError::Os(errno(s.error)))
        } else if s.req.op() == RequestOp::Flush {
            Ok(0)
        } else {
            Ok(s.req.len())
        };
        out.push(Completion {
            request: s.req,
            result,
        });
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.in_start += n;
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
    }

    /// Parses the replies in the receive buffer.
    pub(super) fn parse(&mut self, out: &mut Vec<Completion>) -> Result<(), String> {
        loop {
            let avail = self.in_end - self.in_start;
            let b = &self.inbuf[self.in_start..self.in_end];
            match self.rx {
                Rx::Header => {
                    if avail < 4 {
                        return Ok(());
                    }
                    match be32(b) {
                        SIMPLE_REPLY_MAGIC => {
                            if avail < 16 {
                                return Ok(());
                            }
                            let error = be32(&b[4..]);
                            let i = self.slot_for(be64(&b[8..]))?;
                            self.consume(16);
                            let structured = self.shared.info.structured;
                            let s = self.slot_mut(i);
                            if error != 0 {
                                s.error = error;
                                self.finish(i, out);
                            } else if s.cmd == cmd::READ {
                                if structured {
                                    return Err("a simple reply with data to a READ after \
                                                structured replies were negotiated"
                                        .into());
                                }
                                let left = s.req.len() as usize;
                                self.rx = Rx::Data {
                                    slot: i,
                                    pos: 0,
                                    left,
                                    done: true,
                                };
                            } else {
                                self.finish(i, out);
                            }
                        }
                        STRUCTURED_REPLY_MAGIC => {
                            if avail < 20 {
                                return Ok(());
                            }
                            let flags = be16(&b[4..]);
                            let kind = be16(&b[6..]);
                            let cookie = be64(&b[8..]);
                            let len = be32(&b[16..]);
                            let i = self.slot_for(cookie)?;
                            self.consume(20);
                            let is_read = self.slot(i).cmd == cmd::READ;
                            match kind {
                                chunk::OFFSET_DATA if is_read && len > 8 => {
                                    self.rx = Rx::Offset {
                                        slot: i,
                                        flags,
                                        len,
                                    };
                                }
                                chunk::NONE if len == 0 && flags & chunk::FLAG_DONE != 0 => {
                                    self.finish(i, out);
                                }
                                CHUNK_OFFSET_HOLE if is_read && len == 12 => {
                                    self.rx = Rx::Small {
                                        slot: i,
                                        flags,
                                        kind,
                                        len: 12,
                                    };
                                }
                                k if k & (1 << 15) != 0
                                    && (6..=SMALL_MAX as u32).contains(&len) =>
                                {
                                    self.rx = Rx::Small {
                                        slot: i,
                                        flags,
                                        kind,
                                        len: len as usize,
                                    };
                                }
                                k => {
                                    return Err(format!(
                                        "reply chunk of type {k} with {len} bytes \
                                         to command {}",
                                        self.slot(i).cmd
                                    ))
                                }
                            }
                        }
                        m => return Err(format!("bad reply magic {m:#x}")),
                    }
                }
                Rx::Offset { slot, flags, len } => {
                    if avail < 8 {
                        return Ok(());
                    }
                    let off = be64(b);
                    self.consume(8);
                    let req = &self.slot(slot).req;
                    let data = u64::from(len - 8);
                    let inside = off >= req.offset()
                        && off
                            .checked_add(data)
                            .is_some_and(|end| end <= req.offset() + req.len());
                    if !inside {
                        return Err(format!(
                            "READ data at {off} (+{data}) outside the request at {} (+{})",
                            req.offset(),
                            req.len()
                        ));
                    }
                    self.rx = Rx::Data {
                        slot,
                        pos: (off - req.offset()) as usize,
                        left: data as usize,
                        done: flags & chunk::FLAG_DONE != 0,
                    };
                }
                Rx::Data {
                    slot,
                    pos,
                    left,
                    done,
                } => {
                    if avail == 0 {
                        return Ok(());
                    }
                    let n = avail.min(left);
                    sys::copy_to_iovecs(self.slot(slot).req.iovecs(), pos, &b[..n]);
                    self.consume(n);
                    self.data_progress(slot, pos + n, left - n, done, out);
                }
                Rx::Small {
                    slot,
                    flags,
                    kind,
                    len,
                } => {
                    if avail < len {
                        if self.in_start + len > self.inbuf.len() {
                            self.inbuf.copy_within(self.in_start..self.in_end, 0);
                            self.in_end -= self.in_start;
                            self.in_start = 0;
                        }
                        return Ok(());
                    }
                    let p = &b[..len];
                    if kind == CHUNK_OFFSET_HOLE {
                        let (off, hlen) = (be64(p), u64::from(be32(&p[8..])));
                        let req = &self.slot(slot).req;
                        let inside = off >= req.offset()
                            && off
                                .checked_add(hlen)
                                .is_some_and(|end| end <= req.offset() + req.len());
                        if !inside || hlen == 0 {
                            return Err(format!(
                                "hole at {off} (+{hlen}) outside the request at {} (+{})",
                                req.offset(),
                                req.len()
                            ));
                        }
                        zero_range(req.iovecs(), (off - req.offset()) as usize, hlen as usize);
                    } else {
                        let e = be32(p);
                        let msg_len = usize::from(be16(&p[4..]));
                        let min = if kind == CHUNK_ERROR_OFFSET { 14 } else { 6 };
                        if min + msg_len > len {
                            return Err(format!(
                                "error chunk of {len} bytes with a {msg_len}-byte message"
                            ));
                        }
                        let s = self.slot_mut(slot);
                        if s.error == 0 {
                            s.error = if e == 0 { err::EIO } else { e };
                        }
                    }
                    self.consume(len);
                    self.rx = Rx::Header;
                    if flags & chunk::FLAG_DONE != 0 {
                        self.finish(slot, out);
                    }
                }
            }
        }
    }

    pub(super) fn data_progress(
        &mut self,
        slot: u32,
        pos: usize,
        left: usize,
        done: bool,
        out: &mut Vec<Completion>,
    ) {
        if left > 0 {
            self.rx = Rx::Data {
                slot,
                pos,
                left,
                done,
            };
            return;
        }
        self.rx = Rx::Header;
        if done {
            self.finish(slot, out);
        }
    }

    /// Reads and parses what the socket has.
    pub(super) fn receive(&mut self, out: &mut Vec<Completion>) -> Result<(), String> {
        let Link::Up(t) = &self.link else {
            return Ok(());
        };
        let direct = t.is_plain();
        loop {
            self.parse(out)?;
            if let Rx::Data {
                slot,
                pos,
                left,
                done,
            } = self.rx
            {
                if direct && left >= DIRECT_MIN && self.in_start == self.in_end {
                    let mut iov = std::mem::take(&mut self.iov.0);
                    iov.clear();
                    sub_iovecs(self.slot(slot).req.iovecs(), pos, left, &mut iov);
                    self.iov.0 = iov;
                    let Link::Up(t) = &mut self.link else {
                        return Ok(());
                    };
                    // The iovecs lie within the request's buffers, valid
                    // for writes until its completion.
                    match t.readv(&self.iov.0) {
                        Ok(0) => return Err("the server closed the connection".into()),
                        Ok(n) => {
                            self.data_progress(slot, pos + n, left - n, done, out);
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(format!("receive: {e}")),
                    }
                }
            }
            if self.in_end == self.inbuf.len() {
                if self.in_start == 0 {
                    // Nothing waits for more than SMALL_MAX bytes: never.
                    return Err("receive buffer full".into());
                }
                // A header or chunk cut at the end of the buffer: move
                // what is left of it to the front.
                self.inbuf.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            let Link::Up(sock) = &mut self.link else {
                return Ok(());
            };
            match sock.read(&mut self.inbuf[self.in_end..]) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => self.in_end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
    }
}
