//! Test support for the qcow2 modules: new images laid out in memory
//! (`create::layout`) on a simulated disk (`x-sim`), opened the way the
//! driver opens them, and `qemu-img check` as the judge of what a crash
//! leaves.

use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use reactor::{IoBuf, Reactor, ReactorOptions};
use serde_json::Value;

use super::create::{CreateOptions, layout};
use super::overlap::kind;
use super::state::{Alarm, CacheSizes, Qcow2, Settings};
use super::{Qcow2Channel, read_header_from};
use crate::bdev::Bdev;
use crate::channel::{BlockChannel, ChannelPolicy};
use crate::drivers::sim::SimDisk;
use crate::io::IoFlags;
use crate::options::{DetectZeroes, DiscardMode};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// Runs `f` on a reactor of this thread until it completes.
pub fn run<T: 'static>(f: impl Future<Output = T> + 'static) -> T {
    Reactor::new(None, ReactorOptions::default()).expect("a reactor").block_on(f)
}

/// A new, empty image of `size` bytes on a simulated disk.
pub fn new_disk(size: u64, cluster: u64, refcount_order: u32) -> Arc<SimDisk> {
    let opts = CreateOptions { size, cluster_size: Some(cluster), ..Default::default() };
    SimDisk::new(layout(&opts, refcount_order).expect("a valid layout").to_bytes(), 1)
}

/// Caches of `l2` tables and `blocks` refcount blocks.
pub fn caches(l2: usize, blocks: usize) -> CacheSizes {
    CacheSizes { l2_tables: l2, refcount_blocks: blocks }
}

/// An image opened read-write: its state, a guest's channel on it, and
/// the events it sent.
pub struct Open {
    pub q: Rc<Qcow2>,
    pub ch: BlockChannel,
    pub events: Arc<Mutex<Vec<(String, Value)>>>,
}

/// Opens the image on `disk` (on the current reactor), with every overlap
/// check on.
pub async fn open(disk: &Arc<SimDisk>, caches: CacheSizes) -> Open {
    let file = disk.channel();
    let size = disk.size();
    let header = read_header_from(&file, size).await.expect("a valid header");
    let virtual_size = header.size;
    let events: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let sink = Arc::clone(&events);
    let alarm = Alarm {
        node_name: "test".into(),
        events: Some(Arc::new(move |name: &str, data: Value| {
            sink.lock().unwrap().push((name.to_string(), data));
        })),
        fenced: Arc::default(),
    };
    let settings = Settings { read_only: false, caches, grow: false, overlap_check: kind::ALL, alarm };
    let q = Qcow2::open(file, size, header, None, settings).await.expect("the image opens");
    let ch = BlockChannel::new(
        Rc::new(Qcow2Channel { state: Rc::clone(&q) }),
        ChannelPolicy {
            size: virtual_size,
            block_size: disk.block_size(),
            read_only: false,
            discard: DiscardMode::Unmap,
            detect_zeroes: DetectZeroes::Off,
            compress: true,
        },
    );
    Open { q, ch, events }
}

/// Deterministic bytes for a write: `seed` and the guest offset of each
/// 8-byte word.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let at = offset + i;
            ((at / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> ((at % 8) * 8)) as u8 ^ seed
        })
        .collect()
}

pub async fn write(ch: &BlockChannel, offset: u64, data: &[u8]) {
    let (_, res) = ch.write(offset, IoBuf::from_slice(data), IoFlags::NONE).await;
    res.unwrap_or_else(|e| panic!("write at {offset:#x}+{:#x}: {e}", data.len()));
}

pub async fn read(ch: &BlockChannel, offset: u64, len: usize) -> Vec<u8> {
    ch.read(offset, len).await.unwrap_or_else(|e| panic!("read at {offset:#x}+{len:#x}: {e}")).to_vec()
}

/// `qemu-img check` of an image held in memory: its exit code and output.
pub fn qemu_check(image: &[u8]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("image.qcow2");
    std::fs::write(&path, image).expect("the image is written");
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .expect("qemu-img runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Panics unless `qemu-img check` finds at most leaked clusters.
pub fn assert_consistent(image: &[u8], what: &str) {
    let (code, text) = qemu_check(image);
    assert!((code == 0 || code == 3) && !text.contains("ERROR"), "{what}: qemu-img check exited {code}:\n{text}");
}

/// Panics unless `qemu-img check` finds nothing at all (no leaks).
pub fn assert_clean(image: &[u8], what: &str) {
    let (code, text) = qemu_check(image);
    assert!(code == 0, "{what}: qemu-img check exited {code}:\n{text}");
}

/// splitmix64: seeded choices for workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One guest request of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zero { offset: u64, len: u64, unmap: bool },
    Discard { offset: u64, len: u64 },
    Flush,
}

impl Op {
    /// A random request on a disk of `size` bytes: sector aligned, up to
    /// `max_sectors` long, half of them starting on a cluster boundary.
    pub fn random(r: &mut Rng, size: u64, cluster: u64, max_sectors: u64, step: usize) -> Op {
        let sectors = size / 512;
        let mut start = r.below(sectors);
        if r.below(2) == 0 {
            start = start / (cluster / 512) * (cluster / 512);
        }
        let len = (1 + r.below(max_sectors)).min(sectors - start);
        let (offset, len) = (start * 512, len * 512);
        match r.below(100) {
            0..10 => Op::Flush,
            10..18 => Op::Zero { offset, len, unmap: r.below(2) == 0 },
            18..25 => Op::Discard { offset, len },
            _ => Op::Write { offset, len, seed: (step % 251) as u8 + 1 },
        }
    }

    /// Sends the request; panics if it fails.
    pub async fn apply(self, ch: &BlockChannel) {
        let res = match self {
            Op::Write { offset, len, seed } => {
                ch.write(offset, IoBuf::from_slice(&pattern(offset, len as usize, seed)), IoFlags::NONE).await.1
            }
            Op::Zero { offset, len, unmap } => {
                ch.write_zeroes(offset, len, if unmap { IoFlags::MAY_UNMAP } else { IoFlags::NONE }).await
            }
            Op::Discard { offset, len } => ch.discard(offset, len).await,
            Op::Flush => ch.flush().await,
        };
        res.unwrap_or_else(|e| panic!("{self:?}: {e}"));
    }

    /// Applies the request to a flat model of a disk with `cluster`-sized
    /// clusters. A discard leaves the parts of clusters it does not cover
    /// whole as they were and makes the rest read as zeroes (qcow2, as
    /// QEMU does it).
    pub fn model(self, flat: &mut [u8], cluster: u64) {
        match self {
            Op::Write { offset, len, seed } => {
                flat[offset as usize..(offset + len) as usize].copy_from_slice(&pattern(offset, len as usize, seed))
            }
            Op::Zero { offset, len, .. } => flat[offset as usize..(offset + len) as usize].fill(0),
            Op::Discard { offset, len } => {
                let start = offset.next_multiple_of(cluster);
                let end = (offset + len) / cluster * cluster;
                if start < end {
                    flat[start as usize..end as usize].fill(0);
                }
            }
            Op::Flush => {}
        }
    }
}
