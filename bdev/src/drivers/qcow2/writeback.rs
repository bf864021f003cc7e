//! Write-back: cached metadata reaches the file in an order that survives
//! a crash at any instant.
//!
//! # Crash ordering
//!
//! Metadata is cached and written back at flush (or eviction) time, in an
//! order that leaves, after a crash at any instant, at most leaked clusters
//! (`qemu-img check` exit 0 or 3) and every write that an acknowledged flush
//! covered:
//!
//! 1. Allocating a cluster raises its refcount (in the refcount block
//!    cache). A cluster freed while the image is open is handed out again
//!    only once its lowered refcount is durable (rule 4 put the tables
//!    that dropped it on disk before that) and no request that looked up
//!    the old mapping is still in flight — a late write to it cannot land
//!    on someone else's data (`reuse.rs`).
//! 2. Guest data, with copy-on-write of the parts of the cluster the write
//!    does not cover, goes to the new cluster before the L2 entry is set.
//! 3. Writing back L2 tables: first every dirty refcount block, then a file
//!    flush (data and refcounts durable), then the tables. An L2 entry on
//!    disk therefore never points at a cluster whose data or refcount is
//!    not on disk.
//! 4. Dropping a reference (COW of a shared cluster, discard, zeroing with
//!    unmap) queues the old cluster; its refcount is lowered only after the
//!    L2 tables that dropped it were written and flushed. A crash in
//!    between leaves a leak.
//! 5. A new L2 table is written, with the refcounts covering it, and
//!    flushed before the L1 entry pointing to it is written. An L2 table
//!    the L1 table stops pointing at (copied from one shared with a
//!    snapshot) has its refcount lowered once that L1 entry is durable.
//! 6. A new refcount block is written and flushed before the refcount
//!    table entry pointing to it, and that entry is flushed before any L2
//!    entry counting on the block is written; a grown refcount table is
//!    written and flushed before the header points to it, and the old one
//!    is freed after.
//!
//! # One write-back
//!
//! New L2 tables and refcount blocks wait in the caches (dirty), with
//! their L1 and refcount table entries set in memory, until a write-back
//! puts them on disk in this order:
//!
//! ```text
//!   0. new refcount blocks ─ flush ─ their table entries      (only if any)
//!   1. dirty refcount blocks; the L2 tables, L1 entries and frees to write
//!      are captured now ─ flush
//!   2. the captured L2 tables (a table changed since stays dirty) ─ flush
//!   3. the L1 entries; the frees lower their refcounts
//!   4. refcount blocks ─ flush: all durable; clusters freed by now wait in
//!      quarantine (rule 1)
//! ```
//!
//! Write-backs run one at a time (their own lock), and they hold the
//! metadata lock only while they read and write metadata: every flush of
//! the file is waited for without it, so writes — in place or allocating,
//! even ones that make new L2 tables or refcount blocks — go on while a
//! flush is under way. What they change meanwhile is not captured and goes
//! to the next write-back. Waits on a flush that still happen under the
//! metadata lock, and why:
//!
//! - an L2 cache whose every table is dirty (eviction needs a write-back
//!   and the request that needs the room holds the lock); where a
//!   write-back is already under way, the cache grows past its size
//!   instead, until that one has written the tables;
//! - step 0 when new refcount blocks appeared during its own flush (a
//!   second round holds the lock so that the rounds end);
//! - growing the refcount table (the header moves: rare, and the
//!   allocation that needs it cannot go on before);
//! - changing the backing file name and setting the corrupt bit (header
//!   writes, rare).

use std::collections::BTreeSet;

use reactor::{IoBuf, LocalMutexGuard};

use super::entry::{self, Cluster};
use super::overlap::kind;
use super::state::{Qcow2, encode_be64};
use crate::error::IoError;

/// Rounds of step 0 before it keeps the metadata lock through its flush.
const NEW_BLOCK_ROUNDS_UNLOCKED_MAX: usize = 1;
/// Write-backs one flush runs at most to lower the refcounts of L2 tables
/// the L1 table dropped (each needs the L1 entries of the one before
/// durable).
const CYCLES_MAX: usize = 3;

/// Who holds the metadata lock during a write-back.
enum Hold {
    /// The caller, throughout (an L2 cache full of dirty tables).
    Caller,
    /// The write-back, except while it waits for a flush.
    Own(Option<LocalMutexGuard>),
}

impl Hold {
    async fn lock(&mut self, q: &Qcow2) {
        if let Hold::Own(g @ None) = self {
            *g = Some(q.lock.lock().await);
        }
    }

    fn unlock(&mut self) {
        if let Hold::Own(g) = self {
            *g = None;
        }
    }

    /// Flushes the file, without the metadata lock unless the caller holds
    /// it; returns with the lock.
    async fn flush(&mut self, q: &Qcow2) -> Result<(), IoError> {
        self.unlock();
        let res = q.file.flush().await;
        self.lock(q).await;
        res
    }
}

/// What one write-back took to write; given back if it fails.
#[derive(Default)]
struct Captured {
    /// Refcount table entries of new blocks.
    entries: BTreeSet<u64>,
    l1: BTreeSet<usize>,
    /// L2 tables the captured L1 entries dropped.
    dropped: Vec<u64>,
    /// Clusters whose refcount is lowered after the tables are durable.
    frees: Vec<u64>,
}

impl Captured {
    fn give_back(self, q: &Qcow2) {
        q.rc.borrow_mut().dirty.extend(self.entries);
        q.l1_dirty.borrow_mut().extend(self.l1);
        q.l1_dropped.borrow_mut().extend(self.dropped);
        q.pending_frees.borrow_mut().extend(self.frees);
    }
}

impl Qcow2 {
    /// Writes the header (and its extensions) to cluster 0.
    pub(super) async fn write_header(&self) -> Result<(), IoError> {
        let bytes = self.header.borrow().serialize().map_err(|e| self.corrupt(e))?;
        self.write_checked(0, IoBuf::from_slice(&bytes), kind::MAIN_HEADER).await
    }

    /// Writes all cached metadata back in the crash-safe order and flushes
    /// the file: everything completed before the call is durable after it.
    pub(super) async fn flush(&self) -> Result<(), IoError> {
        let _wb = self.writeback.lock().await;
        self.writeback(Hold::Own(None)).await
    }

    /// [`Qcow2::flush`] for a caller holding the metadata lock and the
    /// write-back lock: the flushes are waited for with both held.
    pub(super) async fn writeback_locked(&self) -> Result<(), IoError> {
        self.writeback(Hold::Caller).await
    }

    async fn writeback(&self, mut hold: Hold) -> Result<(), IoError> {
        for _ in 0..CYCLES_MAX {
            self.writeback_cycle(&mut hold).await?;
            if self.l1_frees.borrow().is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// One write-back (see the module documentation).
    async fn writeback_cycle(&self, hold: &mut Hold) -> Result<(), IoError> {
        hold.lock(self).await;
        let mut cap = Captured::default();
        let res = self.writeback_steps(hold, &mut cap).await;
        hold.unlock();
        if res.is_err() {
            cap.give_back(self);
        }
        res
    }

    async fn writeback_steps(&self, hold: &mut Hold, cap: &mut Captured) -> Result<(), IoError> {
        // 0. New refcount blocks, then their table entries.
        let mut rounds = 0;
        while !self.rc.borrow().dirty.is_empty() {
            rounds += 1;
            cap.entries = std::mem::take(&mut self.rc.borrow_mut().dirty);
            self.write_dirty_blocks().await?;
            if rounds > NEW_BLOCK_ROUNDS_UNLOCKED_MAX {
                self.file.flush().await?;
            } else {
                hold.flush(self).await?;
            }
            self.write_table_entries(&cap.entries).await?;
            cap.entries.clear();
        }
        // 1. Refcounts, and what this write-back takes.
        self.write_dirty_blocks().await?;
        let tables: Vec<(u64, u64, IoBuf)> = {
            let l2 = self.l2.borrow();
            l2.dirty_versions()
                .into_iter()
                .map(|(off, v)| (off, v, encode_be64(l2.peek(off).expect("dirty table is cached"))))
                .collect()
        };
        cap.l1 = std::mem::take(&mut *self.l1_dirty.borrow_mut());
        cap.dropped = std::mem::take(&mut *self.l1_dropped.borrow_mut());
        cap.frees = std::mem::take(&mut *self.pending_frees.borrow_mut());
        cap.frees.append(&mut self.l1_frees.borrow_mut());
        // 2. The L2 tables, once data and refcounts are durable.
        if !tables.is_empty() {
            hold.flush(self).await?;
            for (off, version, buf) in tables {
                self.write_checked(off, buf, kind::ACTIVE_L2).await?;
                self.l2.borrow_mut().mark_clean_at(off, version);
            }
        }
        // 3. L1 entries and lowered refcounts, once the tables are durable.
        if !cap.l1.is_empty() || !cap.frees.is_empty() {
            hold.flush(self).await?;
            for &i in &cap.l1 {
                self.write_l1_entry(i).await?;
            }
            cap.l1.clear();
            while let Some(off) = cap.frees.pop() {
                if let Err(e) = self.update_refcount(off >> self.geo.cluster_bits, -1).await {
                    cap.frees.push(off);
                    return Err(e);
                }
            }
        }
        // 4. Everything durable, refcounts lowered meanwhile by other paths
        // (a failed allocating write, a grown refcount table) included.
        self.write_dirty_blocks().await?;
        let limbo = self.reuse.borrow().limbo_len();
        hold.unlock();
        self.file.flush().await?;
        self.l1_frees.borrow_mut().append(&mut cap.dropped);
        if limbo > 0 {
            let tag = self.epochs.borrow_mut().advance();
            self.reuse.borrow_mut().durable(limbo, tag);
        }
        Ok(())
    }

    /// Queues the host clusters an old entry referenced.
    pub(super) fn queue_free(&self, old: Cluster) {
        let mut frees = self.pending_frees.borrow_mut();
        match old {
            Cluster::Data { host, .. } | Cluster::Zero { host: Some(host), .. } => frees.push(host),
            Cluster::Compressed { offset, len } => {
                let (first, count) = entry::compressed_clusters(offset, len, self.geo.cluster_bits);
                frees.extend((0..count).map(|k| first + k * self.geo.cluster_size));
            }
            Cluster::Unallocated | Cluster::Zero { host: None, .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use reactor::JoinHandle;

    use super::super::testing::{
        KIB, MIB, Op, Rng, assert_consistent, caches, new_disk, open, pattern, qemu_check, read, run, write,
    };
    use crate::channel::BlockChannel;
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

    fn spawn_write(ch: &BlockChannel, offset: u64, len: usize, seed: u8) -> JoinHandle<()> {
        let ch = ch.clone();
        reactor::spawn_local(async move { write(&ch, offset, &pattern(offset, len, seed)).await })
    }

    #[test]
    fn writes_go_on_while_a_flush_waits_for_the_disk() {
        // 64 KiB clusters: an L2 table maps 512 MiB.
        let disk = new_disk(2048 * MIB, 64 * KIB, 4);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(8, 4)).await;
            write(&o.ch, 0, &pattern(0, 128 * KIB as usize, 1)).await;
            write(&o.ch, 600 * MIB, &pattern(600 * MIB, 128 * KIB as usize, 1)).await;
            o.q.flush().await.unwrap();
            // Opened again: nothing cached.
            let o = open(&d, caches(8, 4)).await;
            write(&o.ch, 4 * MIB, &pattern(4 * MIB, 4096, 2)).await;
            let hold = d.add_rule(Rule::hold(&[IoKind::Flush]));
            let ch = o.ch.clone();
            let flush = reactor::spawn_local(async move { ch.flush().await });
            assert!(!finishes(&flush, 50).await, "the flush waits for the disk");
            assert!(d.held() >= 1);
            // Its L2 table is not cached: the write takes the metadata lock.
            let in_place = spawn_write(&o.ch, 600 * MIB + 4096, 8192, 3);
            assert!(finishes(&in_place, 200).await, "a write to an allocated cluster waits for the flush");
            let allocating = spawn_write(&o.ch, 8 * MIB, 4096, 4);
            assert!(finishes(&allocating, 200).await, "an allocating write waits for the flush");
            let new_table = spawn_write(&o.ch, 1500 * MIB, 4096, 5);
            assert!(finishes(&new_table, 200).await, "a write needing a new L2 table waits for the flush");
            assert!(!flush.is_finished());
            d.remove_rule(hold);
            flush.await.unwrap();
            // What was written while the flush waited goes to the next one.
            o.q.flush().await.unwrap();
            let o = open(&d, caches(8, 4)).await;
            for (at, len, seed) in [
                (0, 4096, 1),
                (600 * MIB, 4096, 1),
                (600 * MIB + 4096, 8192, 3),
                (4 * MIB, 4096, 2),
                (8 * MIB, 4096, 4),
                (1500 * MIB, 4096, 5),
            ] {
                assert_eq!(read(&o.ch, at, len).await, pattern(at, len, seed), "at {at:#x}");
            }
        });
        assert_consistent(&disk.crash_image(Keep::None), "flushed");
    }

    #[test]
    fn new_refcount_blocks_do_not_wait_for_a_flush_either() {
        // 512-byte clusters: a refcount block covers 128 KiB of file.
        let disk = new_disk(4 * MIB, 512, 4);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(64, 8)).await;
            write(&o.ch, 0, &pattern(0, 4096, 1)).await;
            let blocks = || o.q.rc.borrow().table.iter().filter(|&&e| e != 0).count();
            let before = blocks();
            let hold = d.add_rule(Rule::hold(&[IoKind::Flush]));
            let ch = o.ch.clone();
            let flush = reactor::spawn_local(async move { ch.flush().await });
            assert!(!finishes(&flush, 50).await);
            for k in 0..8u64 {
                let at = MIB + k * 64 * KIB;
                let job = spawn_write(&o.ch, at, 64 * KIB as usize, 6);
                assert!(finishes(&job, 500).await, "write {k} waits for the flush");
            }
            assert!(blocks() > before, "new refcount blocks were made");
            d.remove_rule(hold);
            flush.await.unwrap();
            o.q.flush().await.unwrap();
            assert_eq!(read(&o.ch, MIB, 512 * KIB as usize).await, pattern(MIB, 512 * KIB as usize, 6));
        });
        assert_consistent(&disk.crash_image(Keep::None), "flushed");
    }

    /// FNV-1a of a sector.
    fn hash(b: &[u8]) -> u64 {
        b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
    }

    /// Checks the images a power cut at every flush of a random workload
    /// could leave with `qemu-img check`; returns the failures.
    fn cuts_at_every_flush(cluster: u64, order: u32, seed: u64, steps: usize) -> (usize, Vec<String>) {
        let size = MIB;
        let disk = new_disk(size, cluster, order);
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let checked: Arc<Mutex<usize>> = Arc::default();
        let (f, c, mut r) = (Arc::clone(&failures), Arc::clone(&checked), Rng(seed ^ 0xc0ffee));
        let mut cut_no = 0usize;
        disk.on_flush(Box::new(move |cut| {
            cut_no += 1;
            let n = cut.undecided();
            let mut keeps = vec![Keep::Random(r.next())];
            if n > 0 {
                keeps.push(if r.below(2) == 0 {
                    Keep::Prefix(r.below(n as u64) as usize)
                } else {
                    Keep::AllBut(r.below(n as u64) as usize)
                });
            }
            if cut_no.is_multiple_of(4) {
                keeps.push(Keep::None);
            }
            for keep in keeps {
                *c.lock().unwrap() += 1;
                let (code, text) = qemu_check(&cut.image(keep));
                if !(code == 0 || code == 3) || text.contains("ERROR") {
                    f.lock().unwrap().push(format!("cut {cut_no} ({n} undecided), {keep:?}: exit {code}\n{text}"));
                }
            }
        }));
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(4, 2)).await;
            let mut r = Rng(seed);
            for step in 0..steps {
                Op::random(&mut r, size, cluster, 64, step).apply(&o.ch).await;
            }
            o.q.flush().await.unwrap();
        });
        let checked = *checked.lock().unwrap();
        (checked, std::mem::take(&mut *failures.lock().unwrap()))
    }

    #[test]
    fn a_power_cut_at_any_flush_leaves_at_most_leaked_clusters() {
        // 512-byte clusters and small caches: new L2 tables, refcount
        // blocks and a grown refcount table (64-bit refcounts), evictions.
        for (cluster, order, seed) in [(512, 4, 1), (512, 6, 2), (4096, 4, 3)] {
            let (checked, failures) = cuts_at_every_flush(cluster, order, seed, 60);
            assert!(checked > 20, "only {checked} images checked");
            assert!(failures.is_empty(), "cluster {cluster}, order {order}, seed {seed}:\n{}", failures.join("\n"));
        }
    }

    /// Batches of up to eight requests at once (never overlapping within a
    /// batch), flushes among them, a disk that completes in a seeded
    /// order, caches of two L2 tables: write-backs run while requests and
    /// other write-backs (evictions, the allocator's) change the caches.
    /// Every cut at a flush must leave at most leaks, and the disk must
    /// read as the model at the end.
    #[test]
    fn concurrent_requests_and_write_backs_keep_the_order() {
        for (cluster, order, seed) in [(512u64, 6u32, 21u64), (4096, 4, 22)] {
            let size = MIB;
            let opts = super::super::create::CreateOptions { size, cluster_size: Some(cluster), ..Default::default() };
            let image = super::super::create::layout(&opts, order).unwrap().to_bytes();
            let disk = SimDisk::with_options(image, seed, 512, true);
            let failures: Arc<Mutex<Vec<String>>> = Arc::default();
            let checked: Arc<Mutex<usize>> = Arc::default();
            let (f, c, mut r) = (Arc::clone(&failures), Arc::clone(&checked), Rng(seed));
            let mut cut_no = 0u64;
            disk.on_flush(Box::new(move |cut| {
                cut_no += 1;
                if !cut_no.is_multiple_of(3) {
                    return;
                }
                *c.lock().unwrap() += 1;
                let keep = if r.below(2) == 0 {
                    Keep::Random(r.next())
                } else {
                    Keep::Prefix(r.below(cut.undecided() as u64 + 1) as usize)
                };
                let (code, text) = qemu_check(&cut.image(keep));
                if !(code == 0 || code == 3) || text.contains("ERROR") {
                    f.lock().unwrap().push(format!("cut {cut_no}, {keep:?}: exit {code}\n{text}"));
                }
            }));
            let d = Arc::clone(&disk);
            run(async move {
                let o = open(&d, caches(2, 2)).await;
                let mut flat = vec![0u8; size as usize];
                let mut r = Rng(seed ^ 0xbeef);
                for step in 0..60 {
                    let mut batch: Vec<Op> = Vec::new();
                    for _ in 0..1 + r.below(8) {
                        let op = Op::random(&mut r, size, cluster, 16, step);
                        let range = |op: &Op| match *op {
                            Op::Write { offset, len, .. }
                            | Op::Zero { offset, len, .. }
                            | Op::Discard { offset, len } => {
                                Some((offset / cluster * cluster, (offset + len).next_multiple_of(cluster)))
                            }
                            Op::Flush => None,
                        };
                        let clash = range(&op)
                            .is_some_and(|(a, b)| batch.iter().filter_map(range).any(|(c, e)| a < e && c < b));
                        if !clash {
                            batch.push(op);
                        }
                    }
                    let jobs: Vec<_> = batch
                        .iter()
                        .map(|&op| {
                            let ch = o.ch.clone();
                            reactor::spawn_local(async move { op.apply(&ch).await })
                        })
                        .collect();
                    for j in jobs {
                        j.await;
                    }
                    for op in batch {
                        op.model(&mut flat, cluster);
                    }
                }
                o.q.flush().await.unwrap();
                assert!(
                    read(&o.ch, 0, size as usize).await == flat,
                    "cluster {cluster}: the disk differs from the model"
                );
                let o = open(&d, caches(8, 8)).await;
                assert!(read(&o.ch, 0, size as usize).await == flat, "cluster {cluster}: reopened, it differs");
            });
            let failures = failures.lock().unwrap().clone();
            assert!(failures.is_empty(), "cluster {cluster}:\n{}", failures.join("\n"));
            let checked = *checked.lock().unwrap();
            assert!(checked >= 10, "cluster {cluster}: only {checked} cuts checked");
            assert_consistent(&disk.contents(), "at the end");
        }
    }

    #[test]
    fn flushed_writes_survive_a_power_cut_between_requests() {
        let (size, cluster) = (MIB, 512);
        let disk = new_disk(size, cluster, 4);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(4, 2)).await;
            let sectors = (size / 512) as usize;
            let mut flat = vec![0u8; size as usize];
            // Per sector, the contents a power cut may leave.
            let mut allowed: Vec<Vec<u64>> = vec![vec![hash(&[0; 512])]; sectors];
            let mut r = Rng(7);
            for step in 0..120 {
                let op = Op::random(&mut r, size, cluster, 32, step);
                op.apply(&o.ch).await;
                op.model(&mut flat, cluster);
                match op {
                    Op::Flush => {
                        for (s, a) in allowed.iter_mut().enumerate() {
                            *a = vec![hash(&flat[s * 512..(s + 1) * 512])];
                        }
                    }
                    Op::Write { offset, len, .. } | Op::Zero { offset, len, .. } | Op::Discard { offset, len } => {
                        for s in offset / 512..(offset + len) / 512 {
                            let s = s as usize;
                            allowed[s].push(hash(&flat[s * 512..(s + 1) * 512]));
                        }
                    }
                }
                if step % 10 != 9 {
                    continue;
                }
                for keep in [Keep::None, Keep::Random(step as u64), Keep::All] {
                    let img = SimDisk::new(d.crash_image(keep), 1);
                    let c = open(&img, caches(64, 8)).await;
                    let got = read(&c.ch, 0, size as usize).await;
                    for (s, a) in allowed.iter().enumerate() {
                        let h = hash(&got[s * 512..(s + 1) * 512]);
                        assert!(a.contains(&h), "step {step}, {keep:?}: sector {s} holds what no write left there");
                    }
                }
            }
        });
    }
}
