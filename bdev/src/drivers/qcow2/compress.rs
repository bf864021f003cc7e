//! Compressed cluster writes: what QEMU writes for `compress` (backup's
//! option, `qemu-img convert -c`), requested with [`IoFlags::COMPRESS`].
//!
//! Such a write covers whole clusters (the image's last cluster may be
//! partial: it is compressed padded with zeroes). Each cluster is
//! compressed — raw deflate with a 4 KiB window for `zlib` images, one
//! zstd frame for `zstd` images, as QEMU writes them — and stored as it is
//! (a normal cluster) where that does not make it smaller than a cluster.
//! Otherwise:
//!
//! ```text
//!   1. lock: wait for writers of the guest cluster; its L2 table made
//!      writable; room for the compressed bytes (below), each host cluster
//!      they touch counted once more; the guest cluster marked allocating
//!   2. the bytes, zero padded to whole blocks, go to the file
//!   3. lock: the L2 entry becomes the compressed descriptor; the clusters
//!      the old entry held are queued to be freed (writeback.rs, rule 4)
//! ```
//!
//! Ordering is that of any allocation (writeback.rs, rules 1 to 3): the
//! data is written before the entry is set in memory, and a write-back
//! flushes the file before it writes the L2 table, so an entry on disk
//! never points at compressed bytes that are not.
//!
//! Packing: compressed clusters are laid one after another into host
//! clusters, each starting on a block boundary (512 bytes, or the file's
//! block size where larger, so that no two writes share a block — the
//! read-modify-write of a partial block is not serialised; see `align.rs`).
//! A host cluster is counted once per compressed cluster that touches it,
//! which is what QEMU counts and checks. The allocator's `packing` cursor
//! says where the next one goes; a compressed cluster that does not fit in
//! what is left spills into the next host cluster if the allocator hands
//! out exactly that one, and starts a new cluster otherwise. The cursor
//! only moves forward, so bytes a compressed cluster occupies are never
//! written again while it is referenced; once its host cluster's refcount
//! drops to zero the cursor leaves it (it may be handed out again, as
//! anything freed: reuse.rs).

use std::rc::Rc;

use reactor::IoBuf;

use super::entry::{self, refcount};
use super::header::Compression;
use super::request::Run;
use super::state::Qcow2;
use crate::error::IoError;

/// Clusters of one request being compressed and written at once (QEMU
/// compresses on up to 4 threads).
const PARALLEL_CLUSTERS_MAX: usize = 4;
/// Clusters up to this size are compressed on the reactor (a few
/// microseconds); larger ones on an offload thread, so the reactor goes on
/// polling meanwhile.
const INLINE_CLUSTER_BYTES_MAX: u64 = 4096;
/// zlib's default level, QEMU's choice.
const DEFLATE_LEVEL: u32 = 6;
/// QEMU compresses and decompresses with a 2^12-byte window: a stream
/// reaching further back would not decompress there.
const DEFLATE_WINDOW_BITS: u8 = 12;

/// QEMU's zstd level (libzstd's default).
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    /// One zstd context per thread, kept between clusters.
    static ZSTD_ENCODER: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
}

/// Compresses one cluster the way QEMU's qcow2 does for `kind`; None when
/// the result would not be shorter than `cluster.len()` bytes (the cluster
/// is then stored as it is).
pub fn compress(kind: Compression, cluster: &[u8]) -> Option<Vec<u8>> {
    let limit = cluster.len() - 1;
    let out = match kind {
        Compression::Deflate => {
            let level = flate2::Compression::new(DEFLATE_LEVEL);
            let mut c = flate2::Compress::new_with_window_bits(level, false, DEFLATE_WINDOW_BITS);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(cluster, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                // Out of room: not worth it.
                _ => return None,
            }
        }
        Compression::Zstd => ZSTD_ENCODER.with(|c| {
            let mut c = c.borrow_mut();
            let mut out = vec![0u8; limit];
            // An error is a frame that does not fit: stored as it is.
            let n = c.as_mut()?.compress_to_buffer(cluster, &mut out).ok()?;
            out.truncate(n);
            Some(out)
        })?,
    };
    (out.len() <= limit).then_some(out)
}

impl Qcow2 {
    /// Writes `data` at guest `offset`, cluster by cluster compressed.
    /// `offset` must start a cluster, and the write end on one or at the
    /// end of the image (QEMU's EINVAL otherwise).
    pub(super) async fn write_compressed(self: &Rc<Self>, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let g = self.geo;
        let size = self.header.borrow().size;
        let end = offset + data.len() as u64;
        if g.within(offset) != 0 || (g.within(end) != 0 && end != size) {
            return Err(IoError::Invalid);
        }
        let mut pos = offset;
        while pos < end {
            let mut tasks = Vec::with_capacity(PARALLEL_CLUSTERS_MAX);
            while pos < end && tasks.len() < PARALLEL_CLUSTERS_MAX {
                let n = g.cluster_size.min(end - pos) as usize;
                let at = (pos - offset) as usize;
                let mut cluster = IoBuf::zeroed(g.cluster_size as usize);
                cluster[..n].copy_from_slice(&data[at..at + n]);
                let this = Rc::clone(self);
                tasks.push(reactor::spawn_local(async move { this.write_compressed_cluster(pos, cluster, n).await }));
                pos += n as u64;
            }
            let mut first_err = None;
            for t in tasks {
                if let Err(e) = t.await {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Compresses the cluster at guest offset `pos` (`len` bytes of it
    /// written, the rest padding) and stores it.
    async fn write_compressed_cluster(self: Rc<Self>, pos: u64, cluster: IoBuf, len: usize) -> Result<(), IoError> {
        let kind = self.geo.compression;
        let (cluster, packed) = if self.geo.cluster_size <= INLINE_CLUSTER_BYTES_MAX {
            let packed = compress(kind, &cluster);
            (cluster, packed)
        } else {
            reactor::offload::call(move || {
                let packed = compress(kind, &cluster);
                (cluster, packed)
            })
            .await
            .map_err(|_| IoError::Canceled)?
        };
        match packed {
            // As QEMU does: the bytes written, uncompressed.
            None => self.write_range(pos, &cluster[..len], false).await,
            Some(bytes) => self.store_compressed(self.geo.cluster(pos), &bytes).await,
        }
    }

    /// Points guest cluster `c` at a copy of `bytes`, compressed data.
    async fn store_compressed(&self, c: u64, bytes: &[u8]) -> Result<(), IoError> {
        let len = bytes.len() as u64;
        let run = loop {
            let guard = self.lock.lock().await;
            let busy = self.allocating.borrow().get(&c).cloned();
            if let Some(other) = busy {
                drop(guard);
                drop(other.lock().await);
                continue;
            }
            let table = self.writable_l2(c).await?;
            let old = self.cluster(c).await?;
            let host = self.alloc_compressed(len).await?;
            if entry::compressed_entry(host, len, self.geo.cluster_bits).is_none() {
                // Beyond what the descriptor can address (2 MiB clusters: 512 TiB).
                self.drop_compressed(host, len).await?;
                return Err(IoError::NoSpace);
            }
            let run = self.register_run(table, c, host, vec![old]);
            drop(guard);
            break run;
        };
        let mut buf = IoBuf::zeroed(len.next_multiple_of(self.packing_unit()) as usize);
        buf[..bytes.len()].copy_from_slice(bytes);
        let written = self.write_checked(run.host, buf, 0).await;
        self.commit_compressed(run, len, written).await
    }

    /// Sets the L2 entry of a written compressed cluster (or, if the data
    /// write failed, gives its room back), then releases the guest cluster.
    async fn commit_compressed(&self, run: Run, len: u64, written: Result<(), IoError>) -> Result<(), IoError> {
        let _g = self.lock.lock().await;
        self.allocating.borrow_mut().remove(&run.c0);
        let g = self.geo;
        match written {
            Ok(()) => {
                let e = entry::compressed_entry(run.host, len, g.cluster_bits).expect("checked at allocation");
                self.load_l2(run.table).await?;
                let idx = (run.c0 % g.l2_entries) as usize;
                self.l2.borrow_mut().get_mut(run.table).expect("table just loaded")[idx] = e;
                self.queue_free(run.old[0]);
                Ok(())
            }
            Err(e) => {
                // Never referenced: its room goes back at once.
                self.drop_compressed(run.host, len).await?;
                Err(e)
            }
        }
    }

    /// Where compressed clusters start: a 512-byte sector, or the file's
    /// block where that is larger (but never more than a cluster).
    fn packing_unit(&self) -> u64 {
        u64::from(self.file.block_size()).max(512).min(self.geo.cluster_size)
    }

    /// Room for `len` bytes of compressed data: at the packing cursor, or
    /// in a new host cluster. Each host cluster the room touches is counted
    /// once more (a new one starts at one). Lock held.
    async fn alloc_compressed(&self, len: u64) -> Result<u64, IoError> {
        let (cs, bits) = (self.geo.cluster_size, self.geo.cluster_bits);
        let need = len.next_multiple_of(self.packing_unit());
        debug_assert!(need <= cs, "compressed data is shorter than a cluster");
        let max = refcount::max(self.geo.refcount_order);
        let cursor = self.alloc.borrow().packing;
        let at = match cursor {
            // One more user must fit in the refcount (never with 1-bit refcounts).
            Some(t) if (1..max).contains(&self.refcount(t >> bits).await?) => {
                let h = t & !(cs - 1);
                if t + need <= h + cs {
                    self.update_refcount(t >> bits, 1).await?;
                    t
                } else {
                    let next = self.alloc_clusters(1).await?;
                    if next == h + cs {
                        // Spills over into the next cluster.
                        self.update_refcount(t >> bits, 1).await?;
                        t
                    } else {
                        // The rest of this one stays unused.
                        next
                    }
                }
            }
            _ => self.alloc_clusters(1).await?,
        };
        let end = at + need;
        self.alloc.borrow_mut().packing = (!end.is_multiple_of(cs)).then_some(end);
        Ok(at)
    }

    /// Lowers the refcounts a compressed cluster's room raised. Lock held.
    async fn drop_compressed(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let (first, n) = entry::compressed_clusters(offset, len, self.geo.cluster_bits);
        for k in 0..n {
            self.update_refcount((first >> self.geo.cluster_bits) + k, -1).await?;
        }
        Ok(())
    }

    /// Host cluster `c` is free now: if the packing cursor is in it, the
    /// next compressed cluster starts a new one (`c` may be handed out for
    /// anything).
    pub(super) fn packing_freed(&self, c: u64) {
        let mut a = self.alloc.borrow_mut();
        if a.packing.is_some_and(|t| t >> self.geo.cluster_bits == c) {
            a.packing = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    use super::super::entry::Cluster;
    use super::super::testing::{
        KIB, MIB, Open, Rng, assert_clean, assert_consistent, caches, open, qemu_check, read, run, write,
    };
    use super::*;
    use crate::channel::BlockChannel;
    use crate::drivers::sim::{Keep, Rule, SimDisk};
    use crate::io::{IoFlags, IoKind};

    /// A new image made by `qemu-img create` on a simulated disk.
    fn disk(size: u64, cluster: u64, zstd: bool, refcount_bits: u32) -> Arc<SimDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.qcow2");
        let kind = if zstd { "zstd" } else { "zlib" };
        let opts = format!("cluster_size={cluster},compression_type={kind},refcount_bits={refcount_bits}");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", &opts])
            .arg(&path)
            .arg(size.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        SimDisk::new(std::fs::read(&path).unwrap(), 1)
    }

    /// Bytes that compress well but differ from cluster to cluster and
    /// from `seed` to `seed`: short lines naming their place.
    fn text(offset: u64, len: usize, seed: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 64);
        let mut at = offset / 64 * 64;
        while out.len() < len + (offset - offset / 64 * 64) as usize {
            let line = format!("seed {seed:3} line at {:#014x} of some compressible text\n", at);
            out.extend_from_slice(&line.as_bytes()[..64.min(line.len())]);
            out.resize(out.len().next_multiple_of(64), b'.');
            at += 64;
        }
        out.drain(..(offset % 64) as usize);
        out.truncate(len);
        out
    }

    /// Bytes that do not compress: a seeded random stream, different for
    /// every offset.
    fn noise(offset: u64, len: usize, seed: u8) -> Vec<u8> {
        let mut r = Rng(offset ^ u64::from(seed) << 56);
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&r.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    async fn write_compressed(ch: &BlockChannel, offset: u64, data: &[u8]) {
        let (_, res) = ch.write(offset, IoBuf::from_slice(data), IoFlags::COMPRESS).await;
        res.unwrap_or_else(|e| panic!("compressed write at {offset:#x}+{:#x}: {e}", data.len()));
    }

    async fn mapping(o: &Open, c: u64) -> Cluster {
        let _g = o.q.lock.lock().await;
        o.q.cluster(c).await.unwrap()
    }

    fn qemu_img(args: &[&str], path: &Path) -> String {
        let out = Command::new("qemu-img").args(args).arg(path).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn streams_are_the_ones_qemu_writes_and_reads() {
        let cluster = text(0, 64 * KIB as usize, 1);
        let packed = compress(Compression::Deflate, &cluster).expect("text compresses");
        assert!(packed.len() < cluster.len() / 4, "{} bytes", packed.len());
        // QEMU inflates with a 4 KiB window: the stream must not reach further back.
        let mut out = vec![0u8; cluster.len()];
        let mut d = flate2::Decompress::new_with_window_bits(false, DEFLATE_WINDOW_BITS);
        d.decompress(&packed, &mut out, flate2::FlushDecompress::Finish).unwrap();
        assert_eq!(out, cluster);
        for kind in [Compression::Deflate, Compression::Zstd] {
            let packed = compress(kind, &cluster).expect("text compresses");
            let mut padded = packed.clone();
            padded.resize(packed.len().next_multiple_of(512), 0);
            let mut out = vec![0u8; cluster.len()];
            entry::decompress(kind, &padded, &mut out).unwrap();
            assert_eq!(out, cluster, "{kind:?}");
            assert!(compress(kind, &noise(0, 64 * KIB as usize, 3)).is_none(), "{kind:?}: noise stays as it is");
            assert!(compress(kind, &[0u8; 512]).is_some(), "{kind:?}: even a 512-byte cluster");
        }
    }

    /// Host clusters a mapping touches.
    fn hosts(cl: Cluster, bits: u32) -> Vec<u64> {
        match cl {
            Cluster::Compressed { offset, len } => {
                let (first, n) = entry::compressed_clusters(offset, len, bits);
                (0..n).map(|k| (first >> bits) + k).collect()
            }
            Cluster::Data { host, .. } => vec![host >> bits],
            _ => Vec::new(),
        }
    }

    /// The image QEMU's tools judge: `qemu-img check` finds nothing (no
    /// leak either), `map` says which clusters are compressed, `compare`
    /// finds the guest's bytes.
    fn judged_by_qemu(image: &[u8], flat: &[u8], compressed: &[bool], cluster: u64, what: &str) {
        assert_clean(image, what);
        let dir = tempfile::tempdir().unwrap();
        let (img, raw) = (dir.path().join("i.qcow2"), dir.path().join("flat.raw"));
        std::fs::write(&img, image).unwrap();
        std::fs::write(&raw, flat).unwrap();
        qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", &img.display().to_string()], &raw);
        let map: serde_json::Value = serde_json::from_str(&qemu_img(&["map", "--output=json"], &img)).unwrap();
        let mut seen = vec![false; compressed.len()];
        for e in map.as_array().unwrap() {
            if e["compressed"] == true {
                let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                for c in start / cluster..(start + len).div_ceil(cluster) {
                    seen[c as usize] = true;
                }
            }
        }
        assert_eq!(seen, compressed, "{what}: clusters qemu-img map calls compressed: {map}");
    }

    /// Every path a compressed cluster takes, on one image: compressed
    /// writes of text (packed, several to a host cluster) and of noise
    /// (stored as it is), the image's partial last cluster, a normal write
    /// into a compressed cluster, a compressed write over a compressed and
    /// over a normal cluster, a discard, writes in parallel.
    fn round_trip(cluster: u64, zstd: bool) {
        let what = format!("{} KiB clusters, {}", cluster / KIB, if zstd { "zstd" } else { "zlib" });
        let cs = cluster;
        let tail = if cs > 512 { cs / 2 } else { 0 };
        let size = 8 * cs + tail;
        let disk = disk(size, cs, zstd, 16);
        let d = Arc::clone(&disk);
        let w = what.clone();
        let (flat, compressed) = run(async move {
            let what = w;
            let o = open(&d, caches(8, 8)).await;
            let bits = o.q.geo.cluster_bits;
            let mut flat = vec![0u8; size as usize];
            let put = |flat: &mut Vec<u8>, at: u64, data: &[u8]| {
                flat[at as usize..at as usize + data.len()].copy_from_slice(data);
            };
            let data = text(0, 4 * cs as usize, 1);
            write_compressed(&o.ch, 0, &data).await;
            put(&mut flat, 0, &data);
            let mut users = std::collections::HashMap::new();
            for c in 0..4 {
                let cl = mapping(&o, c).await;
                assert!(matches!(cl, Cluster::Compressed { .. }), "{what}: cluster {c} is {cl:?}");
                for h in hosts(cl, bits) {
                    *users.entry(h).or_insert(0u64) += 1;
                }
            }
            if cs >= 4 * KIB {
                assert!(users.len() < 4, "{what}: four compressed clusters share host clusters: {users:?}");
            }
            {
                let _g = o.q.lock.lock().await;
                for (&h, &n) in &users {
                    assert_eq!(o.q.refcount(h).await, Ok(n), "{what}: host cluster {h} counts each user");
                }
            }
            // Noise is stored as it is.
            let data = noise(4 * cs, cs as usize, 2);
            write_compressed(&o.ch, 4 * cs, &data).await;
            put(&mut flat, 4 * cs, &data);
            assert!(matches!(mapping(&o, 4).await, Cluster::Data { copied: true, .. }), "{what}");
            // The last cluster of the image, partial.
            if tail > 0 {
                let data = text(8 * cs, tail as usize, 3);
                write_compressed(&o.ch, 8 * cs, &data).await;
                put(&mut flat, 8 * cs, &data);
                assert!(matches!(mapping(&o, 8).await, Cluster::Compressed { .. }), "{what}");
                assert_eq!(read(&o.ch, 8 * cs, tail as usize).await, data, "{what}: the partial cluster");
                // Not at the end of the image: refused, as QEMU does.
                let (_, res) = o.ch.write(0, IoBuf::from_slice(&text(0, tail as usize, 9)), IoFlags::COMPRESS).await;
                assert_eq!(res, Err(IoError::Invalid), "{what}");
                let (_, res) = o.ch.write(512, IoBuf::from_slice(&text(0, cs as usize, 9)), IoFlags::COMPRESS).await;
                assert_eq!(res, Err(IoError::Invalid), "{what}");
            }
            assert!(read(&o.ch, 0, size as usize).await == flat, "{what}: read back");
            // A normal write into a compressed cluster: copy-on-write from it.
            let data = noise(cs + 512.min(cs / 2), 256, 4);
            write(&o.ch, cs + 512.min(cs / 2), &data).await;
            put(&mut flat, cs + 512.min(cs / 2), &data);
            assert!(matches!(mapping(&o, 1).await, Cluster::Data { copied: true, .. }), "{what}");
            // Compressed again over compressed, and over a normal cluster.
            for (c, seed) in [(2u64, 5u8), (4, 6)] {
                let data = text(c * cs, cs as usize, seed);
                write_compressed(&o.ch, c * cs, &data).await;
                put(&mut flat, c * cs, &data);
                assert!(matches!(mapping(&o, c).await, Cluster::Compressed { .. }), "{what}: cluster {c}");
            }
            // A discarded compressed cluster reads as zeroes.
            o.ch.discard(3 * cs, cs).await.unwrap();
            flat[3 * cs as usize..4 * cs as usize].fill(0);
            // Several at once, one of them noise.
            let jobs: Vec<_> = [(5u64, true), (6, false), (7, true)]
                .into_iter()
                .map(|(c, compressible)| {
                    let data = if compressible { text(c * cs, cs as usize, 7) } else { noise(c * cs, cs as usize, 7) };
                    put(&mut flat, c * cs, &data);
                    let ch = o.ch.clone();
                    reactor::spawn_local(async move { write_compressed(&ch, c * cs, &data).await })
                })
                .collect();
            for j in jobs {
                j.await;
            }
            assert!(read(&o.ch, 0, size as usize).await == flat, "{what}: read back after the rewrites");
            o.q.flush().await.unwrap();
            let o = open(&d, caches(8, 8)).await;
            assert!(read(&o.ch, 0, size as usize).await == flat, "{what}: read back, opened again");
            let mut compressed = Vec::new();
            for c in 0..size.div_ceil(cs) {
                compressed.push(matches!(mapping(&o, c).await, Cluster::Compressed { .. }));
            }
            (flat, compressed)
        });
        let mut want = vec![true, false, true, false, true, true, false, true];
        if tail > 0 {
            want.push(true);
        }
        assert_eq!(compressed, want, "{what}");
        judged_by_qemu(&disk.contents(), &flat, &compressed, cs, &what);
    }

    #[test]
    fn compressed_clusters_of_512_byte_clusters() {
        round_trip(512, false);
        round_trip(512, true);
    }

    #[test]
    fn compressed_clusters_of_64k_clusters() {
        round_trip(64 * KIB, false);
        round_trip(64 * KIB, true);
    }

    #[test]
    fn compressed_clusters_of_2m_clusters() {
        round_trip(2 * MIB, false);
        round_trip(2 * MIB, true);
    }

    #[test]
    fn one_bit_refcounts_give_every_compressed_cluster_its_own_host_cluster() {
        let cs = 64 * KIB;
        let disk = disk(16 * cs, cs, false, 1);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(8, 8)).await;
            write_compressed(&o.ch, 0, &text(0, 4 * cs as usize, 1)).await;
            let mut seen = std::collections::HashSet::new();
            for c in 0..4 {
                let cl = mapping(&o, c).await;
                assert!(matches!(cl, Cluster::Compressed { .. }), "{cl:?}");
                for h in hosts(cl, o.q.geo.cluster_bits) {
                    assert!(seen.insert(h), "host cluster {h} shared with 1-bit refcounts");
                }
            }
            o.q.flush().await.unwrap();
        });
        assert_clean(&disk.contents(), "1-bit refcounts");
    }

    /// The packing cursor's host cluster freed (its compressed clusters
    /// overwritten) and handed out again as a data cluster: the next
    /// compressed cluster must go elsewhere.
    #[test]
    fn a_freed_packing_cluster_is_left_alone() {
        let cs = 64 * KIB;
        let disk = disk(16 * cs, cs, false, 16);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(8, 8)).await;
            let bits = o.q.geo.cluster_bits;
            write_compressed(&o.ch, 0, &text(0, cs as usize, 1)).await;
            let Cluster::Compressed { offset, .. } = mapping(&o, 0).await else { panic!("cluster 0 is compressed") };
            assert!(o.q.alloc.borrow().packing.is_some(), "room is left after the first compressed cluster");
            write(&o.ch, 0, &noise(0, cs as usize, 2)).await;
            o.q.flush().await.unwrap();
            assert_eq!(o.q.alloc.borrow().packing, None, "its host cluster is free: the cursor left it");
            write(&o.ch, 5 * cs, &noise(5 * cs, cs as usize, 3)).await;
            let Cluster::Data { host, .. } = mapping(&o, 5).await else { panic!("cluster 5 holds data") };
            assert_eq!(host >> bits, offset >> bits, "the freed cluster was reused");
            write_compressed(&o.ch, 6 * cs, &text(6 * cs, cs as usize, 4)).await;
            assert_eq!(read(&o.ch, 5 * cs, cs as usize).await, noise(5 * cs, cs as usize, 3));
            assert_eq!(read(&o.ch, 6 * cs, cs as usize).await, text(6 * cs, cs as usize, 4));
            o.q.flush().await.unwrap();
        });
        assert_clean(&disk.contents(), "after reusing the packing cluster");
    }

    #[test]
    fn a_failed_compressed_write_gives_its_room_back() {
        let cs = 64 * KIB;
        let disk = disk(16 * cs, cs, true, 16);
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(8, 8)).await;
            write_compressed(&o.ch, 0, &text(0, cs as usize, 1)).await;
            let fail = d.add_rule(Rule::fail(&[IoKind::Write], IoError::Io));
            let (_, res) = o.ch.write(cs, IoBuf::from_slice(&text(cs, cs as usize, 2)), IoFlags::COMPRESS).await;
            assert_eq!(res, Err(IoError::Io));
            d.remove_rule(fail);
            assert_eq!(mapping(&o, 1).await, Cluster::Unallocated, "the entry was never set");
            write_compressed(&o.ch, 2 * cs, &text(2 * cs, cs as usize, 3)).await;
            assert_eq!(read(&o.ch, 0, cs as usize).await, text(0, cs as usize, 1));
            assert_eq!(read(&o.ch, 2 * cs, cs as usize).await, text(2 * cs, cs as usize, 3));
            o.q.flush().await.unwrap();
        });
        assert_clean(&disk.contents(), "after a failed compressed write");
    }

    fn hash(b: &[u8]) -> u64 {
        b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
    }

    /// What a crashed image reads as, through QEMU: `qemu-img check`, then
    /// `convert` (which fails on compressed data that is not there).
    fn crashed(image: &[u8]) -> Result<Vec<u8>, String> {
        let (code, text) = qemu_check(image);
        if !(code == 0 || code == 3) || text.contains("ERROR") {
            return Err(format!("qemu-img check exited {code}:\n{text}"));
        }
        let dir = tempfile::tempdir().unwrap();
        let (img, raw) = (dir.path().join("i.qcow2"), dir.path().join("i.raw"));
        std::fs::write(&img, image).unwrap();
        let out = Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&img).arg(&raw).output();
        let out = out.unwrap();
        if !out.status.success() {
            return Err(format!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(std::fs::read(&raw).unwrap())
    }

    /// One guest request of the crash workload.
    #[derive(Debug, Clone)]
    enum GuestOp {
        Compressed { offset: u64, data: Vec<u8> },
        Write { offset: u64, data: Vec<u8> },
        Discard { offset: u64, len: u64 },
    }

    impl GuestOp {
        fn range(&self) -> (u64, u64) {
            match self {
                GuestOp::Compressed { offset, data } | GuestOp::Write { offset, data } => {
                    (*offset, offset + data.len() as u64)
                }
                GuestOp::Discard { offset, len } => (*offset, offset + len),
            }
        }

        fn apply(&self, flat: &mut [u8]) {
            let (a, b) = self.range();
            match self {
                GuestOp::Compressed { data, .. } | GuestOp::Write { data, .. } => {
                    flat[a as usize..b as usize].copy_from_slice(data)
                }
                GuestOp::Discard { .. } => flat[a as usize..b as usize].fill(0),
            }
        }

        async fn send(self, ch: BlockChannel) {
            match self {
                GuestOp::Compressed { offset, data } => write_compressed(&ch, offset, &data).await,
                GuestOp::Write { offset, data } => write(&ch, offset, &data).await,
                GuestOp::Discard { offset, len } => ch.discard(offset, len).await.unwrap(),
            }
        }
    }

    /// A power cut at every flush of the file while a guest sends
    /// compressed writes (text and noise), normal writes into compressed
    /// clusters and discards, several at once, with flushes between: every
    /// image a cut can leave passes `qemu-img check` and reads, through
    /// QEMU, sector by sector as the last flushed data or something written
    /// since. Returns how many images were checked and the failures.
    fn cuts_under_compressed_writes(cluster: u64, zstd: bool, seed: u64, steps: usize) -> (usize, Vec<String>) {
        let cs = cluster;
        let clusters = 24u64;
        let size = clusters * cs;
        let image = disk(size, cs, zstd, 16).contents();
        let disk = SimDisk::with_options(image, seed, 512, true);
        let sectors = (size / 512) as usize;
        let allowed: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![vec![hash(&[0; 512])]; sectors]));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let checked: Arc<Mutex<usize>> = Arc::default();
        let (a, f, n, mut r) = (Arc::clone(&allowed), Arc::clone(&failures), Arc::clone(&checked), Rng(seed));
        let mut cut_no = 0usize;
        disk.on_flush(Box::new(move |cut| {
            cut_no += 1;
            let undecided = cut.undecided();
            let mut keeps = vec![Keep::Random(r.next())];
            if undecided > 0 {
                keeps.push(if r.below(2) == 0 {
                    Keep::Prefix(r.below(undecided as u64) as usize)
                } else {
                    Keep::AllBut(r.below(undecided as u64) as usize)
                });
            }
            if cut_no.is_multiple_of(3) {
                keeps.push(Keep::None);
            }
            for keep in keeps {
                *n.lock().unwrap() += 1;
                let failure = match crashed(&cut.image(keep)) {
                    Err(e) => Some(e),
                    Ok(got) => {
                        let allowed = a.lock().unwrap();
                        (0..sectors).find(|&s| !allowed[s].contains(&hash(&got[s * 512..(s + 1) * 512]))).map(|s| {
                            format!("sector {s} (cluster {}) holds what no write left there", s as u64 * 512 / cs)
                        })
                    }
                };
                if let Some(e) = failure {
                    f.lock().unwrap().push(format!("cut {cut_no} ({undecided} undecided), {keep:?}: {e}"));
                }
            }
        }));
        let d = Arc::clone(&disk);
        run(async move {
            let o = open(&d, caches(2, 2)).await;
            let mut flat = vec![0u8; size as usize];
            let mut r = Rng(seed ^ 0x5eed);
            for step in 0..steps {
                if r.below(6) == 0 {
                    o.ch.flush().await.unwrap();
                    let mut allowed = allowed.lock().unwrap();
                    for (s, a) in allowed.iter_mut().enumerate() {
                        *a = vec![hash(&flat[s * 512..(s + 1) * 512])];
                    }
                    continue;
                }
                let mut batch: Vec<GuestOp> = Vec::new();
                for _ in 0..1 + r.below(4) {
                    let seed = (step % 251) as u8;
                    let c = r.below(clusters);
                    let op = match r.below(10) {
                        0..5 => {
                            let n = (1 + r.below(3)).min(clusters - c);
                            let len = (n * cs) as usize;
                            let data = if r.below(4) == 0 { noise(c * cs, len, seed) } else { text(c * cs, len, seed) };
                            GuestOp::Compressed { offset: c * cs, data }
                        }
                        5..8 => {
                            let start = c * cs + r.below(cs / 512) * 512;
                            let len = ((1 + r.below(2 * cs / 512)) * 512).min(size - start);
                            GuestOp::Write { offset: start, data: noise(start, len as usize, seed) }
                        }
                        _ => GuestOp::Discard { offset: c * cs, len: cs },
                    };
                    let (a, b) = op.range();
                    if batch.iter().all(|o| {
                        let (c, e) = o.range();
                        // Whole clusters apart: a discard or a compressed
                        // write and a write in the same cluster race.
                        b.next_multiple_of(cs) <= c / cs * cs || e.next_multiple_of(cs) <= a / cs * cs
                    }) {
                        batch.push(op);
                    }
                }
                {
                    // What each sector may hold from now until the next flush.
                    let mut allowed = allowed.lock().unwrap();
                    let mut next = flat.clone();
                    for op in &batch {
                        op.apply(&mut next);
                        let (a, b) = op.range();
                        for s in (a / 512) as usize..(b / 512) as usize {
                            allowed[s].push(hash(&next[s * 512..(s + 1) * 512]));
                        }
                    }
                    flat = next;
                }
                let jobs: Vec<_> = batch.into_iter().map(|op| reactor::spawn_local(op.send(o.ch.clone()))).collect();
                for j in jobs {
                    j.await;
                }
            }
            o.q.flush().await.unwrap();
            assert!(read(&o.ch, 0, size as usize).await == flat, "the disk reads as the model");
        });
        assert_consistent(&disk.contents(), "at the end");
        let checked = *checked.lock().unwrap();
        (checked, std::mem::take(&mut *failures.lock().unwrap()))
    }

    #[test]
    fn a_power_cut_at_any_flush_leaves_old_or_new_clusters() {
        for (cluster, zstd, seed) in [(4 * KIB, false, 1), (64 * KIB, true, 2), (512, false, 3), (64 * KIB, false, 4)] {
            let (checked, failures) = cuts_under_compressed_writes(cluster, zstd, seed, 60);
            assert!(checked >= 20, "cluster {cluster}: only {checked} images checked");
            assert!(failures.is_empty(), "cluster {cluster}, zstd {zstd}, seed {seed}:\n{}", failures.join("\n"));
        }
    }

    #[test]
    fn devices_that_cannot_compress_refuse_the_flag() {
        let raw = SimDisk::new(vec![0u8; 1 << 20], 1);
        run(async move {
            let ch = raw.channel();
            let (_, res) = ch.write(0, IoBuf::from_slice(&text(0, 65536, 1)), IoFlags::COMPRESS).await;
            assert_eq!(res, Err(IoError::NotSupported));
            assert_eq!(ch.write_zeroes(0, 65536, IoFlags::COMPRESS).await, Err(IoError::NotSupported));
            assert_eq!(read(&ch, 0, 512).await, vec![0u8; 512], "nothing was written");
        });
    }
}
