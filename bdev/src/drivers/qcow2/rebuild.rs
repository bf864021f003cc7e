//! Refcount rebuild for images opened with the dirty bit set (a writer
//! using lazy refcounts did not close cleanly), as QEMU does on a
//! read-write open.
//!
//! Every reference is counted — the header cluster, active and snapshot
//! L1 tables, their L2 tables and data (compressed data counts every
//! cluster it touches), the snapshot table, persistent bitmap structures —
//! and a fresh refcount table and blocks describing exactly that are
//! written past the end of the file. Only then does the header switch to
//! them and lose the dirty bit; the old refcount structures become free
//! space.

use reactor::IoBuf;

use super::entry::{self, Cluster, refcount};
use super::header::{ext, incompat};
use super::overlap::kind;
use super::snapshot;
use super::state::Qcow2;
use crate::error::IoError;

fn corrupt(what: impl std::fmt::Display) -> IoError {
    tracing::error!("qcow2: refcount rebuild: {what}");
    IoError::Io
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// Expected refcount per host cluster.
struct Counts {
    counts: Vec<u64>,
    cluster_bits: u32,
}

impl Counts {
    /// Counts one reference to every cluster of `[offset, offset + len)`.
    fn add(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        if last as usize >= self.counts.len() {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            self.counts[c as usize] += 1;
        }
    }
}

/// Counts an L1 table, its L2 tables and their data.
async fn count_l1(s: &Qcow2, counts: &mut Counts, l1: &[u64]) -> Result<(), IoError> {
    let g = s.geo;
    for &e in l1 {
        let (l2_off, _) = entry::decode_l1(e, g.cluster_bits).map_err(|c| corrupt(c.0))?;
        if l2_off == 0 {
            continue;
        }
        counts.add(l2_off, g.cluster_size);
        let table = s.file().read(l2_off, g.cluster_size as usize).await?;
        for chunk in table.chunks_exact(8) {
            let e = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            match entry::decode_l2(e, g.cluster_bits, g.version).map_err(|c| corrupt(c.0))? {
                Cluster::Data { host, .. } | Cluster::Zero { host: Some(host), .. } => counts.add(host, g.cluster_size),
                Cluster::Compressed { offset, len } => {
                    let (first, n) = entry::compressed_clusters(offset, len, g.cluster_bits);
                    for k in 0..n {
                        counts.add(first + k * g.cluster_size, 1);
                    }
                }
                Cluster::Unallocated | Cluster::Zero { host: None, .. } => {}
            }
        }
    }
    Ok(())
}

async fn read_l1(s: &Qcow2, offset: u64, entries: u32) -> Result<Vec<u64>, IoError> {
    if entries == 0 {
        return Ok(Vec::new());
    }
    let buf = s.file().read(offset, entries as usize * 8).await?;
    Ok(buf.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Counts the snapshot table and every snapshot's tables.
async fn count_snapshots(s: &Qcow2, counts: &mut Counts) -> Result<(), IoError> {
    let (offset, n) = {
        let h = s.header.borrow();
        (h.snapshots_offset, h.nb_snapshots)
    };
    let table = snapshot::read_table(s.file(), offset, n).await?;
    for &(l1_off, l1_size) in &table.l1_tables {
        if l1_size > 0 {
            counts.add(l1_off, u64::from(l1_size) * 8);
            let l1 = read_l1(s, l1_off, l1_size).await?;
            count_l1(s, counts, &l1).await?;
        }
    }
    counts.add(offset, table.bytes);
    Ok(())
}

/// Counts the persistent bitmap directory, tables and data.
async fn count_bitmaps(s: &Qcow2, counts: &mut Counts) -> Result<(), IoError> {
    let ext = s.header.borrow().extensions.iter().find(|e| e.kind == ext::BITMAPS).map(|e| e.data.clone());
    let Some(data) = ext else { return Ok(()) };
    if data.len() < 24 {
        return Err(corrupt("bitmaps extension too short"));
    }
    let (nb, dir_size, dir_off) = (be32(&data, 0), be64(&data, 8), be64(&data, 16));
    counts.add(dir_off, dir_size);
    let dir = s.file().read(dir_off, dir_size as usize).await?;
    let mut at = 0usize;
    for _ in 0..nb {
        if at + 24 > dir.len() {
            return Err(corrupt("bitmap directory truncated"));
        }
        let (table_off, table_size) = (be64(&dir, at), be32(&dir, at + 8));
        let (name_len, extra_len) = (be16(&dir, at + 14) as usize, be32(&dir, at + 16) as usize);
        at = (at + 24 + extra_len + name_len).next_multiple_of(8);
        if table_size == 0 {
            continue;
        }
        counts.add(table_off, u64::from(table_size) * 8);
        let table = read_l1(s, table_off, table_size).await?;
        for e in table {
            let off = e & entry::OFFSET_MASK;
            if off != 0 {
                counts.add(off, s.geo.cluster_size);
            }
        }
    }
    Ok(())
}

/// Recomputes every refcount and installs a new refcount structure.
pub(super) async fn rebuild_refcounts(s: &Qcow2) -> Result<(), IoError> {
    let g = s.geo;
    let cs = g.cluster_size;
    let mut counts = Counts { counts: vec![0; (s.file_end() / cs) as usize], cluster_bits: g.cluster_bits };
    counts.add(0, cs);
    let (l1_off, l1_size) = {
        let h = s.header.borrow();
        (h.l1_table_offset, h.l1_size)
    };
    counts.add(l1_off, u64::from(l1_size) * 8);
    count_l1(s, &mut counts, &s.l1_entries()).await?;
    count_snapshots(s, &mut counts).await?;
    count_bitmaps(s, &mut counts).await?;

    // The new structure goes past everything in use: [blocks][table].
    let pb = g.per_block();
    let start = (counts.counts.len() as u64).max(s.file_end() / cs);
    // Enough blocks to cover everything up to the end of the new
    // structure itself, and a table with an entry for each.
    let (nb, table_clusters) = {
        let mut nb = 1u64;
        loop {
            let tc = (nb * 8).div_ceil(cs);
            let needed = (start + nb + tc).div_ceil(pb);
            if needed <= nb {
                break (nb, tc);
            }
            nb = needed;
        }
    };
    let end = start + nb + table_clusters;
    counts.add(start * cs, (nb + table_clusters) * cs);
    let max = refcount::max(g.refcount_order);
    let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
    for t in 0..nb {
        let mut block = IoBuf::zeroed(cs as usize);
        for idx in 0..pb {
            let c = t * pb + idx;
            if let Some(&v) = counts.counts.get(c as usize) {
                if v > max {
                    return Err(corrupt(format!("cluster {c} has {v} references, more than {max}")));
                }
                refcount::set(&mut block, g.refcount_order, idx as usize, v);
            }
        }
        let off = (start + t) * cs;
        table[t as usize] = off;
        s.write_checked(off, block, kind::REFCOUNT_BLOCK | kind::REFCOUNT_TABLE).await?;
    }
    let table_off = (start + nb) * cs;
    let mut tbuf = IoBuf::zeroed((table_clusters * cs) as usize);
    for (chunk, e) in tbuf.chunks_exact_mut(8).zip(&table) {
        chunk.copy_from_slice(&e.to_be_bytes());
    }
    s.write_checked(table_off, tbuf, kind::REFCOUNT_BLOCK | kind::REFCOUNT_TABLE).await?;
    s.file().flush().await?;
    {
        let mut h = s.header.borrow_mut();
        h.refcount_table_offset = table_off;
        h.refcount_table_clusters = table_clusters as u32;
        h.incompatible &= !incompat::DIRTY;
    }
    s.write_header().await?;
    s.file().flush().await?;
    s.set_refcount_table(table, table_off, table_clusters);
    s.set_file_end(end * cs);
    tracing::info!(clusters = end, "qcow2: refcounts rebuilt for a dirty image");
    Ok(())
}
