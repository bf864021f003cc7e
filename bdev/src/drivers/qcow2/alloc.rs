//! The allocator: contiguous runs of host clusters with refcount one, new
//! refcount blocks where none covers the clusters handed out, a larger
//! refcount table when the old one is full, and growing the image file
//! ahead of the allocator.

use std::collections::HashMap;

use reactor::IoBuf;

use super::entry::refcount;
use super::overlap::kind;
use super::state::{Qcow2, encode_be64};
use crate::error::IoError;
use crate::io::IoFlags;

/// How far ahead of the allocator the image file is grown (preallocated,
/// reading as zeroes): data writes then land inside the file, where the
/// file system takes them in parallel, instead of extending it one by one.
pub(super) const GROW_AHEAD_BYTES: u64 = 32 << 20;

impl Qcow2 {
    /// Allocates `n` contiguous host clusters with refcount one; returns the
    /// offset of the first. Lock held.
    pub(super) async fn alloc_clusters(&self, n: u64) -> Result<u64, IoError> {
        debug_assert!(n > 0);
        let pb = self.geo.per_block();
        'search: loop {
            let start = self.rc.borrow().free_search;
            let end = start + n;
            let mut c = start;
            while c < end {
                let t = c / pb;
                if self.block_offset(t)?.is_none() {
                    self.create_block(t).await?;
                    continue 'search;
                }
                if self.refcount(c).await? != 0 {
                    self.rc.borrow_mut().free_search = c + 1;
                    continue 'search;
                }
                c += 1;
            }
            for c in start..end {
                self.update_refcount(c, 1).await?;
            }
            self.rc.borrow_mut().free_search = end;
            let end_bytes = end << self.geo.cluster_bits;
            let written_end = self.file_end.get();
            if end_bytes > written_end {
                self.file_end.set(end_bytes);
            }
            self.grow_ahead(written_end, end_bytes).await;
            return Ok(start << self.geo.cluster_bits);
        }
    }

    /// Grows the file past `end` in big preallocated steps. Only an
    /// optimisation: where the file system cannot, data writes extend the
    /// file themselves.
    /// `written_end`: the end of everything placed in the file so far (the
    /// new clusters are not written yet); nothing below it is zeroed —
    /// metadata placed at the end of the file by other paths (a refcount
    /// rebuild, a grown refcount table) lies there.
    async fn grow_ahead(&self, written_end: u64, end: u64) {
        let grown = self.grown_to.get();
        if grown == 0 || end <= grown {
            return;
        }
        let from = grown.max(written_end);
        let to = (end + GROW_AHEAD_BYTES).next_multiple_of(GROW_AHEAD_BYTES);
        if self.overlaps.borrow().check(from, to - from, 0).is_some() || self.fenced() {
            // Metadata past the end of what allocation knows: leave it be.
            self.grown_to.set(0);
            return;
        }
        let flags = IoFlags::GROW | IoFlags::NO_FALLBACK;
        match self.file.write_zeroes(from, to - from, flags).await {
            Ok(()) => self.grown_to.set(to),
            // Not supported (or failing): stop trying.
            Err(_) => self.grown_to.set(0),
        }
    }

    /// Creates the refcount block for table index `t`. It goes at the
    /// allocation frontier (`free_search`), not inside the range it
    /// covers, so that range stays free for contiguous runs. The caller
    /// searches again afterwards.
    async fn create_block(&self, t: u64) -> Result<(), IoError> {
        if t as usize >= self.rc.borrow().table.len() {
            // The grown table and its blocks take the clusters from the old
            // end of the file on.
            return self.grow_refcount_table(t).await;
        }
        let pb = self.geo.per_block();
        let p = self.rc.borrow().free_search;
        let home = p / pb;
        if home as usize >= self.rc.borrow().table.len() {
            return self.grow_refcount_table(home).await;
        }
        let (t, self_covering) = match self.block_offset(home)? {
            // The frontier itself is uncovered: its block goes there and covers itself.
            None => (home, true),
            Some(_) if self.refcount(p).await? != 0 => {
                self.rc.borrow_mut().free_search = p + 1;
                return Ok(());
            }
            Some(_) => (t, false),
        };
        tracing::trace!(t, at = p, "qcow2: new refcount block");
        let mut block = vec![0u8; self.geo.cluster_size as usize];
        if self_covering {
            refcount::set(&mut block, self.geo.refcount_order, (p % pb) as usize, 1);
        } else {
            self.update_refcount(p, 1).await?;
        }
        while self.blocks.borrow().is_full() && !self.blocks.borrow_mut().evict_clean() {
            self.write_dirty_blocks().await?;
        }
        let off = p << self.geo.cluster_bits;
        if off + self.geo.cluster_size > self.file_end.get() {
            self.file_end.set(off + self.geo.cluster_size);
        }
        // Ordering rule 6: the block (dirty in the cache) reaches the file
        // and a flush before the table entry pointing at it is written.
        self.blocks.borrow_mut().insert(off, block, true);
        {
            let mut rc = self.rc.borrow_mut();
            rc.table[t as usize] = off;
            rc.dirty.insert(t);
            rc.free_search = p + 1;
        }
        self.overlaps.borrow_mut().add_cluster(kind::REFCOUNT_BLOCK, off);
        Ok(())
    }

    /// Replaces the refcount table by a larger one covering table index
    /// `needed`, placed with the blocks it needs at the end of the file.
    async fn grow_refcount_table(&self, needed: u64) -> Result<(), IoError> {
        let cs = self.geo.cluster_size;
        let pb = self.geo.per_block();
        let old_len = self.rc.borrow().table.len() as u64;
        let start = self.file_end.get().div_ceil(cs).max(self.rc.borrow().free_search);
        let mut entries = (old_len * 2).max(needed + 1);
        // Lay out [new blocks][new table] from `start`, growing until the
        // table covers itself, its blocks and `needed`.
        let (missing, table_clusters) = loop {
            let table_clusters = (entries * 8).div_ceil(cs);
            let mut nb = 0u64;
            let missing = loop {
                let last = start + nb + table_clusters - 1;
                let missing: Vec<u64> = (start / pb..=last / pb)
                    .filter(|&t| t >= old_len || self.block_offset(t).ok().flatten().is_none())
                    .collect();
                if missing.len() as u64 == nb {
                    break missing;
                }
                nb = missing.len() as u64;
            };
            let last = start + nb + table_clusters - 1;
            if last / pb < entries {
                break (missing, table_clusters);
            }
            entries *= 2;
        };
        let nb = missing.len() as u64;
        let area_end = start + nb + table_clusters;
        tracing::debug!(needed, old_len, entries, start, nb, table_clusters, "qcow2: growing the refcount table");
        if (table_clusters * cs) > super::header::REFCOUNT_TABLE_BYTES_MAX {
            tracing::error!("qcow2: the refcount table would exceed its size limit");
            return Err(IoError::NoSpace);
        }
        // New blocks, one per missing table index, at the start of the area.
        let mut new_blocks: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
        for (i, &t) in missing.iter().enumerate() {
            new_blocks.insert(t, ((start + i as u64) * cs, vec![0u8; cs as usize]));
        }
        // Every cluster of the area is in use: record it in the block covering it.
        for c in start..area_end {
            let t = c / pb;
            let idx = (c % pb) as usize;
            match new_blocks.get_mut(&t) {
                Some((_, block)) => refcount::set(block, self.geo.refcount_order, idx, 1),
                None => self.update_refcount(c, 1).await?,
            }
        }
        let mut table = self.rc.borrow().table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        for (&t, (off, _)) in &new_blocks {
            table[t as usize] = *off;
        }
        let table_off = (start + nb) * cs;
        for (off, block) in new_blocks.values() {
            self.write_checked(*off, IoBuf::from_slice(block), kind::REFCOUNT_BLOCK).await?;
        }
        self.write_dirty_blocks().await?;
        self.write_checked(table_off, encode_be64(&table), kind::REFCOUNT_TABLE).await?;
        self.file.flush().await?;
        let (old_off, old_clusters) = {
            let mut h = self.header.borrow_mut();
            let old = (h.refcount_table_offset, u64::from(h.refcount_table_clusters));
            h.refcount_table_offset = table_off;
            h.refcount_table_clusters = table_clusters as u32;
            old
        };
        self.write_header().await?;
        self.file.flush().await?;
        {
            // Entries of blocks not yet written back are in the new table,
            // written with their blocks before the flush above.
            let mut rc = self.rc.borrow_mut();
            rc.table = table;
            rc.dirty.clear();
        }
        {
            let mut o = self.overlaps.borrow_mut();
            o.set_range(kind::REFCOUNT_TABLE, table_off, table_clusters * cs);
            for (off, _) in new_blocks.values() {
                o.add_cluster(kind::REFCOUNT_BLOCK, *off);
            }
        }
        for (off, block) in new_blocks.into_values() {
            self.blocks.borrow_mut().insert(off, block, false);
        }
        {
            let mut rc = self.rc.borrow_mut();
            rc.free_search = rc.free_search.max(area_end);
        }
        self.file_end.set(self.file_end.get().max(area_end * cs));
        // The header no longer points at the old table.
        for k in 0..old_clusters {
            self.update_refcount(old_off / cs + k, -1).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{KIB, MIB, assert_clean, caches, new_disk, open, pattern, read, run, write};
    use super::*;
    use crate::bdev::Bdev;

    #[test]
    fn runs_are_contiguous_and_counted() {
        let disk = new_disk(4 * MIB, 64 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            let _g = o.q.lock.lock().await;
            let cs = o.q.geo.cluster_size;
            let a = o.q.alloc_clusters(3).await.unwrap();
            assert_eq!(a, 4 * cs, "right after the header, tables and L1");
            let b = o.q.alloc_clusters(1).await.unwrap();
            assert_eq!(b, a + 3 * cs);
            for c in 4..8 {
                assert_eq!(o.q.refcount(c).await, Ok(1));
            }
            assert_eq!(o.q.file_end(), 8 * cs);
        });
    }

    #[test]
    fn new_refcount_blocks_and_a_grown_table_cover_everything_allocated() {
        // 512-byte clusters, 64-bit refcounts: a block covers 32 KiB of file
        // and the one-cluster table 2 MiB, so 3 MiB of data grows it.
        let disk = new_disk(4 * MIB, 512, 6);
        let d = disk.clone();
        run(async move {
            let o = open(&d, caches(16, 4)).await;
            let old_table = o.q.header.borrow().refcount_table_offset;
            for k in 0..48u64 {
                write(&o.ch, k * 64 * KIB, &pattern(k * 64 * KIB, 64 * KIB as usize, 3)).await;
            }
            o.q.flush().await.unwrap();
            let h = o.q.header.borrow().clone();
            assert_ne!(h.refcount_table_offset, old_table, "the table moved");
            assert!(h.refcount_table_clusters > 1);
            for k in (0..48u64).step_by(7) {
                assert_eq!(read(&o.ch, k * 64 * KIB, 4096).await, pattern(k * 64 * KIB, 4096, 3));
            }
        });
        assert_clean(&disk.contents(), "after growing the refcount table");
    }

    #[test]
    fn the_file_grows_ahead_where_asked_and_the_tail_stays_free() {
        let disk = new_disk(64 * MIB, 64 * KIB, 4);
        let d = disk.clone();
        run(async move {
            let o = open(&d, caches(8, 4)).await;
            o.q.grown_to.set(d.size());
            write(&o.ch, 0, &pattern(0, 4096, 1)).await;
            // An L2 table and a data cluster after the four of a new image.
            assert_eq!(o.q.file_end(), 6 * 64 * KIB, "allocation knows where its clusters end");
            assert_eq!(d.size(), 2 * GROW_AHEAD_BYTES, "grown a whole step past the end, in steps");
            o.q.flush().await.unwrap();
        });
        assert_clean(&disk.contents(), "a grown file");
    }
}
