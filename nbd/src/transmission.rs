//! The transmission phase, both sides.
//!
//! Requests come in two header styles, fixed for the connection by the
//! handshake:
//!
//! - compact (28 bytes): magic `0x25609513`, u16 flags, u16 type, u64
//!   cookie, u64 offset, u32 length; only `NBD_CMD_WRITE` carries a payload
//!   (*length* bytes);
//! - extended (32 bytes, after `NBD_OPT_EXTENDED_HEADERS`): magic
//!   `0x21e41c71`, same fields but a u64 length; a payload of *length* bytes
//!   follows exactly when `NBD_CMD_FLAG_PAYLOAD_LEN` is set.
//!
//! Replies are simple (16 bytes: magic, u32 error, u64 cookie; read data
//! follows on success), structured chunks (20 bytes: magic, u16 flags, u16
//! type, u64 cookie, u32 length) or extended chunks (32 bytes: magic, u16
//! flags, u16 type, u64 cookie, u64 request offset, u64 length). With
//! extended headers only extended chunks may be sent.
//!
//! Server side: [`RequestDecoder`] splits the byte stream into [`Request`]s,
//! [`Request::validate`] and its parts check them, and the `encode_*`
//! functions build replies. Client side: [`Request::encode`],
//! [`ReplyHeader::decode`] and [`decode_chunk`].

use crate::consts::{
    EXTENDED_REPLY_HEADER_BYTES, EXTENDED_REQUEST_HEADER_BYTES, REQUEST_HEADER_BYTES, SIMPLE_REPLY_HEADER_BYTES,
    STRING_BYTES_MAX, STRUCTURED_REPLY_HEADER_BYTES, cmd, cmd_flags, magic, reply_flags, reply_type,
    transmission_flags,
};
use crate::error::{ProtoError, Result};
use crate::proto::{PutBe, Reader, check_str, len_u16, len_u32, lossy_message, to_array, to_usize};

// ---------------------------------------------------------------------------
// Requests

/// One transmission request, whichever header style carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    /// Command flags ([`cmd_flags`]).
    pub flags: u16,
    /// Command ([`cmd`]).
    pub kind: u16,
    /// Opaque cookie, echoed in every reply.
    pub cookie: u64,
    /// Offset in the export (the new size for `NBD_CMD_RESIZE`).
    pub offset: u64,
    /// Effect or payload length (32 bits on compact headers).
    pub length: u64,
}

/// The header size of a request in the given style.
pub fn request_header_len(extended: bool) -> usize {
    if extended { EXTENDED_REQUEST_HEADER_BYTES } else { REQUEST_HEADER_BYTES }
}

impl Request {
    /// Decodes a compact request header.
    pub fn decode_compact(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<Self> {
        let mut r = Reader::new("request header", bytes);
        expect_u32(&mut r, "request", magic::REQUEST)?;
        Ok(Self { flags: r.u16()?, kind: r.u16()?, cookie: r.u64()?, offset: r.u64()?, length: r.u32()?.into() })
    }

    /// Decodes an extended request header.
    pub fn decode_extended(bytes: &[u8; EXTENDED_REQUEST_HEADER_BYTES]) -> Result<Self> {
        let mut r = Reader::new("extended request header", bytes);
        expect_u32(&mut r, "extended request", magic::EXTENDED_REQUEST)?;
        Ok(Self { flags: r.u16()?, kind: r.u16()?, cookie: r.u64()?, offset: r.u64()?, length: r.u64()? })
    }

    /// Encodes a compact header; a length above `u32::MAX` is
    /// [`ProtoError::LengthTooLarge`].
    pub fn encode_compact(&self) -> Result<[u8; REQUEST_HEADER_BYTES]> {
        let length = u32::try_from(self.length).map_err(|_| ProtoError::LengthTooLarge {
            what: "compact request length",
            len: self.length,
            max: u32::MAX.into(),
        })?;
        let mut out = Vec::with_capacity(REQUEST_HEADER_BYTES);
        out.put_u32(magic::REQUEST);
        self.put_common(&mut out);
        out.put_u32(length);
        Ok(to_array(&out))
    }

    /// Encodes an extended header.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_HEADER_BYTES] {
        let mut out = Vec::with_capacity(EXTENDED_REQUEST_HEADER_BYTES);
        out.put_u32(magic::EXTENDED_REQUEST);
        self.put_common(&mut out);
        out.put_u64(self.length);
        to_array(&out)
    }

    /// Client side: appends the header in the negotiated style (the payload,
    /// if any, is the caller's to append).
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) -> Result<()> {
        if extended {
            out.extend_from_slice(&self.encode_extended());
        } else {
            out.extend_from_slice(&self.encode_compact()?);
        }
        Ok(())
    }

    fn put_common(&self, out: &mut Vec<u8>) {
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
    }

    /// Bytes of payload that follow this header on the wire: *length* for
    /// `NBD_CMD_WRITE` on compact headers; *length* for any command with
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` on extended headers; else 0.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let has_payload = if extended { self.flags & cmd_flags::PAYLOAD_LEN != 0 } else { self.kind == cmd::WRITE };
        if has_payload { self.length } else { 0 }
    }

    /// `offset + length`, or [`ProtoError::OffsetOverflow`].
    pub fn end(&self) -> Result<u64> {
        self.offset
            .checked_add(self.length)
            .ok_or(ProtoError::OffsetOverflow { offset: self.offset, length: self.length })
    }

    /// The request lies within an export of `size` bytes
    /// ([`ProtoError::OutOfBounds`] or [`ProtoError::OffsetOverflow`]).
    pub fn check_bounds(&self, size: u64) -> Result<()> {
        if self.end()? > size {
            return Err(ProtoError::OutOfBounds { offset: self.offset, length: self.length, size });
        }
        Ok(())
    }

    /// The command is one this codec knows ([`ProtoError::UnknownCommand`]);
    /// the server should answer `NBD_EINVAL`.
    pub fn check_command(&self) -> Result<()> {
        if cmd::is_known(self.kind) { Ok(()) } else { Err(ProtoError::UnknownCommand(self.kind)) }
    }

    /// Every flag set is valid for this command under the negotiated
    /// transmission flags ([`allowed_flags`]), and an extended
    /// `NBD_CMD_WRITE` sets `NBD_CMD_FLAG_PAYLOAD_LEN`. The server should
    /// answer `NBD_EINVAL` — after consuming [`Request::payload_len`] bytes,
    /// which stay on the stream whatever the flags.
    pub fn check_flags(&self, extended: bool, transmission_flags: u16) -> Result<()> {
        let allowed =
            allowed_flags(self.kind, extended, transmission_flags).ok_or(ProtoError::UnknownCommand(self.kind))?;
        let invalid = self.flags & !allowed;
        if invalid != 0 {
            return Err(ProtoError::BadFlags { command: self.kind, flags: self.flags, invalid });
        }
        if extended && self.kind == cmd::WRITE && self.flags & cmd_flags::PAYLOAD_LEN == 0 {
            return Err(ProtoError::MissingPayloadLen { command: self.kind });
        }
        Ok(())
    }

    /// *length* is at most `max` ([`ProtoError::LengthTooLarge`]), e.g. a
    /// read longer than the maximum payload.
    pub fn check_length(&self, max: u64) -> Result<()> {
        if self.length > max {
            return Err(ProtoError::LengthTooLarge { what: "request length", len: self.length, max });
        }
        Ok(())
    }

    /// The payload following the header is at most `max` bytes. A server
    /// seeing [`ProtoError::LengthTooLarge`] here cannot reasonably consume
    /// the payload and should disconnect.
    pub fn check_payload(&self, extended: bool, max: u64) -> Result<()> {
        let len = self.payload_len(extended);
        if len > max {
            return Err(ProtoError::LengthTooLarge { what: "request payload", len, max });
        }
        Ok(())
    }

    /// Server side: every codec-level check, in this order — payload size
    /// (the one that calls for a disconnect), command, flags,
    /// `offset + length` overflow. Bounds against the export size are left
    /// to [`Request::check_bounds`], since what they mean depends on the
    /// command.
    pub fn validate(&self, limits: &RequestLimits) -> Result<()> {
        self.check_payload(limits.extended, limits.max_payload)?;
        self.check_command()?;
        self.check_flags(limits.extended, limits.transmission_flags)?;
        self.end()?;
        Ok(())
    }
}

/// What a server validates requests against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Extended headers were negotiated.
    pub extended: bool,
    /// The transmission flags sent for the export.
    pub transmission_flags: u16,
    /// The largest request payload accepted, in bytes.
    pub max_payload: u64,
}

/// The command flags valid for `kind`, or `None` for an unknown command.
///
/// `NBD_CMD_FLAG_FUA` needs `NBD_FLAG_SEND_FUA` (then any command may carry
/// it); `DF` is for reads under `NBD_FLAG_SEND_DF`; `NO_HOLE` and
/// `FAST_ZERO` (under `NBD_FLAG_SEND_FAST_ZERO`) for write-zeroes; `REQ_ONE`
/// for block status; `PAYLOAD_LEN` only with extended headers, for writes
/// and, under `NBD_FLAG_BLOCK_STATUS_PAYLOAD`, block status.
pub fn allowed_flags(kind: u16, extended: bool, tflags: u16) -> Option<u16> {
    let when = |flag: u16, cond: bool| if cond { flag } else { 0 };
    let base = when(cmd_flags::FUA, tflags & transmission_flags::SEND_FUA != 0);
    let extra = match kind {
        cmd::READ => when(cmd_flags::DF, tflags & transmission_flags::SEND_DF != 0),
        cmd::WRITE => when(cmd_flags::PAYLOAD_LEN, extended),
        cmd::WRITE_ZEROES => {
            cmd_flags::NO_HOLE | when(cmd_flags::FAST_ZERO, tflags & transmission_flags::SEND_FAST_ZERO != 0)
        }
        cmd::BLOCK_STATUS => {
            cmd_flags::REQ_ONE
                | when(cmd_flags::PAYLOAD_LEN, extended && tflags & transmission_flags::BLOCK_STATUS_PAYLOAD != 0)
        }
        k if cmd::is_known(k) => 0,
        _ => return None,
    };
    Some(base | extra)
}

/// The payload form of `NBD_CMD_BLOCK_STATUS` (extended headers with
/// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`): u64 effect length, then the u32 context
/// ids to answer for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockStatusFilter {
    /// The effect length (the header's *length* is the payload length).
    pub effect_length: u64,
    /// Context ids the client wants answers for.
    pub context_ids: Vec<u32>,
}

impl BlockStatusFilter {
    /// Server side: parses the payload; it must be 8 + 4n bytes.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let mut r = Reader::new("block status payload", payload);
        let effect_length = r.u64()?;
        let mut context_ids = Vec::with_capacity(r.remaining() / 4);
        while r.remaining() >= 4 {
            context_ids.push(r.u32()?);
        }
        r.finish()?;
        Ok(Self { effect_length, context_ids })
    }

    /// Client side: the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * self.context_ids.len());
        out.put_u64(self.effect_length);
        for &id in &self.context_ids {
            out.put_u32(id);
        }
        out
    }
}

// ---------------------------------------------------------------------------
// The incremental server-side decoder

/// Splits the client's byte stream into requests.
///
/// Feed it with [`push`](Self::push) and take requests with
/// [`next`](Self::next). The decoder does not collect payloads: after a
/// request with a payload (see [`Request::payload_len`]) the caller must
/// consume exactly that many bytes before calling `next` again, which
/// otherwise fails with [`ProtoError::PayloadPending`]. Payload bytes that
/// were already pushed are taken with [`copy_payload`](Self::copy_payload)
/// or [`take_payload`](Self::take_payload); bytes the caller reads from the
/// socket itself straight into its I/O buffer are reported with
/// [`payload_read_directly`](Self::payload_read_directly); a payload to be
/// thrown away (a rejected request) is dropped with
/// [`discard_payload`](Self::discard_payload), including bytes not yet
/// pushed. No byte is lost or counted twice.
#[derive(Debug, Clone, Default)]
pub struct RequestDecoder {
    buf: Vec<u8>,
    start: usize,
    extended: bool,
    payload_pending: u64,
    discarding: bool,
}

impl RequestDecoder {
    /// A decoder for compact (`extended == false`) or extended headers.
    pub fn new(extended: bool) -> Self {
        Self { extended, ..Self::default() }
    }

    /// Whether it decodes extended headers.
    pub fn extended(&self) -> bool {
        self.extended
    }

    /// Appends bytes read from the client. While a payload is being
    /// discarded, its bytes are dropped here.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.discarding {
            let skip = to_usize(self.payload_pending).min(data.len());
            data = data.get(skip..).unwrap_or_default();
            self.payload_pending -= skip as u64;
            if self.payload_pending == 0 {
                self.discarding = false;
            }
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes pushed and not yet consumed (header or payload).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Payload bytes of the last request still to be consumed.
    pub fn payload_pending(&self) -> u64 {
        self.payload_pending
    }

    /// The next request, `Ok(None)` until its whole header is in.
    ///
    /// A wrong magic fails as soon as its 4 bytes are in; the stream is then
    /// beyond repair and the server should disconnect.
    #[allow(clippy::should_implement_trait, reason = "fallible and resumable after Ok(None): not an Iterator")]
    pub fn next(&mut self) -> Result<Option<Request>> {
        if self.payload_pending > 0 {
            return Err(ProtoError::PayloadPending { remaining: self.payload_pending });
        }
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let (what, expected) =
            if self.extended { ("extended request", magic::EXTENDED_REQUEST) } else { ("request", magic::REQUEST) };
        if let Some(m) = pending.first_chunk::<4>() {
            let got = u32::from_be_bytes(*m);
            if got != expected {
                return Err(ProtoError::BadMagic { what, expected: expected.into(), got: got.into() });
            }
        }
        let req = if self.extended {
            match pending.first_chunk::<EXTENDED_REQUEST_HEADER_BYTES>() {
                Some(h) => Request::decode_extended(h)?,
                None => return Ok(None),
            }
        } else {
            match pending.first_chunk::<REQUEST_HEADER_BYTES>() {
                Some(h) => Request::decode_compact(h)?,
                None => return Ok(None),
            }
        };
        self.start += request_header_len(self.extended);
        self.payload_pending = req.payload_len(self.extended);
        Ok(Some(req))
    }

    /// The pushed bytes that belong to the pending payload.
    pub fn buffered_payload(&self) -> &[u8] {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let n = to_usize(self.payload_pending).min(pending.len());
        pending.get(..n).unwrap_or_default()
    }

    /// Copies pushed payload bytes into `dst` (as many as fit and are
    /// there) and counts them consumed; returns how many.
    pub fn copy_payload(&mut self, dst: &mut [u8]) -> usize {
        let src = self.buffered_payload();
        let n = src.len().min(dst.len());
        if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
            d.copy_from_slice(s);
        }
        self.consume(n);
        n
    }

    /// Takes up to `max` pushed payload bytes, counting them consumed.
    pub fn take_payload(&mut self, max: usize) -> Vec<u8> {
        let src = self.buffered_payload();
        let out = src.get(..max.min(src.len())).unwrap_or_default().to_vec();
        self.consume(out.len());
        out
    }

    /// Counts `n` payload bytes that the caller read from the socket itself
    /// (after taking everything buffered). More than is pending is
    /// [`ProtoError::LengthTooLarge`] and changes nothing.
    pub fn payload_read_directly(&mut self, n: u64) -> Result<()> {
        let unbuffered = self.payload_pending - self.buffered_payload().len() as u64;
        if n > unbuffered {
            return Err(ProtoError::LengthTooLarge { what: "payload read directly", len: n, max: unbuffered });
        }
        self.payload_pending -= n;
        Ok(())
    }

    /// Drops the rest of the pending payload: what is buffered now, and
    /// what is still to be pushed.
    pub fn discard_payload(&mut self) {
        let n = self.buffered_payload().len();
        self.consume(n);
        if self.payload_pending > 0 {
            self.discarding = true;
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.payload_pending -= n as u64;
    }
}

// ---------------------------------------------------------------------------
// Replies: headers

/// Server side: a simple reply header (read data follows if `error` is 0).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut out = Vec::with_capacity(SIMPLE_REPLY_HEADER_BYTES);
    out.put_u32(magic::SIMPLE_REPLY);
    out.put_u32(error);
    out.put_u64(cookie);
    to_array(&out)
}

/// A structured or extended reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkHeader {
    /// Reply flags ([`reply_flags`]).
    pub flags: u16,
    /// Chunk type ([`reply_type`]).
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset; carried by extended headers only (0 when
    /// decoded from, and ignored when encoding, a structured header).
    pub offset: u64,
    /// Payload bytes that follow (32 bits on structured headers).
    pub length: u64,
}

impl ChunkHeader {
    /// `NBD_REPLY_FLAG_DONE` is set.
    pub fn is_done(&self) -> bool {
        self.flags & reply_flags::DONE != 0
    }

    /// Encodes a structured header; a length above `u32::MAX` is
    /// [`ProtoError::LengthTooLarge`].
    pub fn encode_structured(&self) -> Result<[u8; STRUCTURED_REPLY_HEADER_BYTES]> {
        let length = u32::try_from(self.length).map_err(|_| ProtoError::LengthTooLarge {
            what: "structured chunk length",
            len: self.length,
            max: u32::MAX.into(),
        })?;
        let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_BYTES);
        out.put_u32(magic::STRUCTURED_REPLY);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u32(length);
        Ok(to_array(&out))
    }

    /// Encodes an extended header.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REPLY_HEADER_BYTES] {
        let mut out = Vec::with_capacity(EXTENDED_REPLY_HEADER_BYTES);
        out.put_u32(magic::EXTENDED_REPLY);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u64(self.length);
        to_array(&out)
    }

    /// Appends the header in the negotiated style.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) -> Result<()> {
        if extended {
            out.extend_from_slice(&self.encode_extended());
        } else {
            out.extend_from_slice(&self.encode_structured()?);
        }
        Ok(())
    }
}

/// A reply header as the client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful `NBD_CMD_READ` the request's length
    /// of data follows.
    Simple { error: u32, cookie: u64 },
    /// A structured or extended chunk; `length` payload bytes follow.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// The cookie of the request answered.
    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple { cookie, .. } => *cookie,
            Self::Chunk(h) => h.cookie,
        }
    }

    /// Client side: decodes a reply header from the front of `buf`,
    /// `Ok(None)` while incomplete. With compact headers a simple or a
    /// structured header may come; with extended headers only an extended
    /// one. A chunk longer than `max_chunk` bytes is
    /// [`ProtoError::LengthTooLarge`].
    pub fn decode(buf: &[u8], extended: bool, max_chunk: u64) -> Result<Option<(Self, usize)>> {
        let Some(m) = buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let got = u32::from_be_bytes(*m);
        let header = match (extended, got) {
            (true, magic::EXTENDED_REPLY) => {
                let Some(h) = buf.first_chunk::<EXTENDED_REPLY_HEADER_BYTES>() else {
                    return Ok(None);
                };
                let mut r = Reader::new("extended reply header", h);
                r.u32()?;
                ChunkHeader { flags: r.u16()?, kind: r.u16()?, cookie: r.u64()?, offset: r.u64()?, length: r.u64()? }
            }
            (true, _) => {
                return Err(ProtoError::BadMagic {
                    what: "extended reply",
                    expected: magic::EXTENDED_REPLY.into(),
                    got: got.into(),
                });
            }
            (false, magic::SIMPLE_REPLY) => {
                let Some(h) = buf.first_chunk::<SIMPLE_REPLY_HEADER_BYTES>() else {
                    return Ok(None);
                };
                let mut r = Reader::new("simple reply header", h);
                r.u32()?;
                let reply = Self::Simple { error: r.u32()?, cookie: r.u64()? };
                return Ok(Some((reply, SIMPLE_REPLY_HEADER_BYTES)));
            }
            (false, magic::STRUCTURED_REPLY) => {
                let Some(h) = buf.first_chunk::<STRUCTURED_REPLY_HEADER_BYTES>() else {
                    return Ok(None);
                };
                let mut r = Reader::new("structured reply header", h);
                r.u32()?;
                ChunkHeader { flags: r.u16()?, kind: r.u16()?, cookie: r.u64()?, offset: 0, length: r.u32()?.into() }
            }
            (false, _) => {
                return Err(ProtoError::BadMagic {
                    what: "simple or structured reply",
                    expected: magic::SIMPLE_REPLY.into(),
                    got: got.into(),
                });
            }
        };
        if header.length > max_chunk {
            return Err(ProtoError::LengthTooLarge { what: "reply chunk", len: header.length, max: max_chunk });
        }
        let used = if extended { EXTENDED_REPLY_HEADER_BYTES } else { STRUCTURED_REPLY_HEADER_BYTES };
        Ok(Some((Self::Chunk(header), used)))
    }
}

// ---------------------------------------------------------------------------
// Replies: server-side chunk encoders

/// Where a reply chunk goes: the request's cookie and offset, and the
/// header style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTarget {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (sent in extended headers).
    pub offset: u64,
    /// Extended headers were negotiated (else structured replies).
    pub extended: bool,
}

impl ReplyTarget {
    /// The target answering `req`.
    pub fn new(req: &Request, extended: bool) -> Self {
        Self { cookie: req.cookie, offset: req.offset, extended }
    }

    fn header(&self, flags: u16, kind: u16, length: u64, out: &mut Vec<u8>) -> Result<()> {
        ChunkHeader { flags, kind, cookie: self.cookie, offset: self.offset, length }.encode(self.extended, out)
    }
}

/// One block status descriptor. Compact `NBD_REPLY_TYPE_BLOCK_STATUS`
/// carries 32-bit fields; `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` 64-bit ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extent {
    /// Extent length in bytes (nonzero).
    pub length: u64,
    /// Status flags (for `base:allocation`, [`state`](crate::consts::state)).
    pub flags: u64,
}

/// Appends a chunk with an arbitrary payload.
pub fn encode_chunk(t: ReplyTarget, flags: u16, kind: u16, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
    t.header(flags, kind, payload.len() as u64, out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends `NBD_REPLY_TYPE_NONE` with `NBD_REPLY_FLAG_DONE`: the end of a
/// reply.
pub fn encode_none(t: ReplyTarget, out: &mut Vec<u8>) -> Result<()> {
    t.header(reply_flags::DONE, reply_type::NONE, 0, out)
}

/// Appends the header and the offset of an `NBD_REPLY_TYPE_OFFSET_DATA`
/// chunk; the caller sends the `data_len` data bytes after it.
pub fn encode_offset_data_header(
    t: ReplyTarget,
    flags: u16,
    data_offset: u64,
    data_len: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    let length = data_len.checked_add(8).ok_or(ProtoError::LengthTooLarge {
        what: "offset data chunk",
        len: data_len,
        max: u64::MAX - 8,
    })?;
    t.header(flags, reply_type::OFFSET_DATA, length, out)?;
    out.put_u64(data_offset);
    Ok(())
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn encode_offset_hole(
    t: ReplyTarget,
    flags: u16,
    hole_offset: u64,
    hole_size: u32,
    out: &mut Vec<u8>,
) -> Result<()> {
    t.header(flags, reply_type::OFFSET_HOLE, 12, out)?;
    out.put_u64(hole_offset);
    out.put_u32(hole_size);
    Ok(())
}

/// Appends a block status chunk for one metadata context:
/// `NBD_REPLY_TYPE_BLOCK_STATUS` (u32 id, then u32 length + u32 flags per
/// extent) on structured replies, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (u32 id,
/// u32 count, then u64 length + u64 flags) on extended ones. On structured
/// replies an extent field above 32 bits is [`ProtoError::LengthTooLarge`].
pub fn encode_block_status(
    t: ReplyTarget,
    flags: u16,
    context_id: u32,
    extents: &[Extent],
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut payload;
    let kind;
    if t.extended {
        kind = reply_type::BLOCK_STATUS_EXT;
        payload = Vec::with_capacity(8 + 16 * extents.len());
        payload.put_u32(context_id);
        payload.put_u32(len_u32("block status descriptor count", extents.len())?);
        for e in extents {
            payload.put_u64(e.length);
            payload.put_u64(e.flags);
        }
    } else {
        kind = reply_type::BLOCK_STATUS;
        payload = Vec::with_capacity(4 + 8 * extents.len());
        payload.put_u32(context_id);
        for e in extents {
            let narrow = |what, v: u64| {
                u32::try_from(v).map_err(|_| ProtoError::LengthTooLarge { what, len: v, max: u32::MAX.into() })
            };
            payload.put_u32(narrow("extent length", e.length)?);
            payload.put_u32(narrow("extent status flags", e.flags)?);
        }
    }
    encode_chunk(t, flags, kind, &payload, out)
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk (u32 error, u16 message length,
/// message).
pub fn encode_error_chunk(t: ReplyTarget, flags: u16, error: u32, message: &str, out: &mut Vec<u8>) -> Result<()> {
    let payload = error_payload(error, message, None)?;
    encode_chunk(t, flags, reply_type::ERROR, &payload, out)
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk (as `ERROR`, then the u64
/// offset of the failure).
pub fn encode_error_offset_chunk(
    t: ReplyTarget,
    flags: u16,
    error: u32,
    message: &str,
    error_offset: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    let payload = error_payload(error, message, Some(error_offset))?;
    encode_chunk(t, flags, reply_type::ERROR_OFFSET, &payload, out)
}

fn error_payload(error: u32, message: &str, offset: Option<u64>) -> Result<Vec<u8>> {
    check_str("error message", message)?;
    let mut payload = Vec::with_capacity(6 + message.len() + 8);
    payload.put_u32(error);
    payload.put_u16(len_u16("error message", message.len())?);
    payload.extend_from_slice(message.as_bytes());
    if let Some(o) = offset {
        payload.put_u64(o);
    }
    Ok(payload)
}

// ---------------------------------------------------------------------------
// Replies: client-side chunk decoding

/// A decoded chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: `data` read at `offset`.
    OffsetData { offset: u64, data: &'a [u8] },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `size` zero bytes at `offset`.
    OffsetHole { offset: u64, size: u32 },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT`.
    BlockStatus { context_id: u32, extents: Vec<Extent> },
    /// An error chunk: `NBD_REPLY_TYPE_ERROR`, `NBD_REPLY_TYPE_ERROR_OFFSET`
    /// (with `offset`), or an unknown type with bit 15 set (its fields after
    /// the message ignored). The reply as a whole has failed.
    Error { kind: u16, error: u32, message: String, offset: Option<u64> },
}

/// Client side: checks an `NBD_REPLY_TYPE_OFFSET_DATA` header and its first
/// 8 payload bytes, returning the data offset and the number of data bytes
/// that follow — for reading the data straight into the caller's buffer.
pub fn decode_offset_data_start(header: &ChunkHeader, prefix: &[u8; 8]) -> Result<(u64, u64)> {
    if header.kind != reply_type::OFFSET_DATA || header.length < 9 {
        return Err(ProtoError::BadChunkLength { kind: header.kind, len: header.length });
    }
    Ok((u64::from_be_bytes(*prefix), header.length - 8))
}

/// Client side: decodes a chunk's payload (exactly `header.length` bytes),
/// checking the length rules of its type. An unknown non-error type is
/// [`ProtoError::UnknownChunkType`]: the client must disconnect.
pub fn decode_chunk<'a>(header: &ChunkHeader, payload: &'a [u8]) -> Result<Chunk<'a>> {
    let what = "reply chunk payload";
    let got = payload.len();
    if (got as u64) < header.length {
        return Err(ProtoError::ShortPayload { what, need: to_usize(header.length), got });
    }
    if got as u64 > header.length {
        return Err(ProtoError::TrailingBytes { what, extra: got - to_usize(header.length) });
    }
    let bad_len = || ProtoError::BadChunkLength { kind: header.kind, len: header.length };
    let mut r = Reader::new(what, payload);
    let chunk = match header.kind {
        reply_type::NONE => {
            if header.length != 0 {
                return Err(bad_len());
            }
            if !header.is_done() {
                return Err(ProtoError::NoneWithoutDone);
            }
            Chunk::None
        }
        reply_type::OFFSET_DATA => {
            if header.length < 9 {
                return Err(bad_len());
            }
            Chunk::OffsetData { offset: r.u64()?, data: r.rest() }
        }
        reply_type::OFFSET_HOLE => {
            if header.length != 12 {
                return Err(bad_len());
            }
            let offset = r.u64()?;
            let size = r.u32()?;
            if size == 0 {
                return Err(ProtoError::ZeroLength { what: "hole size" });
            }
            Chunk::OffsetHole { offset, size }
        }
        reply_type::BLOCK_STATUS => {
            if header.length < 12 || !(header.length - 4).is_multiple_of(8) {
                return Err(bad_len());
            }
            let context_id = r.u32()?;
            let mut extents = Vec::with_capacity(r.remaining() / 8);
            while !r.is_empty() {
                extents.push(extent(r.u32()?.into(), r.u32()?.into())?);
            }
            Chunk::BlockStatus { context_id, extents }
        }
        reply_type::BLOCK_STATUS_EXT => {
            if header.length < 24 || !(header.length - 8).is_multiple_of(16) {
                return Err(bad_len());
            }
            let context_id = r.u32()?;
            let count = r.u32()?;
            let present = (r.remaining() / 16) as u64;
            if u64::from(count) != present {
                return Err(ProtoError::CountMismatch {
                    what: "block status descriptors",
                    declared: count.into(),
                    found: present,
                });
            }
            let mut extents = Vec::with_capacity(r.remaining() / 16);
            while !r.is_empty() {
                extents.push(extent(r.u64()?, r.u64()?)?);
            }
            Chunk::BlockStatus { context_id, extents }
        }
        kind if reply_type::is_error(kind) => {
            let error = r.u32()?;
            let msg_len = r.u16()?;
            if usize::from(msg_len) > STRING_BYTES_MAX {
                return Err(ProtoError::StringTooLong {
                    what: "error message",
                    len: msg_len.into(),
                    max: STRING_BYTES_MAX,
                });
            }
            let message = lossy_message("error message", r.bytes(msg_len.into())?)?;
            let offset = match kind {
                reply_type::ERROR_OFFSET => Some(r.u64()?),
                reply_type::ERROR => None,
                _ => {
                    r.rest();
                    None
                }
            };
            if error == 0 {
                return Err(ProtoError::ZeroErrorValue);
            }
            Chunk::Error { kind, error, message, offset }
        }
        kind => return Err(ProtoError::UnknownChunkType(kind)),
    };
    r.finish()?;
    Ok(chunk)
}

fn extent(length: u64, flags: u64) -> Result<Extent> {
    if length == 0 {
        return Err(ProtoError::ZeroLength { what: "block status extent length" });
    }
    Ok(Extent { length, flags })
}

// ---------------------------------------------------------------------------
// Helpers

fn expect_u32(r: &mut Reader<'_>, what: &'static str, expected: u32) -> Result<()> {
    let got = r.u32()?;
    if got == expected {
        Ok(())
    } else {
        Err(ProtoError::BadMagic { what, expected: expected.into(), got: got.into() })
    }
}

#[cfg(test)]
mod tests;
