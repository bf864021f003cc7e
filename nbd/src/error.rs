//! The one error type of the wire codec.
//!
//! Every variant names the step that failed, so a server can pick its answer
//! from the variant alone: an option reply error (`NBD_REP_ERR_INVALID`,
//! `NBD_REP_ERR_TOO_BIG`), an `NBD_EINVAL` reply, or a hard disconnect.
//! `what` fields are short static descriptions of the field or message being
//! decoded, for logs.

/// `Result` with [`ProtoError`] as the default error.
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// A message that does not follow the NBD protocol, or a value that cannot be
/// put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number did not match the one the protocol requires here.
    #[error("bad {what} magic: expected {expected:#x}, got {got:#x}")]
    BadMagic { what: &'static str, expected: u64, got: u64 },

    /// The client set a flag the server does not know or did not advertise;
    /// the server must drop the connection.
    #[error("client flags {flags:#x} set bits {unexpected:#x} the server does not know or did not advertise")]
    BadClientFlags { flags: u32, unexpected: u32 },

    /// An option's data is longer than the decoder accepts. The 16-byte
    /// option header has been read; `len` data bytes still follow on the
    /// stream. The server may answer `NBD_REP_ERR_TOO_BIG` after skipping
    /// them, or disconnect.
    #[error("option {code} carries {len} bytes of data, more than the {max} accepted")]
    OptionTooLong { code: u32, len: u32, max: usize },

    /// An option reply's data is longer than the decoder accepts.
    #[error("reply {reply_type:#x} to option {option} carries {len} bytes, more than the {max} accepted")]
    ReplyTooLong { option: u32, reply_type: u32, len: u32, max: usize },

    /// A message or field ended before all of its bytes were there.
    #[error("{what} is truncated: needs {need} bytes, has {got}")]
    ShortPayload { what: &'static str, need: usize, got: usize },

    /// A message had bytes left over after its last field.
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },

    /// A string is longer than the protocol's 4096-byte limit (or the
    /// width of its length field).
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    StringTooLong { what: &'static str, len: usize, max: usize },

    /// A string is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },

    /// A string contains a NUL byte, which protocol strings must not.
    #[error("{what} contains a NUL byte")]
    ContainsNul { what: &'static str },

    /// A list's declared count disagrees with the entries present.
    #[error("{what}: {declared} declared, {found} present")]
    CountMismatch { what: &'static str, declared: u64, found: u64 },

    /// A request names a command this codec does not know.
    #[error("unknown command {0}")]
    UnknownCommand(u16),

    /// A request sets command flags that are not valid for its command (or
    /// not exposed by the negotiated transmission flags).
    #[error("command {command} has flags {flags:#x}, of which {invalid:#x} are not valid for it")]
    BadFlags { command: u16, flags: u16, invalid: u16 },

    /// With extended headers, `NBD_CMD_WRITE` must set
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`.
    #[error("command {command} needs NBD_CMD_FLAG_PAYLOAD_LEN with extended headers")]
    MissingPayloadLen { command: u16 },

    /// A length is above a limit: a request's payload, a reply chunk, or a
    /// wire field's width when encoding.
    #[error("{what} of {len} bytes is more than the {max} allowed")]
    LengthTooLarge { what: &'static str, len: u64, max: u64 },

    /// `offset + length` does not fit in 64 bits.
    #[error("offset {offset} + length {length} overflows")]
    OffsetOverflow { offset: u64, length: u64 },

    /// A request reaches past the end of the export.
    #[error("offset {offset} + length {length} is beyond the export size {size}")]
    OutOfBounds { offset: u64, length: u64, size: u64 },

    /// `RequestDecoder::next` was called before the previous request's
    /// payload was consumed.
    #[error("{remaining} payload bytes of the previous request are not consumed")]
    PayloadPending { remaining: u64 },

    /// A structured reply chunk's length does not fit its type.
    #[error("reply chunk type {kind} cannot have length {len}")]
    BadChunkLength { kind: u16, len: u64 },

    /// A structured reply chunk type this codec does not know and that is
    /// not an error chunk; the client must disconnect.
    #[error("unknown reply chunk type {0}")]
    UnknownChunkType(u16),

    /// An `NBD_REPLY_TYPE_NONE` chunk without `NBD_REPLY_FLAG_DONE`.
    #[error("NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE")]
    NoneWithoutDone,

    /// A field that the protocol requires to be nonzero is zero.
    #[error("{what} is zero")]
    ZeroLength { what: &'static str },

    /// An error chunk carries error value 0.
    #[error("error chunk with error value 0")]
    ZeroErrorValue,
}
