//! Finding JSON values in a byte stream: both protocols send JSON values
//! back to back with no length prefix, so the server accumulates bytes and
//! takes complete values off the front.
//!
//! A small scanner tracks nesting, strings and escapes as bytes arrive, so
//! each byte is looked at once no matter how the client splits its writes;
//! only a complete value is handed to serde. The scanner also bounds the
//! nesting: a value deeper than [`NESTING_DEPTH_MAX`] is refused at the
//! bracket that goes too deep, not when (or if) the value ends.
//!
//! A complete value is parsed by serde_json into a [`Value`] built by
//! [`parse`], which refuses a key repeated in an object (serde_json's own
//! `Value` keeps the last one silently; QEMU refuses the input). Every
//! refusal speaks QEMU's words: `JSON parse error, duplicate key`, `JSON
//! nesting depth limit exceeded`, `JSON parse error, <what serde found>`.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Largest single request accepted, in bytes.
pub const REQUEST_BYTES_MAX: usize = 1 << 20;

/// Deepest nesting of arrays and objects accepted (a top-level `[]` is
/// depth 1). QEMU accepts 1024 levels; serde_json parses at most 127 (its
/// recursion limit, which keeps parsing and dropping a value well inside a
/// thread's stack), so that is the limit here, enforced by the scanner as
/// the bytes arrive. No command comes near it: a JSON-RPC batch of
/// `blockdev-add` with inline children nests a handful of levels.
pub const NESTING_DEPTH_MAX: usize = 127;

/// The refusal of an object with a key given twice (QEMU's words).
pub const DUPLICATE_KEY: &str = "JSON parse error, duplicate key";

/// The refusal of a value nested deeper than [`NESTING_DEPTH_MAX`] (QEMU's words).
pub const TOO_DEEP: &str = "JSON nesting depth limit exceeded";

/// What the front of the buffer holds.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A complete value (removed from the buffer).
    Value(Value),
    /// More bytes are needed.
    Incomplete,
    /// Not JSON, or JSON refused (a duplicate key, too deep); the message
    /// is the one to answer with. The value, or what had arrived of it, is
    /// removed from the buffer.
    Syntax(String),
    /// A value larger than [`REQUEST_BYTES_MAX`].
    TooLarge,
}

/// What a scan of the new bytes found.
enum Scanned {
    /// A value ends before this offset.
    Complete(usize),
    /// The bracket at this offset nests too deep.
    TooDeep(usize),
    /// The value goes on.
    More,
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

    /// Scans new bytes up to the end of the first complete value.
    fn scan(&mut self) -> Scanned {
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
                    b'{' | b'[' => {
                        self.depth += 1;
                        if self.depth > NESTING_DEPTH_MAX {
                            return Scanned::TooDeep(i);
                        }
                    }
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return Scanned::Complete(i + 1);
                        }
                    }
                    _ => {}
                },
                Scan::TopString => match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => return Scanned::Complete(i + 1),
                    _ => {}
                },
                Scan::TopToken => {
                    if matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'"' | b'}' | b']' | b',') {
                        // The delimiter belongs to what follows.
                        self.scanned = i;
                        return Scanned::Complete(i);
                    }
                }
            }
        }
        Scanned::More
    }

    /// Takes the next complete value off the front, if there is one.
    pub fn next_frame(&mut self) -> Frame {
        let end = match self.scan() {
            Scanned::Complete(end) => end,
            Scanned::TooDeep(at) => {
                // What arrived of the value goes; the transport decides
                // about the rest (QMP skips to the next newline).
                self.buf.drain(..=at);
                self.reset_scan();
                return Frame::Syntax(TOO_DEEP.to_string());
            }
            Scanned::More => {
                if self.state != Scan::Idle && self.buf.len() - self.start > self.limit {
                    return Frame::TooLarge;
                }
                if self.state == Scan::Idle {
                    // Only whitespace so far: keep the buffer small.
                    self.buf.clear();
                    self.reset_scan();
                }
                return Frame::Incomplete;
            }
        };
        if end - self.start > self.limit {
            return Frame::TooLarge;
        }
        let parsed = parse(&self.buf[self.start..end]);
        self.buf.drain(..end);
        self.reset_scan();
        match parsed {
            Ok(v) => Frame::Value(v),
            Err(msg) => Frame::Syntax(msg),
        }
    }
}

/// Parses one JSON value, refusing a key repeated in any object; the
/// error is the message to answer with, in QEMU's words.
pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Unique::deserialize(&mut de).and_then(|Unique(v)| de.end().map(|()| v));
    parsed.map_err(|e| {
        if e.is_data() {
            // The only data error: Unique takes any JSON but a repeated key.
            DUPLICATE_KEY.to_string()
        } else if e.to_string().starts_with("recursion limit exceeded") {
            // serde_json's own depth limit, which the scanner's equals.
            TOO_DEEP.to_string()
        } else {
            format!("JSON parse error, {e}")
        }
    })
}

/// A [`Value`] whose objects hold each key once: built like serde_json's
/// own, except that a key already in the object is an error rather than
/// a replacement. The map's own lookup finds the repeat; nothing else is
/// allocated.
struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unique, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Unique::deserialize(d).map(|Unique(v)| v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Unique(v) = map.next_value()?;
            if obj.insert(key, v).is_some() {
                return Err(serde::de::Error::custom("duplicate key"));
            }
        }
        Ok(Value::Object(obj))
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
        assert!(
            matches!(f.next_frame(), Frame::Syntax(m) if m.starts_with("JSON parse error, ") && m.contains("line 1"))
        );
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

    #[test]
    fn a_key_given_twice_is_refused_at_any_depth() {
        for text in [
            r#"{"execute":"query-version","execute":"quit"}"#,
            r#"{"execute":"query-version","arguments":{"a":1,"a":2}}"#,
            r#"{"execute":"query-version","id":{"a":1,"a":2}}"#,
            r#"[{"jsonrpc":"2.0","method":"x","params":[{"k":[],"k":null}]}]"#,
            r#"{"a":{"b":1},"a":{"b":1}}"#,
        ] {
            assert_eq!(parse(text.as_bytes()), Err(DUPLICATE_KEY.to_string()), "{text}");
            let mut f = Framer::new();
            f.push(text.as_bytes());
            f.push(b" {\"ok\":1}");
            assert_eq!(f.next_frame(), Frame::Syntax(DUPLICATE_KEY.into()), "{text}");
            assert_eq!(f.next_frame(), Frame::Value(json!({"ok": 1})), "the refused value is gone");
        }
        // The same key in different objects, or escaped differently but
        // equal once decoded (as QEMU compares them).
        assert_eq!(parse(br#"{"a":{"a":1},"b":{"a":2}}"#), Ok(json!({"a": {"a": 1}, "b": {"a": 2}})));
        assert_eq!(parse(br#"{"a":1,"\u0061":2}"#), Err(DUPLICATE_KEY.to_string()));
    }

    #[test]
    fn values_parse_as_serde_json_parses_them() {
        for text in [
            "0",
            "-9223372036854775808",
            "18446744073709551615",
            "1.5e300",
            "-0.0",
            "\"\\u00e9\\n\\\"\"",
            "null",
            "[true,false,[],{}]",
            r#"{"z":1,"a":[1,{"m":null}],"k":"v"}"#,
        ] {
            let want: Value = serde_json::from_str(text).unwrap();
            let got = parse(text.as_bytes()).unwrap();
            assert_eq!(got, want, "{text}");
            // Key order is kept, as serde_json keeps it here.
            assert_eq!(got.to_string(), want.to_string(), "{text}");
        }
        assert_eq!(parse(b"{} x"), Err("JSON parse error, trailing characters at line 1 column 4".into()));
    }

    fn nested(depth: usize) -> Vec<u8> {
        let mut v = vec![b'['; depth];
        v.extend(std::iter::repeat_n(b']', depth));
        v
    }

    #[test]
    fn nesting_past_the_limit_is_refused_as_its_bracket_arrives() {
        let mut f = Framer::new();
        f.push(&nested(NESTING_DEPTH_MAX));
        assert!(matches!(f.next_frame(), Frame::Value(_)), "the limit itself is fine");
        // One level more, with nothing after the bracket that passes the
        // limit: refused at once, not when the value would end.
        let mut f = Framer::new();
        f.push(&[b'['; NESTING_DEPTH_MAX + 1]);
        assert_eq!(f.next_frame(), Frame::Syntax(TOO_DEEP.into()));
        assert_eq!(f.buffered(), 0, "what arrived of the value is dropped");
        // Objects count as arrays do; brackets inside strings do not.
        let mut deep_obj = b"{\"a\":".repeat(NESTING_DEPTH_MAX + 1);
        deep_obj.extend_from_slice(b"1\n{\"ok\":1}");
        let mut f = Framer::new();
        f.push(&deep_obj);
        assert_eq!(f.next_frame(), Frame::Syntax(TOO_DEEP.into()));
        assert!(f.skip_line(), "QMP goes on after the next newline");
        assert_eq!(f.next_frame(), Frame::Value(json!({"ok": 1})));
        let in_string = format!("[\"{}\"]", "[{".repeat(1000));
        assert!(matches!(parse(in_string.as_bytes()), Ok(Value::Array(_))));
        let mut f = Framer::new();
        f.push(in_string.as_bytes());
        assert!(matches!(f.next_frame(), Frame::Value(_)));
        // 100k brackets in pieces: refused within the first piece.
        let mut f = Framer::new();
        f.push(&[b'['; 4096]);
        assert_eq!(f.next_frame(), Frame::Syntax(TOO_DEEP.into()));
        assert!(f.scanned_total() <= NESTING_DEPTH_MAX as u64 + 1);
    }

    #[test]
    fn serde_json_refusing_depth_gives_the_same_message() {
        // The scanner stops such values first; parse() alone meets
        // serde_json's own limit, which is the same.
        assert!(parse(&nested(NESTING_DEPTH_MAX)).is_ok());
        assert_eq!(parse(&nested(NESTING_DEPTH_MAX + 1)), Err(TOO_DEEP.to_string()));
    }
}
