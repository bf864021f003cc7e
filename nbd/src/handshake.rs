//! Newstyle (fixed newstyle) negotiation, both sides.
//!
//! The exchange, as `doc/proto.md` lays it out:
//!
//! 1. S: greeting — `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags
//!    ([`Greeting`]).
//! 2. C: 32-bit client flags ([`ClientFlags`]).
//! 3. Repeatedly C: option request — `IHAVEOPT`, u32 option, u32 length, data
//!    ([`OptionRequest`]); S: zero or more option replies — magic, u32
//!    option, u32 reply type, u32 length, data ([`OptionReply`]).
//! 4. Ends with `NBD_OPT_GO` answered by `NBD_REP_ACK`, or with
//!    `NBD_OPT_EXPORT_NAME` answered by the bare [`ExportInfo`] (plus 124
//!    zero bytes unless `NBD_FLAG_C_NO_ZEROES`).
//!
//! Fixed-size messages decode from `&[u8; N]`. Variable-size ones decode from
//! the front of a byte buffer and return `Ok(None)` while it holds less than
//! a whole message, else the message and the bytes it used — so a caller
//! can feed whatever the socket gave it. Encoders append to a `Vec<u8>`;
//! those whose inputs may not fit a wire field return a `Result`.

use crate::consts::{
    CLIENT_FLAGS_BYTES, EXPORT_NAME_REPLY_BYTES, EXPORT_NAME_ZEROES_BYTES, GREETING_BYTES, OPTION_HEADER_BYTES,
    OPTION_REPLY_HEADER_BYTES, client_flags, handshake_flags, info, magic, opt, rep,
};
use crate::error::{ProtoError, Result};
use crate::proto::{PutBe, Reader, check_str, check_string, len_u16, len_u32, lossy_message, to_array, to_usize};

// ---------------------------------------------------------------------------
// Greeting and client flags

/// The newstyle server greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags ([`handshake_flags`]).
    pub handshake_flags: u16,
}

impl Greeting {
    /// Server side: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
    pub fn encode(&self) -> [u8; GREETING_BYTES] {
        let mut out = [0; GREETING_BYTES];
        let (a, rest) = out.split_at_mut(8);
        let (b, c) = rest.split_at_mut(8);
        a.copy_from_slice(&magic::NBDMAGIC.to_be_bytes());
        b.copy_from_slice(&magic::IHAVEOPT.to_be_bytes());
        c.copy_from_slice(&self.handshake_flags.to_be_bytes());
        out
    }

    /// Client side: checks both magics (an oldstyle server shows up as a bad
    /// `IHAVEOPT`). Unknown handshake flags are kept; the client should
    /// ignore them.
    pub fn decode(bytes: &[u8; GREETING_BYTES]) -> Result<Self> {
        let mut r = Reader::new("greeting", bytes);
        expect_u64(&mut r, "NBDMAGIC", magic::NBDMAGIC)?;
        expect_u64(&mut r, "IHAVEOPT", magic::IHAVEOPT)?;
        Ok(Self { handshake_flags: r.u16()? })
    }
}

/// The client flags, checked against what the server advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags(u32);

impl ClientFlags {
    /// Server side: parses the client flags. Any bit that is unknown, or
    /// that answers a handshake flag the server did not advertise, is
    /// [`ProtoError::BadClientFlags`]: the server must drop the connection.
    pub fn decode(bytes: &[u8; CLIENT_FLAGS_BYTES], advertised: u16) -> Result<Self> {
        let flags = u32::from_be_bytes(*bytes);
        let mut allowed = 0;
        if advertised & handshake_flags::FIXED_NEWSTYLE != 0 {
            allowed |= client_flags::FIXED_NEWSTYLE;
        }
        if advertised & handshake_flags::NO_ZEROES != 0 {
            allowed |= client_flags::NO_ZEROES;
        }
        let unexpected = flags & !allowed;
        if unexpected != 0 {
            return Err(ProtoError::BadClientFlags { flags, unexpected });
        }
        Ok(Self(flags))
    }

    /// Client side: the flags answering a server's handshake flags — every
    /// feature we know that the server offers.
    pub fn negotiate(server_handshake_flags: u16) -> Self {
        let mut flags = 0;
        if server_handshake_flags & handshake_flags::FIXED_NEWSTYLE != 0 {
            flags |= client_flags::FIXED_NEWSTYLE;
        }
        if server_handshake_flags & handshake_flags::NO_ZEROES != 0 {
            flags |= client_flags::NO_ZEROES;
        }
        Self(flags)
    }

    /// The flags as raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// `NBD_FLAG_C_FIXED_NEWSTYLE` is set.
    pub fn fixed_newstyle(self) -> bool {
        self.0 & client_flags::FIXED_NEWSTYLE != 0
    }

    /// `NBD_FLAG_C_NO_ZEROES` is set.
    pub fn no_zeroes(self) -> bool {
        self.0 & client_flags::NO_ZEROES != 0
    }

    /// The 4 wire bytes.
    pub fn encode(self) -> [u8; CLIENT_FLAGS_BYTES] {
        self.0.to_be_bytes()
    }
}

// ---------------------------------------------------------------------------
// Option requests

/// The 16-byte header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code ([`opt`]).
    pub code: u32,
    /// Bytes of option data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Checks `IHAVEOPT` and reads the code and length.
    pub fn decode(bytes: &[u8; OPTION_HEADER_BYTES]) -> Result<Self> {
        let mut r = Reader::new("option header", bytes);
        expect_u64(&mut r, "option request", magic::IHAVEOPT)?;
        Ok(Self { code: r.u32()?, len: r.u32()? })
    }

    /// The 16 wire bytes.
    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut out = Vec::with_capacity(OPTION_HEADER_BYTES);
        out.put_u64(magic::IHAVEOPT);
        out.put_u32(self.code);
        out.put_u32(self.len);
        to_array(&out)
    }
}

/// One option request: its code and its raw data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    /// Option code ([`opt`]).
    pub code: u32,
    /// Option data; parse it with [`parse_export_name`],
    /// [`InfoRequest::parse`] or [`MetaContextRequest::parse`].
    pub data: Vec<u8>,
}

impl OptionRequest {
    /// An option without data (`NBD_OPT_ABORT`, `NBD_OPT_LIST`,
    /// `NBD_OPT_STARTTLS`, `NBD_OPT_STRUCTURED_REPLY`,
    /// `NBD_OPT_EXTENDED_HEADERS`).
    pub fn new(code: u32) -> Self {
        Self { code, data: Vec::new() }
    }

    /// Client side: `NBD_OPT_EXPORT_NAME` for `name`.
    pub fn export_name(name: &str) -> Result<Self> {
        check_str("export name", name)?;
        Ok(Self { code: opt::EXPORT_NAME, data: name.as_bytes().to_vec() })
    }

    /// Server side: decodes one option request from the front of `buf`.
    ///
    /// `Ok(None)` while `buf` holds less than a whole option. An option
    /// whose data is longer than `max` is refused as soon as its header is
    /// in: [`ProtoError::OptionTooLong`] carries the code and length, so the
    /// server can skip the [`OPTION_HEADER_BYTES`] + `len` bytes and answer
    /// `NBD_REP_ERR_TOO_BIG`, or disconnect. A bad magic is
    /// [`ProtoError::BadMagic`].
    pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Self, usize)>> {
        let Some(header) = buf.first_chunk::<OPTION_HEADER_BYTES>() else {
            return Ok(None);
        };
        let header = OptionHeader::decode(header)?;
        let len = to_usize(u64::from(header.len));
        if len > max {
            return Err(ProtoError::OptionTooLong { code: header.code, len: header.len, max });
        }
        let Some(data) = buf.get(OPTION_HEADER_BYTES..).and_then(|rest| rest.get(..len)) else {
            return Ok(None);
        };
        Ok(Some((Self { code: header.code, data: data.to_vec() }, OPTION_HEADER_BYTES + len)))
    }

    /// Client side: appends the header and data.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        let len = len_u32("option data", self.data.len())?;
        out.extend_from_slice(&OptionHeader { code: self.code, len }.encode());
        out.extend_from_slice(&self.data);
        Ok(())
    }
}

/// Server side: the data of `NBD_OPT_EXPORT_NAME` is the bare name.
pub fn parse_export_name(data: &[u8]) -> Result<String> {
    check_string("export name", data).map(str::to_owned)
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: u32 name length, name, u16
/// count, count × u16 information types.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// Export name; empty for the default export.
    pub name: String,
    /// Requested [`info`] types, in the client's order (duplicates are the
    /// client's fault and are kept; unknown types are for the server to
    /// ignore).
    pub info_types: Vec<u16>,
}

impl InfoRequest {
    /// Server side: parses the option data; every length must match
    /// exactly.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new("NBD_OPT_INFO/GO data", data);
        let name = read_string(&mut r, "export name")?;
        let count = r.u16()?;
        let need = usize::from(count) * 2;
        let have = r.remaining();
        if have < need {
            return Err(ProtoError::CountMismatch {
                what: "information requests",
                declared: u64::from(count),
                found: (have / 2) as u64,
            });
        }
        let info_types = (0..count).map(|_| r.u16()).collect::<Result<Vec<_>>>()?;
        r.finish()?;
        Ok(Self { name, info_types })
    }

    /// Client side: the option data.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let count = len_u16("information request count", self.info_types.len())?;
        let mut out = Vec::with_capacity(4 + self.name.len() + 2 + 2 * self.info_types.len());
        put_string(&mut out, "export name", &self.name)?;
        out.put_u16(count);
        for &t in &self.info_types {
            out.put_u16(t);
        }
        Ok(out)
    }

    /// Client side: the whole option, for `code` = [`opt::INFO`] or
    /// [`opt::GO`].
    pub fn to_option(&self, code: u32) -> Result<OptionRequest> {
        Ok(OptionRequest { code, data: self.encode()? })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`:
/// u32 name length, name, u32 query count, each query a u32 length and a
/// string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaContextRequest {
    /// Export name.
    pub name: String,
    /// Queries, each of the form `namespace:rest` (not checked here).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Server side: parses the option data; every length must match
    /// exactly. A syntactically invalid request must be answered with
    /// `NBD_REP_ERR_INVALID`.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new("meta context option data", data);
        let name = read_string(&mut r, "export name")?;
        let count = r.u32()?;
        let mut queries = Vec::new();
        for found in 0..count {
            if r.is_empty() {
                return Err(ProtoError::CountMismatch {
                    what: "meta context queries",
                    declared: u64::from(count),
                    found: u64::from(found),
                });
            }
            queries.push(read_string(&mut r, "meta context query")?);
        }
        r.finish()?;
        Ok(Self { name, queries })
    }

    /// Client side: the option data.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let count = len_u32("meta context query count", self.queries.len())?;
        let mut out = Vec::new();
        put_string(&mut out, "export name", &self.name)?;
        out.put_u32(count);
        for q in &self.queries {
            put_string(&mut out, "meta context query", q)?;
        }
        Ok(out)
    }

    /// Client side: the whole option, for `code` =
    /// [`opt::LIST_META_CONTEXT`] or [`opt::SET_META_CONTEXT`].
    pub fn to_option(&self, code: u32) -> Result<OptionRequest> {
        Ok(OptionRequest { code, data: self.encode()? })
    }
}

// ---------------------------------------------------------------------------
// Option replies

/// The 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// Reply type ([`rep`]).
    pub reply_type: u32,
    /// Bytes of reply data that follow.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Checks the magic and reads the fields.
    pub fn decode(bytes: &[u8; OPTION_REPLY_HEADER_BYTES]) -> Result<Self> {
        let mut r = Reader::new("option reply header", bytes);
        expect_u64(&mut r, "option reply", magic::OPTION_REPLY)?;
        Ok(Self { option: r.u32()?, reply_type: r.u32()?, len: r.u32()? })
    }

    /// The 20 wire bytes.
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_BYTES] {
        let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_BYTES);
        out.put_u64(magic::OPTION_REPLY);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.len);
        to_array(&out)
    }
}

/// One option reply: the option it answers, its type and its raw data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// Reply type ([`rep`]).
    pub reply_type: u32,
    /// Reply data; interpret it with [`OptionReply::parse`].
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Client side: decodes one reply from the front of `buf`, `Ok(None)`
    /// while incomplete. Data longer than `max` (e.g.
    /// [`REPLY_BYTES_MAX`](crate::consts::REPLY_BYTES_MAX)) is
    /// [`ProtoError::ReplyTooLong`] as soon as the header is in.
    pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Self, usize)>> {
        let Some(header) = buf.first_chunk::<OPTION_REPLY_HEADER_BYTES>() else {
            return Ok(None);
        };
        let h = OptionReplyHeader::decode(header)?;
        let len = to_usize(u64::from(h.len));
        if len > max {
            return Err(ProtoError::ReplyTooLong { option: h.option, reply_type: h.reply_type, len: h.len, max });
        }
        let Some(data) = buf.get(OPTION_REPLY_HEADER_BYTES..).and_then(|rest| rest.get(..len)) else {
            return Ok(None);
        };
        Ok(Some((
            Self { option: h.option, reply_type: h.reply_type, data: data.to_vec() },
            OPTION_REPLY_HEADER_BYTES + len,
        )))
    }

    /// Appends the header and data.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        encode_reply(self.option, self.reply_type, &self.data, out)
    }

    /// Whether the reply type is an error.
    pub fn is_error(&self) -> bool {
        rep::is_error(self.reply_type)
    }

    /// Client side: interprets the data by reply type.
    pub fn parse(&self) -> Result<ReplyData> {
        let data = self.data.as_slice();
        Ok(match self.reply_type {
            rep::ACK => {
                Reader::new("NBD_REP_ACK data", data).finish()?;
                ReplyData::Ack
            }
            rep::SERVER => ReplyData::Server(ServerEntry::parse(data)?),
            rep::INFO => ReplyData::Info(InfoReply::parse(data)?),
            rep::META_CONTEXT => ReplyData::MetaContext(MetaContext::parse(data)?),
            t if rep::is_error(t) => ReplyData::Error { reply_type: t, message: lossy_message("error message", data)? },
            t => ReplyData::Unknown { reply_type: t },
        })
    }
}

/// The data of an option reply, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyData {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`.
    Server(ServerEntry),
    /// `NBD_REP_INFO`.
    Info(InfoReply),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext(MetaContext),
    /// Any error type (bit 31), with its message (may be empty; invalid
    /// UTF-8 replaced).
    Error { reply_type: u32, message: String },
    /// A non-error type this codec does not know.
    Unknown { reply_type: u32 },
}

/// Server side: appends an option reply (`reply(option, type, data)`).
pub fn encode_reply(option: u32, reply_type: u32, data: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let len = len_u32("option reply data", data.len())?;
    out.extend_from_slice(&OptionReplyHeader { option, reply_type, len }.encode());
    out.extend_from_slice(data);
    Ok(())
}

/// Server side: `NBD_REP_ACK` to `option`.
pub fn encode_ack(option: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&OptionReplyHeader { option, reply_type: rep::ACK, len: 0 }.encode());
}

/// Server side: an error reply (`reply_type` one of the `rep::ERR_*`) with
/// an optional message for display (empty: no data).
pub fn encode_error(option: u32, reply_type: u32, message: &str, out: &mut Vec<u8>) -> Result<()> {
    check_str("error message", message)?;
    encode_reply(option, reply_type, message.as_bytes(), out)
}

/// One export in the answer to `NBD_OPT_LIST`: u32 name length, name, and
/// an optional description filling the rest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerEntry {
    /// Export name.
    pub name: String,
    /// Description for display; empty when absent.
    pub description: String,
}

impl ServerEntry {
    /// Client side: parses `NBD_REP_SERVER` data.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new("NBD_REP_SERVER data", data);
        let name = read_string(&mut r, "export name")?;
        let description = lossy_message("export description", r.rest())?;
        Ok(Self { name, description })
    }

    /// Server side: appends the whole `NBD_REP_SERVER` reply to
    /// `NBD_OPT_LIST`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        check_str("export description", &self.description)?;
        let mut data = Vec::with_capacity(4 + self.name.len() + self.description.len());
        put_string(&mut data, "export name", &self.name)?;
        data.extend_from_slice(self.description.as_bytes());
        encode_reply(opt::LIST, rep::SERVER, &data, out)
    }
}

/// Size and transmission flags of an export: the `NBD_INFO_EXPORT` payload
/// and the `NBD_OPT_EXPORT_NAME` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags ([`transmission_flags`](crate::consts::transmission_flags)).
    pub transmission_flags: u16,
}

/// Size constraints: the `NBD_INFO_BLOCK_SIZE` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size (power of 2, at most 64 KiB).
    pub min: u32,
    /// Preferred block size (power of 2, at least max(min, 512)).
    pub preferred: u32,
    /// Maximum payload size.
    pub max: u32,
}

/// One `NBD_REP_INFO`: u16 information type, then its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT` (length 12).
    Export(ExportInfo),
    /// `NBD_INFO_NAME`: the canonical export name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE` (length 14).
    BlockSize(BlockSize),
    /// A type this codec does not know; the client must ignore it.
    Unknown { info_type: u16, payload: Vec<u8> },
}

impl InfoReply {
    /// The information type.
    pub fn info_type(&self) -> u16 {
        match self {
            Self::Export(_) => info::EXPORT,
            Self::Name(_) => info::NAME,
            Self::Description(_) => info::DESCRIPTION,
            Self::BlockSize(_) => info::BLOCK_SIZE,
            Self::Unknown { info_type, .. } => *info_type,
        }
    }

    /// Client side: parses `NBD_REP_INFO` data; fixed-size types must have
    /// their exact length.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new("NBD_REP_INFO data", data);
        let info_type = r.u16()?;
        let reply = match info_type {
            info::EXPORT => Self::Export(ExportInfo { size: r.u64()?, transmission_flags: r.u16()? }),
            info::NAME => Self::Name(check_string("export name", r.rest())?.to_owned()),
            info::DESCRIPTION => Self::Description(lossy_message("export description", r.rest())?),
            info::BLOCK_SIZE => Self::BlockSize(BlockSize { min: r.u32()?, preferred: r.u32()?, max: r.u32()? }),
            _ => Self::Unknown { info_type, payload: r.rest().to_vec() },
        };
        r.finish()?;
        Ok(reply)
    }

    /// The reply data: type then payload.
    pub fn encode_data(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(16);
        out.put_u16(self.info_type());
        match self {
            Self::Export(e) => {
                out.put_u64(e.size);
                out.put_u16(e.transmission_flags);
            }
            Self::Name(s) => {
                check_str("export name", s)?;
                out.extend_from_slice(s.as_bytes());
            }
            Self::Description(s) => {
                check_str("export description", s)?;
                out.extend_from_slice(s.as_bytes());
            }
            Self::BlockSize(b) => {
                out.put_u32(b.min);
                out.put_u32(b.preferred);
                out.put_u32(b.max);
            }
            Self::Unknown { payload, .. } => out.extend_from_slice(payload),
        }
        Ok(out)
    }

    /// Server side: appends the whole `NBD_REP_INFO` reply to `option`
    /// (`NBD_OPT_INFO` or `NBD_OPT_GO`).
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) -> Result<()> {
        encode_reply(option, rep::INFO, &self.encode_data()?, out)
    }
}

/// One `NBD_REP_META_CONTEXT`: u32 context id, context name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Context id (zero and meaningless in answers to
    /// `NBD_OPT_LIST_META_CONTEXT`).
    pub id: u32,
    /// Context name, `namespace:leaf`.
    pub name: String,
}

impl MetaContext {
    /// Client side: parses `NBD_REP_META_CONTEXT` data.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new("NBD_REP_META_CONTEXT data", data);
        let id = r.u32()?;
        let name = check_string("meta context name", r.rest())?.to_owned();
        Ok(Self { id, name })
    }

    /// Server side: appends the whole `NBD_REP_META_CONTEXT` reply to
    /// `option`.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) -> Result<()> {
        check_str("meta context name", &self.name)?;
        let mut data = Vec::with_capacity(4 + self.name.len());
        data.put_u32(self.id);
        data.extend_from_slice(self.name.as_bytes());
        encode_reply(option, rep::META_CONTEXT, &data, out)
    }
}

// ---------------------------------------------------------------------------
// The NBD_OPT_EXPORT_NAME ending

/// Server side: the answer to `NBD_OPT_EXPORT_NAME` — u64 size, u16
/// transmission flags, then 124 zero bytes unless the client set
/// `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(export: ExportInfo, no_zeroes: bool, out: &mut Vec<u8>) {
    out.put_u64(export.size);
    out.put_u16(export.transmission_flags);
    if !no_zeroes {
        out.extend_from_slice(&[0; EXPORT_NAME_ZEROES_BYTES]);
    }
}

/// Client side: decodes the answer to `NBD_OPT_EXPORT_NAME` from the front
/// of `buf`, `Ok(None)` while incomplete. The reserved zeroes are skipped
/// unread.
pub fn decode_export_name_reply(buf: &[u8], no_zeroes: bool) -> Result<Option<(ExportInfo, usize)>> {
    let total = EXPORT_NAME_REPLY_BYTES + if no_zeroes { 0 } else { EXPORT_NAME_ZEROES_BYTES };
    let Some(msg) = buf.get(..total) else {
        return Ok(None);
    };
    let mut r = Reader::new("NBD_OPT_EXPORT_NAME reply", msg);
    let export = ExportInfo { size: r.u64()?, transmission_flags: r.u16()? };
    Ok(Some((export, total)))
}

// ---------------------------------------------------------------------------
// Helpers

fn expect_u64(r: &mut Reader<'_>, what: &'static str, expected: u64) -> Result<()> {
    let got = r.u64()?;
    if got == expected { Ok(()) } else { Err(ProtoError::BadMagic { what, expected, got }) }
}

/// u32 length, then that many bytes of protocol string.
fn read_string(r: &mut Reader<'_>, what: &'static str) -> Result<String> {
    let len = r.u32()?;
    let bytes = r.bytes(to_usize(u64::from(len)))?;
    check_string(what, bytes).map(str::to_owned)
}

/// u32 length, then the string.
fn put_string(out: &mut Vec<u8>, what: &'static str, s: &str) -> Result<()> {
    check_str(what, s)?;
    out.put_u32(len_u32(what, s.len())?);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests;
