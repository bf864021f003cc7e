//! L1 and L2 table entries: decoding into a [`Cluster`] with validation,
//! and encoding back. A malformed entry is a corruption error, never a
//! guess.

use super::header::Compression;

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount of the referenced cluster is exactly one (writable in place).
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// Reads as zero (v3).
pub const ZERO: u64 = 1;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated here: the backing chain (or zeroes) answers.
    Unallocated,
    /// Reads as zero; may keep a preallocated host cluster.
    Zero { host: Option<u64>, copied: bool },
    /// Data at `host`.
    Data { host: u64, copied: bool },
    /// Compressed data: `len` bytes (an upper bound) at byte `offset`.
    Compressed { offset: u64, len: u64 },
}

/// Why an entry is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt(pub String);

/// Decodes an L1 entry into its L2 table offset (0 = none) and COPIED flag.
pub fn decode_l1(entry: u64, cluster_bits: u32) -> Result<(u64, bool), Corrupt> {
    if entry & L1_RESERVED != 0 {
        return Err(Corrupt(format!("L1 entry {entry:#x} has reserved bits set")));
    }
    let off = entry & OFFSET_MASK;
    if !off.is_multiple_of(1 << cluster_bits) {
        return Err(Corrupt(format!("L2 table offset {off:#x} is not cluster aligned")));
    }
    Ok((off, entry & COPIED != 0))
}

/// Decodes a standard (64-bit) L2 entry.
pub fn decode_l2(entry: u64, cluster_bits: u32, version: u32) -> Result<Cluster, Corrupt> {
    if entry & COMPRESSED != 0 {
        if entry & COPIED != 0 {
            return Err(Corrupt(format!("compressed L2 entry {entry:#x} has the COPIED flag")));
        }
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
        let len = (sectors * 512).saturating_sub(offset & 511);
        return Ok(Cluster::Compressed { offset, len });
    }
    if entry & L2_RESERVED != 0 {
        return Err(Corrupt(format!("L2 entry {entry:#x} has reserved bits set")));
    }
    let host = entry & OFFSET_MASK;
    if !host.is_multiple_of(1 << cluster_bits) {
        return Err(Corrupt(format!("data cluster offset {host:#x} is not cluster aligned")));
    }
    let copied = entry & COPIED != 0;
    if entry & ZERO != 0 {
        if version < 3 {
            return Err(Corrupt("zero cluster flag in a version 2 image".into()));
        }
        return Ok(Cluster::Zero { host: (host != 0).then_some(host), copied });
    }
    if host == 0 {
        if copied {
            return Err(Corrupt("L2 entry with COPIED but no cluster".into()));
        }
        return Ok(Cluster::Unallocated);
    }
    Ok(Cluster::Data { host, copied })
}

/// The entry for data at `host` with refcount one.
pub fn data_entry(host: u64) -> u64 {
    host | COPIED
}

/// The entry for `len` bytes of compressed data at byte `offset` (never
/// COPIED): with `x = 62 - (cluster_bits - 8)`, the offset in bits 0..x
/// and the 512-byte sectors the data reaches beyond the first in bits
/// x..62. None where a field cannot hold its value.
pub fn compressed_entry(offset: u64, len: u64, cluster_bits: u32) -> Option<u64> {
    let x = 62 - (cluster_bits - 8);
    let extra = (offset + len.max(1) - 1) / 512 - offset / 512;
    let fits = offset < 1 << x.min(56) && extra < 1 << (62 - x);
    fits.then_some(COMPRESSED | (extra << x) | offset)
}

/// Host clusters a compressed extent touches: (first cluster offset, count).
pub fn compressed_clusters(offset: u64, len: u64, cluster_bits: u32) -> (u64, u64) {
    let cs = 1u64 << cluster_bits;
    let first = offset & !(cs - 1);
    let last = (offset + len.max(1) - 1) & !(cs - 1);
    (first, (last - first) / cs + 1)
}

thread_local! {
    /// One zstd context per thread, kept between clusters.
    static ZSTD_DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// Decompresses one cluster from `input` into `out` (exactly one cluster).
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), Corrupt> {
    match kind {
        Compression::Deflate => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => {
                    Err(Corrupt(format!("compressed cluster inflates to {} bytes, not {}", d.total_out(), out.len())))
                }
                Err(e) => Err(Corrupt(format!("compressed cluster: {e}"))),
            }
        }
        Compression::Zstd => {
            // The stored bytes run to a sector's end: one frame is the data.
            let frame = zstd::zstd_safe::find_frame_compressed_size(input)
                .map_err(|e| Corrupt(format!("zstd cluster: {}", zstd::zstd_safe::get_error_name(e))))?;
            let n = ZSTD_DECODER
                .with(|d| match d.borrow_mut().as_mut() {
                    Some(d) => d.decompress_to_buffer(&input[..frame], out).map_err(|e| e.to_string()),
                    None => Err("no zstd context".to_string()),
                })
                .map_err(|e| Corrupt(format!("zstd cluster: {e}")))?;
            if n == out.len() {
                Ok(())
            } else {
                Err(Corrupt(format!("zstd cluster inflates to {n} bytes, not {}", out.len())))
            }
        }
    }
}

/// Reading and writing refcounts of any width (1 to 64 bits) in a
/// refcount block. Sub-byte widths count from the least significant bit.
pub mod refcount {
    pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
        let bits = 1usize << order;
        if bits >= 8 {
            let bytes = bits / 8;
            let at = index * bytes;
            block[at..at + bytes].iter().fold(0u64, |v, &b| (v << 8) | u64::from(b))
        } else {
            let bit = index * bits;
            let mask = (1u8 << bits) - 1;
            u64::from((block[bit / 8] >> (bit % 8)) & mask)
        }
    }

    pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) {
        let bits = 1usize << order;
        debug_assert!(value <= max(order));
        if bits >= 8 {
            let bytes = bits / 8;
            let at = index * bytes;
            let be = value.to_be_bytes();
            block[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
        } else {
            let bit = index * bits;
            let mask = ((1u16 << bits) - 1) as u8;
            let shift = bit % 8;
            let byte = &mut block[bit / 8];
            *byte = (*byte & !(mask << shift)) | (((value as u8) & mask) << shift);
        }
    }

    /// Largest refcount the width can hold.
    pub fn max(order: u32) -> u64 {
        let bits = 1u32 << order;
        if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 }
    }

    /// Entries per refcount block.
    pub fn per_block(order: u32, cluster_bits: u32) -> u64 {
        (1u64 << (cluster_bits + 3)) >> order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_entries() {
        // What QEMU wrote for `write 0 64k` and `write -z`, and a compressed cluster.
        assert_eq!(decode_l2(0x8000_0000_0005_0000, 16, 3).unwrap(), Cluster::Data { host: 0x50000, copied: true });
        assert_eq!(decode_l2(0x1, 16, 3).unwrap(), Cluster::Zero { host: None, copied: false });
        assert_eq!(decode_l2(0, 16, 3).unwrap(), Cluster::Unallocated);
        assert_eq!(decode_l2(0x4000_0000_0007_0000, 16, 3).unwrap(), Cluster::Compressed { offset: 0x70000, len: 512 });
        assert_eq!(decode_l1(0x8000_0000_0004_0000, 16).unwrap(), (0x40000, true));
    }

    #[test]
    fn malformed_entries() {
        assert!(decode_l2(0x8000_0000_0005_0200, 16, 3).is_err(), "misaligned");
        assert!(decode_l2(0x0100_0000_0005_0000, 16, 3).is_err(), "reserved bits");
        assert!(decode_l2(0x1, 16, 2).is_err(), "zero flag in v2");
        assert!(decode_l2(COPIED, 16, 3).is_err(), "COPIED without a cluster");
        assert!(decode_l2(COMPRESSED | COPIED | 0x70000, 16, 3).is_err());
        assert!(decode_l1(0x0000_0000_0004_0001, 16).is_err());
    }

    #[test]
    fn compressed_size_field() {
        // 64 KiB clusters: x = 54; 3 additional sectors at an unaligned offset.
        let e = COMPRESSED | (3u64 << 54) | 0x70100;
        assert_eq!(decode_l2(e, 16, 3).unwrap(), Cluster::Compressed { offset: 0x70100, len: 4 * 512 - 0x100 });
        assert_eq!(compressed_clusters(0xfff0, 0x20, 16), (0, 2));
        // And back: 4 sectors reached from 0x70100 are 3 beyond the first.
        assert_eq!(compressed_entry(0x70100, 4 * 512 - 0x100, 16), Some(e));
        assert_eq!(compressed_entry(0x70000, 1, 16), Some(0x4000_0000_0007_0000), "QEMU's observed entry");
        for bits in [9u32, 12, 16, 21] {
            let cs = 1u64 << bits;
            // The largest compressed cluster (one byte short of a cluster),
            // at an unaligned offset: it touches two host clusters.
            let (off, len) = (7 * cs + 100, cs - 1);
            let e = compressed_entry(off, len, bits).unwrap();
            let Cluster::Compressed { offset, len: got } = decode_l2(e, bits, 3).unwrap() else { panic!() };
            assert_eq!(offset, off, "cluster_bits {bits}");
            assert!(got >= len && got < len + 512, "cluster_bits {bits}: {got} for {len}");
        }
        // 2 MiB clusters: the offset field ends at bit 49.
        assert_eq!(compressed_entry(1 << 49, 512, 21), None);
        assert!(compressed_entry((1 << 49) - 512, 512, 21).is_some());
        assert_eq!(compressed_clusters(0x10000, 0x100, 16), (0x10000, 1));
    }

    #[test]
    fn refcounts_of_every_width() {
        for order in 0..=6 {
            let mut block = vec![0u8; 512];
            let n = refcount::per_block(order, 9) as usize;
            assert_eq!(n * (1 << order), 4096);
            let max = refcount::max(order);
            for i in 0..n {
                refcount::set(&mut block, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(refcount::get(&block, order, i), (i as u64 * 7) & max, "order {order} index {i}");
            }
        }
        // 16-bit refcounts are big-endian u16: a fresh image's block starts 0001 0001.
        let mut b = vec![0u8; 8];
        refcount::set(&mut b, 4, 0, 1);
        refcount::set(&mut b, 4, 1, 1);
        assert_eq!(&b[..4], &[0, 1, 0, 1]);
        // 1-bit: bit 0 is the least significant.
        let mut b = vec![0u8; 1];
        refcount::set(&mut b, 0, 0, 1);
        refcount::set(&mut b, 0, 3, 1);
        assert_eq!(b[0], 0b1001);
    }

    #[test]
    fn deflate_round_trip_and_garbage() {
        use std::io::Write;
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut comp = enc.finish().unwrap();
        comp.extend_from_slice(&[0xaa; 300]); // sector padding after the stream
        let mut out = vec![0u8; 65536];
        decompress(Compression::Deflate, &comp, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(Compression::Deflate, &[1, 2, 3], &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[1, 2, 3], &mut out).is_err());
    }
}
