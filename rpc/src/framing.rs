//! Finding JSON values in a byte stream: both protocols send JSON values
//! back to back with no length prefix, so the server accumulates bytes and
//! takes complete values off the front.

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
    /// A value larger than [`REQUEST_BYTES_MAX`] is still incomplete.
    TooLarge,
}

/// An accumulating buffer of received bytes.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    pub fn new() -> Framer {
        Framer::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drops everything up to and including the next newline; true if one
    /// was found (QMP's resynchronisation after a syntax error).
    pub fn skip_line(&mut self) -> bool {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.buf.drain(..=i);
                true
            }
            None => {
                self.buf.clear();
                false
            }
        }
    }

    /// Takes the next complete value off the front, if there is one.
    pub fn next_frame(&mut self) -> Frame {
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        if self.buf.is_empty() {
            return Frame::Incomplete;
        }
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                let used = it.byte_offset();
                self.buf.drain(..used);
                Frame::Value(v)
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buf.len() > REQUEST_BYTES_MAX {
                    Frame::TooLarge
                } else {
                    Frame::Incomplete
                }
            }
            Some(Err(e)) => Frame::Syntax(e.to_string()),
            None => Frame::Incomplete,
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
    fn byte_by_byte() {
        let mut f = Framer::new();
        let text = br#"{"jsonrpc":"2.0","method":"x","params":{"s":"a}b"}}"#;
        for (i, b) in text.iter().enumerate() {
            f.push(&[*b]);
            let frame = f.next_frame();
            if i + 1 < text.len() {
                assert_eq!(frame, Frame::Incomplete, "at byte {i}");
            } else {
                assert!(matches!(frame, Frame::Value(_)));
            }
        }
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
        let mut f = Framer::new();
        f.push(b"garbage\n{\"ok\":1}");
        assert!(matches!(f.next_frame(), Frame::Syntax(_)));
        assert!(f.skip_line());
        assert_eq!(f.next_frame(), Frame::Value(json!({"ok": 1})));
    }
}
