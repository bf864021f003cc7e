//! Refcounts: the refcount table (kept in memory) and the refcount blocks
//! (cached), reading and changing one cluster's count, and writing dirty
//! blocks back.

use reactor::IoBuf;

use super::entry::refcount;
use super::overlap::kind;
use super::state::Qcow2;
use crate::error::IoError;

/// The refcount table and where the allocator stands.
pub(super) struct Refcounts {
    /// The refcount table: entry `t` is the offset of the block covering
    /// clusters `[t * per_block, (t + 1) * per_block)`, or 0.
    pub table: Vec<u64>,
    /// First cluster index the allocator considers; only moves forward.
    pub free_search: u64,
}

impl Qcow2 {
    pub(super) fn block_offset(&self, t: u64) -> Result<Option<u64>, IoError> {
        let e = self.rc.borrow().table.get(t as usize).copied().unwrap_or(0);
        let off = e & !511;
        if off == 0 {
            return Ok(None);
        }
        if off % self.geo.cluster_size != 0 || e & 511 != 0 {
            return Err(self.corrupt(format!("refcount table entry {e:#x} is invalid")));
        }
        self.check_metadata_offset(off)?;
        Ok(Some(off))
    }

    async fn load_block(&self, off: u64) -> Result<(), IoError> {
        if self.blocks.borrow().contains(off) {
            return Ok(());
        }
        while self.blocks.borrow().is_full() {
            if self.blocks.borrow_mut().evict_clean() {
                break;
            }
            // Dirty refcount blocks only hold increments until a flush
            // applies frees, so writing them early is always safe.
            self.write_dirty_blocks().await?;
        }
        let buf = self.file.read(off, self.geo.cluster_size as usize).await?;
        self.blocks.borrow_mut().insert(off, buf.to_vec(), false);
        Ok(())
    }

    /// Refcount of host cluster index `c` (0 where no block covers it). Lock held.
    pub(super) async fn refcount(&self, c: u64) -> Result<u64, IoError> {
        let pb = self.geo.per_block();
        let Some(off) = self.block_offset(c / pb)? else { return Ok(0) };
        self.load_block(off).await?;
        let blocks = self.blocks.borrow();
        let block = blocks.peek(off).expect("block just loaded");
        Ok(refcount::get(block, self.geo.refcount_order, (c % pb) as usize))
    }

    /// Adds `delta` to the refcount of host cluster index `c`, whose block exists. Lock held.
    pub(super) async fn update_refcount(&self, c: u64, delta: i64) -> Result<(), IoError> {
        let pb = self.geo.per_block();
        let Some(off) = self.block_offset(c / pb)? else {
            return Err(self.corrupt(format!("cluster {c} has no refcount block")));
        };
        self.load_block(off).await?;
        let order = self.geo.refcount_order;
        let mut blocks = self.blocks.borrow_mut();
        let block = blocks.get_mut(off).expect("block just loaded");
        let idx = (c % pb) as usize;
        let old = refcount::get(block, order, idx);
        let new = old.checked_add_signed(delta).filter(|&v| v <= refcount::max(order));
        match new {
            Some(v) => {
                refcount::set(block, order, idx, v);
                Ok(())
            }
            None if delta > 0 => {
                tracing::error!("qcow2: the refcount of cluster {c} would overflow");
                Err(IoError::Io)
            }
            None => Err(self.corrupt(format!("refcount of cluster {c} would drop below zero"))),
        }
    }

    pub(super) async fn write_dirty_blocks(&self) -> Result<(), IoError> {
        let dirty = self.blocks.borrow().dirty_offsets();
        for off in dirty {
            let buf = IoBuf::from_slice(self.blocks.borrow().peek(off).expect("dirty block is cached"));
            self.write_checked(off, buf, kind::REFCOUNT_BLOCK).await?;
            self.blocks.borrow_mut().mark_clean(off);
        }
        Ok(())
    }
}
