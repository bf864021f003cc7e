//! One open qcow2 image on its home reactor: the L1 table, the L2 and
//! refcount block caches, and the request paths.
//!
//! Requests whose clusters are already mapped in cached L2 tables — reads
//! of data clusters, overwrites of clusters with refcount one (COPIED) —
//! go straight to the file with their offset translated: only data I/O.
//! Everything else runs as a task: planning under the image's metadata
//! lock, data I/O outside it.
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

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use reactor::{IoBuf, LocalMutex};
use slab::Slab;

use super::cache::TableCache;
use super::entry::{self, COPIED, Cluster, OFFSET_MASK, ZERO, refcount};
use super::header::{Compression, Header, autoclear, ext, incompat};
use super::overlap::{Overlaps, kind};
use super::snapshot;
use crate::bdev::EventSink;
use crate::channel::BlockChannel;
use crate::error::IoError;
use crate::io::{BlockStatus, Done, Io, IoDone, IoFlags, IoKind};

/// Most clusters allocated for one write at once.
const ALLOC_RUN_CLUSTERS_MAX: u64 = 512;
/// How far ahead of the allocator the image file is grown (preallocated,
/// reading as zeroes): data writes then land inside the file, where the
/// file system takes them in parallel, instead of extending it one by one.
const GROW_AHEAD_BYTES: u64 = 32 << 20;

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
    fn cluster(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    fn within(&self, offset: u64) -> u64 {
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

struct Refcounts {
    /// The refcount table: entry `t` is the offset of the block covering
    /// clusters `[t * per_block, (t + 1) * per_block)`, or 0.
    table: Vec<u64>,
    /// First cluster index the allocator considers; only moves forward.
    free_search: u64,
}

pub(super) struct Qcow2 {
    pub geo: Geometry,
    pub header: RefCell<Header>,
    file: BlockChannel,
    /// Replaced when a job re-points the image (stream, commit).
    backing: RefCell<Option<Rc<Backing>>>,
    read_only: bool,
    l1: RefCell<Vec<u64>>,
    l2: RefCell<TableCache<Vec<u64>>>,
    blocks: RefCell<TableCache<Vec<u8>>>,
    rc: RefCell<Refcounts>,
    /// Serialises metadata changes (held across metadata I/O, never across
    /// guest data I/O).
    lock: LocalMutex,
    /// Guest clusters whose new data is being written: their run's lock
    /// is held until the L2 entries are set.
    allocating: RefCell<HashMap<u64, LocalMutex>>,
    /// Host clusters to lower by one once the L2 updates dropping them are on disk.
    pending_frees: RefCell<Vec<u64>>,
    /// End of the file as far as allocation knows (bytes).
    file_end: Cell<u64>,
    /// The file's length as grown ahead of `file_end`; 0: never grow (the
    /// file child is not a plain file).
    grown_to: Cell<u64>,
    caches: CacheSizes,
    /// Fast-path requests in flight: their completion and guest offset.
    fast: RefCell<Slab<(Done, u64)>>,
    /// Where the metadata lies, checked before every write to the file.
    overlaps: RefCell<Overlaps>,
    /// Who hears of corruption, and the fence it raises.
    alarm: Alarm,
    /// A corruption event was sent (QEMU sends one, then stays quiet).
    signaled: Cell<bool>,
    me: Weak<Qcow2>,
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

/// A run of guest clusters being allocated: where, what they held before,
/// and the lock writers to the same clusters wait on.
struct Run {
    table: u64,
    c0: u64,
    host: u64,
    old: Vec<Cluster>,
    _guard: reactor::LocalMutexGuard,
}

/// Sizes of the caches.
#[derive(Debug, Clone, Copy)]
pub(super) struct CacheSizes {
    pub l2_tables: usize,
    pub refcount_blocks: usize,
}

/// Where the metadata of a writable image lies, for the overlap checks
/// `enabled` asks for (the tables read at open: L1, refcount table; the
/// snapshot table and, for `all`, the snapshots' L1 tables are read here).
async fn metadata_map(
    file: &BlockChannel,
    h: &Header,
    l1: &[u64],
    refcount_table: &[u64],
    enabled: u16,
) -> Result<Overlaps, IoError> {
    let cs = h.cluster_size();
    let mut o = Overlaps::new(enabled, h.cluster_bits);
    if enabled == 0 {
        return Ok(o);
    }
    o.add_range(kind::ACTIVE_L1, h.l1_table_offset, u64::from(h.l1_size) * 8);
    o.add_range(kind::REFCOUNT_TABLE, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs);
    for &e in l1.iter().filter(|&&e| e & OFFSET_MASK != 0) {
        o.add_cluster(kind::ACTIVE_L2, e & OFFSET_MASK);
    }
    for &e in refcount_table.iter().filter(|&&e| e & !511 != 0) {
        o.add_cluster(kind::REFCOUNT_BLOCK, e & !511);
    }
    if h.nb_snapshots > 0 {
        let table = snapshot::read_table(file, h.snapshots_offset, h.nb_snapshots).await?;
        o.add_range(kind::SNAPSHOT_TABLE, h.snapshots_offset, table.bytes);
        for &(off, entries) in &table.l1_tables {
            o.add_range(kind::INACTIVE_L1, off, u64::from(entries) * 8);
            if enabled & kind::INACTIVE_L2 != 0 && entries > 0 {
                let l1 = decode_be64(&file.read(off, entries as usize * 8).await?);
                for &e in l1.iter().filter(|&&e| e & OFFSET_MASK != 0) {
                    o.add_cluster(kind::INACTIVE_L2, e & OFFSET_MASK);
                }
            }
        }
    }
    if h.autoclear & autoclear::BITMAPS != 0
        && let Some(e) = h.extensions.iter().find(|e| e.kind == ext::BITMAPS && e.data.len() >= 24)
    {
        let be = |at: usize| u64::from_be_bytes(e.data[at..at + 8].try_into().expect("8 bytes"));
        o.add_range(kind::BITMAP_DIRECTORY, be(16), be(8));
    }
    Ok(o)
}

fn decode_be64(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect()
}

fn encode_be64(entries: &[u64]) -> IoBuf {
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
    /// Grow the file ahead of the allocator (see [`GROW_AHEAD_BYTES`]).
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
            metadata_map(&file, &header, &l1, &table, overlap_check).await?
        };
        Ok(Rc::new_cyclic(|me| Qcow2 {
            geo,
            header: RefCell::new(header),
            file,
            backing: RefCell::new(backing.map(Rc::new)),
            read_only,
            l1: RefCell::new(l1),
            l2: RefCell::new(TableCache::new(caches.l2_tables)),
            blocks: RefCell::new(TableCache::new(caches.refcount_blocks)),
            rc: RefCell::new(Refcounts { table, free_search: 0 }),
            lock: LocalMutex::new(),
            allocating: RefCell::new(HashMap::new()),
            pending_frees: RefCell::new(Vec::new()),
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

    fn backing(&self) -> Option<Rc<Backing>> {
        self.backing.borrow().clone()
    }

    fn has_backing(&self) -> bool {
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
        let mut rc = self.rc.borrow_mut();
        rc.table = table;
        rc.free_search = 0;
        drop(rc);
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

    // ----- corruption ------------------------------------------------------

    /// The image found corrupt while writable: nothing reaches the file.
    pub(super) fn fenced(&self) -> bool {
        self.alarm.fenced.load(Ordering::Acquire)
    }

    /// Reports corrupt metadata found on the way (QEMU's
    /// qcow2_signal_corruption without a place): the request fails with EIO.
    fn corrupt(&self, what: impl std::fmt::Display) -> IoError {
        self.signal_corruption(None, what.to_string());
        IoError::Io
    }

    /// Refuses a write of `len` bytes at `offset` that would land on
    /// metadata (but that of the kinds in `ignore`), raising the alarm;
    /// refuses every write once the image is fenced.
    pub(super) fn check_write(&self, offset: u64, len: u64, ignore: u16) -> Result<(), IoError> {
        if self.fenced() {
            return Err(IoError::Io);
        }
        let hit = self.overlaps.borrow().check(offset, len, ignore);
        match hit {
            None => Ok(()),
            Some(k) => {
                let msg = format!("Preventing invalid write on metadata (overlaps with {})", kind::name(k));
                self.signal_corruption(Some((offset, len)), msg);
                Err(IoError::Io)
            }
        }
    }

    /// Writes `buf` at `offset` of the file after the overlap check.
    pub(super) async fn write_checked(&self, offset: u64, buf: IoBuf, ignore: u16) -> Result<(), IoError> {
        self.check_write(offset, buf.len() as u64, ignore)?;
        self.file.write(offset, buf, IoFlags::NONE).await.1
    }

    /// Makes a corruption known, as QEMU does: once, as a
    /// `BLOCK_IMAGE_CORRUPTED` event; on a writable image also fatally —
    /// the image is fenced (no more writes, the node reads as read-only)
    /// and the header's corrupt bit is set, so QEMU and Spindle refuse to
    /// open it for writing until `qemu-img check -r` repairs it.
    fn signal_corruption(&self, place: Option<(u64, u64)>, msg: String) {
        let fatal = !self.read_only;
        if self.signaled.get() && (!fatal || self.fenced()) {
            tracing::debug!("qcow2: {}: further corruption: {msg}", self.alarm.node_name);
            return;
        }
        if fatal {
            tracing::error!(
                "qcow2: {}: Marking image as corrupt: {msg}; further corruption events will be suppressed",
                self.alarm.node_name
            );
        } else {
            tracing::error!(
                "qcow2: {}: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed",
                self.alarm.node_name
            );
        }
        if let Some(events) = &self.alarm.events {
            let mut data = serde_json::json!({
                "device": "",
                "node-name": self.alarm.node_name,
                "msg": msg,
                "fatal": fatal,
            });
            if let Some((offset, size)) = place {
                data["offset"] = offset.into();
                data["size"] = size.into();
            }
            events("BLOCK_IMAGE_CORRUPTED", data);
        }
        self.signaled.set(true);
        if fatal {
            self.alarm.fenced.store(true, Ordering::Release);
            self.header.borrow_mut().incompatible |= incompat::CORRUPT;
            if let Some(me) = self.me.upgrade() {
                reactor::spawn_local(async move { me.write_corrupt_bit().await });
            }
        }
    }

    /// Sets the corrupt bit on disk (version 3 images; version 2 has no
    /// feature bits). Under the metadata lock, so a header write in flight
    /// cannot land after it.
    async fn write_corrupt_bit(&self) {
        let _g = self.lock.lock().await;
        let (version, bits) = {
            let h = self.header.borrow();
            (h.version, h.incompatible)
        };
        if version < 3 {
            return;
        }
        // The incompatible feature bits sit at byte 72 of the header.
        let res = self.file.write(72, IoBuf::from_slice(&bits.to_be_bytes()), IoFlags::NONE).await.1;
        let res = match res {
            Ok(()) => self.file.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            tracing::error!("qcow2: {}: setting the corrupt bit failed: {e}", self.alarm.node_name);
        }
    }

    // ----- lookups ---------------------------------------------------------

    /// The L1 entry for guest cluster `c`: (L1 index, L2 table offset, COPIED).
    fn l1_lookup(&self, c: u64) -> Result<(usize, u64, bool), IoError> {
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

    fn check_metadata_offset(&self, off: u64) -> Result<(), IoError> {
        self.check_cluster("metadata table", off)
    }

    fn decode(&self, e: u64) -> Result<Cluster, IoError> {
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
    fn cached_cluster(&self, c: u64) -> Option<Result<Cluster, IoError>> {
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
    async fn load_l2(&self, off: u64) -> Result<(), IoError> {
        if self.l2.borrow().contains(off) {
            return Ok(());
        }
        self.make_room_l2().await?;
        let buf = self.file.read(off, self.geo.cluster_size as usize).await?;
        self.l2.borrow_mut().insert(off, decode_be64(&buf), false);
        Ok(())
    }

    async fn make_room_l2(&self) -> Result<(), IoError> {
        while self.l2.borrow().is_full() {
            if self.l2.borrow_mut().evict_clean() {
                return Ok(());
            }
            // Every cached table is dirty: write them back, then evict.
            self.flush_metadata_locked().await?;
        }
        Ok(())
    }

    /// The mapping of guest cluster `c`, loading its table. Lock held.
    async fn cluster(&self, c: u64) -> Result<Cluster, IoError> {
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
    async fn writable_l2(&self, c: u64) -> Result<u64, IoError> {
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
        // Ordering rule 5: table and its refcount durable before the L1 entry.
        self.write_dirty_blocks().await?;
        self.write_checked(new, encode_be64(&entries), kind::ACTIVE_L2).await?;
        self.file.flush().await?;
        self.l1.borrow_mut()[i] = new | COPIED;
        {
            let mut o = self.overlaps.borrow_mut();
            o.add_cluster(kind::ACTIVE_L2, new);
            if off != 0 {
                o.remove_cluster(kind::ACTIVE_L2, off);
            }
        }
        self.write_l1_entry(i).await?;
        self.make_room_l2().await?;
        self.l2.borrow_mut().insert(new, entries, false);
        if off != 0 {
            // The shared table now belongs to the snapshots only.
            self.l2.borrow_mut().remove(off);
            self.pending_frees.borrow_mut().push(off);
        }
        Ok(new)
    }

    async fn write_l1_entry(&self, i: usize) -> Result<(), IoError> {
        let e = self.l1.borrow()[i];
        let off = self.header.borrow().l1_table_offset + i as u64 * 8;
        self.write_checked(off, IoBuf::from_slice(&e.to_be_bytes()), kind::ACTIVE_L1).await
    }

    // ----- refcounts -------------------------------------------------------

    fn block_offset(&self, t: u64) -> Result<Option<u64>, IoError> {
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
    async fn update_refcount(&self, c: u64, delta: i64) -> Result<(), IoError> {
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

    async fn write_dirty_blocks(&self) -> Result<(), IoError> {
        let dirty = self.blocks.borrow().dirty_offsets();
        for off in dirty {
            let buf = IoBuf::from_slice(self.blocks.borrow().peek(off).expect("dirty block is cached"));
            self.write_checked(off, buf, kind::REFCOUNT_BLOCK).await?;
            self.blocks.borrow_mut().mark_clean(off);
        }
        Ok(())
    }

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
            self.write_dirty_blocks().await?;
        }
        let off = p << self.geo.cluster_bits;
        // Ordering rule 6: the block and its own refcount are durable
        // before the table points at it.
        self.write_checked(off, IoBuf::from_slice(&block), kind::REFCOUNT_BLOCK).await?;
        self.file.flush().await?;
        self.rc.borrow_mut().table[t as usize] = off;
        self.overlaps.borrow_mut().add_cluster(kind::REFCOUNT_BLOCK, off);
        let entry_off = self.header.borrow().refcount_table_offset + t * 8;
        self.write_checked(entry_off, IoBuf::from_slice(&off.to_be_bytes()), kind::REFCOUNT_TABLE).await?;
        while self.blocks.borrow().is_full() && !self.blocks.borrow_mut().evict_clean() {
            self.write_dirty_blocks().await?;
        }
        self.blocks.borrow_mut().insert(off, block, false);
        self.rc.borrow_mut().free_search = p + 1;
        if off + self.geo.cluster_size > self.file_end.get() {
            self.file_end.set(off + self.geo.cluster_size);
        }
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
        self.rc.borrow_mut().table = table;
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

    /// Writes the header (and its extensions) to cluster 0.
    pub(super) async fn write_header(&self) -> Result<(), IoError> {
        let bytes = self.header.borrow().serialize().map_err(|e| self.corrupt(e))?;
        self.write_checked(0, IoBuf::from_slice(&bytes), kind::MAIN_HEADER).await
    }

    // ----- write-back --------------------------------------------------------

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
    fn queue_free(&self, old: Cluster) {
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

    // ----- requests ----------------------------------------------------------

    /// Host offset for a request whose clusters are all cached, allocated
    /// data, contiguous on the host (and, for writes, refcount one).
    fn fast_target(&self, io: &Io, write: bool) -> Option<u64> {
        let g = &self.geo;
        let (first, last) = (g.cluster(io.offset), g.cluster(io.end() - 1));
        let mut base = None;
        for c in first..=last {
            match self.cached_cluster(c)? {
                Ok(Cluster::Data { host, copied }) if copied || !write => {
                    let expect = *base.get_or_insert(host) + (c - first) * g.cluster_size;
                    if host != expect {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        base.map(|h| h + g.within(io.offset))
    }

    pub(super) fn submit(self: &Rc<Self>, io: Io, done: Done) {
        let fast = match io.kind {
            IoKind::Read => self.fast_target(&io, false),
            IoKind::Write
                if !self.read_only
                    && !io.flags.contains(IoFlags::FUA)
                    && !io.flags.contains(IoFlags::FILL_UNALLOCATED) =>
            {
                // A write that would hit metadata takes the slow path,
                // which refuses it and raises the alarm.
                self.fast_target(&io, true).filter(|&h| self.check_write(h, io.len, 0).is_ok())
            }
            _ => None,
        };
        if let Some(host) = fast {
            let tag = self.fast.borrow_mut().insert((done, io.offset)) as u64;
            let me: Rc<dyn IoDone> = Rc::clone(self) as Rc<dyn IoDone>;
            let mut io = io;
            io.offset = host;
            return self.file.raw().submit(io, Done::new(me, tag));
        }
        let this = Rc::clone(self);
        reactor::spawn_local(async move {
            let (io, res) = match io.kind {
                IoKind::Read => this.read(io).await,
                IoKind::Write => this.write(io).await,
                IoKind::Flush => {
                    let res = this.flush().await;
                    (io, res)
                }
                IoKind::Discard | IoKind::WriteZeroes => this.zero_or_discard(io).await,
            };
            done.complete(io, res);
        });
    }

    async fn read(self: Rc<Self>, mut io: Io) -> (Io, Result<(), IoError>) {
        let offset = io.offset;
        let res = self.read_into(offset, io.buf_mut()).await;
        (io, res)
    }

    /// Reads guest bytes at `offset` into `out`.
    async fn read_into(self: &Rc<Self>, offset: u64, out: &mut [u8]) -> Result<(), IoError> {
        let g = self.geo;
        let end = offset + out.len() as u64;
        // Plan under the lock, then move data without it.
        let mut plan: Vec<(u64, u64, Cluster)> = Vec::new();
        {
            let _lock = self.lock.lock().await;
            let mut pos = offset;
            while pos < end {
                let n = (g.cluster_size - g.within(pos)).min(end - pos);
                let cl = self.cluster(g.cluster(pos)).await?;
                match (plan.last_mut(), cl) {
                    // Merge data contiguous on the host into one read.
                    (Some((p, len, Cluster::Data { host, .. })), Cluster::Data { host: h2, .. })
                        if *host + g.within(*p) + *len == h2 + g.within(pos) =>
                    {
                        *len += n
                    }
                    (Some((_, len, Cluster::Unallocated)), Cluster::Unallocated) => *len += n,
                    _ => plan.push((pos, n, cl)),
                }
                pos += n;
            }
        }
        let mut jobs = Vec::new();
        for (pos, n, cl) in plan {
            let at = (pos - offset) as usize;
            let this = Rc::clone(self);
            match cl {
                Cluster::Zero { .. } => out[at..at + n as usize].fill(0),
                Cluster::Unallocated if !self.has_backing() => out[at..at + n as usize].fill(0),
                _ => jobs.push((at, reactor::spawn_local(async move { this.read_segment(pos, n, cl).await }))),
            }
        }
        let mut first_err = None;
        for (at, job) in jobs {
            match job.await {
                Ok(buf) => out[at..at + buf.len()].copy_from_slice(&buf),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reads one planned segment: data, compressed, or the backing chain.
    async fn read_segment(&self, pos: u64, n: u64, cl: Cluster) -> Result<IoBuf, IoError> {
        match cl {
            Cluster::Data { host, .. } => self.file.read(host + self.geo.within(pos), n as usize).await,
            Cluster::Compressed { offset, len } => {
                let cluster = self.read_compressed(offset, len).await?;
                let at = self.geo.within(pos) as usize;
                Ok(IoBuf::from_slice(&cluster[at..at + n as usize]))
            }
            Cluster::Unallocated => self.read_backing(pos, n).await,
            Cluster::Zero { .. } => Ok(IoBuf::zeroed(n as usize)),
        }
    }

    async fn read_compressed(&self, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
        let input = self.file.read(offset, len as usize).await?;
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        entry::decompress(self.geo.compression, &input, &mut out).map_err(|e| {
            tracing::error!("qcow2: compressed cluster at {offset:#x}: {}", e.0);
            IoError::Io
        })?;
        Ok(out)
    }

    /// Guest bytes from the backing chain (zeroes past its end).
    async fn read_backing(&self, pos: u64, n: u64) -> Result<IoBuf, IoError> {
        let Some(b) = self.backing() else { return Ok(IoBuf::zeroed(n as usize)) };
        if pos >= b.size {
            return Ok(IoBuf::zeroed(n as usize));
        }
        let avail = n.min(b.size - pos);
        let mut got = b.ch.read(pos, avail as usize).await?;
        if avail < n {
            let mut buf = IoBuf::zeroed(n as usize);
            buf[..avail as usize].copy_from_slice(&got);
            got = buf;
        }
        Ok(got)
    }

    /// Fills `out` with the current content of guest cluster `c` from byte
    /// `from` (copy-on-write source).
    async fn cow_fill(&self, old: Cluster, c: u64, from: u64, out: &mut [u8]) -> Result<(), IoError> {
        let n = out.len() as u64;
        match old {
            Cluster::Zero { .. } => out.fill(0),
            Cluster::Unallocated if !self.has_backing() => out.fill(0),
            _ => out.copy_from_slice(&self.read_segment((c << self.geo.cluster_bits) + from, n, old).await?),
        }
        Ok(())
    }

    async fn write(self: Rc<Self>, mut io: Io) -> (Io, Result<(), IoError>) {
        if self.read_only {
            return (io, Err(IoError::ReadOnly));
        }
        let fill = io.flags.contains(IoFlags::FILL_UNALLOCATED);
        let whole = if fill { Ok(false) } else { self.write_whole_clusters(&mut io).await };
        let mut res = match whole {
            Ok(true) => Ok(()),
            Ok(false) => {
                let data = io.buf.take().expect("write carries a buffer");
                let r = self.write_range(io.offset, &data, fill).await;
                io.buf = Some(data);
                r
            }
            Err(e) => Err(e),
        };
        if res.is_ok() && io.flags.contains(IoFlags::FUA) {
            res = self.flush().await;
        }
        (io, res)
    }

    /// A write of whole clusters that all need allocation, inside one L2
    /// table: the request's own buffer goes to the new clusters, no copy.
    /// Ok(false) when the request does not qualify.
    async fn write_whole_clusters(&self, io: &mut Io) -> Result<bool, IoError> {
        let g = self.geo;
        if g.within(io.offset) != 0 || g.within(io.len) != 0 {
            return Ok(false);
        }
        let (c0, n) = (g.cluster(io.offset), io.len >> g.cluster_bits);
        if n > ALLOC_RUN_CLUSTERS_MAX || c0 / g.l2_entries != (c0 + n - 1) / g.l2_entries {
            return Ok(false);
        }
        let guard = self.lock.lock().await;
        let mut old = Vec::with_capacity(n as usize);
        for c in c0..c0 + n {
            if self.allocating.borrow().contains_key(&c) {
                return Ok(false);
            }
            let cl = self.cluster(c).await?;
            if matches!(cl, Cluster::Data { copied: true, .. }) {
                return Ok(false);
            }
            old.push(cl);
        }
        let table = self.writable_l2(c0).await?;
        let host = self.alloc_clusters(n).await?;
        let run = self.register_run(table, c0, host, old);
        drop(guard);
        let buf = io.buf.take().expect("write carries a buffer");
        let res = match self.check_write(host, buf.len() as u64, 0) {
            Ok(()) => {
                let (io_back, res) = self.file.submit_io(Io::write(host, buf, IoFlags::NONE)).await;
                io.buf = io_back.buf;
                res
            }
            Err(e) => {
                io.buf = Some(buf);
                Err(e)
            }
        };
        self.commit_run(run, res).await?;
        Ok(true)
    }

    /// Marks guest clusters `c0..c0 + old.len()` as being allocated at `host`.
    fn register_run(&self, table: u64, c0: u64, host: u64, old: Vec<Cluster>) -> Run {
        let lock = LocalMutex::new();
        let guard = lock.try_lock().expect("a fresh lock is free");
        let mut alloc = self.allocating.borrow_mut();
        for c in c0..c0 + old.len() as u64 {
            alloc.insert(c, lock.clone());
        }
        Run { table, c0, host, old, _guard: guard }
    }

    /// Points the L2 entries of a written run at their new clusters (or, if
    /// the data write failed, gives the clusters back), then releases the run.
    async fn commit_run(&self, run: Run, written: Result<(), IoError>) -> Result<(), IoError> {
        let _g = self.lock.lock().await;
        let n = run.old.len() as u64;
        for c in run.c0..run.c0 + n {
            self.allocating.borrow_mut().remove(&c);
        }
        let cs = self.geo.cluster_size;
        match written {
            Ok(()) => {
                self.load_l2(run.table).await?;
                let base = (run.c0 % self.geo.l2_entries) as usize;
                {
                    let mut l2 = self.l2.borrow_mut();
                    let t = l2.get_mut(run.table).expect("table just loaded");
                    for i in 0..n as usize {
                        t[base + i] = entry::data_entry(run.host + i as u64 * cs);
                    }
                }
                for &cl in &run.old {
                    self.queue_free(cl);
                }
                Ok(())
            }
            Err(e) => {
                // Never referenced: the clusters can go back at once.
                for k in 0..n {
                    self.update_refcount((run.host >> self.geo.cluster_bits) + k, -1).await?;
                }
                Err(e)
            }
        }
        // Dropping `run` releases writers waiting on these clusters.
    }

    /// The general write: in-place where clusters are ours, allocation with
    /// copy-on-write elsewhere.
    /// With `fill`, clusters this layer already holds are skipped (see
    /// [`IoFlags::FILL_UNALLOCATED`]).
    async fn write_range(&self, offset: u64, data: &[u8], fill: bool) -> Result<(), IoError> {
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            pos += self.write_step(pos, offset, data, fill).await?;
        }
        Ok(())
    }

    /// Writes from `pos` as far as one run of clusters allows; returns the
    /// bytes written or skipped (0: waited for a concurrent allocation, retry).
    async fn write_step(&self, pos: u64, base: u64, data: &[u8], fill: bool) -> Result<u64, IoError> {
        let g = self.geo;
        let end = base + data.len() as u64;
        let c0 = g.cluster(pos);
        let guard = self.lock.lock().await;
        let busy = self.allocating.borrow().get(&c0).cloned();
        if let Some(run) = busy {
            drop(guard);
            drop(run.lock().await);
            return Ok(0);
        }
        let table = self.writable_l2(c0).await?;
        let table_last = (c0 / g.l2_entries + 1) * g.l2_entries - 1;
        let last = g.cluster(end - 1).min(table_last).min(c0 + ALLOC_RUN_CLUSTERS_MAX - 1);
        let first = self.cluster(c0).await?;
        if fill && first != Cluster::Unallocated {
            // Held here already (written meanwhile): keep it.
            return Ok(end.min((c0 + 1) << g.cluster_bits) - pos);
        }
        if let Cluster::Data { host, copied: true } = first {
            // In place over contiguous clusters that are ours.
            let mut c = c0 + 1;
            while c <= last
                && !self.allocating.borrow().contains_key(&c)
                && self.cluster(c).await? == (Cluster::Data { host: host + (c - c0) * g.cluster_size, copied: true })
            {
                c += 1;
            }
            drop(guard);
            let run_end = end.min(c << g.cluster_bits);
            let buf = IoBuf::from_slice(&data[(pos - base) as usize..(run_end - base) as usize]);
            self.write_checked(host + g.within(pos), buf, 0).await?;
            return Ok(run_end - pos);
        }
        let mut old = vec![first];
        let mut c = c0 + 1;
        while c <= last && !self.allocating.borrow().contains_key(&c) {
            let cl = self.cluster(c).await?;
            if matches!(cl, Cluster::Data { copied: true, .. }) || (fill && cl != Cluster::Unallocated) {
                break;
            }
            old.push(cl);
            c += 1;
        }
        let n = old.len() as u64;
        let host = self.alloc_clusters(n).await?;
        let run = self.register_run(table, c0, host, old);
        drop(guard);
        let run_start = c0 << g.cluster_bits;
        let run_end = (c0 + n) << g.cluster_bits;
        let w_end = end.min(run_end);
        let filled = async {
            let mut buf = IoBuf::new((run_end - run_start) as usize);
            if pos > run_start {
                self.cow_fill(run.old[0], c0, 0, &mut buf[..(pos - run_start) as usize]).await?;
            }
            if w_end < run_end {
                let lc = c0 + n - 1;
                let from = w_end - (lc << g.cluster_bits);
                let at = (w_end - run_start) as usize;
                self.cow_fill(run.old[n as usize - 1], lc, from, &mut buf[at..]).await?;
            }
            buf[(pos - run_start) as usize..(w_end - run_start) as usize]
                .copy_from_slice(&data[(pos - base) as usize..(w_end - base) as usize]);
            self.write_checked(host, buf, 0).await
        }
        .await;
        self.commit_run(run, filled).await?;
        Ok(w_end - pos)
    }

    async fn zero_or_discard(self: Rc<Self>, io: Io) -> (Io, Result<(), IoError>) {
        if self.read_only {
            return (io, Err(IoError::ReadOnly));
        }
        let mut res = self.zero_or_discard_range(&io).await;
        if res.is_ok() && io.flags.contains(IoFlags::FUA) {
            res = self.flush().await;
        }
        (io, res)
    }

    async fn zero_or_discard_range(&self, io: &Io) -> Result<(), IoError> {
        let g = self.geo;
        let discard = io.kind == IoKind::Discard;
        let (start, end) = (io.offset, io.end());
        let a = start.next_multiple_of(g.cluster_size).min(end);
        let b = (end >> g.cluster_bits << g.cluster_bits).max(a);
        if !discard {
            // Partial clusters at the edges get zero data.
            if start < a {
                self.write_range(start, &vec![0u8; (a - start) as usize], false).await?;
            }
            if b < end {
                self.write_range(b, &vec![0u8; (end - b) as usize], false).await?;
            }
        }
        let unmap = discard || io.flags.contains(IoFlags::MAY_UNMAP);
        let mut c = g.cluster(a);
        while c < g.cluster(b) {
            c += self.zero_cluster(c, discard, unmap).await?;
        }
        Ok(())
    }

    /// Zeroes or discards whole cluster `c`; returns clusters done (0: retry).
    async fn zero_cluster(&self, c: u64, discard: bool, unmap: bool) -> Result<u64, IoError> {
        let g = self.geo;
        let guard = self.lock.lock().await;
        let busy = self.allocating.borrow().get(&c).cloned();
        if let Some(run) = busy {
            drop(guard);
            drop(run.lock().await);
            return Ok(0);
        }
        self.l1_lookup(c)?;
        let old = self.cluster(c).await?;
        let has_backing = self.has_backing();
        let v3 = g.version >= 3;
        // QEMU's choices, so images end up mapped the same way.
        let new_entry = if discard {
            // Over a backing file (v3) even an unallocated cluster gets the
            // zero flag, so the backing data does not show through.
            if old == Cluster::Unallocated && !(has_backing && v3) {
                return Ok(1);
            }
            if v3 { ZERO } else { 0 }
        } else if v3 {
            match old {
                Cluster::Data { host, copied: true } | Cluster::Zero { host: Some(host), copied: true } if !unmap => {
                    host | COPIED | ZERO
                }
                _ => ZERO,
            }
        } else if !has_backing {
            // Version 2 has no zero flag; unallocated reads as zero.
            if old == Cluster::Unallocated {
                return Ok(1);
            }
            0
        } else {
            // Version 2 over a backing file: zeroes must be written as data.
            drop(guard);
            self.write_range(c << g.cluster_bits, &vec![0u8; g.cluster_size as usize], false).await?;
            return Ok(1);
        };
        let table = self.writable_l2(c).await?;
        let idx = (c % g.l2_entries) as usize;
        let current = self.l2.borrow_mut().get(table).expect("table loaded")[idx];
        if current != new_entry {
            self.l2.borrow_mut().get_mut(table).expect("table loaded")[idx] = new_entry;
            let keeps_host = new_entry & OFFSET_MASK != 0;
            if !keeps_host {
                self.queue_free(old);
            }
        }
        drop(guard);
        Ok(1)
    }

    /// What the range at `offset` holds, through the backing chain.
    pub(super) async fn block_status(self: Rc<Self>, offset: u64, len: u64) -> Result<BlockStatus, IoError> {
        let g = self.geo;
        let end = offset + len;
        let (first, run) = {
            let _lock = self.lock.lock().await;
            let c0 = g.cluster(offset);
            let first = self.cluster(c0).await?;
            // Whether cluster `c` continues the run `first` starts: the same
            // kind, and for data, the next host cluster.
            let continues = |c: u64, cl: Cluster| match (first, cl) {
                (Cluster::Data { host: a, .. }, Cluster::Data { host: b, .. }) => b == a + (c - c0) * g.cluster_size,
                (Cluster::Zero { host: None, .. }, Cluster::Zero { host: None, .. }) => true,
                (Cluster::Zero { host: Some(a), .. }, Cluster::Zero { host: Some(b), .. }) => {
                    b == a + (c - c0) * g.cluster_size
                }
                (Cluster::Unallocated, Cluster::Unallocated) => true,
                (Cluster::Compressed { .. }, Cluster::Compressed { .. }) => true,
                _ => false,
            };
            // One L2 table at a time: a range no table covers is skipped
            // whole, a loaded table is scanned without further lookups, so
            // a walk costs per table, not per cluster of virtual size.
            let mut pos = (c0 + 1) << g.cluster_bits;
            'scan: while pos < end {
                let c = g.cluster(pos);
                let table_end = (c / g.l2_entries + 1) * g.l2_entries;
                let (_, off, _) = self.l1_lookup(c)?;
                if off == 0 {
                    if !matches!(first, Cluster::Unallocated) {
                        break;
                    }
                    pos = table_end << g.cluster_bits;
                    continue;
                }
                self.load_l2(off).await?;
                let mut l2 = self.l2.borrow_mut();
                let table = l2.get(off).expect("table just loaded");
                for cc in c..table_end {
                    pos = cc << g.cluster_bits;
                    if pos >= end || !continues(cc, self.decode(table[(cc % g.l2_entries) as usize])?) {
                        break 'scan;
                    }
                }
                pos = table_end << g.cluster_bits;
            }
            (first, pos.min(end) - offset)
        };
        let within = g.within(offset);
        Ok(match first {
            Cluster::Data { host, .. } => BlockStatus::data(run, Some(host + within)),
            Cluster::Zero { host, .. } => BlockStatus { offset: host.map(|h| h + within), ..BlockStatus::zero(run) },
            Cluster::Compressed { .. } => BlockStatus { compressed: true, ..BlockStatus::data(run, None) },
            Cluster::Unallocated => match self.backing() {
                Some(b) if offset < b.size => {
                    let st = b.ch.block_status(offset, run.min(b.size - offset)).await?;
                    BlockStatus { depth: st.depth + 1, ..st }
                }
                // No backing, or past its end: zeroes that no layer holds
                // (qemu-img map reports this node's depth).
                _ => BlockStatus::unallocated(run),
            },
        })
    }
}

impl IoDone for Qcow2 {
    fn io_done(&self, tag: u64, mut io: Io, res: Result<(), IoError>) {
        let (done, offset) = self.fast.borrow_mut().remove(tag as usize);
        io.offset = offset;
        done.complete(io, res);
    }
}
