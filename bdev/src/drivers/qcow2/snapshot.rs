//! The internal snapshot table (docs/interop/qcow2.rst, "Snapshots"):
//! Spindle keeps snapshots as it finds them; it reads the table for its
//! size and for where each snapshot's L1 table lies (refcount rebuilds and
//! overlap checks need both).

use crate::channel::BlockChannel;
use crate::error::IoError;

/// Fixed part of one snapshot table entry.
const ENTRY_FIXED_BYTES: u64 = 40;

/// What the snapshot table holds, as far as Spindle needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct SnapshotTable {
    /// Bytes the table occupies from `header.snapshots_offset`.
    pub bytes: u64,
    /// Each snapshot's L1 table: (offset, entries).
    pub l1_tables: Vec<(u64, u32)>,
}

fn be(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n].iter().fold(0u64, |v, &x| (v << 8) | u64::from(x))
}

/// Reads the `count` entries of the table at `offset`.
pub(super) async fn read_table(file: &BlockChannel, offset: u64, count: u32) -> Result<SnapshotTable, IoError> {
    let mut table = SnapshotTable::default();
    let mut at = offset;
    for _ in 0..count {
        let fixed = file.read(at, ENTRY_FIXED_BYTES as usize).await?;
        let (l1_off, l1_size) = (be(&fixed, 0, 8), be(&fixed, 8, 4) as u32);
        let (id_len, name_len, extra_len) = (be(&fixed, 12, 2), be(&fixed, 14, 2), be(&fixed, 36, 4));
        at = (at + ENTRY_FIXED_BYTES + extra_len + id_len + name_len).next_multiple_of(8);
        table.l1_tables.push((l1_off, l1_size));
    }
    table.bytes = at - offset;
    Ok(table)
}
