//! Every number of the NBD protocol, from `doc/proto.md` of
//! NetworkBlockDevice/nbd (and its `extension-ext-header` branch for the
//! extended headers), grouped by the field that carries it.
//!
//! The Rust type of each constant is the width of its wire field. Names drop
//! the `NBD_` / group prefix of the document: `NBD_OPT_GO` is [`opt::GO`],
//! `NBD_CMD_FLAG_FUA` is [`cmd_flags::FUA`], `NBD_REPLY_TYPE_ERROR` is
//! [`reply_type::ERROR`].

/// The longest string the protocol allows (export names, context names,
/// queries, error messages), in bytes. Strings SHOULD be at most 256.
pub const STRING_BYTES_MAX: usize = 4096;

/// The longest export name, in bytes: the protocol's string limit.
pub const EXPORT_NAME_BYTES_MAX: usize = STRING_BYTES_MAX;

/// The most option data the server-side option decoder accepts, in bytes.
/// Enough for `NBD_OPT_SET_META_CONTEXT` with a full-length name and a dozen
/// full-length queries; anything longer is refused with
/// [`ProtoError::OptionTooLong`](crate::ProtoError::OptionTooLong).
pub const OPTION_BYTES_MAX: usize = 64 * 1024;

/// The most option reply data the client-side decoder accepts, in bytes.
/// The largest defined reply (`NBD_REP_SERVER` with name and description)
/// is about 8 KiB.
pub const REPLY_BYTES_MAX: usize = 64 * 1024;

/// Bytes of the newstyle server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Bytes of the client flags field.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Bytes of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of the reserved zeroes after the `NBD_OPT_EXPORT_NAME` reply,
/// unless `NBD_FLAG_C_NO_ZEROES` was negotiated.
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Bytes of the `NBD_OPT_EXPORT_NAME` reply without the zeroes: size, flags.
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;
/// Bytes of a compact request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes of an extended request header.
pub const EXTENDED_REQUEST_HEADER_BYTES: usize = 32;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of an extended reply chunk header.
pub const EXTENDED_REPLY_HEADER_BYTES: usize = 32;

/// Default minimum block size, in bytes, when none was advertised.
pub const DEFAULT_MIN_BLOCK_BYTES: u32 = 1;
/// Default preferred block size, in bytes, when none was advertised.
pub const DEFAULT_PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Default maximum payload, in bytes (2^25), when none was advertised; also
/// the largest payload that SHOULD NOT be treated as denial of service.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u32 = 1 << 25;
/// The largest minimum block size a server may advertise, in bytes.
pub const MIN_BLOCK_BYTES_MAX: u32 = 1 << 16;
/// Servers SHOULD NOT send more extents than this in one block status chunk.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1 << 20;
/// The one metadata context the protocol defines.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's namespace of metadata contexts (QEMU's `docs/interop/nbd.rst`).
pub const QEMU_NAMESPACE: &str = "qemu:";
/// QEMU's context telling which layer of a backing chain holds each extent.
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty bitmap contexts: `qemu:dirty-bitmap:NAME`.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Magic numbers.
pub mod magic {
    /// `NBDMAGIC` (`INIT_PASSWD`): first 8 bytes of every server greeting.
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// `IHAVEOPT`: second word of the newstyle greeting and the start of
    /// every option request.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// `cliserv_magic` of the oldstyle greeting (not supported here).
    pub const CLISERV: u64 = 0x0000_4202_8186_1253;
    /// Start of every option reply.
    pub const OPTION_REPLY: u64 = 0x0003_e889_0455_65a9;
    /// `NBD_REQUEST_MAGIC`: compact request header.
    pub const REQUEST: u32 = 0x2560_9513;
    /// `NBD_EXTENDED_REQUEST_MAGIC`: extended request header.
    pub const EXTENDED_REQUEST: u32 = 0x21e4_1c71;
    /// `NBD_SIMPLE_REPLY_MAGIC` (formerly `NBD_REPLY_MAGIC`).
    pub const SIMPLE_REPLY: u32 = 0x6744_6698;
    /// `NBD_STRUCTURED_REPLY_MAGIC`: structured reply chunk header.
    pub const STRUCTURED_REPLY: u32 = 0x668e_33ef;
    /// `NBD_EXTENDED_REPLY_MAGIC`: extended reply chunk header.
    pub const EXTENDED_REPLY: u32 = 0x6e8a_278c;
}

/// Handshake flags (16 bits, server to client, in the greeting).
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`: the server can omit the 124 zero bytes.
    pub const NO_ZEROES: u16 = 1 << 1;
    /// Every handshake flag defined.
    pub const ALL: u16 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Client flags (32 bits, client to server, after the greeting).
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every client flag defined.
    pub const ALL: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, server to client, per export).
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`: the export behaves like a rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and
    /// `NBD_CMD_FLAG_NO_HOLE` are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` on reads is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: flushes are visible across connections.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`: `NBD_CMD_RESIZE` (experimental extension).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`: `NBD_CMD_BLOCK_STATUS` accepts the
    /// payload form (extended headers only).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option codes (32 bits, in option requests and replies).
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`: end the negotiation.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`: list the exports.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_PEEK_EXPORT`: withdrawn, not in use.
    pub const PEEK_EXPORT: u32 = 4;
    /// `NBD_OPT_STARTTLS`: upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`: describe an export.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`: describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`: use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`: use extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The document's name for an option code, for logs.
    pub fn name(code: u32) -> Option<&'static str> {
        Some(match code {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => return None,
        })
    }
}

/// Option reply types (32 bits). Error types have bit 31 set and may carry a
/// message for display.
pub mod rep {
    /// `NBD_REP_ACK`: the option succeeded, or a list is complete.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`: one export, in reply to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`: one item of export information.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`: one metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31: set on every error reply type.
    pub const ERR_BIT: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`: unknown option.
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    /// `NBD_REP_ERR_POLICY`: forbidden by server policy.
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    /// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    /// `NBD_REP_ERR_PLATFORM`: not supported on this platform or build.
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    /// `NBD_REP_ERR_TLS_REQD`: TLS must be initiated first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: request `NBD_INFO_BLOCK_SIZE` first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    /// `NBD_REP_ERR_TOO_BIG`: the request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    /// `NBD_REP_ERR_EXT_HEADER_REQD`: extended headers are required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;

    /// Whether a reply type is an error.
    pub fn is_error(reply_type: u32) -> bool {
        reply_type & ERR_BIT != 0
    }
}

/// Information types (16 bits) of `NBD_OPT_INFO` / `NBD_OPT_GO` requests and
/// `NBD_REP_INFO` replies.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: canonical export name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types (16 bits).
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`: the payload follows the header.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`: disconnect; no reply.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
    /// `NBD_CMD_RESIZE` (experimental extension): `offset` is the new size.
    pub const RESIZE: u16 = 8;

    /// Whether a command is one this codec knows.
    pub fn is_known(kind: u16) -> bool {
        kind <= RESIZE
    }

    /// The document's name for a command, for logs.
    pub fn name(kind: u16) -> Option<&'static str> {
        Some(match kind {
            READ => "NBD_CMD_READ",
            WRITE => "NBD_CMD_WRITE",
            DISC => "NBD_CMD_DISC",
            FLUSH => "NBD_CMD_FLUSH",
            TRIM => "NBD_CMD_TRIM",
            CACHE => "NBD_CMD_CACHE",
            WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
            BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
            RESIZE => "NBD_CMD_RESIZE",
            _ => return None,
        })
    }
}

/// Command flags (16 bits, in every request).
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`: persist before replying (any command, if
    /// `NBD_FLAG_SEND_FUA`).
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: `NBD_CMD_WRITE_ZEROES` must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: `NBD_CMD_READ` reply in at most one content chunk.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: `NBD_CMD_BLOCK_STATUS` wants one extent.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: `NBD_CMD_WRITE_ZEROES` must be fast or fail.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`: with extended headers, *length* is a
    /// payload length and that many bytes follow the header.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
    /// Every command flag defined.
    pub const ALL: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO | PAYLOAD_LEN;
}

/// Structured / extended reply flags (16 bits).
pub mod reply_flags {
    /// `NBD_REPLY_FLAG_DONE`: the final chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured / extended reply chunk types (16 bits). Error types have bit
/// 15 set.
pub mod reply_type {
    /// `NBD_REPLY_TYPE_NONE`: no payload; final chunk.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: u64 offset, then data.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: u64 offset, u32 hole size.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: u32 context id, then (u32 length, u32
    /// flags) descriptors. Compact headers only.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: u32 context id, u32 count, then
    /// (u64 length, u64 flags) descriptors. Extended headers only.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Bit 15: set on every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// `NBD_REPLY_TYPE_ERROR`: u32 error, u16 message length, message.
    pub const ERROR: u16 = ERROR_BIT + 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: as `ERROR`, then u64 offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT + 2;

    /// Whether a chunk type is an error chunk.
    pub fn is_error(kind: u16) -> bool {
        kind & ERROR_BIT != 0
    }
}

/// Error values of replies (32 bits). The client should treat an unknown
/// value as [`EINVAL`](errno::EINVAL).
pub mod errno {
    /// `NBD_EPERM`: operation not permitted.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`: input/output error.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`: cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`: invalid argument.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`: no space left on device.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`: value too large.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`: operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Status flags of the `base:allocation` metadata context (32 bits).
pub mod state {
    /// `NBD_STATE_HOLE`: the extent is not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`: the extent reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Status values of QEMU's contexts (32 bits).
pub mod qemu_state {
    /// `NBD_STATE_DIRTY` of a `qemu:dirty-bitmap:` context: the extent is
    /// dirty in the bitmap.
    pub const DIRTY: u32 = 1 << 0;
    /// `qemu:allocation-depth`: no layer of the chain holds the extent. Any
    /// other value is the layer that does: 1 the exported node itself, 2
    /// its backing file, and so on.
    pub const UNALLOCATED: u32 = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&magic::NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&magic::IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn error_bits_and_values() {
        assert_eq!(rep::ERR_UNSUP, 0x8000_0001);
        assert_eq!(rep::ERR_EXT_HEADER_REQD, 0x8000_000a);
        assert!(rep::is_error(rep::ERR_TOO_BIG) && !rep::is_error(rep::ACK));
        assert_eq!(reply_type::ERROR, 32769);
        assert_eq!(reply_type::ERROR_OFFSET, 32770);
        assert!(reply_type::is_error(reply_type::ERROR_OFFSET) && !reply_type::is_error(reply_type::BLOCK_STATUS));
    }

    #[test]
    fn names() {
        assert_eq!(opt::name(opt::GO), Some("NBD_OPT_GO"));
        assert_eq!(opt::name(99), None);
        assert_eq!(cmd::name(cmd::WRITE_ZEROES), Some("NBD_CMD_WRITE_ZEROES"));
        assert!(cmd::is_known(cmd::RESIZE) && !cmd::is_known(9));
    }
}
