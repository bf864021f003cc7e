//! The file driver's channel on one reactor: requests become io_uring
//! operations on that reactor's ring.
//!
//! Short reads and writes continue where they stopped; a read that reaches
//! the end of the file fills the rest with zeroes. Write-zeroes tries, in
//! order, hole punching (when the caller allows deallocation), a zero-range
//! fallocate, then plain writes of zeroes — unless the caller asked for a
//! fast zero only.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use reactor::{IoBuf, Op, OpCallback, Ring};
use slab::Slab;

use super::{FileBdev, seek_status_async};
use crate::bdev::{Channel, LocalBoxFuture};
use crate::error::IoError;
use crate::io::{BlockStatus, Done, Io, IoFlags, IoKind};

/// Reads and writes of files in memory from this size on are copied by the
/// offload threads (`reactor::offload`), which use every core, instead of
/// kernel workers pinned to this reactor's core; smaller ones stay on the
/// ring, where a thread hop would cost more than the copy.
const OFFLOAD_MIN_BYTES: usize = 64 << 10;

/// Largest write of zeroes issued at once when the file system cannot zero a range.
const ZERO_WRITE_CHUNK_BYTES: u64 = 1 << 20;

const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// What the kernel is doing for a request right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Read or write of the request's own buffer.
    Data,
    Fsync,
    Discard,
    /// Write-zeroes by punching a hole.
    Punch,
    /// Write-zeroes by FALLOC_FL_ZERO_RANGE.
    ZeroRange,
    /// Write-zeroes by writing a zero buffer, chunk by chunk.
    ZeroWrite,
}

struct Req {
    kind: IoKind,
    offset: u64,
    len: u64,
    flags: IoFlags,
    /// A buffer the request carries but the kernel does not use (write-zeroes
    /// turned from a write by detect-zeroes keeps its data buffer here).
    spare: Option<IoBuf>,
    done: Done,
    stage: Stage,
    /// Bytes of the request finished so far.
    progress: u64,
}

pub(crate) struct FileChannel {
    bdev: Arc<FileBdev>,
    ring: Rc<Ring>,
    me: Weak<FileChannel>,
    reqs: RefCell<Slab<Req>>,
}

impl FileChannel {
    pub(crate) fn new(bdev: Arc<FileBdev>) -> Rc<FileChannel> {
        let ring = Rc::clone(reactor::current().ring());
        Rc::new_cyclic(|me| FileChannel { bdev, ring, me: me.clone(), reqs: RefCell::new(Slab::new()) })
    }

    fn callback(&self) -> Rc<dyn OpCallback> {
        self.me.upgrade().expect("channel alive while submitting")
    }

    fn issue(&self, key: usize, op: Op) {
        let big = matches!(op, Op::Read { len, .. } | Op::Write { len, .. } if len >= OFFLOAD_MIN_BYTES);
        if self.bdev.punt && big {
            reactor::offload(op, self.callback(), key as u64);
        } else if self.bdev.punt && matches!(op, Op::Read { .. }) {
            self.ring.submit_punted_with(op, self.callback(), key as u64);
        } else {
            self.ring.submit_with(op, self.callback(), key as u64);
        }
    }

    /// The operation for the current stage of request `key`, given the data
    /// buffer (for stages that move data).
    fn stage_op(&self, req: &Req, buf: Option<IoBuf>) -> Op {
        let fd = Arc::clone(&self.bdev.fd);
        let at = req.progress;
        match req.stage {
            Stage::Data => {
                let buf = buf.expect("data stage has a buffer");
                let (offset, at, len) = (req.offset + at, at as usize, (req.len - at) as usize);
                match req.kind {
                    IoKind::Read => Op::Read { fd, offset, buf, at, len },
                    _ => Op::Write { fd, offset, buf, at, len, fua: req.flags.contains(IoFlags::FUA) },
                }
            }
            Stage::Fsync => Op::Fsync { fd, datasync: true },
            Stage::Discard => Op::Fallocate { fd, mode: PUNCH_HOLE, offset: req.offset, len: req.len },
            Stage::Punch => Op::Fallocate { fd, mode: PUNCH_HOLE, offset: req.offset, len: req.len },
            Stage::ZeroRange => {
                let mode = if req.flags.contains(IoFlags::GROW) { libc::FALLOC_FL_ZERO_RANGE } else { ZERO_RANGE };
                Op::Fallocate { fd, mode, offset: req.offset, len: req.len }
            }
            Stage::ZeroWrite => {
                let chunk = (req.len - at).min(ZERO_WRITE_CHUNK_BYTES) as usize;
                let buf = buf.unwrap_or_else(|| IoBuf::zeroed(chunk));
                Op::Write { fd, offset: req.offset + at, buf, at: 0, len: chunk, fua: req.flags.contains(IoFlags::FUA) }
            }
        }
    }

    fn first_zero_stage(&self, flags: IoFlags) -> Option<Stage> {
        if flags.contains(IoFlags::MAY_UNMAP) {
            Some(Stage::Punch)
        } else if self.bdev.zero_range_supported() {
            Some(Stage::ZeroRange)
        } else if flags.contains(IoFlags::NO_FALLBACK) {
            None
        } else {
            Some(Stage::ZeroWrite)
        }
    }

    /// Moves a write-zeroes request to its next strategy after `EOPNOTSUPP`.
    fn next_zero_stage(&self, stage: Stage, flags: IoFlags) -> Option<Stage> {
        match stage {
            Stage::Punch if self.bdev.zero_range_supported() => Some(Stage::ZeroRange),
            Stage::Punch | Stage::ZeroRange if !flags.contains(IoFlags::NO_FALLBACK) => Some(Stage::ZeroWrite),
            _ => None,
        }
    }

    fn finish(&self, key: usize, buf: Option<IoBuf>, res: Result<(), IoError>) {
        let req = self.reqs.borrow_mut().remove(key);
        let buf = match req.stage {
            Stage::Data => buf,
            _ => req.spare,
        };
        let io = Io { kind: req.kind, offset: req.offset, len: req.len, flags: req.flags, buf };
        req.done.complete(io, res);
    }

    fn restart(&self, key: usize, stage: Stage) {
        let op = {
            let mut reqs = self.reqs.borrow_mut();
            let req = &mut reqs[key];
            req.stage = stage;
            req.progress = 0;
            self.stage_op(req, None)
        };
        self.issue(key, op);
    }

    fn continue_or_finish(&self, key: usize, buf: IoBuf, n: u64) {
        let next = {
            let mut reqs = self.reqs.borrow_mut();
            let req = &mut reqs[key];
            req.progress += n;
            (req.progress < req.len).then(|| self.stage_op(req, Some(buf)))
        };
        match next {
            Some(op) => self.issue(key, op),
            // Only zero writes get here: a data request finishes in op_done
            // with its buffer; the zero buffer went away with its last op.
            None => self.finish(key, None, Ok(())),
        }
    }
}

impl Channel for FileChannel {
    fn submit(&self, mut io: Io, done: Done) {
        let stage = match io.kind {
            IoKind::Read | IoKind::Write => Stage::Data,
            IoKind::Flush if self.bdev.no_flush => return done.complete_later(io, Ok(())),
            IoKind::Flush => Stage::Fsync,
            IoKind::Discard => Stage::Discard,
            IoKind::WriteZeroes => match self.first_zero_stage(io.flags) {
                Some(s) => s,
                None => return done.complete_later(io, Err(IoError::NotSupported)),
            },
        };
        if matches!(io.kind, IoKind::Discard | IoKind::WriteZeroes) {
            self.bdev.forget_extent(io.offset, io.len);
        }
        let data = if stage == Stage::Data { io.buf.take() } else { None };
        let req = Req {
            kind: io.kind,
            offset: io.offset,
            len: io.len,
            flags: io.flags,
            spare: io.buf.take(),
            done,
            stage,
            progress: 0,
        };
        let op = self.stage_op(&req, data);
        let key = self.reqs.borrow_mut().insert(req);
        self.issue(key, op);
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        seek_status_async(&self.bdev, offset, len)
    }
}

impl OpCallback for FileChannel {
    fn op_done(&self, tag: u64, res: i32, op: Op) {
        let key = tag as usize;
        let (stage, kind, flags) = {
            let reqs = self.reqs.borrow();
            let r = &reqs[key];
            (r.stage, r.kind, r.flags)
        };
        let buf = op.into_buf();
        if matches!(stage, Stage::Discard | Stage::Punch | Stage::ZeroRange) {
            // A block-status query may have cached the extent meanwhile.
            let r = &self.reqs.borrow()[key];
            self.bdev.forget_extent(r.offset, r.len);
        }
        match stage {
            Stage::Data | Stage::ZeroWrite => {
                let buf = buf.expect("data operations return their buffer");
                if res < 0 {
                    let keep = (stage == Stage::Data).then_some(buf);
                    return self.finish(key, keep, Err(IoError::from_errno(res)));
                }
                if res == 0 {
                    if kind == IoKind::Read {
                        // End of file: the rest reads as zeroes.
                        let mut buf = buf;
                        let at = self.reqs.borrow()[key].progress as usize;
                        buf[at..].fill(0);
                        return self.finish(key, Some(buf), Ok(()));
                    }
                    let keep = (stage == Stage::Data).then_some(buf);
                    return self.finish(key, keep, Err(IoError::Io));
                }
                if stage == Stage::Data {
                    let (progress, len) = {
                        let reqs = self.reqs.borrow();
                        (reqs[key].progress + res as u64, reqs[key].len)
                    };
                    if progress >= len {
                        return self.finish(key, Some(buf), Ok(()));
                    }
                    let align = u64::from(self.bdev.block_size);
                    if kind == IoKind::Read && !progress.is_multiple_of(align) {
                        // A short direct read ends at the end of a file whose
                        // size is not aligned: the rest reads as zeroes.
                        let mut buf = buf;
                        buf[progress as usize..].fill(0);
                        return self.finish(key, Some(buf), Ok(()));
                    }
                }
                self.continue_or_finish(key, buf, res as u64);
            }
            Stage::Punch | Stage::ZeroRange
                if res == -libc::EOPNOTSUPP || res == -libc::EINVAL && stage == Stage::ZeroRange =>
            {
                if stage == Stage::ZeroRange {
                    self.bdev.zero_range_unsupported();
                }
                match self.next_zero_stage(stage, flags) {
                    Some(next) => self.restart(key, next),
                    None => self.finish(key, None, Err(IoError::NotSupported)),
                }
            }
            // A discard is advisory: a file system without hole punching ignores it.
            Stage::Discard if res == -libc::EOPNOTSUPP => self.finish(key, None, Ok(())),
            _ if res < 0 => self.finish(key, None, Err(IoError::from_errno(res))),
            _ => self.finish(key, None, Ok(())),
        }
    }
}
