//! Guest clusters to host clusters: L1 lookups, the L2 table cache (loading,
//! making room), entry decoding with its checks (an entry pointing at the
//! header or past the end of the file is corruption), and making an L2
//! table writable (a new one, or a copy of one shared with a snapshot).

use reactor::IoBuf;

use super::entry::{self, COPIED, Cluster};
use super::overlap::kind;
use super::state::{Qcow2, decode_be64};
use crate::error::IoError;

impl Qcow2 {
    /// The L1 entry for guest cluster `c`: (L1 index, L2 table offset, COPIED).
    pub(super) fn l1_lookup(&self, c: u64) -> Result<(usize, u64, bool), IoError> {
        let i = (c / self.geo.l2_entries) as usize;
        let e = *self
            .l1
            .borrow()
            .get(i)
            .ok_or_else(|| self.corrupt(format!("guest cluster {c} lies beyond the L1 table")))?;
        let (off, copied) = entry::decode_l1(e, self.geo.cluster_bits).map_err(|x| self.corrupt(x.0))?;
        if off != 0 {
            self.check_metadata_offset(off)?;
        }
        Ok((i, off, copied))
    }

    /// A cluster a table points at must lie past the header and inside the file.
    fn check_cluster(&self, what: &str, off: u64) -> Result<(), IoError> {
        if off < self.geo.cluster_size {
            return Err(self.corrupt(format!("{what} at {off:#x} overlaps the header")));
        }
        if off + self.geo.cluster_size > self.file_end.get() {
            return Err(self.corrupt(format!("{what} at {off:#x} lies beyond the end of the file")));
        }
        Ok(())
    }

    pub(super) fn check_metadata_offset(&self, off: u64) -> Result<(), IoError> {
        self.check_cluster("metadata table", off)
    }

    pub(super) fn decode(&self, e: u64) -> Result<Cluster, IoError> {
        let cl = entry::decode_l2(e, self.geo.cluster_bits, self.geo.version).map_err(|x| self.corrupt(x.0))?;
        match cl {
            Cluster::Data { host, .. } | Cluster::Zero { host: Some(host), .. } => {
                self.check_cluster("data cluster", host)?
            }
            Cluster::Compressed { offset, len } if offset.saturating_add(len) > self.file_end.get() + 512 => {
                return Err(self.corrupt(format!("compressed data at {offset:#x} lies beyond the end of the file")));
            }
            _ => {}
        }
        Ok(cl)
    }

    /// Fast path: the mapping of cluster `c` if its L2 table is cached.
    pub(super) fn cached_cluster(&self, c: u64) -> Option<Result<Cluster, IoError>> {
        let (_, off, _) = match self.l1_lookup(c) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        if off == 0 {
            return Some(Ok(Cluster::Unallocated));
        }
        let e = self.l2.borrow_mut().get(off)?[(c % self.geo.l2_entries) as usize];
        Some(self.decode(e))
    }

    /// Loads an L2 table into the cache. Lock held.
    pub(super) async fn load_l2(&self, off: u64) -> Result<(), IoError> {
        if self.l2.borrow().contains(off) {
            return Ok(());
        }
        self.make_room_l2().await?;
        let buf = self.file.read(off, self.geo.cluster_size as usize).await?;
        self.l2.borrow_mut().insert(off, decode_be64(&buf), false);
        Ok(())
    }

    /// Makes room in the L2 cache for one more table. When every cached
    /// table is dirty they are written back first, the lock held through
    /// the flushes (`writeback.rs`); if a write-back is already under way,
    /// the cache goes over its size until that one has written them.
    async fn make_room_l2(&self) -> Result<(), IoError> {
        while self.l2.borrow().is_full() {
            if self.l2.borrow_mut().evict_clean() {
                return Ok(());
            }
            let Some(_wb) = self.writeback.try_lock() else { return Ok(()) };
            self.writeback_locked().await?;
        }
        Ok(())
    }

    /// The mapping of guest cluster `c`, loading its table. Lock held.
    pub(super) async fn cluster(&self, c: u64) -> Result<Cluster, IoError> {
        let (_, off, _) = self.l1_lookup(c)?;
        if off == 0 {
            return Ok(Cluster::Unallocated);
        }
        self.load_l2(off).await?;
        let e = self.l2.borrow_mut().get(off).expect("table just loaded")[(c % self.geo.l2_entries) as usize];
        self.decode(e)
    }

    /// The L2 table covering cluster `c`, allocated (or copied, if shared
    /// with a snapshot) so it can be written. Lock held.
    ///
    /// A new table goes into the cache dirty, and the L1 entry pointing at
    /// it is set in memory only: write-back writes the table and flushes
    /// before it writes the entry (ordering rule 5), so nothing waits for
    /// the disk here.
    pub(super) async fn writable_l2(&self, c: u64) -> Result<u64, IoError> {
        let (i, off, copied) = self.l1_lookup(c)?;
        if off != 0 && copied {
            self.load_l2(off).await?;
            return Ok(off);
        }
        let entries = if off == 0 {
            vec![0u64; self.geo.l2_entries as usize]
        } else {
            self.load_l2(off).await?;
            self.l2.borrow().peek(off).expect("table just loaded").clone()
        };
        let new = self.alloc_clusters(1).await?;
        self.make_room_l2().await?;
        // From here to the end nothing waits: the table, the L1 entry and
        // the overlap map change together.
        self.l2.borrow_mut().insert(new, entries, true);
        self.l1.borrow_mut()[i] = new | COPIED;
        self.l1_dirty.borrow_mut().insert(i);
        {
            let mut o = self.overlaps.borrow_mut();
            o.add_cluster(kind::ACTIVE_L2, new);
            if off != 0 {
                o.remove_cluster(kind::ACTIVE_L2, off);
            }
        }
        if off != 0 {
            // The shared table now belongs to the snapshots only; its
            // refcount drops once the L1 entry is durable.
            self.l2.borrow_mut().remove(off);
            self.l1_dropped.borrow_mut().push(off);
        }
        Ok(new)
    }

    /// Writes L1 entry `i` as it is in memory.
    pub(super) async fn write_l1_entry(&self, i: usize) -> Result<(), IoError> {
        let e = self.l1.borrow()[i];
        let off = self.header.borrow().l1_table_offset + i as u64 * 8;
        self.write_checked(off, IoBuf::from_slice(&e.to_be_bytes()), kind::ACTIVE_L1).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{KIB, MIB, assert_consistent, caches, new_disk, open, pattern, read, run, write};
    use super::*;
    use crate::drivers::sim::Keep;
    use crate::io::IoFlags;

    #[test]
    fn lookups_follow_l1_then_the_cached_l2_table() {
        let disk = new_disk(4 * MIB, 4 * KIB, 4);
        let d = disk.clone();
        run(async move {
            let o = open(&d, caches(8, 4)).await;
            let g = o.q.geo;
            assert_eq!(o.q.cached_cluster(3), Some(Ok(Cluster::Unallocated)), "no L2 table yet");
            write(&o.ch, 3 * g.cluster_size, &pattern(0, 4096, 1)).await;
            let (i, table, copied) = o.q.l1_lookup(3).unwrap();
            assert_eq!((i, copied), (0, true));
            let Some(Ok(Cluster::Data { host, copied: true })) = o.q.cached_cluster(3) else {
                panic!("cluster 3 is mapped in the cached table");
            };
            assert!(host > table, "the data comes after its table");
            assert_eq!(o.q.cached_cluster(4), Some(Ok(Cluster::Unallocated)));
            o.q.flush().await.unwrap();

            // A second open starts with nothing cached and loads on demand.
            let o = open(&d, caches(8, 4)).await;
            assert_eq!(o.q.cached_cluster(3), None);
            let _g = o.q.lock.lock().await;
            assert_eq!(o.q.cluster(3).await, Ok(Cluster::Data { host, copied: true }));
            assert!(o.q.cached_cluster(3).is_some());
        });
    }

    #[test]
    fn a_new_table_is_entered_in_l1_and_written_before_the_entry() {
        // 4 KiB clusters: one L2 table maps 2 MiB.
        let disk = new_disk(8 * MIB, 4 * KIB, 4);
        let d = disk.clone();
        run(async move {
            let o = open(&d, caches(8, 4)).await;
            write(&o.ch, 5 * MIB, &pattern(5 * MIB, 512, 2)).await;
            let (i, table, _) = o.q.l1_lookup((5 * MIB) >> 12).unwrap();
            assert_eq!(i, 2);
            o.q.flush().await.unwrap();
            let l1 = o.q.header.borrow().l1_table_offset;
            let on_disk = d.channel().read(l1 + 16, 8).await.unwrap();
            assert_eq!(u64::from_be_bytes(on_disk[..8].try_into().unwrap()), table | COPIED);
        });
        // Whatever a crash keeps, the L1 entry never points at a table not written.
        for seed in 0..16 {
            assert_consistent(&disk.crash_image(Keep::Random(seed)), "a crash");
        }
    }

    #[test]
    fn a_small_l2_cache_evicts_and_reloads() {
        // 512-byte clusters: one L2 table maps 32 KiB; two tables cached.
        let disk = new_disk(MIB, 512, 4);
        run(async move {
            let o = open(&disk, caches(2, 4)).await;
            for k in 0..8u64 {
                write(&o.ch, k * 32 * KIB + 512, &pattern(k, 512, k as u8)).await;
            }
            for k in (0..8u64).rev() {
                assert_eq!(read(&o.ch, k * 32 * KIB + 512, 512).await, pattern(k, 512, k as u8));
                assert_eq!(read(&o.ch, k * 32 * KIB, 512).await, vec![0; 512]);
            }
        });
    }

    #[test]
    fn an_entry_pointing_past_the_end_of_the_file_is_corruption() {
        let disk = new_disk(4 * MIB, 4 * KIB, 4);
        let d = disk.clone();
        run(async move {
            let o = open(&d, caches(8, 4)).await;
            write(&o.ch, 0, &pattern(0, 4096, 1)).await;
            o.q.flush().await.unwrap();
            let (_, table, _) = o.q.l1_lookup(0).unwrap();
            let bogus = entry::data_entry(1 << 30);
            d.channel().write(table, IoBuf::from_slice(&bogus.to_be_bytes()), IoFlags::NONE).await.1.unwrap();

            let o = open(&d, caches(8, 4)).await;
            assert_eq!(o.ch.read(0, 4096).await.err(), Some(IoError::Io));
            assert!(o.q.fenced(), "a writable image is fenced");
            let events = o.events.lock().unwrap().clone();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].0, "BLOCK_IMAGE_CORRUPTED");
            assert!(events[0].1["msg"].as_str().unwrap().contains("beyond the end of the file"), "{events:?}");
        });
    }
}
