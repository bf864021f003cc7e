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
