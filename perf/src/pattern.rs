//! The data `verify` writes and checks.
//!
//! Every 8-byte word of a request holds its own byte position XOR a key
//! derived from the job's seed and a generation number that changes with
//! every write. A read that returns another offset's data (a misdirected
//! write), an older generation (a lost write) or anything else (zeroes,
//! garbage) fails the check, and the first differing byte is named.

use crate::rng::mix;

/// The key of one write: distinct per job seed and generation.
pub fn key(seed: u64, generation: u64) -> u64 {
    mix(seed ^ mix(generation))
}

fn word(position: u64, key: u64) -> [u8; 8] {
    (position ^ key).to_le_bytes()
}

/// Fills `buf`, which is written at device offset `offset`, with the pattern for `key`.
pub fn fill(buf: &mut [u8], offset: u64, key: u64) {
    let mut position = offset;
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&word(position, key)[..chunk.len()]);
        position += 8;
    }
}

/// Checks that `buf`, read at `offset`, holds the pattern for `key`;
/// on a mismatch returns the device offset of the first wrong byte.
pub fn check(buf: &[u8], offset: u64, key: u64) -> Result<(), u64> {
    let mut position = offset;
    for chunk in buf.chunks(8) {
        let want = word(position, key);
        let want = &want[..chunk.len()];
        if chunk != want {
            let at = chunk.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(position + at as u64);
        }
        position += 8;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_buffer_checks() {
        for len in [0usize, 1, 7, 8, 9, 512, 4096, 4099] {
            let mut buf = vec![0u8; len];
            fill(&mut buf, 1 << 20, key(1, 2));
            assert_eq!(check(&buf, 1 << 20, key(1, 2)), Ok(()), "len {len}");
        }
    }

    #[test]
    fn any_changed_byte_is_found() {
        let offset = 3 * 4096;
        let k = key(99, 5);
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, offset, k);
        for at in [0usize, 1, 7, 8, 1000, 4095] {
            let mut bad = buf.clone();
            bad[at] ^= 0x10;
            assert_eq!(check(&bad, offset, k), Err(offset + at as u64), "byte {at}");
        }
    }

    #[test]
    fn other_offsets_generations_and_zeroes_fail() {
        let k = key(7, 1);
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 8192, k);
        // Data written for another offset (a misdirected write).
        assert!(matches!(check(&buf, 4096, k), Err(p) if (4096..4104).contains(&p)));
        // An older generation (a lost write).
        assert!(matches!(check(&buf, 8192, key(7, 0)), Err(p) if (8192..8200).contains(&p)));
        // Another job's data.
        assert!(check(&buf, 8192, key(8, 1)).is_err());
        // A block never written.
        assert!(check(&[0u8; 4096], 8192, k).is_err());
        assert_ne!(key(1, 0), key(1, 1));
        assert_ne!(key(1, 0), key(2, 0));
    }
}
