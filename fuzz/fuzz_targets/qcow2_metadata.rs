//! qcow2 metadata parsing: the header and its extensions (parse, validate,
//! serialise, parse again), L1/L2 entries, compressed clusters and refcount
//! blocks of every width. Input: the first cluster of an image (seeds are
//! real images made by qemu-img).
#![no_main]

use bdev::drivers::qcow2::entry::{self, refcount};
use bdev::drivers::qcow2::header::{Compression, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bits = match Header::parse(data) {
        Ok(h) => {
            let _ = h.validate(data.len() as u64);
            if let Ok(bytes) = h.serialize() {
                let mut cluster = bytes.clone();
                cluster.resize(h.cluster_size() as usize, 0);
                let again = Header::parse(&cluster).expect("a serialised header parses");
                assert_eq!(again.serialize().expect("and serialises again"), bytes);
            }
            h.cluster_bits
        }
        Err(_) => 16,
    };
    for chunk in data.chunks_exact(8) {
        let e = u64::from_be_bytes(chunk.try_into().unwrap());
        let _ = entry::decode_l1(e, bits);
        for version in [2, 3] {
            if let Ok(entry::Cluster::Compressed { offset, len }) = entry::decode_l2(e, bits, version) {
                let _ = entry::compressed_clusters(offset, len, bits);
            }
        }
    }
    let mut out = vec![0u8; 1 << bits.min(16)];
    let _ = entry::decompress(Compression::Deflate, data, &mut out);
    let _ = entry::decompress(Compression::Zstd, data, &mut out);
    if data.len() >= 512 {
        let mut block = data[..512].to_vec();
        for order in 0..=6 {
            let n = refcount::per_block(order, 9) as usize;
            for i in (0..n).step_by(7) {
                let v = refcount::get(&block, order, i);
                refcount::set(&mut block, order, i, v);
                assert_eq!(refcount::get(&block, order, i), v);
            }
        }
    }
});
