//! Refcounts: the refcount table (kept in memory) and the refcount blocks
//! (cached), reading and changing one cluster's count, and writing dirty
//! blocks and new table entries back.

use std::collections::BTreeSet;

use reactor::IoBuf;

use super::entry::refcount;
use super::overlap::kind;
use super::state::Qcow2;
use crate::error::IoError;

/// The refcount table.
pub(super) struct Refcounts {
    /// The refcount table: entry `t` is the offset of the block covering
    /// clusters `[t * per_block, (t + 1) * per_block)`, or 0.
    pub table: Vec<u64>,
    /// Entries set in memory (new blocks), written back once their blocks
    /// are durable (ordering rule 6).
    pub dirty: BTreeSet<u64>,
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

    /// Runs `f` on the refcount block of table index `t`, loaded; None
    /// where there is no block. Lock held.
    pub(super) async fn with_block<R>(&self, t: u64, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, IoError> {
        let Some(off) = self.block_offset(t)? else { return Ok(None) };
        self.load_block(off).await?;
        let blocks = self.blocks.borrow();
        Ok(Some(f(blocks.peek(off).expect("block just loaded"))))
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
                drop(blocks);
                if v == 0 && delta < 0 {
                    self.reuse.borrow_mut().freed(c);
                    self.packing_freed(c);
                }
                Ok(())
            }
            None if delta > 0 => {
                tracing::error!("qcow2: the refcount of cluster {c} would overflow");
                Err(IoError::Io)
            }
            None => Err(self.corrupt(format!("refcount of cluster {c} would drop below zero"))),
        }
    }

    /// Writes refcount table entries `entries` (of blocks already durable).
    pub(super) async fn write_table_entries(&self, entries: &BTreeSet<u64>) -> Result<(), IoError> {
        for &t in entries {
            // Where the table is now: a grown table moved it, and holds the entry already.
            let at = self.header.borrow().refcount_table_offset + t * 8;
            let e = self.rc.borrow().table.get(t as usize).copied().unwrap_or(0);
            self.write_checked(at, IoBuf::from_slice(&e.to_be_bytes()), kind::REFCOUNT_TABLE).await?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::testing::{KIB, MIB, caches, new_disk, open, run};
    use super::*;

    #[test]
    fn a_new_image_counts_its_own_metadata() {
        let disk = new_disk(4 * MIB, 64 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            let _g = o.q.lock.lock().await;
            // Header, refcount table, refcount block, L1 table.
            for c in 0..4 {
                assert_eq!(o.q.refcount(c).await, Ok(1), "cluster {c}");
            }
            assert_eq!(o.q.refcount(4).await, Ok(0));
            let pb = o.q.geo.per_block();
            assert_eq!(o.q.block_offset(1), Ok(None));
            assert_eq!(o.q.refcount(pb + 3).await, Ok(0), "no block: refcount 0");
            assert!(o.q.update_refcount(pb + 3, 1).await.is_err(), "no block to count in");
        });
    }

    #[test]
    fn every_width_counts_up_to_its_maximum_and_is_written_back() {
        for order in 0..=6 {
            let disk = new_disk(MIB, 4 * KIB, order);
            let d = disk.clone();
            run(async move {
                let o = open(&d, caches(8, 4)).await;
                let _g = o.q.lock.lock().await;
                let max = refcount::max(order);
                let steps = max.min(3);
                for _ in 0..steps {
                    o.q.update_refcount(9, 1).await.unwrap();
                }
                assert_eq!(o.q.refcount(9).await, Ok(steps));
                assert_eq!(o.q.refcount(8).await, Ok(0), "the neighbour is untouched (order {order})");
                assert_eq!(o.q.refcount(10).await, Ok(0));
                if max == 1 {
                    assert_eq!(o.q.update_refcount(9, 1).await, Err(IoError::Io), "1-bit refcounts overflow");
                    assert!(!o.q.fenced(), "an overflow is not corruption");
                }
                o.q.write_dirty_blocks().await.unwrap();
                let block = o.q.block_offset(0).unwrap().unwrap();
                let on_disk = d.channel().read(block, o.q.geo.cluster_size as usize).await.unwrap();
                assert_eq!(refcount::get(&on_disk, order, 9), steps, "order {order}");
            });
        }
    }

    #[test]
    fn a_refcount_below_zero_is_corruption() {
        let disk = new_disk(MIB, 4 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            let _g = o.q.lock.lock().await;
            assert_eq!(o.q.update_refcount(20, -1).await, Err(IoError::Io));
            assert!(o.q.fenced());
            let events = o.events.lock().unwrap().clone();
            assert!(events[0].1["msg"].as_str().unwrap().contains("below zero"), "{events:?}");
        });
    }

    #[test]
    fn a_table_entry_that_is_not_a_cluster_is_corruption() {
        let disk = new_disk(MIB, 4 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            o.q.rc.borrow_mut().table[1] = 5 * 4096 + 512;
            assert_eq!(o.q.block_offset(1), Err(IoError::Io));
            assert!(o.q.fenced());
        });
    }

    #[test]
    fn a_full_cache_writes_dirty_blocks_before_evicting() {
        // 512-byte clusters with 64-bit refcounts: a block covers 64 clusters.
        let disk = new_disk(MIB, 512, 6);
        let d = disk.clone();
        run(async move {
            let o = open(&d, caches(4, 1)).await;
            let _g = o.q.lock.lock().await;
            let pb = o.q.geo.per_block();
            // Enough allocations for several blocks; one block cached.
            let first = o.q.alloc_clusters(3 * pb).await.unwrap() >> 9;
            for c in [first, first + pb, first + 2 * pb, first] {
                o.q.update_refcount(c, 1).await.unwrap();
            }
            for c in [first, first + pb, first + 2 * pb] {
                let want = if c == first { 3 } else { 2 };
                assert_eq!(o.q.refcount(c).await, Ok(want), "cluster {c}");
            }
        });
    }
}
