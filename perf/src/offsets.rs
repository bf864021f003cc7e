//! Where a job's next request goes: sequential or random blocks of its
//! slice, aligned to the I/O size, optionally confined to one queue slot's
//! stripe.

use crate::options::Slice;
use crate::rng::SplitMix64;

/// The offset generator of one job. `Copy`, so the job keeps it in a `Cell`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offsets {
    start: u64,
    blocks: u64,
    io_size: u64,
    random: bool,
    rng: SplitMix64,
    /// Next block of a sequential walk.
    cursor: u64,
}

impl Offsets {
    pub fn new(slice: Slice, io_size: u64, random: bool, seed: u64) -> Offsets {
        debug_assert!(slice.blocks > 0);
        Offsets { start: slice.start, blocks: slice.blocks, io_size, random, rng: SplitMix64::new(seed), cursor: 0 }
    }

    fn offset_of(&self, block: u64) -> u64 {
        self.start + block * self.io_size
    }

    /// The next offset: a random block, or the next one in order
    /// (wrapping at the end of the slice).
    pub fn next(&mut self) -> u64 {
        let block = if self.random {
            self.rng.below(self.blocks)
        } else {
            let b = self.cursor;
            self.cursor = if b + 1 == self.blocks { 0 } else { b + 1 };
            b
        };
        self.offset_of(block)
    }

    /// A random offset in stripe `stripe` of `stripes`: blocks `stripe,
    /// stripe + stripes, ...`. Stripes never share a block. The slice's
    /// last `blocks % stripes` blocks belong to no stripe.
    pub fn next_in_stripe(&mut self, stripe: u64, stripes: u64) -> u64 {
        debug_assert!(stripe < stripes && stripes <= self.blocks);
        let k = self.rng.below(self.blocks / stripes);
        self.offset_of(k * stripes + stripe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IO: u64 = 4096;

    #[test]
    fn random_offsets_stay_in_the_slice_and_aligned() {
        let slice = Slice { start: 1 << 20, blocks: 100 };
        let mut o = Offsets::new(slice, IO, true, 5);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let off = o.next();
            assert!(off >= slice.start && off + IO <= slice.start + slice.blocks * IO, "{off}");
            assert_eq!((off - slice.start) % IO, 0);
            seen.insert(off);
        }
        assert_eq!(seen.len(), 100, "every block is reached");
    }

    #[test]
    fn sequential_offsets_walk_and_wrap() {
        let mut o = Offsets::new(Slice { start: 8192, blocks: 3 }, IO, false, 0);
        let got: Vec<u64> = (0..7).map(|_| o.next()).collect();
        assert_eq!(got, [8192, 12288, 16384, 8192, 12288, 16384, 8192]);
        let mut one = Offsets::new(Slice { start: 0, blocks: 1 }, IO, false, 0);
        assert_eq!((one.next(), one.next()), (0, 0));
    }

    #[test]
    fn stripes_are_disjoint_and_in_range() {
        let slice = Slice { start: 0, blocks: 37 };
        let stripes = 8;
        let mut o = Offsets::new(slice, IO, true, 11);
        let mut owner = std::collections::HashMap::new();
        for _ in 0..10_000 {
            for s in 0..stripes {
                let off = o.next_in_stripe(s, stripes);
                assert_eq!(off % IO, 0);
                let block = off / IO;
                assert!(block < slice.blocks / stripes * stripes, "block {block} beyond the striped part");
                assert_eq!(*owner.entry(block).or_insert(s), s, "block {block} in two stripes");
            }
        }
        assert_eq!(owner.len(), 32);
    }

    #[test]
    fn same_seed_same_offsets() {
        let slice = Slice { start: 0, blocks: 1 << 30 };
        let mut a = Offsets::new(slice, IO, true, 3);
        let mut b = Offsets::new(slice, IO, true, 3);
        assert!((0..100).all(|_| a.next() == b.next()));
    }
}
