//! The allocator: contiguous runs of host clusters with refcount one, new
//! refcount blocks where none covers the clusters handed out, a larger
//! refcount table when the old one is full, and growing the image file
//! ahead of the allocator.
//!
//! ```text
//!   alloc_clusters(n): 1. the first time: the frontier (one refcount block read)
//!                      2. the hole scan: at most one refcount block below the frontier
//!                      3. a free run of n (holes, freed clusters now safe: reuse.rs)
//!                      4. else at the frontier (new refcount blocks, a grown table)
//! ```
//!
//! The frontier is where every cluster on is free: at the first
//! allocation of a session it is found from the end of the file, pulled
//! back over the free clusters at the end of the last refcount block (a
//! file grown ahead holds some). Holes below it — clusters earlier
//! sessions freed — are found by a scan of the refcount blocks that
//! advances one block per allocation, so no allocation reads more than a
//! few blocks, however large the image.

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
/// Refcount blocks the hole scan reads per allocation at most.
const HOLE_SCAN_BLOCKS_PER_ALLOC: usize = 1;
/// Clusters waiting for a write-back to free them that make the allocator
/// start one in the background.
const FREES_WRITEBACK_MIN: usize = 64;

/// Where the allocator stands.
#[derive(Debug, Default)]
pub(super) struct Allocator {
    /// Every cluster from here on is free (refcount 0, or no block yet);
    /// None until the session's first allocation finds it.
    frontier: Option<u64>,
    /// The hole scan: clusters `scan_next..scan_end` are not looked at yet.
    scan_next: u64,
    scan_end: u64,
    /// Where the next compressed cluster's bytes go: inside a host cluster
    /// that compressed data already uses (`compress.rs`); None: start a
    /// new one.
    pub(super) packing: Option<u64>,
}

impl Qcow2 {
    /// Allocates `n` contiguous host clusters with refcount one; returns the
    /// offset of the first. Lock held.
    pub(super) async fn alloc_clusters(&self, n: u64) -> Result<u64, IoError> {
        Ok(self.alloc(n, false).await?.0)
    }

    /// Allocates up to `n` contiguous host clusters with refcount one:
    /// fewer where a free run shorter than `n` is the lowest one free.
    /// Returns the offset of the first and how many. Lock held.
    pub(super) async fn alloc_clusters_upto(&self, n: u64) -> Result<(u64, u64), IoError> {
        self.alloc(n, true).await
    }

    async fn alloc(&self, n: u64, fewer: bool) -> Result<(u64, u64), IoError> {
        debug_assert!(n > 0);
        if self.alloc.borrow().frontier.is_none() {
            self.find_frontier().await?;
        }
        self.scan_holes().await?;
        {
            let epochs = self.epochs.borrow();
            self.reuse.borrow_mut().release(&epochs);
        }
        let waiting = self.pending_frees.borrow().len() + self.reuse.borrow().limbo_len();
        if waiting >= FREES_WRITEBACK_MIN {
            self.kick_writeback();
        }
        if let Some((c, got)) = self.take_free(n, fewer).await? {
            return Ok((c << self.geo.cluster_bits, got));
        }
        if waiting > 0 {
            self.kick_writeback();
        }
        Ok((self.alloc_at_frontier(n).await?, n))
    }

    fn frontier(&self) -> u64 {
        self.alloc.borrow().frontier.expect("the frontier is known once allocation started")
    }

    fn set_frontier(&self, c: u64) {
        self.alloc.borrow_mut().frontier = Some(c);
    }

    /// Finds the frontier: the end of the file, less the free clusters at
    /// the end of the refcount block covering it. Everything below is left
    /// to the hole scan.
    async fn find_frontier(&self) -> Result<(), IoError> {
        let pb = self.geo.per_block();
        let order = self.geo.refcount_order;
        let end = self.file_end.get() >> self.geo.cluster_bits;
        let mut frontier = end;
        if end > 0 {
            let t = (end - 1) / pb;
            let first = t * pb;
            // Freed clusters not reusable yet count as used.
            let reuse = self.reuse.borrow().held_clusters();
            let last_used = self
                .with_block(t, |block| {
                    (first..end)
                        .rev()
                        .find(|&c| refcount::get(block, order, (c % pb) as usize) != 0 || reuse.contains(&c))
                })
                .await?;
            if let Some(last_used) = last_used {
                frontier = last_used.map_or(first, |c| c + 1);
            }
        }
        tracing::debug!(frontier, "qcow2: allocation starts at the frontier");
        let mut a = self.alloc.borrow_mut();
        (a.frontier, a.scan_next, a.scan_end) = (Some(frontier), 0, frontier);
        Ok(())
    }

    /// Looks for free clusters below the frontier, at most
    /// [`HOLE_SCAN_BLOCKS_PER_ALLOC`] refcount blocks' worth.
    async fn scan_holes(&self) -> Result<(), IoError> {
        let pb = self.geo.per_block();
        let order = self.geo.refcount_order;
        let mut read = 0;
        while read < HOLE_SCAN_BLOCKS_PER_ALLOC {
            let (next, end) = {
                let a = self.alloc.borrow();
                (a.scan_next, a.scan_end)
            };
            if next >= end {
                return Ok(());
            }
            let t = next / pb;
            let stop = ((t + 1) * pb).min(end);
            let zeroes = self
                .with_block(t, |block| {
                    (next..stop).filter(|&c| refcount::get(block, order, (c % pb) as usize) == 0).collect::<Vec<u64>>()
                })
                .await?;
            self.alloc.borrow_mut().scan_next = stop;
            // Where no block exists, nothing is allocated, but a block would
            // have to be made first: the frontier does that.
            if let Some(zeroes) = zeroes {
                read += 1;
                let mut reuse = self.reuse.borrow_mut();
                for c in zeroes {
                    // Freed in this session: free only once safe (reuse.rs).
                    if !reuse.is_held(c) {
                        reuse.free.insert(c);
                    }
                }
            }
        }
        Ok(())
    }

    /// `n` contiguous clusters from the free runs (or, if `fewer`, as
    /// many of them as the run found holds), counted.
    async fn take_free(&self, n: u64, fewer: bool) -> Result<Option<(u64, u64)>, IoError> {
        loop {
            let taken = if fewer {
                self.reuse.borrow_mut().free.take_upto(n)
            } else {
                self.reuse.borrow_mut().free.take(n).map(|s| (s, n))
            };
            let Some((start, n)) = taken else { return Ok(None) };
            let mut taken = true;
            for c in start..start + n {
                if self.refcount(c).await? != 0 {
                    // Not free after all (counted since it was found): drop it.
                    tracing::warn!(cluster = c, "qcow2: a free run held a cluster in use");
                    taken = false;
                }
            }
            if !taken {
                for c in start..start + n {
                    if self.refcount(c).await? == 0 {
                        self.reuse.borrow_mut().free.insert(c);
                    }
                }
                continue;
            }
            for c in start..start + n {
                self.update_refcount(c, 1).await?;
            }
            return Ok(Some((start, n)));
        }
    }

    /// Clusters wait for a write-back to free them (many, or the allocator
    /// is about to extend the image): starts one in the background, so
    /// later allocations find them — a guest that does not flush would
    /// otherwise only grow the image.
    fn kick_writeback(&self) {
        if self.read_only || self.fenced() || self.closed.get() || self.background_writeback.get() {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        self.background_writeback.set(true);
        reactor::spawn_local(async move {
            let res = if me.closed.get() { Ok(()) } else { me.flush().await };
            me.background_writeback.set(false);
            if let Err(e) = res {
                tracing::warn!("qcow2: {}: writing back freed clusters failed: {e}", me.alarm.node_name);
            }
        });
    }

    /// `n` clusters at the frontier, which moves past them.
    async fn alloc_at_frontier(&self, n: u64) -> Result<u64, IoError> {
        let pb = self.geo.per_block();
        'search: loop {
            let start = self.frontier();
            let end = start + n;
            let mut c = start;
            while c < end {
                let t = c / pb;
                if self.block_offset(t)?.is_none() {
                    self.create_block(t).await?;
                    continue 'search;
                }
                if self.refcount(c).await? != 0 || self.reuse.borrow().is_held(c) {
                    self.set_frontier(c + 1);
                    continue 'search;
                }
                c += 1;
            }
            for c in start..end {
                self.update_refcount(c, 1).await?;
            }
            self.set_frontier(end);
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
    /// allocation frontier, not inside the range it covers, so that range
    /// stays free for contiguous runs. The caller searches again afterwards.
    async fn create_block(&self, t: u64) -> Result<(), IoError> {
        if t as usize >= self.rc.borrow().table.len() {
            // The grown table and its blocks take the clusters from the old
            // end of the file on.
            return self.grow_refcount_table(t).await;
        }
        let pb = self.geo.per_block();
        let p = self.frontier();
        let home = p / pb;
        if home as usize >= self.rc.borrow().table.len() {
            return self.grow_refcount_table(home).await;
        }
        let (t, self_covering) = match self.block_offset(home)? {
            // The frontier itself is uncovered: its block goes there and covers itself.
            None => (home, true),
            Some(_) if self.refcount(p).await? != 0 => {
                self.set_frontier(p + 1);
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
        }
        self.overlaps.borrow_mut().add_cluster(kind::REFCOUNT_BLOCK, off);
        self.set_frontier(p + 1);
        Ok(())
    }

    /// Replaces the refcount table by a larger one covering table index
    /// `needed`, placed with the blocks it needs at the end of the file.
    async fn grow_refcount_table(&self, needed: u64) -> Result<(), IoError> {
        let cs = self.geo.cluster_size;
        let pb = self.geo.per_block();
        let old_len = self.rc.borrow().table.len() as u64;
        let start = self.file_end.get().div_ceil(cs).max(self.frontier());
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
        self.set_frontier(self.frontier().max(area_end));
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
    use std::process::Command;
    use std::sync::Arc;

    use reactor::JoinHandle;

    use super::super::entry::Cluster;
    use super::super::testing::{
        KIB, MIB, assert_clean, assert_consistent, caches, new_disk, open, pattern, read, run, write,
    };
    use super::*;
    use crate::bdev::Bdev;
    use crate::drivers::sim::{Keep, Rule, SimDisk};
    use crate::io::IoKind;

    /// Polls until `job` finishes, for at most `ticks` turns of the reactor.
    async fn finishes<T>(job: &JoinHandle<T>, ticks: usize) -> bool {
        for _ in 0..ticks {
            if job.is_finished() {
                return true;
            }
            reactor::yield_now().await;
        }
        job.is_finished()
    }

    #[test]
    fn the_first_allocation_after_opening_a_full_image_reads_few_refcount_blocks() {
        // 512-byte clusters: a refcount block covers 128 KiB, so 23 MiB of
        // data need about 190 of them.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.qcow2");
        let ok = |c: &mut Command| assert!(c.output().unwrap().status.success(), "{c:?}");
        ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
            .arg(&path)
            .arg("24M"));
        ok(Command::new("qemu-io").args(["-c", "write -P 0x5a 0 23M"]).arg(&path));
        let disk = SimDisk::new(std::fs::read(&path).unwrap(), 1);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(64, 64)).await;
            d.record_reads();
            write(&o.ch, 23 * MIB + 4096, &pattern(0, 512, 1)).await;
            let blocks: Vec<u64> = o.q.rc.borrow().table.iter().map(|e| e & !511).filter(|&e| e != 0).collect();
            assert!(blocks.len() > 150, "{} refcount blocks", blocks.len());
            let reads = d.reads();
            let block_reads = reads.iter().filter(|(off, _)| blocks.contains(off)).count();
            assert!(block_reads <= 3, "{block_reads} refcount blocks read ({} reads in all: {reads:?})", reads.len());
            assert!(reads.len() <= 6, "{reads:?}");
            assert_eq!(read(&o.ch, 23 * MIB + 4096, 512).await, pattern(0, 512, 1));
            assert_eq!(read(&o.ch, 23 * MIB - 512, 512).await, vec![0x5a; 512]);
            o.q.flush().await.unwrap();
        });
        assert_clean(&disk.contents(), "after the first allocation");
    }

    #[test]
    fn holes_an_earlier_session_left_are_found_and_filled() {
        let disk = new_disk(16 * MIB, 4 * KIB, 4);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(8, 8)).await;
            write(&o.ch, 0, &pattern(0, 4 * MIB as usize, 1)).await;
            o.ch.discard(MIB, 2 * MIB).await.unwrap();
            o.q.flush().await.unwrap();
            let size = d.size();
            let o = open(&d, caches(8, 8)).await;
            for k in 0..32u64 {
                write(&o.ch, 8 * MIB + k * 64 * KIB, &pattern(k, 64 * KIB as usize, 2)).await;
            }
            // Whole-cluster writes need their run in one piece: the last
            // may not fit in what the new L2 table left of the hole.
            assert!(
                d.size() <= size + 64 * KIB,
                "2 MiB of new data went past the 2 MiB of holes: {} > {size}",
                d.size()
            );
            o.q.flush().await.unwrap();
            assert_eq!(read(&o.ch, 0, MIB as usize).await, pattern(0, MIB as usize, 1));
        });
        assert_clean(&disk.contents(), "holes filled");
    }

    #[test]
    fn discard_and_rewrite_churn_reuses_clusters_while_open() {
        for cluster in [4 * KIB, 64 * KIB] {
            let disk = new_disk(4 * MIB, cluster, 4);
            let d = Arc::clone(&disk);
            run(async move {
                let o = open(&d, caches(8, 8)).await;
                let mut after_first = 0;
                for round in 0..10u64 {
                    for k in 0..64u64 {
                        write(&o.ch, k * 64 * KIB, &pattern(k, 64 * KIB as usize, round as u8)).await;
                    }
                    o.ch.discard(0, 4 * MIB).await.unwrap();
                    if round == 0 {
                        after_first = d.size();
                    }
                }
                let last = d.size();
                assert!(
                    last * 10 <= after_first * 11,
                    "cluster {cluster}: the file grew from {after_first} to {last} bytes in 10 rounds"
                );
                o.q.flush().await.unwrap();
            });
            assert_consistent(&disk.contents(), "after the churn");
        }
    }

    /// A request held on its way to host cluster H while the guest
    /// cluster that had H is discarded and the discard made durable: H
    /// must not be handed to another guest cluster before the request is
    /// done, and may be after.
    /// `fast`: through the fast path (the L2 table cached), or planned
    /// under the metadata lock and sent after it.
    fn late_request_over_a_freed_cluster(kind: IoKind, fast: bool) {
        let disk = new_disk(4 * MIB, 64 * KIB, 4);
        let d = Arc::clone(&disk);
        run(async move {
            let mut o = open(&d, caches(8, 8)).await;
            let cs = 64 * KIB;
            write(&o.ch, 0, &pattern(0, cs as usize, 1)).await;
            o.q.flush().await.unwrap();
            let Some(Ok(Cluster::Data { host: h, .. })) = o.q.cached_cluster(0) else { panic!("cluster 0 is mapped") };
            if !fast {
                o = open(&d, caches(8, 8)).await;
                assert_eq!(o.q.cached_cluster(0), None);
            }
            let host = |c: u64| match o.q.cached_cluster(c) {
                Some(Ok(Cluster::Data { host, .. })) => host,
                other => panic!("cluster {c} is {other:?}"),
            };
            let kinds: &'static [IoKind] = if kind == IoKind::Write { &[IoKind::Write] } else { &[IoKind::Read] };
            let hold = d.add_rule(Rule::hold(kinds).within(h, cs));
            let ch = o.ch.clone();
            let late = reactor::spawn_local(async move {
                match kind {
                    IoKind::Write => write(&ch, 0, &pattern(0, 4096, 9)).await,
                    _ => drop(read(&ch, 0, 4096).await),
                }
            });
            assert!(!finishes(&late, 20).await);
            assert_eq!(d.held(), 1);
            o.ch.discard(0, cs).await.unwrap();
            o.q.flush().await.unwrap();
            // Another guest cluster gets new data while the request is out.
            let ch = o.ch.clone();
            let other = reactor::spawn_local(async move { write(&ch, 5 * cs, &pattern(5 * cs, cs as usize, 2)).await });
            assert!(finishes(&other, 200).await, "the new write went to the held cluster");
            assert_ne!(host(5), h, "{kind:?} (fast {fast}): a cluster was reused while a request to it was in flight");
            d.remove_rule(hold);
            late.await;
            assert_eq!(read(&o.ch, 5 * cs, cs as usize).await, pattern(5 * cs, cs as usize, 2));
            // Now it is safe, and the allocator takes it.
            write(&o.ch, 6 * cs, &pattern(6 * cs, cs as usize, 3)).await;
            assert_eq!(host(6), h, "the freed cluster is reused once nothing can reach it");
            assert_eq!(read(&o.ch, 5 * cs, cs as usize).await, pattern(5 * cs, cs as usize, 2));
            o.q.flush().await.unwrap();
        });
        assert_clean(&disk.crash_image(Keep::None), "after the reuse");
    }

    #[test]
    fn a_late_write_never_lands_on_a_reused_cluster() {
        late_request_over_a_freed_cluster(IoKind::Write, true);
        late_request_over_a_freed_cluster(IoKind::Write, false);
    }

    #[test]
    fn a_late_read_never_sees_a_reused_cluster() {
        late_request_over_a_freed_cluster(IoKind::Read, true);
        late_request_over_a_freed_cluster(IoKind::Read, false);
    }

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
