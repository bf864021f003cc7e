//! One open qcow2 image on its home reactor: the fixed facts of the image
//! and the state every part shares — the header, the L1 table, the L2 and
//! refcount block caches, the refcount table, the locks, what waits to be
//! written back or freed — and opening it.
//!
//! The parts work on this state from their own modules: `mapping`
//! (lookups), `refcount`, `alloc` (and `reuse`: when freed clusters come
//! back), `writeback` (the crash-ordering rules), `request` (the request
//! paths) and `corrupt` (overlap checks, fencing).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use reactor::{IoBuf, LocalMutex};
use slab::Slab;

use super::alloc::Allocator;
use super::cache::TableCache;
use super::entry::refcount;
use super::header::{Compression, Header};
use super::overlap::{self, Overlaps, kind};
use super::refcount::Refcounts;
use super::reuse::{Epochs, Reuse};
use crate::bdev::EventSink;
use crate::channel::BlockChannel;
use crate::error::IoError;
use crate::io::Done;

/// Fixed facts of the image.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub l2_entries: u64,
    pub version: u32,
    pub refcount_order: u32,
    pub compression: Compression,
}

impl Geometry {
    pub(super) fn cluster(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    pub(super) fn within(&self, offset: u64) -> u64 {
        offset & (self.cluster_size - 1)
    }

    pub(super) fn per_block(&self) -> u64 {
        refcount::per_block(self.refcount_order, self.cluster_bits)
    }
}

/// The backing node, as this image reads it.
pub(super) struct Backing {
    pub ch: BlockChannel,
    pub size: u64,
}

/// The open image (see the module documentation).
pub(super) struct Qcow2 {
    pub geo: Geometry,
    pub header: RefCell<Header>,
    pub file: BlockChannel,
    /// Replaced when a job re-points the image (stream, commit).
    pub backing: RefCell<Option<Rc<Backing>>>,
    pub read_only: bool,
    pub l1: RefCell<Vec<u64>>,
    /// L1 entries changed in memory (new L2 tables), written back once
    /// their tables are durable.
    pub l1_dirty: RefCell<BTreeSet<usize>>,
    pub l2: RefCell<TableCache<Vec<u64>>>,
    pub blocks: RefCell<TableCache<Vec<u8>>>,
    pub rc: RefCell<Refcounts>,
    /// Serialises metadata changes (held across metadata reads and writes,
    /// never across guest data I/O, and across a flush of the file only
    /// where `writeback.rs` says so).
    pub lock: LocalMutex,
    /// Serialises write-backs (held across their flushes of the file).
    pub writeback: LocalMutex,
    /// Guest clusters whose new data is being written: their run's lock
    /// is held until the L2 entries are set.
    pub allocating: RefCell<HashMap<u64, LocalMutex>>,
    /// Host clusters to lower by one once the L2 updates dropping them are on disk.
    pub pending_frees: RefCell<Vec<u64>>,
    /// L2 tables the L1 table no longer points at (copied from a shared
    /// table): lowered once the L1 entries are durable, a write-back later.
    pub l1_dropped: RefCell<Vec<u64>>,
    /// Dropped by L1 entries already durable: lowered at the next write-back.
    pub l1_frees: RefCell<Vec<u64>>,
    /// Where the allocator stands.
    pub alloc: RefCell<Allocator>,
    /// Freed clusters on their way back to the allocator.
    pub reuse: RefCell<Reuse>,
    /// Requests in flight that may touch host clusters, by epoch.
    pub epochs: RefCell<Epochs>,
    /// A write-back the allocator started is under way.
    pub background_writeback: Cell<bool>,
    /// Closed: nothing starts in the background any more.
    pub closed: Cell<bool>,
    /// End of the file as far as allocation knows (bytes).
    pub file_end: Cell<u64>,
    /// The file's length as grown ahead of `file_end`; 0: never grow (the
    /// file child is not a plain file).
    pub grown_to: Cell<u64>,
    pub caches: CacheSizes,
    /// Fast-path requests in flight: their completion, guest offset and epoch.
    pub fast: RefCell<Slab<(Done, u64, u64)>>,
    /// Where the metadata lies, checked before every write to the file.
    pub overlaps: RefCell<Overlaps>,
    /// Who hears of corruption, and the fence it raises.
    pub alarm: Alarm,
    /// A corruption event was sent (QEMU sends one, then stays quiet).
    pub signaled: Cell<bool>,
    pub me: Weak<Qcow2>,
}

/// How a detected corruption is made known: the node's name and the
/// event sink for `BLOCK_IMAGE_CORRUPTED`, and the flag that fences the
/// image (no write reaches the file any more; the node reads as read-only).
#[derive(Clone)]
pub(super) struct Alarm {
    pub node_name: String,
    pub events: Option<EventSink>,
    pub fenced: Arc<AtomicBool>,
}

/// Sizes of the caches.
#[derive(Debug, Clone, Copy)]
pub(super) struct CacheSizes {
    pub l2_tables: usize,
    pub refcount_blocks: usize,
}

pub(super) fn decode_be64(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect()
}

pub(super) fn encode_be64(entries: &[u64]) -> IoBuf {
    let mut buf = IoBuf::new(entries.len() * 8);
    for (chunk, e) in buf.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_be_bytes());
    }
    buf
}

/// How an image is opened, besides its file and header.
pub(super) struct Settings {
    pub read_only: bool,
    pub caches: CacheSizes,
    /// Grow the file ahead of the allocator (see [`super::alloc::GROW_AHEAD_BYTES`]).
    pub grow: bool,
    /// The overlap checks enabled ([`super::overlap::parse_option`]).
    pub overlap_check: u16,
    pub alarm: Alarm,
}

impl Qcow2 {
    /// Loads the L1 and refcount tables and builds the state.
    pub(super) async fn open(
        file: BlockChannel,
        file_size: u64,
        header: Header,
        backing: Option<Backing>,
        settings: Settings,
    ) -> Result<Rc<Qcow2>, IoError> {
        let Settings { read_only, caches, grow, overlap_check, alarm } = settings;
        let cs = header.cluster_size();
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            cluster_size: cs,
            l2_entries: cs / 8,
            version: header.version,
            refcount_order: header.refcount_order,
            compression: header.compression(),
        };
        let l1 = if header.l1_size == 0 {
            Vec::new()
        } else {
            decode_be64(&file.read(header.l1_table_offset, header.l1_size as usize * 8).await?)
        };
        let table_bytes = header.refcount_table_clusters as usize * cs as usize;
        let table = decode_be64(&file.read(header.refcount_table_offset, table_bytes).await?);
        // Nothing is written through a read-only image: no map needed.
        let overlaps = if read_only {
            Overlaps::new(0, header.cluster_bits)
        } else {
            overlap::metadata_map(&file, &header, &l1, &table, overlap_check).await?
        };
        Ok(Rc::new_cyclic(|me| Qcow2 {
            geo,
            header: RefCell::new(header),
            file,
            backing: RefCell::new(backing.map(Rc::new)),
            read_only,
            l1: RefCell::new(l1),
            l1_dirty: RefCell::default(),
            l2: RefCell::new(TableCache::new(caches.l2_tables)),
            blocks: RefCell::new(TableCache::new(caches.refcount_blocks)),
            rc: RefCell::new(Refcounts { table, dirty: BTreeSet::new() }),
            lock: LocalMutex::new(),
            writeback: LocalMutex::new(),
            allocating: RefCell::new(HashMap::new()),
            pending_frees: RefCell::new(Vec::new()),
            l1_dropped: RefCell::default(),
            l1_frees: RefCell::default(),
            alloc: RefCell::default(),
            reuse: RefCell::default(),
            epochs: RefCell::default(),
            background_writeback: Cell::new(false),
            closed: Cell::new(false),
            file_end: Cell::new(file_size.next_multiple_of(cs)),
            grown_to: Cell::new(if grow && !read_only { file_size } else { 0 }),
            caches,
            fast: RefCell::new(Slab::new()),
            overlaps: RefCell::new(overlaps),
            alarm,
            signaled: Cell::new(false),
            me: me.clone(),
        }))
    }

    pub(super) fn file(&self) -> &BlockChannel {
        &self.file
    }

    pub(super) fn backing(&self) -> Option<Rc<Backing>> {
        self.backing.borrow().clone()
    }

    pub(super) fn has_backing(&self) -> bool {
        self.backing.borrow().is_some()
    }

    /// Reads unallocated clusters from `backing` from now on, leaving the
    /// header as it is (an overlay put on top of a running disk, whose file
    /// already names it or gets named later).
    pub(super) fn attach_backing(&self, backing: Option<Backing>) {
        *self.backing.borrow_mut() = backing.map(Rc::new);
    }

    /// Reads unallocated clusters from `backing` from now on and records
    /// it in the header (`name`, `format`). Requests already reading the
    /// old backing finish there: callers switch only between chains that
    /// read the same (stream, commit).
    pub(super) async fn set_backing(
        &self,
        backing: Option<Backing>,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<(), IoError> {
        let _g = self.lock.lock().await;
        let old = self.header.borrow().clone();
        let mut new = old.clone();
        new.set_backing(name, format);
        if new.serialize().is_err() {
            // The name does not fit in cluster 0.
            return Err(IoError::Invalid);
        }
        *self.header.borrow_mut() = new;
        if let Err(e) = self.write_header().await {
            *self.header.borrow_mut() = old;
            return Err(e);
        }
        self.file.flush().await?;
        *self.backing.borrow_mut() = backing.map(Rc::new);
        Ok(())
    }

    pub(super) fn l1_entries(&self) -> Vec<u64> {
        self.l1.borrow().clone()
    }

    /// Installs a rebuilt refcount table (at `offset`, `clusters` long).
    pub(super) fn set_refcount_table(&self, table: Vec<u64>, offset: u64, clusters: u64) {
        {
            let mut o = self.overlaps.borrow_mut();
            o.clear_clusters(kind::REFCOUNT_BLOCK);
            for &e in table.iter().filter(|&&e| e & !511 != 0) {
                o.add_cluster(kind::REFCOUNT_BLOCK, e & !511);
            }
            o.set_range(kind::REFCOUNT_TABLE, offset, clusters << self.geo.cluster_bits);
        }
        *self.rc.borrow_mut() = Refcounts { table, dirty: BTreeSet::new() };
        *self.alloc.borrow_mut() = Allocator::default();
        self.reuse.borrow_mut().clear();
        *self.blocks.borrow_mut() = TableCache::new(self.caches.refcount_blocks);
    }

    pub(super) fn read_only(&self) -> bool {
        self.read_only
    }

    pub(super) fn set_file_end(&self, end: u64) {
        self.file_end.set(end.next_multiple_of(self.geo.cluster_size));
    }

    pub(super) fn file_end(&self) -> u64 {
        self.file_end.get()
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::testing::{KIB, caches, open, read, run};
    use crate::drivers::sim::SimDisk;

    #[test]
    fn an_image_qemu_made_opens_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.qcow2");
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=8"])
            .arg(&path)
            .arg("8M"));
        ok(Command::new("qemu-io").args(["-c", "write -P 0xab 12k 20k", "-c", "write -z 64k 64k"]).arg(&path));
        let disk = SimDisk::new(std::fs::read(&path).unwrap(), 1);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            let g = o.q.geo;
            assert_eq!((g.cluster_size, g.refcount_order, g.version), (4 * KIB, 3, 3));
            assert_eq!(o.q.l1_entries().len(), 4, "8 MiB in 2 MiB tables");
            assert_eq!(o.q.file_end() % g.cluster_size, 0);
            let got = read(&o.ch, 8 * KIB, 32 * KIB as usize).await;
            assert!(got[..4096].iter().all(|&b| b == 0));
            assert!(got[4096..24 * 1024].iter().all(|&b| b == 0xab));
            assert!(got[24 * 1024..].iter().all(|&b| b == 0));
        });
    }
}
