//! `raw`: the raw format over a protocol node (`file`), optionally a window
//! of it (`offset`, `size`). Requests pass through with their offset shifted.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use slab::Slab;

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::channel::BlockChannel;
use crate::error::{BdevError, IoError};
use crate::graph::{Node, OpenCtx};
use crate::io::{BlockStatus, Done, Io, IoDone};
use crate::lock::Perms;
use crate::options::OptReader;

pub struct RawBdev {
    file: Arc<Node>,
    offset: u64,
    size: u64,
    read_only: bool,
}

pub fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let file = opts.take("file").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("file"))?;
    let offset = opts.u64_opt("offset")?.unwrap_or(0);
    let size = opts.u64_opt("size")?;
    opts.finish()?;
    let read_only = ctx.common().read_only;
    let file = ctx.open_child("file", file, Perms::data_file(!read_only))?;
    let file_size = file.size();
    let size = size.unwrap_or(file_size.saturating_sub(offset));
    if offset.checked_add(size).is_none_or(|end| end > file_size) {
        return Err(BdevError::invalid(format!(
            "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the actual size of the containing file ({file_size})"
        )));
    }
    let align = u64::from(file.bdev().block_size());
    if offset % align != 0 {
        return Err(BdevError::invalid(format!("offset {offset} must be a multiple of the file's block size {align}")));
    }
    let read_only = read_only || file.read_only();
    Ok(Arc::new(RawBdev { file, offset, size, read_only }))
}

impl Bdev for RawBdev {
    fn driver(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.file.bdev().block_size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let file = self.file.channel()?;
        let offset = self.offset;
        Ok(Rc::new_cyclic(|me| RawChannel { file, offset, me: me.clone(), pending: RefCell::new(Slab::new()) }))
    }

    fn home(&self) -> Option<reactor::Handle> {
        self.file.home()
    }

    fn info(&self) -> BdevInfo {
        let child = self.file.bdev().info();
        BdevInfo { format_specific: None, ..child }
    }
}

struct RawChannel {
    file: BlockChannel,
    offset: u64,
    me: Weak<RawChannel>,
    /// Completions of shifted requests, restored on the way back.
    pending: RefCell<Slab<Done>>,
}

impl Channel for RawChannel {
    fn submit(&self, mut io: Io, done: Done) {
        if self.offset == 0 {
            return self.file.raw().submit(io, done);
        }
        io.offset += self.offset;
        let key = self.pending.borrow_mut().insert(done);
        let me: Rc<dyn IoDone> = self.me.upgrade().expect("channel alive while submitting");
        self.file.raw().submit(io, Done::new(me, key as u64));
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let file = self.file.clone();
        let shift = self.offset;
        Box::pin(async move { file.block_status(offset + shift, len).await })
    }
}

impl IoDone for RawChannel {
    fn io_done(&self, tag: u64, mut io: Io, res: Result<(), IoError>) {
        let done = self.pending.borrow_mut().remove(tag as usize);
        io.offset -= self.offset;
        done.complete(io, res);
    }
}
