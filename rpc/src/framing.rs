//! Finding JSON values in a byte stream: both protocols send JSON values
//! back to back with no length prefix, so the server accumulates bytes and
//! takes complete values off the front.
//!
//! A small scanner tracks nesting, strings and escapes as bytes arrive, so
//! each byte is looked at once no matter how the client splits its writes;
//! only a complete value is handed to serde.

use serde_json::Value;

/// Largest single request accepted, in bytes.
pub const REQUEST_BYTES_MAX: usize = 1 << 20;

/// What the front of the buffer holds.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A complete value (removed from the buffer).
    Value(Value),
    /// More bytes are needed.
    Incomplete,
    /// Not JSON; the message says where.
    Syntax(String),
    /// A value larger than [`REQUEST_BYTES_MAX`].
    TooLarge,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Between values.
    #[default]
    Idle,
    /// Inside an object or array (`depth` > 0), maybe inside a string.
    Nested,
    /// A top-level string.
    TopString,
    /// A top-level number or literal, ended by whitespace or a bracket.
    TopToken,
}

/// An accumulating buffer of received bytes.
pub struct Framer {
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned.
    scanned: usize,
    /// Start of the value being scanned.
    start: usize,
    state: Scan,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Bytes looked at by the scanner, ever (each received byte once).
    scanned_total: u64,
    /// Largest value accepted.
    limit: usize,
}

impl Default for Framer {
    fn default() -> Framer {
        Framer::new()
    }
}

impl Framer {
    pub fn new() -> Framer {
        Framer::with_limit(REQUEST_BYTES_MAX)
    }

    /// A framer accepting values up to `limit` bytes.
    pub fn with_limit(limit: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            scanned: 0,
            start: 0,
            state: Scan::Idle,
            depth: 0,
            in_string: false,
            escaped: false,
            scanned_total: 0,
            limit,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes the scanner has examined so far.
    pub fn scanned_total(&self) -> u64 {
        self.scanned_total
    }

    /// Drops everything up to and including the next newline; true if one
    /// was found (QMP's resynchronisation after a syntax error).
    pub fn skip_line(&mut self) -> bool {
        let found = match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.buf.drain(..=i);
                true
            }
            None => {
                self.buf.clear();
                false
            }
        };
        self.reset_scan();
        found
    }

    fn reset_scan(&mut self) {
        self.scanned = 0;
        self.start = 0;
        self.state = Scan::Idle;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
    }

    /// Scans new bytes; returns the end of the first complete value.
    fn scan(&mut self) -> Option<usize> {
        while self.scanned < self.buf.len() {
            let i = self.scanned;
            let b = self.buf[i];
            self.scanned += 1;
            self.scanned_total += 1;
            match self.state {
                Scan::Idle => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' | b'[' => {
                        self.start = i;
                        self.state = Scan::Nested;
                        self.depth = 1;
                    }
                    b'"' => {
                        self.start = i;
                        self.state = Scan::TopString;
                    }
                    _ => {
                        self.start = i;
                        self.state = Scan::TopToken;
                    }
                },
                Scan::Nested if self.in_string => match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                },
                Scan::Nested => match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                },
                Scan::TopString => match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => return Some(i + 1),
                    _ => {}
                },
                Scan::TopToken => {
                    if matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'"' | b'}' | b']' | b',') {
                        // The delimiter belongs to what follows.
                        self.scanned = i;
                        return Some(i);
                    }
                }
            }
        }
        None
    }

    /// Takes the next complete value off the front, if there is one.
    pub fn next_frame(&mut self) -> Frame {
        let Some(end) = self.scan() else {
            if self.state != Scan::Idle && self.buf.len() - self.start > self.limit {
                return Frame::TooLarge;
            }
            if self.state == Scan::Idle {
                // Only whitespace so far: keep the buffer small.
                self.buf.clear();
                self.reset_scan();
            }
            return Frame::Incomplete;
        };
        if end - self.start > self.limit {
            return Frame::TooLarge;
        }
        let parsed = serde_json::from_slice::<Value>(&self.buf[self.start..end]);
        self.buf.drain(..end);
        self.reset_scan();
        match parsed {
            Ok(v) => Frame::Value(v),
            Err(e) => Frame::Syntax(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_back_to_back_and_split() {
        let mut f = Framer::new();
        f.push(b"{\"a\":1}  {\"b\"");
        assert_eq!(f.next_frame(), Frame::Value(json!({"a": 1})));
        assert_eq!(f.next_frame(), Frame::Incomplete);
        f.push(b":2}\n[1,2]");
        assert_eq!(f.next_frame(), Frame::Value(json!({"b": 2})));
        assert_eq!(f.next_frame(), Frame::Value(json!([1, 2])));
        assert_eq!(f.next_frame(), Frame::Incomplete);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn byte_by_byte_with_tricky_strings() {
        let mut f = Framer::new();
        let text = br#"{"jsonrpc":"2.0","method":"x","params":{"s":"a}b\"]{","t":"\\"}}"#;
        for (i, b) in text.iter().enumerate() {
            f.push(&[*b]);
            let frame = f.next_frame();
            if i + 1 < text.len() {
                assert_eq!(frame, Frame::Incomplete, "at byte {i}");
            } else {
                assert_eq!(frame, Frame::Value(serde_json::from_slice(text).unwrap()));
            }
        }
    }

    #[test]
    fn top_level_scalars() {
        let mut f = Framer::new();
        f.push(b"42 \"s\\\"x\"");
        assert_eq!(f.next_frame(), Frame::Value(json!(42)));
        assert_eq!(f.next_frame(), Frame::Value(json!("s\"x")));
        f.push(b"true");
        assert_eq!(f.next_frame(), Frame::Incomplete, "a token ends at a delimiter");
        f.push(b"\n");
        assert_eq!(f.next_frame(), Frame::Value(json!(true)));
    }

    #[test]
    fn syntax_errors_and_size_cap() {
        let mut f = Framer::new();
        f.push(b"{\"a\": }");
        assert!(matches!(f.next_frame(), Frame::Syntax(m) if m.contains("line 1")));
        let mut f = Framer::new();
        f.push(b"{\"a\":\"");
        f.push(&vec![b'x'; REQUEST_BYTES_MAX]);
        assert_eq!(f.next_frame(), Frame::TooLarge);
        // A complete value above the cap arriving at once is refused too.
        let mut f = Framer::new();
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', REQUEST_BYTES_MAX));
        big.extend_from_slice(b"\"}");
        f.push(&big);
        assert_eq!(f.next_frame(), Frame::TooLarge);
        let mut f = Framer::new();
        f.push(b"garbage\n{\"ok\":1}");
        assert!(matches!(f.next_frame(), Frame::Syntax(_)));
        let mut f = Framer::new();
        f.push(b"{\"x\": tru}\n{\"ok\":1}");
        assert!(matches!(f.next_frame(), Frame::Syntax(_)));
        assert_eq!(f.next_frame(), Frame::Value(json!({"ok": 1})));
        let mut f = Framer::new();
        f.push(b"{{{{\n{\"ok\":1}");
        assert_eq!(f.next_frame(), Frame::Incomplete);
        assert!(f.skip_line());
        assert_eq!(f.next_frame(), Frame::Value(json!({"ok": 1})));
    }

    #[test]
    fn a_trickled_request_costs_linear_time() {
        // 256 KiB sent one byte at a time: each byte is scanned once.
        let mut body = b"{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"params\":{\"s\":\"".to_vec();
        body.extend(std::iter::repeat_n(b'y', 256 << 10));
        body.extend_from_slice(b"\"}}");
        let mut f = Framer::new();
        for b in &body[..body.len() - 1] {
            f.push(std::slice::from_ref(b));
            assert_eq!(f.next_frame(), Frame::Incomplete);
        }
        f.push(&body[body.len() - 1..]);
        assert!(matches!(f.next_frame(), Frame::Value(_)));
        assert!(f.scanned_total() <= body.len() as u64 + 1, "scanned {} bytes for {}", f.scanned_total(), body.len());
    }
}
