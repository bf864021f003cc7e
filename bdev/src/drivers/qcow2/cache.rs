//! The L2 table cache and the refcount block cache: LRU maps from a
//! table's host offset to its decoded contents, with dirty tracking and a
//! version per change (a write-back that captured a table marks it clean
//! only if nothing changed it since). Pure data structures; the I/O that
//! fills them is in `mapping` and `refcount`, write-back in `writeback`.

use std::collections::HashMap;

/// One cached table.
struct Slot<T> {
    data: T,
    dirty: bool,
    last_use: u64,
    /// The clock at the last change.
    version: u64,
}

/// An LRU cache of tables keyed by host offset.
pub struct TableCache<T> {
    slots: HashMap<u64, Slot<T>>,
    capacity: usize,
    clock: u64,
}

impl<T> TableCache<T> {
    pub fn new(capacity: usize) -> TableCache<T> {
        TableCache { slots: HashMap::with_capacity(capacity), capacity: capacity.max(1), clock: 0 }
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The table at `offset`, marking it recently used.
    pub fn get(&mut self, offset: u64) -> Option<&T> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = clock;
            &s.data
        })
    }

    /// The table for modification; it becomes dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = clock;
            s.version = clock;
            s.dirty = true;
            &mut s.data
        })
    }

    /// Inserts a table read from (or about to be written to) disk.
    pub fn insert(&mut self, offset: u64, data: T, dirty: bool) {
        self.clock += 1;
        self.slots.insert(offset, Slot { data, dirty, last_use: self.clock, version: self.clock });
    }

    /// Drops the least recently used clean table; false if every table is dirty.
    pub fn evict_clean(&mut self) -> bool {
        let victim = self.slots.iter().filter(|(_, s)| !s.dirty).min_by_key(|(_, s)| s.last_use).map(|(&k, _)| k);
        match victim {
            Some(k) => {
                self.slots.remove(&k);
                true
            }
            None => false,
        }
    }

    /// Forgets a table (its cluster was freed).
    pub fn remove(&mut self, offset: u64) {
        self.slots.remove(&offset);
    }

    #[cfg(test)]
    pub fn any_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// Offsets of dirty tables, in ascending order (sequential writeback).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.slots.iter().filter(|(_, s)| s.dirty).map(|(&k, _)| k).collect();
        v.sort_unstable();
        v
    }

    /// A dirty table's data (to write it back) without changing its state.
    pub fn peek(&self, offset: u64) -> Option<&T> {
        self.slots.get(&offset).map(|s| &s.data)
    }

    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }

    /// Dirty tables and the version of each, in ascending offset order.
    pub fn dirty_versions(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.slots.iter().filter(|(_, s)| s.dirty).map(|(&k, s)| (k, s.version)).collect();
        v.sort_unstable();
        v
    }

    /// Marks a table clean if it is still at `version` (it was written back
    /// as it was then).
    pub fn mark_clean_at(&mut self, offset: u64, version: u64) {
        if let Some(s) = self.slots.get_mut(&offset)
            && s.version == version
        {
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_only_clean_tables() {
        let mut c: TableCache<u32> = TableCache::new(3);
        c.insert(1, 10, false);
        c.insert(2, 20, true);
        c.insert(3, 30, false);
        assert!(c.is_full());
        c.get(1);
        assert!(c.evict_clean());
        assert!(!c.contains(3), "3 was the least recently used clean table");
        assert!(c.evict_clean());
        assert!(!c.contains(1));
        assert!(!c.evict_clean(), "only the dirty table is left");
        assert_eq!(c.dirty_offsets(), vec![2]);
        c.mark_clean(2);
        assert!(!c.any_dirty());
        *c.get_mut(2).unwrap() = 21;
        assert!(c.any_dirty());
        assert_eq!(c.peek(2), Some(&21));
    }

    #[test]
    fn a_table_changed_after_it_was_captured_stays_dirty() {
        let mut c: TableCache<u32> = TableCache::new(3);
        c.insert(1, 10, false);
        *c.get_mut(1).unwrap() = 11;
        let [(off, v)] = c.dirty_versions()[..] else { panic!("one dirty table") };
        *c.get_mut(1).unwrap() = 12;
        c.mark_clean_at(off, v);
        assert!(c.any_dirty(), "the second change is not written yet");
        let [(_, v2)] = c.dirty_versions()[..] else { panic!("one dirty table") };
        c.mark_clean_at(1, v2);
        assert!(!c.any_dirty());
    }
}
