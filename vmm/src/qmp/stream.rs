//! Splits the bytes a QMP client sends into messages, the way QEMU's JSON
//! streamer does: a message is a top-level `{...}` (or `[...]`) with
//! brackets balanced outside strings, so messages may span lines or share
//! one. Anything else at the top level is a message of its own (it will
//! fail to parse and be answered with an error). A message longer than the
//! limit, or nested too deeply, is dropped as it streams in, so a hostile
//! client cannot make the daemon buffer without bound.

/// What the splitter produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// One complete message's text.
    Message(Vec<u8>),
    /// A message that went over a limit; its bytes were discarded.
    TooLarge,
    /// A message nested deeper than the limit; its bytes were discarded.
    TooDeep,
}

/// Incremental message splitter.
pub struct Splitter {
    max_len: usize,
    max_depth: usize,
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A top-level token that is not an object (`foo`, `42`).
    bare: bool,
    /// The current message went over a limit: skip to its end.
    skipping: Option<Piece>,
}

impl Splitter {
    /// A splitter that refuses messages over `max_len` bytes or nested
    /// deeper than `max_depth`.
    pub fn new(max_len: usize, max_depth: usize) -> Self {
        Splitter {
            max_len,
            max_depth,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            bare: false,
            skipping: None,
        }
    }

    /// Feeds `input`, appending every piece it completes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Piece>) {
        for &b in input {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Piece>) {
        if self.depth == 0 && !self.bare {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => return,
                b'{' | b'[' => {}
                b'"' => {
                    // A top-level string is one token, spaces and all.
                    self.bare = true;
                    self.in_string = true;
                    self.push(b);
                    return;
                }
                _ => self.bare = true,
            }
        }
        if self.bare && self.in_string {
            self.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                self.bare = false;
                self.finish(out);
            }
            return;
        }
        if self.bare {
            // A bare token ends at whitespace or where an object starts.
            if matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[') {
                self.bare = false;
                self.finish(out);
                if matches!(b, b'{' | b'[') {
                    self.byte(b, out);
                }
                return;
            }
            self.push(b);
            return;
        }
        self.push(b);
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > self.max_depth && self.skipping.is_none() {
                    self.skipping = Some(Piece::TooDeep);
                    self.buf = Vec::new();
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.finish(out);
                }
            }
            _ => {}
        }
    }

    fn push(&mut self, b: u8) {
        if self.skipping.is_some() {
            return;
        }
        if self.buf.len() >= self.max_len {
            self.skipping = Some(Piece::TooLarge);
            self.buf = Vec::new();
            return;
        }
        self.buf.push(b);
    }

    fn finish(&mut self, out: &mut Vec<Piece>) {
        match self.skipping.take() {
            Some(p) => out.push(p),
            None => out.push(Piece::Message(std::mem::take(&mut self.buf))),
        }
        self.in_string = false;
        self.escaped = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str, max: usize) -> Vec<Piece> {
        let mut sp = Splitter::new(max, 8);
        let mut out = Vec::new();
        // One byte at a time, as a slow socket would deliver it.
        for b in s.as_bytes() {
            sp.feed(&[*b], &mut out);
        }
        out
    }

    fn msg(s: &str) -> Piece {
        Piece::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn messages_span_lines_and_share_them() {
        let out = split(
            "{\"execute\":\n \"a\"}{\"execute\": \"b}{\"}\n\n  {\"x\": [1, {\"y\": \"\\\"}\"}]}",
            1000,
        );
        assert_eq!(
            out,
            vec![
                msg("{\"execute\":\n \"a\"}"),
                msg("{\"execute\": \"b}{\"}"),
                msg("{\"x\": [1, {\"y\": \"\\\"}\"}]}"),
            ]
        );
    }

    #[test]
    fn bare_tokens_are_messages_of_their_own() {
        let out = split("foo 42{\"a\":1} \"a \\\" b\" x", 1000);
        assert_eq!(
            out,
            vec![msg("foo"), msg("42"), msg("{\"a\":1}"), msg("\"a \\\" b\""),]
        );
    }

    #[test]
    fn oversized_and_deep_messages_are_dropped_and_the_next_one_served() {
        let big = format!("{{\"a\": \"{}\"}}", "x".repeat(100));
        let out = split(&format!("{big}{{\"b\":1}}"), 50);
        assert_eq!(out, vec![Piece::TooLarge, msg("{\"b\":1}")]);
        let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
        let out = split(&format!("{deep} {{\"c\":2}}"), 1000);
        assert_eq!(out, vec![Piece::TooDeep, msg("{\"c\":2}")]);
    }
}
