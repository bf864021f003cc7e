//! Metadata overlap checks (QEMU's `overlap-check`): before anything is
//! written to the image file, the write is compared with where the image
//! keeps its metadata. A write that would land on metadata means the
//! mapping or the refcounts are corrupt; it is refused, and the image is
//! marked corrupt instead of being destroyed.
//!
//! ```text
//!   kind              where                          checked by mode
//!   qcow2_header      cluster 0                      constant cached all
//!   active L1 table   header.l1_table_offset         constant cached all
//!   refcount table    header.refcount_table_offset   constant cached all
//!   snapshot table    header.snapshots_offset        constant cached all
//!   bitmap directory  bitmaps extension              constant cached all
//!   active L2 table   every L1 entry                          cached all
//!   refcount block    every refcount table entry              cached all
//!   inactive L1 table every snapshot                          cached all
//!   inactive L2 table every snapshot's L1 entries                    all
//! ```
//!
//! Writes are widened to whole clusters, as QEMU widens them: metadata
//! and data never share a cluster. Tables of one cluster live in a sorted
//! map, so a check costs a few comparisons and one range lookup whatever
//! the image's size.

use std::collections::BTreeMap;

use serde_json::Value;

use super::entry::OFFSET_MASK;
use super::header::{Header, autoclear, ext};
use super::snapshot;
use super::state::decode_be64;
use crate::channel::BlockChannel;
use crate::error::{BdevError, IoError};

/// The kinds of metadata, as QEMU's `QCow2MetadataOverlap` bits.
pub mod kind {
    pub const MAIN_HEADER: u16 = 1 << 0;
    pub const ACTIVE_L1: u16 = 1 << 1;
    pub const ACTIVE_L2: u16 = 1 << 2;
    pub const REFCOUNT_TABLE: u16 = 1 << 3;
    pub const REFCOUNT_BLOCK: u16 = 1 << 4;
    pub const SNAPSHOT_TABLE: u16 = 1 << 5;
    pub const INACTIVE_L1: u16 = 1 << 6;
    pub const INACTIVE_L2: u16 = 1 << 7;
    pub const BITMAP_DIRECTORY: u16 = 1 << 8;

    /// Checks that cost the same for any image.
    pub const CONSTANT: u16 = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY;
    /// Checks against everything kept in memory (QEMU's default).
    pub const CACHED: u16 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1;
    pub const ALL: u16 = CACHED | INACTIVE_L2;

    /// The option member of each bit, in bit order, and QEMU's name for it
    /// in messages.
    pub const NAMES: [(&str, &str); 9] = [
        ("main-header", "qcow2_header"),
        ("active-l1", "active L1 table"),
        ("active-l2", "active L2 table"),
        ("refcount-table", "refcount table"),
        ("refcount-block", "refcount block"),
        ("snapshot-table", "snapshot table"),
        ("inactive-l1", "inactive L1 table"),
        ("inactive-l2", "inactive L2 table"),
        ("bitmap-directory", "bitmap directory"),
    ];

    /// QEMU's name of the lowest kind in `bits`.
    pub fn name(bits: u16) -> &'static str {
        NAMES[bits.trailing_zeros() as usize % NAMES.len()].1
    }
}

fn template(mode: &str, key: &str) -> Result<u16, BdevError> {
    match mode {
        "none" => Ok(0),
        "constant" => Ok(kind::CONSTANT),
        "cached" => Ok(kind::CACHED),
        "all" => Ok(kind::ALL),
        other => Err(BdevError::invalid(format!("Parameter '{key}' does not accept value '{other}'"))),
    }
}

/// Reads the `overlap-check` option: a mode (`none`, `constant`,
/// `cached` — the default —, `all`) or an object with a `template` mode
/// and a boolean per kind.
pub fn parse_option(value: Option<Value>) -> Result<u16, BdevError> {
    match value {
        None => Ok(kind::CACHED),
        Some(Value::String(mode)) => template(&mode, "overlap-check"),
        Some(Value::Object(mut m)) => {
            let mut bits = match m.remove("template") {
                None => kind::CACHED,
                Some(Value::String(mode)) => template(&mode, "overlap-check.template")?,
                Some(_) => {
                    return Err(BdevError::invalid(
                        "Invalid parameter type for 'overlap-check.template', expected: string",
                    ));
                }
            };
            for (i, (member, _)) in kind::NAMES.iter().enumerate() {
                match m.remove(*member) {
                    None => {}
                    Some(Value::Bool(on)) if on => bits |= 1 << i,
                    Some(Value::Bool(_)) => bits &= !(1 << i),
                    Some(_) => {
                        return Err(BdevError::invalid(format!(
                            "Invalid parameter type for 'overlap-check.{member}', expected: boolean"
                        )));
                    }
                }
            }
            match m.keys().next() {
                Some(k) => Err(BdevError::invalid(format!("Parameter 'overlap-check.{k}' is unexpected"))),
                None => Ok(bits),
            }
        }
        Some(_) => Err(BdevError::invalid("Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks")),
    }
}

/// How many tables of each one-cluster kind a host cluster holds (more
/// than one only in a corrupt image).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    active_l2: u32,
    refcount_block: u32,
    inactive_l2: u32,
}

impl Counts {
    fn kinds(self) -> u16 {
        let mut k = 0;
        if self.active_l2 > 0 {
            k |= kind::ACTIVE_L2;
        }
        if self.refcount_block > 0 {
            k |= kind::REFCOUNT_BLOCK;
        }
        if self.inactive_l2 > 0 {
            k |= kind::INACTIVE_L2;
        }
        k
    }

    fn slot(&mut self, kind: u16) -> &mut u32 {
        match kind {
            kind::ACTIVE_L2 => &mut self.active_l2,
            kind::REFCOUNT_BLOCK => &mut self.refcount_block,
            kind::INACTIVE_L2 => &mut self.inactive_l2,
            _ => unreachable!("kind {kind:#x} is not a one-cluster table"),
        }
    }
}

/// Where an image's metadata lies, and which kinds are checked.
#[derive(Debug, Clone)]
pub struct Overlaps {
    enabled: u16,
    cluster_bits: u32,
    /// Byte ranges of the structures that are not one cluster each.
    ranges: Vec<(u64, u64, u16)>,
    /// One-cluster tables by host cluster index.
    clusters: BTreeMap<u64, Counts>,
}

impl Overlaps {
    /// An image with no metadata known yet; `enabled` from [`parse_option`].
    pub fn new(enabled: u16, cluster_bits: u32) -> Overlaps {
        Overlaps { enabled, cluster_bits, ranges: Vec::new(), clusters: BTreeMap::new() }
    }

    pub fn enabled(&self) -> u16 {
        self.enabled
    }

    /// Records a structure spanning bytes `[start, start + len)`.
    pub fn add_range(&mut self, kind: u16, start: u64, len: u64) {
        if len > 0 {
            self.ranges.push((start, len, kind));
        }
    }

    /// Replaces every structure of `kind` by one at `[start, start + len)`
    /// (the refcount table moved).
    pub fn set_range(&mut self, kind: u16, start: u64, len: u64) {
        self.ranges.retain(|r| r.2 != kind);
        self.add_range(kind, start, len);
    }

    /// Records a one-cluster table of `kind` at byte offset `off`.
    pub fn add_cluster(&mut self, kind: u16, off: u64) {
        *self.clusters.entry(off >> self.cluster_bits).or_default().slot(kind) += 1;
    }

    /// Forgets one table of `kind` at `off` (freed, or no longer active).
    pub fn remove_cluster(&mut self, kind: u16, off: u64) {
        let c = off >> self.cluster_bits;
        if let Some(counts) = self.clusters.get_mut(&c) {
            let n = counts.slot(kind);
            *n = n.saturating_sub(1);
            if *counts == Counts::default() {
                self.clusters.remove(&c);
            }
        }
    }

    /// Forgets every one-cluster table of `kind` (refcounts rebuilt).
    pub fn clear_clusters(&mut self, kind: u16) {
        for counts in self.clusters.values_mut() {
            *counts.slot(kind) = 0;
        }
        self.clusters.retain(|_, c| *c != Counts::default());
    }

    /// The kind of metadata a write of `len` bytes at `offset` would land
    /// on, among the enabled kinds but those in `ignore` (a table being
    /// written ignores its own kind); None if it lands on none.
    pub fn check(&self, offset: u64, len: u64, ignore: u16) -> Option<u16> {
        let chk = self.enabled & !ignore;
        if chk == 0 || len == 0 {
            return None;
        }
        let cs = 1u64 << self.cluster_bits;
        if chk & kind::MAIN_HEADER != 0 && offset < cs {
            return Some(kind::MAIN_HEADER);
        }
        // Whole clusters, as QEMU compares them.
        let start = offset & !(cs - 1);
        let end = (offset + len).next_multiple_of(cs);
        let hit = |k: u16| k & chk;
        let mut found = 0u16;
        for &(s, l, k) in &self.ranges {
            if hit(k) != 0 && s < end && start < s + l {
                found |= k;
            }
        }
        for (_, counts) in self.clusters.range(start >> self.cluster_bits..end >> self.cluster_bits) {
            found |= hit(counts.kinds());
        }
        // QEMU reports the lowest bit.
        (found != 0).then(|| found & found.wrapping_neg())
    }
}

/// Where the metadata of a writable image lies, for the overlap checks
/// `enabled` asks for (the tables read at open: L1, refcount table; the
/// snapshot table and, for `all`, the snapshots' L1 tables are read here).
pub(super) async fn metadata_map(
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CS: u64 = 65536;

    fn image() -> Overlaps {
        let mut o = Overlaps::new(kind::CACHED, 16);
        o.add_range(kind::ACTIVE_L1, 3 * CS, 16);
        o.add_range(kind::REFCOUNT_TABLE, CS, CS);
        o.add_cluster(kind::REFCOUNT_BLOCK, 2 * CS);
        o.add_cluster(kind::ACTIVE_L2, 4 * CS);
        o
    }

    #[test]
    fn every_kind_is_found_where_it_lies() {
        let o = image();
        assert_eq!(o.check(0, 512, 0), Some(kind::MAIN_HEADER));
        assert_eq!(o.check(CS + 4096, 512, 0), Some(kind::REFCOUNT_TABLE));
        assert_eq!(o.check(2 * CS, CS, 0), Some(kind::REFCOUNT_BLOCK));
        // A write into the L1 table's cluster beyond its last entry still
        // hits: metadata clusters hold nothing else.
        assert_eq!(o.check(3 * CS + 8192, 512, 0), Some(kind::ACTIVE_L1));
        assert_eq!(o.check(4 * CS + CS - 1, 1, 0), Some(kind::ACTIVE_L2));
        assert_eq!(o.check(5 * CS, 64 * CS, 0), None);
        // A long write over several finds the lowest kind, as QEMU names it.
        assert_eq!(o.check(CS, 4 * CS, 0), Some(kind::ACTIVE_L1));
        assert_eq!(kind::name(kind::ACTIVE_L2), "active L2 table");
        assert_eq!(kind::name(kind::MAIN_HEADER), "qcow2_header");
    }

    #[test]
    fn a_table_ignores_its_own_kind_and_modes_choose_what_is_checked() {
        let mut o = image();
        assert_eq!(o.check(4 * CS, CS, kind::ACTIVE_L2), None);
        assert_eq!(o.check(2 * CS, CS, kind::REFCOUNT_BLOCK), None);
        o.add_cluster(kind::REFCOUNT_BLOCK, 4 * CS);
        assert_eq!(o.check(4 * CS, CS, kind::ACTIVE_L2), Some(kind::REFCOUNT_BLOCK), "aliased tables are found");
        o.remove_cluster(kind::REFCOUNT_BLOCK, 4 * CS);
        assert_eq!(o.check(4 * CS, CS, kind::ACTIVE_L2), None);
        let constant = Overlaps { enabled: kind::CONSTANT, ..image() };
        assert_eq!(constant.check(4 * CS, 512, 0), None, "L2 tables are not constant-time");
        assert_eq!(constant.check(CS, 512, 0), Some(kind::REFCOUNT_TABLE));
        let none = Overlaps { enabled: 0, ..image() };
        assert_eq!(none.check(0, CS, 0), None);
        o.set_range(kind::REFCOUNT_TABLE, 10 * CS, 2 * CS);
        assert_eq!(o.check(CS, 512, 0), None);
        assert_eq!(o.check(11 * CS, 512, 0), Some(kind::REFCOUNT_TABLE));
        o.clear_clusters(kind::REFCOUNT_BLOCK);
        assert_eq!(o.check(2 * CS, 512, 0), None);
    }

    #[test]
    fn options_are_qemus() {
        assert_eq!(parse_option(None).unwrap(), kind::CACHED);
        assert_eq!(parse_option(Some(json!("none"))).unwrap(), 0);
        assert_eq!(parse_option(Some(json!("all"))).unwrap(), kind::ALL);
        assert_eq!(parse_option(Some(json!({"template": "constant", "active-l2": true}))).unwrap(), kind::CONSTANT | 4);
        assert_eq!(parse_option(Some(json!({"main-header": false}))).unwrap(), kind::CACHED & !1);
        assert_eq!(
            parse_option(Some(json!("some"))).unwrap_err().to_string(),
            "Parameter 'overlap-check' does not accept value 'some'"
        );
        assert_eq!(
            parse_option(Some(json!({"bogus": true}))).unwrap_err().to_string(),
            "Parameter 'overlap-check.bogus' is unexpected"
        );
        assert!(parse_option(Some(json!({"active-l1": 1}))).is_err());
        assert!(parse_option(Some(json!(3))).is_err());
    }
}
