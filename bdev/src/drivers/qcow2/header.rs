//! The qcow2 header and its extensions (docs/interop/qcow2.rst): explicit
//! big-endian decoding into a plain struct, one `validate` at the edge, and
//! serialisation that keeps every extension — unknown ones byte for byte —
//! and the fields beyond those we know.

use crate::error::BdevError;

pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the version 2 header.
pub const V2_HEADER_BYTES: usize = 72;
/// Smallest version 3 header.
pub const V3_HEADER_BYTES_MIN: usize = 104;
/// Longest backing file name QEMU accepts.
pub const BACKING_NAME_BYTES_MAX: usize = 1023;
/// QEMU's limits on table sizes.
pub const L1_BYTES_MAX: u64 = 32 << 20;
pub const REFCOUNT_TABLE_BYTES_MAX: u64 = 8 << 20;
pub const SNAPSHOTS_MAX: u32 = 65536;
pub const CLUSTER_BITS_MIN: u32 = 9;
pub const CLUSTER_BITS_MAX: u32 = 21;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types.
pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Names QEMU gives the feature bits, for messages when an image has no
/// feature name table: (kind, bit, name) with kind 0 incompatible, 1
/// compatible, 2 autoclear.
const KNOWN_FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Compression of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

/// A header extension, kept as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    /// Bytes of the fixed header (72 for v2).
    pub header_length: u32,
    pub compression_type: u8,
    /// Header bytes past the fields we know, up to `header_length`.
    pub tail: Vec<u8>,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

fn invalid(msg: impl Into<String>) -> BdevError {
    BdevError::invalid(format!("qcow2: {}", msg.into()))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Reads the cluster size from the first bytes, so the caller knows how
    /// much of cluster 0 to read before `parse`.
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32, BdevError> {
        if buf.len() < 24 || be32(buf, 0) != MAGIC {
            return Err(invalid("Image is not in qcow2 format"));
        }
        let bits = be32(buf, 20);
        if !(CLUSTER_BITS_MIN..=CLUSTER_BITS_MAX).contains(&bits) {
            return Err(invalid(format!("Unsupported cluster size: 2^{bits}")));
        }
        Ok(bits)
    }

    /// Parses the header, its extensions and the backing file name from
    /// cluster 0 (`buf` holds at least that cluster, or the whole file if
    /// smaller).
    pub fn parse(buf: &[u8]) -> Result<Header, BdevError> {
        if buf.len() < V2_HEADER_BYTES || be32(buf, 0) != MAGIC {
            return Err(invalid("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(invalid(format!("Unsupported qcow2 version {version}")));
        }
        let cluster_bits = Header::peek_cluster_bits(buf)?;
        let cluster_size = 1usize << cluster_bits;
        let area = &buf[..buf.len().min(cluster_size)];
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_BYTES as u32,
            compression_type: 0,
            tail: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        let backing_offset = be64(buf, 8);
        let backing_size = be32(buf, 16) as usize;
        if version == 3 {
            if area.len() < V3_HEADER_BYTES_MIN {
                return Err(invalid("qcow2 header too short"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let hl = h.header_length as usize;
            if hl < V3_HEADER_BYTES_MIN || !hl.is_multiple_of(8) {
                return Err(invalid(format!("qcow2 header length {hl} invalid")));
            }
            if hl > area.len() {
                return Err(invalid("qcow2 header exceeds cluster size"));
            }
            if hl > V3_HEADER_BYTES_MIN {
                h.compression_type = buf[104];
                h.tail = buf[105..hl].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(invalid("Refcount width must be a power of two and may not exceed 64 bits"));
        }
        if backing_offset != 0 && backing_size > BACKING_NAME_BYTES_MAX {
            return Err(invalid("Backing file name too long"));
        }
        h.extensions = parse_extensions(area, h.header_length as usize, backing_offset)?;
        if backing_offset != 0 {
            let start = usize::try_from(backing_offset).map_err(|_| invalid("Invalid backing file offset"))?;
            let end = start
                .checked_add(backing_size)
                .filter(|&e| e <= area.len())
                .ok_or_else(|| invalid("Invalid backing file offset"))?;
            let name =
                std::str::from_utf8(&area[start..end]).map_err(|_| invalid("Backing file name is not valid UTF-8"))?;
            if !name.is_empty() {
                h.backing_file = Some(name.to_string());
            }
        }
        Ok(h)
    }

    /// Checks the fields against each other, the format's limits and the
    /// file's size; refuses what Spindle does not implement, naming it.
    pub fn validate(&self, file_size: u64) -> Result<(), BdevError> {
        let cs = self.cluster_size();
        let aligned = |off: u64| off.is_multiple_of(cs);
        if self.version == 2 && self.refcount_order != 4 {
            return Err(invalid("version 2 images must use 16-bit refcounts"));
        }
        if self.crypt_method != 0 {
            return Err(BdevError::Unsupported(format!(
                "qcow2: encrypted images (crypt method {}) are not supported yet",
                self.crypt_method
            )));
        }
        let unsupported = self.incompatible & !(incompat::DIRTY | incompat::CORRUPT | incompat::COMPRESSION_TYPE);
        if unsupported != 0 {
            let names: Vec<String> =
                (0..64).filter(|b| unsupported & (1 << b) != 0).map(|b| self.feature_name(0, b)).collect();
            return Err(BdevError::Unsupported(format!("qcow2: Unsupported qcow2 feature(s): {}", names.join(", "))));
        }
        if self.compression_type != 0 && self.incompatible & incompat::COMPRESSION_TYPE == 0 {
            return Err(invalid("compression_type is set but the compression type feature bit is not"));
        }
        if self.incompatible & incompat::COMPRESSION_TYPE != 0 && self.compression_type > 1 {
            return Err(BdevError::Unsupported(format!("qcow2: unknown compression type {}", self.compression_type)));
        }
        // The L1 table must cover the virtual size.
        let l2_entries = cs / 8;
        let bytes_per_l1 = l2_entries.checked_mul(cs).ok_or_else(|| invalid("Image is too big"))?;
        let l1_needed = self.size.div_ceil(bytes_per_l1);
        if u64::from(self.l1_size) < l1_needed {
            return Err(invalid("L1 table is too small"));
        }
        if u64::from(self.l1_size) * 8 > L1_BYTES_MAX {
            return Err(invalid("Active L1 table too large"));
        }
        if self.l1_size > 0 && (self.l1_table_offset == 0 || !aligned(self.l1_table_offset)) {
            return Err(invalid("Active L1 table offset invalid"));
        }
        let l1_end = self.l1_table_offset + u64::from(self.l1_size) * 8;
        if self.l1_size > 0 && l1_end > file_size {
            return Err(invalid("Active L1 table lies beyond the end of the file"));
        }
        if self.refcount_table_clusters == 0 || u64::from(self.refcount_table_clusters) * cs > REFCOUNT_TABLE_BYTES_MAX
        {
            return Err(invalid("Reference count table too large"));
        }
        if self.refcount_table_offset == 0 || !aligned(self.refcount_table_offset) {
            return Err(invalid("Reference count table offset invalid"));
        }
        if self.refcount_table_offset + u64::from(self.refcount_table_clusters) * cs > file_size {
            return Err(invalid("Reference count table lies beyond the end of the file"));
        }
        if self.nb_snapshots > SNAPSHOTS_MAX {
            return Err(invalid("Too many snapshots"));
        }
        if self.nb_snapshots > 0
            && (!aligned(self.snapshots_offset) || self.snapshots_offset == 0 || self.snapshots_offset >= file_size)
        {
            return Err(invalid("Snapshot table offset invalid"));
        }
        // Metadata must not overlap the header cluster or each other.
        let ranges = [
            ("L1 table", self.l1_table_offset, u64::from(self.l1_size) * 8),
            ("refcount table", self.refcount_table_offset, u64::from(self.refcount_table_clusters) * cs),
        ];
        for (name, off, len) in ranges {
            if len > 0 && off < cs {
                return Err(invalid(format!("{name} overlaps the header")));
            }
        }
        let (a, b) = (ranges[0], ranges[1]);
        if a.2 > 0 && a.1 < b.1 + b.2 && b.1 < a.1 + a.2 {
            return Err(invalid("L1 table overlaps the refcount table"));
        }
        Ok(())
    }

    /// The name of feature `bit` of `kind` (0 incompatible, 1 compatible, 2
    /// autoclear), from the image's feature name table, else QEMU's name,
    /// else "bit N".
    pub fn feature_name(&self, kind: u8, bit: u8) -> String {
        let from_table = self.extensions.iter().filter(|e| e.kind == ext::FEATURE_NAME_TABLE).find_map(|e| {
            e.data.chunks_exact(48).find(|c| c[0] == kind && c[1] == bit).map(|c| {
                let name = &c[2..];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                String::from_utf8_lossy(&name[..end]).into_owned()
            })
        });
        from_table
            .or_else(|| {
                KNOWN_FEATURE_NAMES.iter().find(|(k, b, _)| *k == kind && *b == bit).map(|(_, _, n)| n.to_string())
            })
            .unwrap_or_else(|| format!("Unknown incompatible feature: bit {bit}"))
    }

    /// The backing file format from its extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == ext::BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    pub fn compression(&self) -> Compression {
        if self.incompatible & incompat::COMPRESSION_TYPE != 0 && self.compression_type == 1 {
            Compression::Zstd
        } else {
            Compression::Deflate
        }
    }

    /// Sets or removes the backing file (and its format extension).
    pub fn set_backing(&mut self, file: Option<&str>, format: Option<&str>) {
        self.backing_file = file.map(str::to_string);
        self.extensions.retain(|e| e.kind != ext::BACKING_FORMAT);
        if let (Some(_), Some(fmt)) = (file, format) {
            // QEMU puts the backing format first among the extensions.
            self.extensions.insert(0, Extension { kind: ext::BACKING_FORMAT, data: fmt.as_bytes().to_vec() });
        }
    }

    /// The bytes of cluster 0 that this header occupies: fixed header,
    /// extensions, end marker, then the backing file name. Fails if they do
    /// not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, BdevError> {
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length as usize > V3_HEADER_BYTES_MIN {
                b.push(self.compression_type);
                b.extend_from_slice(&self.tail);
            }
            debug_assert_eq!(b.len(), self.header_length as usize);
        }
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            if name.len() > BACKING_NAME_BYTES_MAX {
                return Err(invalid("Backing file name too long"));
            }
            let at = b.len() as u64;
            b[8..16].copy_from_slice(&at.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(invalid("header, extensions and backing file name do not fit in the first cluster"));
        }
        Ok(b)
    }
}

fn parse_extensions(area: &[u8], start: usize, backing_offset: u64) -> Result<Vec<Extension>, BdevError> {
    let mut exts = Vec::new();
    let mut at = start;
    // Extensions end at the end marker, at the backing file name, or at the
    // end of the cluster, whichever comes first.
    let limit = if backing_offset > start as u64 { (backing_offset as usize).min(area.len()) } else { area.len() };
    while at + 8 <= limit {
        let kind = be32(area, at);
        let len = be32(area, at + 4) as usize;
        if kind == ext::END {
            return Ok(exts);
        }
        let data_end = (at + 8)
            .checked_add(len)
            .filter(|&e| e <= limit)
            .ok_or_else(|| invalid("header extension overruns the first cluster"))?;
        exts.push(Extension { kind, data: area[at + 8..data_end].to_vec() });
        at = data_end.next_multiple_of(8);
    }
    Ok(exts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh QEMU v3 image with 64 KiB clusters, as `qemu-img create -f qcow2 x 1G` writes it.
    fn fresh_v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        let put32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, 16);
        put64(&mut b, 24, 1 << 30);
        put32(&mut b, 36, 2);
        put64(&mut b, 40, 0x30000);
        put64(&mut b, 48, 0x10000);
        put32(&mut b, 56, 1);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 112);
        // feature name table with one entry, then the end marker
        put32(&mut b, 112, ext::FEATURE_NAME_TABLE);
        put32(&mut b, 116, 48);
        b[120] = 0;
        b[121] = 0;
        b[122..131].copy_from_slice(b"dirty bit");
        b
    }

    #[test]
    fn parses_and_round_trips() {
        let raw = fresh_v3();
        let h = Header::parse(&raw).unwrap();
        assert_eq!((h.version, h.cluster_bits, h.size, h.l1_size), (3, 16, 1 << 30, 2));
        assert_eq!((h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters), (0x30000, 0x10000, 1));
        assert_eq!(h.header_length, 112);
        assert_eq!(h.extensions.len(), 1);
        h.validate(0x40000).unwrap();
        let out = h.serialize().unwrap();
        assert_eq!(&out[..], &raw[..out.len()], "serialisation is byte-exact");
        assert!(raw[out.len()..].iter().all(|&b| b == 0));
        assert_eq!(h.feature_name(0, 0), "dirty bit");
        assert_eq!(h.feature_name(0, 2), "external data file");
        assert_eq!(h.feature_name(0, 40), "Unknown incompatible feature: bit 40");
    }

    #[test]
    fn backing_file_and_format() {
        let mut h = Header::parse(&fresh_v3()).unwrap();
        h.set_backing(Some("base.qcow2"), Some("qcow2"));
        let out = h.serialize().unwrap();
        let mut cluster = out.clone();
        cluster.resize(65536, 0);
        let h2 = Header::parse(&cluster).unwrap();
        assert_eq!(h2.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h2.backing_format().as_deref(), Some("qcow2"));
        assert_eq!(h2.extensions[0].kind, ext::BACKING_FORMAT);
        assert_eq!(h2.serialize().unwrap(), out);
        let mut h3 = h2.clone();
        h3.set_backing(None, None);
        assert!(h3.backing_file.is_none() && h3.backing_format().is_none());
    }

    #[test]
    fn unknown_extensions_survive() {
        let mut raw = fresh_v3();
        // Replace the end marker after the feature table with an unknown extension.
        let at = 120 + 48;
        raw[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        raw[at + 4..at + 8].copy_from_slice(&5u32.to_be_bytes());
        raw[at + 8..at + 13].copy_from_slice(b"hello");
        let h = Header::parse(&raw).unwrap();
        assert_eq!(h.extensions[1], Extension { kind: 0x1234_5678, data: b"hello".to_vec() });
        let out = h.serialize().unwrap();
        assert_eq!(&out[..], &raw[..out.len()]);
    }

    #[test]
    fn bad_headers_are_refused_with_reasons() {
        type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Corrupt, &str)> = vec![
            (Box::new(|b| b[0] = 0), "not in qcow2 format"),
            (Box::new(|b| b[7] = 4), "Unsupported qcow2 version 4"),
            (Box::new(|b| b[23] = 30), "Unsupported cluster size: 2^30"),
            (Box::new(|b| b[23] = 8), "Unsupported cluster size: 2^8"),
            (Box::new(|b| b[103] = 100), "header length 100 invalid"),
            (Box::new(|b| b[103] = 113), "header length 113 invalid"),
            (Box::new(|b| b[99] = 7), "Refcount width"),
            (Box::new(|b| b[79] = 0x04), "Unsupported qcow2 feature(s): external data file"),
            (Box::new(|b| b[79] = 0x10), "extended L2 entries"),
            (Box::new(|b| b[72] = 0x80), "Unknown incompatible feature: bit 63"),
            (Box::new(|b| b[35] = 2), "encrypted images"),
            (Box::new(|b| b[39] = 1), "L1 table is too small"),
            (Box::new(|b| b[46] = 0x01), "L1 table offset invalid"),
            (Box::new(|b| b[54] = 0x01), "Reference count table offset invalid"),
            (Box::new(|b| b[58] = 0xff), "Reference count table too large"),
            (Box::new(|b| b[42] = 0x01), "Active L1 table lies beyond the end of the file"),
            (Box::new(|b| b[61] = 0xff), "Too many snapshots"),
            (
                Box::new(|b| {
                    b[62] = 0;
                    b[63] = 1;
                }),
                "Snapshot table offset invalid",
            ),
            (
                Box::new(|b| {
                    b[13] = 0xff;
                    b[19] = 4;
                }),
                "Invalid backing file offset",
            ),
            (
                Box::new(|b| {
                    b[18] = 0x10;
                    b[15] = 0x80;
                }),
                "Backing file name too long",
            ),
            (Box::new(|b| b[117..120].copy_from_slice(&[0xff, 0xff, 0xff])), "overruns"),
        ];
        for (corrupt, want) in cases {
            let mut raw = fresh_v3();
            corrupt(&mut raw);
            let err = Header::parse(&raw).and_then(|h| h.validate(0x40000).map(|()| h));
            let msg = err.expect_err(want).to_string();
            assert!(msg.contains(want), "expected '{want}', got '{msg}'");
        }
        // Tables beyond the end of the file.
        let h = Header::parse(&fresh_v3()).unwrap();
        assert!(h.validate(0x20000).unwrap_err().to_string().contains("beyond the end"));
        // Truncated input never panics.
        for n in [0, 3, 24, 71, 100] {
            assert!(Header::parse(&fresh_v3()[..n]).is_err());
        }
    }
}
