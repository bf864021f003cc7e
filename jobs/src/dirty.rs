//! A dirty bitmap: one bit per `granularity` bytes of a disk, with a count
//! of set bits and a scan for the next dirty run. Lives on one reactor.

#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    granularity: u64,
    size: u64,
    count: u64,
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes; `granularity` is a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two());
        let chunks = size.div_ceil(granularity);
        DirtyBitmap { words: vec![0; chunks.div_ceil(64) as usize], granularity, size, count: 0 }
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

    /// Number of dirty chunks.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Dirty bytes (chunks times granularity, the last one clipped).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.count * self.granularity;
        let last = self.chunks().saturating_sub(1);
        if self.count > 0 && self.get(last) {
            bytes -= self.chunks() * self.granularity - self.size;
        }
        bytes
    }

    pub fn get(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Chunks touched by the byte range `[offset, offset + len)`.
    fn span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = (offset + len).min(self.size);
        Some((offset / self.granularity, end.div_ceil(self.granularity)))
    }

    /// Marks every chunk the range touches.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if let Some((a, b)) = self.span(offset, len) {
            self.set_chunks(a, b);
        }
    }

    /// Clears every chunk the range touches.
    pub fn clear_range(&mut self, offset: u64, len: u64) {
        if let Some((a, b)) = self.span(offset, len) {
            self.clear_chunks(a, b);
        }
    }

    /// Clears only the chunks the range covers entirely.
    pub fn clear_covered(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        let a = offset.div_ceil(self.granularity);
        let b = if end == self.size { self.chunks() } else { end / self.granularity };
        if a < b {
            self.clear_chunks(a, b);
        }
    }

    pub fn set_chunks(&mut self, a: u64, b: u64) {
        for c in a..b {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if self.words[w] & bit == 0 {
                self.words[w] |= bit;
                self.count += 1;
            }
        }
    }

    pub fn clear_chunks(&mut self, a: u64, b: u64) {
        for c in a..b {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if self.words[w] & bit != 0 {
                self.words[w] &= !bit;
                self.count -= 1;
            }
        }
    }

    pub fn set_all(&mut self) {
        self.set_chunks(0, self.chunks());
    }

    /// The first dirty chunk at or after `from`, wrapping around once.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let n = self.chunks();
        self.scan(from.min(n), n).or_else(|| self.scan(0, from.min(n)))
    }

    fn scan(&self, from: u64, to: u64) -> Option<u64> {
        let mut c = from;
        while c < to {
            let w = self.words[(c / 64) as usize] >> (c % 64);
            if w == 0 {
                c = (c / 64 + 1) * 64;
                continue;
            }
            let hit = c + u64::from(w.trailing_zeros());
            return (hit < to).then_some(hit);
        }
        None
    }

    /// Length in chunks of the dirty run starting at `chunk`, at most `max`.
    pub fn run_len(&self, chunk: u64, max: u64) -> u64 {
        let end = (chunk + max).min(self.chunks());
        (chunk..end).take_while(|&c| self.get(c)).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_scan() {
        let mut b = DirtyBitmap::new(10 * 65536 + 100, 65536);
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
    }

    #[test]
    fn scan_crosses_words() {
        let mut b = DirtyBitmap::new(1000 * 512, 512);
        b.set_chunks(700, 701);
        assert_eq!(b.next_dirty(5), Some(700));
        assert_eq!(b.next_dirty(701), Some(700));
        b.set_range(0, 0);
        assert_eq!(b.count(), 1);
    }
}
