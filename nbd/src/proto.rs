//! Shared pieces of the codec: the protocol's string rules, and the
//! bounds-checked big-endian cursor every decoder reads through.
//!
//! The cursor never indexes: each read asks for a prefix with
//! `split_first_chunk` / `split_at_checked` and turns a miss into
//! [`ProtoError::ShortPayload`], so no input can make a decoder panic.

use crate::consts::STRING_BYTES_MAX;
use crate::error::{ProtoError, Result};

/// Checks raw wire bytes against the protocol's string rules (at most
/// [`STRING_BYTES_MAX`] bytes, UTF-8, no NUL) and returns them as text.
pub fn check_string<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a str> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err(ProtoError::StringTooLong { what, len: bytes.len(), max: STRING_BYTES_MAX });
    }
    if bytes.contains(&0) {
        return Err(ProtoError::ContainsNul { what });
    }
    std::str::from_utf8(bytes).map_err(|_| ProtoError::NotUtf8 { what })
}

/// Checks a string we are about to send against the protocol's rules (UTF-8
/// is given by `&str`).
pub fn check_str(what: &'static str, s: &str) -> Result<()> {
    check_string(what, s.as_bytes()).map(|_| ())
}

/// Decodes a human-readable message (error text, export description)
/// leniently: the length limit holds, but bad UTF-8 is replaced rather than
/// refused, because the text is only ever displayed.
pub(crate) fn lossy_message(what: &'static str, bytes: &[u8]) -> Result<String> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err(ProtoError::StringTooLong { what, len: bytes.len(), max: STRING_BYTES_MAX });
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Converts a wire length to `usize`, saturating (only reachable on targets
/// narrower than the field, where the value is too large anyway).
pub(crate) fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Length of `data` as a `u32` wire field, or [`ProtoError::LengthTooLarge`].
pub(crate) fn len_u32(what: &'static str, len: usize) -> Result<u32> {
    u32::try_from(len).map_err(|_| ProtoError::LengthTooLarge { what, len: len as u64, max: u64::from(u32::MAX) })
}

/// Length of `data` as a `u16` wire field, or [`ProtoError::LengthTooLarge`].
pub(crate) fn len_u16(what: &'static str, len: usize) -> Result<u16> {
    u16::try_from(len).map_err(|_| ProtoError::LengthTooLarge { what, len: len as u64, max: u64::from(u16::MAX) })
}

/// Copies a buffer that the caller filled with exactly `N` bytes (zero
/// padding, never a panic, if it did not).
pub(crate) fn to_array<const N: usize>(v: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    if let Some(src) = v.first_chunk::<N>() {
        out = *src;
    }
    out
}

/// A bounds-checked big-endian reader over one complete message.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
    total: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Self { rest: buf, total: buf.len(), what }
    }

    fn pos(&self) -> usize {
        self.total - self.rest.len()
    }

    fn short(&self, n: usize) -> ProtoError {
        ProtoError::ShortPayload { what: self.what, need: self.pos().saturating_add(n), got: self.total }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(self.short(N)),
        }
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_be_bytes)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        match self.rest.split_at_checked(n) {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(head)
            }
            None => Err(self.short(n)),
        }
    }

    /// Takes everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Ends the message: any byte left is [`ProtoError::TrailingBytes`].
    pub(crate) fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes { what: self.what, extra: self.rest.len() })
        }
    }
}

/// Big-endian append helpers for encoders.
pub(crate) trait PutBe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutBe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_big_endian_and_reports_shortness() {
        let buf = [0x12, 0x34, 0, 0, 0, 1, 9];
        let mut r = Reader::new("test", &buf);
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 1);
        assert_eq!(r.u16(), Err(ProtoError::ShortPayload { what: "test", need: 8, got: 7 }));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.bytes(usize::MAX), Err(ProtoError::ShortPayload { what: "test", need: usize::MAX, got: 7 }));
        assert_eq!(Reader::new("t", &buf).finish(), Err(ProtoError::TrailingBytes { what: "t", extra: 7 }));
    }

    #[test]
    fn string_rules() {
        assert_eq!(check_string("n", b"disk0"), Ok("disk0"));
        assert_eq!(check_string("n", b""), Ok(""));
        assert_eq!(check_string("n", b"a\0b"), Err(ProtoError::ContainsNul { what: "n" }));
        assert_eq!(check_string("n", &[0xff, 0xfe]), Err(ProtoError::NotUtf8 { what: "n" }));
        let long = vec![b'a'; STRING_BYTES_MAX + 1];
        assert_eq!(
            check_string("n", &long),
            Err(ProtoError::StringTooLong { what: "n", len: STRING_BYTES_MAX + 1, max: STRING_BYTES_MAX })
        );
        assert!(check_string("n", &long[1..]).is_ok());
        assert_eq!(lossy_message("m", &[b'o', b'k', 0xff]).unwrap(), "ok\u{fffd}");
    }
}
