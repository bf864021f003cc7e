//! Dirty bitmaps: write tracking that belongs to a node, not to a job.
//!
//! ```text
//!   any reactor: BlockChannel completes a write, write-zeroes or discard
//!        │  (one atomic OR per word touched, per recording bitmap)
//!        ▼
//!   Node ── BitmapSet ──▶ [Bitmap "b0" (named, QEMU's), Bitmap (a mirror's, anonymous), ...]
//!                              ▲ read and cleared by jobs and exports, on their reactor
//! ```
//!
//! A [`DirtyBits`] is one bit per `granularity` bytes, in atomic words, so
//! that writes served on any reactor set bits without a lock, and a count of
//! set bits kept exact by the same atomic operations. A [`Bitmap`] adds what
//! QEMU's block dirty bitmaps have: a name (or none, for a job's own), and
//! whether it records, persists, is busy (used by a job or an export).
//! A node's [`BitmapSet`] lists them; channels learn of changes through a
//! generation counter, so a write to a node without bitmaps costs one
//! atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bits of dirtiness, one per `granularity` bytes of a disk of `size` bytes.
#[derive(Debug)]
pub struct DirtyBits {
    words: Box<[AtomicU64]>,
    granularity: u64,
    size: u64,
    count: AtomicU64,
}

impl DirtyBits {
    /// A clean bitmap; `granularity` is a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBits {
        assert!(granularity.is_power_of_two(), "granularity {granularity} is not a power of two");
        let chunks = size.div_ceil(granularity);
        let words = (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        DirtyBits { words, granularity, size, count: AtomicU64::new(0) }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Dirty chunks.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Dirty bytes (chunks times granularity, the last one clipped), as
    /// QEMU's `count` shows them.
    pub fn dirty_bytes(&self) -> u64 {
        let count = self.count();
        let mut bytes = count * self.granularity;
        let last = self.chunks().saturating_sub(1);
        if count > 0 && self.get(last) {
            bytes -= self.chunks() * self.granularity - self.size;
        }
        bytes
    }

    pub fn get(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Chunks touched by `[offset, offset + len)`.
    fn span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset / self.granularity, end.div_ceil(self.granularity)))
    }

    /// Marks every chunk the range touches.
    pub fn set_range(&self, offset: u64, len: u64) {
        if let Some((a, b)) = self.span(offset, len) {
            self.set_chunks(a, b);
        }
    }

    /// Clears every chunk the range touches.
    pub fn clear_range(&self, offset: u64, len: u64) {
        if let Some((a, b)) = self.span(offset, len) {
            self.clear_chunks(a, b);
        }
    }

    /// Clears only the chunks the range covers entirely.
    pub fn clear_covered(&self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        let a = offset.div_ceil(self.granularity);
        let b = if end == self.size { self.chunks() } else { end / self.granularity };
        if a < b {
            self.clear_chunks(a, b);
        }
    }

    /// The word-sized masks covering chunks `[a, b)`: (word index, mask).
    fn masks(a: u64, b: u64) -> impl Iterator<Item = (usize, u64)> {
        let (first, last) = (a / 64, (b - 1) / 64);
        (first..=last).map(move |w| {
            let lo = if w == first { a % 64 } else { 0 };
            let hi = if w == last { (b - 1) % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            (w as usize, mask)
        })
    }

    pub fn set_chunks(&self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        for (w, mask) in Self::masks(a, b) {
            let old = self.words[w].fetch_or(mask, Ordering::AcqRel);
            let new_bits = (mask & !old).count_ones();
            if new_bits > 0 {
                self.count.fetch_add(u64::from(new_bits), Ordering::AcqRel);
            }
        }
    }

    pub fn clear_chunks(&self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        for (w, mask) in Self::masks(a, b) {
            let old = self.words[w].fetch_and(!mask, Ordering::AcqRel);
            let gone = (mask & old).count_ones();
            if gone > 0 {
                self.count.fetch_sub(u64::from(gone), Ordering::AcqRel);
            }
        }
    }

    pub fn set_all(&self) {
        self.set_chunks(0, self.chunks());
    }

    pub fn clear_all(&self) {
        self.clear_chunks(0, self.chunks());
    }

    /// The first dirty chunk at or after `from`, wrapping around once.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if self.count() == 0 {
            return None;
        }
        let n = self.chunks();
        self.scan(from.min(n), n).or_else(|| self.scan(0, from.min(n)))
    }

    /// The first dirty chunk in `[from, to)`.
    pub fn scan(&self, from: u64, to: u64) -> Option<u64> {
        let mut c = from;
        while c < to {
            let w = self.words[(c / 64) as usize].load(Ordering::Acquire) >> (c % 64);
            if w == 0 {
                c = (c / 64 + 1) * 64;
                continue;
            }
            let hit = c + u64::from(w.trailing_zeros());
            return (hit < to).then_some(hit);
        }
        None
    }

    /// The first clean chunk in `[from, to)`.
    pub fn scan_clean(&self, from: u64, to: u64) -> Option<u64> {
        let mut c = from;
        while c < to {
            // Bits past the last chunk are never set, so they read as clean
            // and fall outside `to`.
            let w = !self.words[(c / 64) as usize].load(Ordering::Acquire) >> (c % 64);
            if w == 0 {
                c = (c / 64 + 1) * 64;
                continue;
            }
            let hit = c + u64::from(w.trailing_zeros());
            return (hit < to).then_some(hit);
        }
        None
    }

    /// Whether the byte at `offset` is dirty, and where the run of bytes
    /// in that state ends, at most `end` (`offset < end`). Bytes past the
    /// bitmap's size are clean.
    pub fn run_at(&self, offset: u64, end: u64) -> (bool, u64) {
        debug_assert!(offset < end, "an empty range has no run");
        if offset >= self.size {
            return (false, end);
        }
        let chunk = offset / self.granularity;
        let dirty = self.get(chunk);
        let last = end.min(self.size).div_ceil(self.granularity);
        let change = if dirty { self.scan_clean(chunk + 1, last) } else { self.scan(chunk + 1, last) };
        let run_end = match change {
            Some(c) => c * self.granularity,
            None if dirty => self.size,
            None => end,
        };
        (dirty, run_end.min(end))
    }

    /// Length in chunks of the dirty run starting at `chunk`, at most `max`.
    pub fn run_len(&self, chunk: u64, max: u64) -> u64 {
        let end = (chunk + max).min(self.chunks());
        (chunk..end).take_while(|&c| self.get(c)).count() as u64
    }

    /// A copy of the bits as they are now.
    pub fn copy(&self) -> DirtyBits {
        let c = DirtyBits::new(self.size(), self.granularity());
        c.merge_from(self);
        c
    }

    /// Marks here every byte range `other` marks (any granularity; same
    /// size, which the caller checks).
    pub fn merge_from(&self, other: &DirtyBits) {
        let mut c = 0;
        while let Some(hit) = other.scan(c, other.chunks()) {
            let run = other.run_len(hit, other.chunks() - hit);
            self.set_range(hit * other.granularity, run * other.granularity);
            c = hit + run;
        }
    }

    /// The words as QEMU lays out its bitmap in memory (64-bit words, the
    /// lowest chunk in the lowest bit, little endian): what
    /// `x-debug-block-dirty-bitmap-sha256` hashes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.load(Ordering::Acquire).to_le_bytes()).collect()
    }
}

/// A dirty bitmap of a node: QEMU's `BdrvDirtyBitmap`.
#[derive(Debug)]
pub struct Bitmap {
    /// None: a job's own (not listed, not addressable by commands).
    name: Option<String>,
    bits: DirtyBits,
    recording: AtomicBool,
    persistent: AtomicBool,
    /// Held by a job or an export: commands may not change it.
    busy: AtomicBool,
    /// Loaded from an image that was not closed cleanly: its bits cannot
    /// be trusted; only removing (or clearing) it is allowed.
    inconsistent: AtomicBool,
}

impl Bitmap {
    pub fn new(name: Option<String>, size: u64, granularity: u64, recording: bool) -> Bitmap {
        Bitmap {
            name,
            bits: DirtyBits::new(size, granularity),
            recording: AtomicBool::new(recording),
            persistent: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            inconsistent: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn bits(&self) -> &DirtyBits {
        &self.bits
    }

    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    pub fn persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    pub fn set_persistent(&self, on: bool) {
        self.persistent.store(on, Ordering::Release);
    }

    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub fn set_busy(&self, on: bool) {
        self.busy.store(on, Ordering::Release);
    }

    pub fn inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }

    pub fn set_inconsistent(&self, on: bool) {
        self.inconsistent.store(on, Ordering::Release);
    }

    /// QEMU's BlockDirtyInfo.
    pub fn describe(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "recording": self.recording(),
            "persistent": self.persistent(),
            "busy": self.busy(),
            "granularity": self.bits.granularity(),
            "count": self.bits.dirty_bytes(),
        });
        if self.inconsistent() {
            v["inconsistent"] = true.into();
        }
        v
    }
}

/// The bitmaps of one node.
#[derive(Debug, Default)]
pub struct BitmapSet {
    list: Mutex<Vec<Arc<Bitmap>>>,
    /// Bumped whenever the list or a bitmap's recording changes.
    generation: AtomicU64,
}

impl BitmapSet {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Bitmap>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every bitmap, newest first (as QEMU lists them).
    pub fn all(&self) -> Vec<Arc<Bitmap>> {
        self.lock().iter().rev().cloned().collect()
    }

    /// The named bitmaps, newest first.
    pub fn named(&self) -> Vec<Arc<Bitmap>> {
        self.lock().iter().rev().filter(|b| b.name.is_some()).cloned().collect()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Bitmap>> {
        self.lock().iter().find(|b| b.name() == Some(name)).cloned()
    }

    /// The bitmaps that record writes now.
    pub fn recording(&self) -> Vec<Arc<Bitmap>> {
        self.lock().iter().filter(|b| b.recording()).cloned().collect()
    }

    pub fn add(&self, bitmap: Arc<Bitmap>) {
        self.lock().push(bitmap);
        self.changed();
    }

    pub fn remove(&self, bitmap: &Arc<Bitmap>) {
        self.lock().retain(|b| !Arc::ptr_eq(b, bitmap));
        self.changed();
    }

    pub fn set_recording(&self, bitmap: &Bitmap, on: bool) {
        bitmap.recording.store(on, Ordering::Release);
        self.changed();
    }

    /// Marks `[offset, offset + len)` in every recording bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        for b in self.lock().iter().filter(|b| b.recording()) {
            b.bits.set_range(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_scan() {
        let b = DirtyBits::new(10 * 65536 + 100, 65536);
        assert_eq!(b.chunks(), 11);
        assert_eq!(b.next_dirty(0), None);
        b.set_range(65536 + 1, 1);
        assert_eq!(b.count(), 1);
        assert_eq!(b.next_dirty(0), Some(1));
        assert_eq!(b.next_dirty(2), Some(1), "wraps around");
        b.set_range(3 * 65536 - 1, 2);
        assert_eq!(b.count(), 3);
        assert_eq!(b.run_len(2, 10), 2);
        b.set_range(10 * 65536, 100);
        assert_eq!(b.dirty_bytes(), 3 * 65536 + 100);
        b.clear_covered(2 * 65536 + 1, 2 * 65536);
        assert!(b.get(2), "partly covered chunks stay dirty");
        b.clear_covered(10 * 65536, 100);
        assert!(!b.get(10), "the clipped last chunk is covered by its bytes");
        b.clear_range(0, 4 * 65536);
        assert_eq!(b.count(), 0);
        b.set_all();
        assert_eq!(b.count(), 11);
        assert_eq!(b.dirty_bytes(), b.size());
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn ranges_across_words_count_exactly() {
        let b = DirtyBits::new(1000 * 512, 512);
        b.set_chunks(60, 200);
        assert_eq!(b.count(), 140);
        b.set_chunks(0, 70);
        assert_eq!(b.count(), 200, "set bits are not counted twice");
        b.clear_chunks(63, 129);
        assert_eq!(b.count(), 134);
        assert!(b.get(62) && !b.get(63) && !b.get(128) && b.get(129));
        assert_eq!(b.next_dirty(63), Some(129));
        b.set_chunks(999, 1000);
        assert_eq!(b.scan(200, 1000), Some(999));
    }

    #[test]
    fn writers_on_many_threads_lose_no_bit() {
        let b = Arc::new(DirtyBits::new(64 << 20, 4096));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    for i in 0..4096u64 {
                        b.set_range((i * 4 + t) * 4096, 4096);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.count(), b.chunks());
    }

    #[test]
    fn runs_are_cut_at_the_range_and_the_size() {
        let b = DirtyBits::new(10 * 4096 + 100, 4096);
        b.set_chunks(2, 4);
        b.set_chunks(10, 11);
        assert_eq!(b.run_at(0, 100_000), (false, 2 * 4096));
        assert_eq!(b.run_at(100, 5000), (false, 5000), "cut at the end of the range");
        assert_eq!(b.run_at(2 * 4096 + 7, 100_000), (true, 4 * 4096), "starts inside a chunk");
        assert_eq!(b.run_at(4 * 4096, 100_000), (false, 10 * 4096));
        assert_eq!(b.run_at(10 * 4096, 100_000), (true, 10 * 4096 + 100), "the last chunk ends at the size");
        assert_eq!(b.run_at(10 * 4096 + 100, 100_000), (false, 100_000), "past the size: clean");
        let wide = DirtyBits::new(300 * 512, 512);
        wide.set_chunks(5, 200);
        assert_eq!(wide.scan_clean(5, 300), Some(200));
        assert_eq!(wide.scan_clean(5, 150), None);
        assert_eq!(wide.run_at(5 * 512, 300 * 512), (true, 200 * 512), "a run across words");
        wide.set_chunks(0, 300);
        assert_eq!(wide.run_at(0, 1 << 30), (true, 300 * 512));
    }

    #[test]
    fn merge_and_qemus_layout() {
        let a = DirtyBits::new(1 << 20, 65536);
        let b = DirtyBits::new(1 << 20, 4096);
        b.set_range(70000, 1);
        b.set_range(1 << 19, 8192);
        a.merge_from(&b);
        assert_eq!(a.count(), 2);
        assert!(a.get(1) && a.get(8));
        let bytes = a.to_le_bytes();
        assert_eq!(bytes.len(), 8);
        assert_eq!(bytes[0], 0b10);
        assert_eq!(bytes[1], 0b1);
    }

    #[test]
    fn the_set_lists_newest_first_and_marks_recording_ones() {
        let set = BitmapSet::default();
        let g0 = set.generation();
        let a = Arc::new(Bitmap::new(Some("a".into()), 1 << 20, 65536, true));
        let off = Arc::new(Bitmap::new(Some("off".into()), 1 << 20, 65536, false));
        let own = Arc::new(Bitmap::new(None, 1 << 20, 4096, true));
        set.add(Arc::clone(&a));
        set.add(Arc::clone(&off));
        set.add(Arc::clone(&own));
        assert!(set.generation() > g0);
        let names: Vec<_> = set.named().iter().map(|b| b.name().unwrap().to_string()).collect();
        assert_eq!(names, ["off", "a"]);
        set.mark(0, 4096);
        assert_eq!((a.bits().count(), off.bits().count(), own.bits().count()), (1, 0, 1));
        set.set_recording(&off, true);
        set.mark(65536, 1);
        assert_eq!(off.bits().count(), 1);
        set.remove(&own);
        assert_eq!(set.all().len(), 2);
        assert_eq!(a.describe()["count"], 131072);
    }
}
