//! Creating an empty qcow2 image, laid out the way QEMU lays out a new
//! one: header, refcount table, one refcount block, L1 table — all with
//! refcount one, nothing else allocated.
//!
//! ```text
//!   cluster 0        1                 2                3..
//!   [header|ext|name][refcount table][refcount block][L1 table ...]
//! ```

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::entry::refcount;
use super::header::{self, Extension, Header, ext};
use crate::error::BdevError;
use crate::lock::CreateLock;

/// QEMU's default cluster size.
pub const CLUSTER_SIZE_DEFAULT: u64 = 64 << 10;
/// QEMU's default refcount width (bits, as `refcount_order` 4).
const REFCOUNT_ORDER_DEFAULT: u32 = 4;

/// What a new image looks like.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Defaults to 64 KiB.
    pub cluster_size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

/// Creates (or truncates) `path` as an empty qcow2 image. A file that a
/// node has open, here or in another process, is refused and left as it is.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), BdevError> {
    let image = layout(opts, REFCOUNT_ORDER_DEFAULT)?;
    let io = |source: std::io::Error| BdevError::Open { path: path.display().to_string(), source };
    let guard = CreateLock::acquire(path)?;
    let mut f = guard.file();
    f.set_len(0).map_err(io)?;
    f.write_all(&image.head).map_err(io)?;
    f.write_all_at(&image.table, image.table_offset).map_err(io)?;
    f.write_all_at(&image.block, image.block_offset).map_err(io)?;
    f.set_len(image.len).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// A new image's bytes: what [`create`] writes. Everything past these
/// pieces up to `len` (the L1 table) is zeroes.
pub struct Layout {
    /// The header, its extensions and the backing file name, at 0.
    pub head: Vec<u8>,
    pub table_offset: u64,
    /// The refcount table, one cluster.
    pub table: Vec<u8>,
    pub block_offset: u64,
    /// The one refcount block.
    pub block: Vec<u8>,
    /// The file's length.
    pub len: u64,
}

impl Layout {
    /// The whole file in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len as usize];
        out[..self.head.len()].copy_from_slice(&self.head);
        let t = self.table_offset as usize;
        out[t..t + self.table.len()].copy_from_slice(&self.table);
        let b = self.block_offset as usize;
        out[b..b + self.block.len()].copy_from_slice(&self.block);
        out
    }
}

/// Lays out a new image with refcounts of `2^refcount_order` bits.
pub fn layout(opts: &CreateOptions, refcount_order: u32) -> Result<Layout, BdevError> {
    let cs = opts.cluster_size.unwrap_or(CLUSTER_SIZE_DEFAULT);
    if !cs.is_power_of_two() || !(1 << header::CLUSTER_BITS_MIN..=1 << header::CLUSTER_BITS_MAX).contains(&cs) {
        return Err(BdevError::invalid("Cluster size must be a power of two between 512 and 2048k".to_string()));
    }
    if !opts.size.is_multiple_of(512) {
        return Err(BdevError::invalid("Image size must be a multiple of 512 bytes"));
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(BdevError::invalid("Backing format cannot be used without backing file"));
    }
    if refcount_order > 6 {
        return Err(BdevError::invalid("Refcount width must be a power of two and may not exceed 64 bits"));
    }
    let cluster_bits = cs.trailing_zeros();
    let l2_coverage = cs * (cs / 8);
    let l1_size = opts.size.div_ceil(l2_coverage);
    if l1_size * 8 > header::L1_BYTES_MAX {
        return Err(BdevError::invalid("Image size is too large for this cluster size"));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let (rt, rb, l1) = (cs, 2 * cs, 3 * cs);
    let used = 3 + l1_clusters;
    let per_block = refcount::per_block(refcount_order, cluster_bits);
    if used > per_block {
        return Err(BdevError::invalid("Image size is too large for this cluster size"));
    }
    let mut h = Header {
        version: 3,
        cluster_bits,
        size: opts.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1,
        refcount_table_offset: rt,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order,
        header_length: 112,
        compression_type: 0,
        // Padding of the 112-byte header QEMU writes.
        tail: vec![0; 7],
        extensions: vec![Extension { kind: ext::FEATURE_NAME_TABLE, data: feature_names() }],
        backing_file: None,
    };
    h.set_backing(opts.backing_file.as_deref(), opts.backing_format.as_deref());
    let head = h.serialize()?;

    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&rb.to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for c in 0..used {
        refcount::set(&mut block, refcount_order, c as usize, 1);
    }
    Ok(Layout { head, table_offset: rt, table, block_offset: rb, block, len: l1 + l1_clusters * cs })
}

/// The feature name table QEMU writes into new images.
fn feature_names() -> Vec<u8> {
    let names: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    let mut out = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&entry);
    }
    out
}

/// Creates (or truncates) `path` as a raw image of `size` bytes (sparse),
/// refusing a file in use as [`create`] does.
pub fn create_raw(path: &Path, size: u64) -> Result<(), BdevError> {
    let io = |source: std::io::Error| BdevError::Open { path: path.display().to_string(), source };
    let guard = CreateLock::acquire(path)?;
    let f = guard.file();
    f.set_len(0).map_err(io)?;
    f.set_len(size).map_err(io)?;
    f.sync_all().map_err(io)
}
