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
//!    cache). The allocator only moves forward within a session, so a
//!    cluster freed now is never handed out again before the next open —
//!    a late write to it cannot land on someone else's data.
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
//!    flushed before the L1 entry pointing to it is written.
//! 6. A new refcount block is written and flushed before the refcount
//!    table entry pointing to it; a grown refcount table is written and
//!    flushed before the header points to it, and the old one is freed
//!    after.

use reactor::IoBuf;

use super::entry::{self, Cluster};
use super::overlap::kind;
use super::state::{Qcow2, encode_be64};
use crate::error::IoError;

impl Qcow2 {
    /// Writes the header (and its extensions) to cluster 0.
    pub(super) async fn write_header(&self) -> Result<(), IoError> {
        let bytes = self.header.borrow().serialize().map_err(|e| self.corrupt(e))?;
        self.write_checked(0, IoBuf::from_slice(&bytes), kind::MAIN_HEADER).await
    }

    /// Writes all cached metadata back in the crash-safe order (see the
    /// module documentation) and flushes the file. Lock held.
    pub(super) async fn flush_metadata_locked(&self) -> Result<(), IoError> {
        if self.l2.borrow().any_dirty() {
            self.write_dirty_blocks().await?;
            self.file.flush().await?;
            let dirty = self.l2.borrow().dirty_offsets();
            for off in dirty {
                let buf = encode_be64(self.l2.borrow().peek(off).expect("dirty table is cached"));
                self.write_checked(off, buf, kind::ACTIVE_L2).await?;
                self.l2.borrow_mut().mark_clean(off);
            }
        }
        let frees = std::mem::take(&mut *self.pending_frees.borrow_mut());
        if !frees.is_empty() {
            self.file.flush().await?;
            for off in frees {
                self.update_refcount(off >> self.geo.cluster_bits, -1).await?;
            }
        }
        self.write_dirty_blocks().await?;
        self.file.flush().await
    }

    pub(super) async fn flush(&self) -> Result<(), IoError> {
        let _g = self.lock.lock().await;
        self.flush_metadata_locked().await
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

    use super::super::testing::{MIB, Op, Rng, caches, new_disk, open, qemu_check, read, run};
    use crate::drivers::sim::{Keep, SimDisk};

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
