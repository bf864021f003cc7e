//! A small seeded generator for offsets and read/write mixes.
//!
//! SplitMix64 (Steele, Lea, Flood 2014): one add and three xor-shift-multiply
//! steps per value, passes BigCrush, and any seed (zero included) is fine.
//! Runs are reproducible from the seed, which is what a benchmark needs;
//! nothing here is for cryptography.

/// Weyl sequence increment of SplitMix64 (2^64 / golden ratio, odd).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64 state. `Copy`, so a job keeps it in a `Cell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// A value in `0..bound` (`bound > 0`), by multiply-shift: no division,
    /// and a bias below `bound / 2^64`, invisible at any device size.
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

/// The SplitMix64 output function; also a good 64-bit hash of its input
/// (derives per-job seeds that share no stream with each other).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 1234567, computed independently.
        let mut r = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]
        );
    }

    #[test]
    fn same_seed_same_stream() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        let mut c = SplitMix64::new(43);
        let (va, vb, vc): (Vec<u64>, Vec<u64>, Vec<u64>) = (
            (0..100).map(|_| a.next_u64()).collect(),
            (0..100).map(|_| b.next_u64()).collect(),
            (0..100).map(|_| c.next_u64()).collect(),
        );
        assert_eq!(va, vb);
        assert_ne!(va, vc);
    }

    #[test]
    fn below_stays_below_and_covers_the_range() {
        let mut r = SplitMix64::new(7);
        let bound = 10;
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let v = r.below(bound);
            assert!(v < bound);
            seen[v as usize] += 1;
        }
        // Uniform enough: every value within ±20 % of its expected 1000.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        assert_eq!(r.below(1), 0);
        let mut big = SplitMix64::new(9);
        assert!((0..1000).all(|_| big.below(u64::MAX) < u64::MAX));
    }
}
