//! One I/O request and how its completion is delivered.
//!
//! An [`Io`] is a plain value: what to do, where, and (for reads and writes)
//! the [`IoBuf`] it owns. It moves into a channel on submit and comes back,
//! buffer included, in the completion. Completions go to a [`Done`]: an
//! `Rc<dyn IoDone>` plus a caller-chosen tag — no allocation per request.

use std::rc::Rc;

use reactor::IoBuf;

use crate::error::IoError;

/// The operation of an [`Io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    /// Deallocate; the range's contents become unspecified (QEMU's discard / NBD TRIM).
    Discard,
    /// Make the range read as zeroes.
    WriteZeroes,
}

impl IoKind {
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Discard => "discard",
            IoKind::WriteZeroes => "write-zeroes",
        }
    }

    /// Changes the device's contents.
    pub fn is_write(self) -> bool {
        matches!(self, IoKind::Write | IoKind::Discard | IoKind::WriteZeroes)
    }
}

/// Modifiers of an [`Io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct IoFlags(u8);

impl IoFlags {
    pub const NONE: IoFlags = IoFlags(0);
    /// Force unit access: durable before completion.
    pub const FUA: IoFlags = IoFlags(1);
    /// Write-zeroes may deallocate the range (NBD: not NO_HOLE).
    pub const MAY_UNMAP: IoFlags = IoFlags(2);
    /// Write-zeroes must be fast (no data writes) or fail with NotSupported (NBD FAST_ZERO).
    pub const NO_FALLBACK: IoFlags = IoFlags(4);
    /// Write only where this layer holds nothing yet, leaving what it holds
    /// (copy-on-read: a stream job pulling backing data up under clients
    /// that write meanwhile). Honoured by formats with a backing file, in
    /// whole clusters; jobs send it to nothing else.
    pub const FILL_UNALLOCATED: IoFlags = IoFlags(8);
    /// Write-zeroes past the end may make the file longer, preallocated
    /// (files: FALLOC_FL_ZERO_RANGE without KEEP_SIZE). A format sends it
    /// to grow its file ahead of its allocator; other devices ignore it.
    pub const GROW: IoFlags = IoFlags(16);
    /// Store the written clusters compressed (QEMU's
    /// BDRV_REQ_WRITE_COMPRESSED: backup's `compress`). Only whole clusters
    /// (the image's last one may be partial); data that does not get
    /// smaller is stored as it is. Devices that cannot store compressed
    /// data ([`crate::Bdev::supports_compressed_writes`]) refuse the write
    /// with NotSupported.
    pub const COMPRESS: IoFlags = IoFlags(32);

    pub fn contains(self, other: IoFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn without(self, other: IoFlags) -> IoFlags {
        IoFlags(self.0 & !other.0)
    }
}

impl std::ops::BitOr for IoFlags {
    type Output = IoFlags;
    fn bitor(self, rhs: IoFlags) -> IoFlags {
        IoFlags(self.0 | rhs.0)
    }
}

/// One request. For reads and writes `len == buf.len()`.
#[derive(Debug)]
pub struct Io {
    pub kind: IoKind,
    pub offset: u64,
    pub len: u64,
    pub flags: IoFlags,
    pub buf: Option<IoBuf>,
}

impl Io {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    pub fn read(offset: u64, buf: IoBuf) -> Io {
        Io { kind: IoKind::Read, offset, len: buf.len() as u64, flags: IoFlags::NONE, buf: Some(buf) }
    }

    /// Write `buf` at `offset`.
    pub fn write(offset: u64, buf: IoBuf, flags: IoFlags) -> Io {
        Io { kind: IoKind::Write, offset, len: buf.len() as u64, flags, buf: Some(buf) }
    }

    pub fn flush() -> Io {
        Io { kind: IoKind::Flush, offset: 0, len: 0, flags: IoFlags::NONE, buf: None }
    }

    pub fn discard(offset: u64, len: u64) -> Io {
        Io { kind: IoKind::Discard, offset, len, flags: IoFlags::NONE, buf: None }
    }

    pub fn write_zeroes(offset: u64, len: u64, flags: IoFlags) -> Io {
        Io { kind: IoKind::WriteZeroes, offset, len, flags, buf: None }
    }

    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// The buffer, for drivers that know this request carries one.
    pub fn buf_mut(&mut self) -> &mut IoBuf {
        self.buf.as_mut().expect("read/write request without a buffer")
    }
}

/// Receives completed requests. One implementor usually serves many
/// requests, told apart by the tag.
pub trait IoDone {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>);
}

/// Where a request's completion goes.
#[derive(Clone)]
pub struct Done {
    target: Rc<dyn IoDone>,
    tag: u64,
}

impl Done {
    pub fn new(target: Rc<dyn IoDone>, tag: u64) -> Done {
        Done { target, tag }
    }

    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Delivers the completion now. Drivers call this only from their
    /// completion path (a poller, a reaped CQE, a deferred callback), never
    /// inside `submit`.
    pub fn complete(self, io: Io, res: Result<(), IoError>) {
        self.target.io_done(self.tag, io, res);
    }

    /// Delivers the completion on the next reactor tick: for failures found
    /// while submitting, so the caller never sees a completion inside submit.
    pub fn complete_later(self, io: Io, res: Result<(), IoError>) {
        reactor::defer(move || self.complete(io, res));
    }
}

/// What a range of a node holds, as the block-status query reports it.
///
/// Mirrors QEMU's `qemu-img map` fields: `data` (reads return stored bytes),
/// `zero` (reads return zeroes), `allocated` (some layer of the chain at or
/// below the node asked holds the range — map's `present`), and `depth`
/// (the layer that answers, 0 being the node asked; for a range no layer
/// holds, the layer where the lookup ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run with these properties, starting at the queried offset.
    pub len: u64,
    pub data: bool,
    pub zero: bool,
    pub allocated: bool,
    pub depth: u32,
    /// Offset of the data in the file underneath, where meaningful.
    pub offset: Option<u64>,
    /// Stored compressed (qcow2).
    pub compressed: bool,
}

impl BlockStatus {
    /// Allocated data at this layer.
    pub fn data(len: u64, offset: Option<u64>) -> BlockStatus {
        BlockStatus { len, data: true, zero: false, allocated: true, depth: 0, offset, compressed: false }
    }

    /// Allocated, reads as zeroes.
    pub fn zero(len: u64) -> BlockStatus {
        BlockStatus { len, data: false, zero: true, allocated: true, depth: 0, offset: None, compressed: false }
    }

    /// Held by no layer at or below this node: reads as zero.
    pub fn unallocated(len: u64) -> BlockStatus {
        BlockStatus { len, data: false, zero: true, allocated: false, depth: 0, offset: None, compressed: false }
    }
}
