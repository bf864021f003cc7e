//! One conformance suite, run against every device driver: read after
//! write, zeroes, discard, flush, boundaries, unaligned, large and
//! concurrent I/O, on one reactor and across reactors.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bdev::drivers::qcow2::create::{CreateOptions, layout};
use bdev::drivers::sim::SimDisk;
use bdev::{IoError, IoFlags, Node};
use common::{Env, pattern};
use reactor::IoBuf;
use serde_json::json;

const SIZE: u64 = 16 << 20;

struct Target {
    name: &'static str,
    env: Env,
    node: Arc<Node>,
    /// Discarded ranges read back as zeroes (true for file and malloc).
    discard_zeroes: bool,
    _dir: Option<tempfile::TempDir>,
}

fn file_target(direct: bool) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let mut env = Env::new();
    let node = env.add(json!({"driver": "file", "node-name": "f0", "filename": path.to_str().unwrap(), "discard": "unmap", "cache": {"direct": direct}}));
    assert_eq!(node.describe()["cache"]["direct"], json!(direct));
    if direct {
        assert!(node.bdev().block_size() >= 512, "O_DIRECT implies an alignment");
    }
    Target {
        name: if direct { "file-direct" } else { "file-buffered" },
        env,
        node,
        discard_zeroes: true,
        _dir: Some(dir),
    }
}

fn targets() -> Vec<Target> {
    let mut out = vec![file_target(false), file_target(true)];
    let mut env = Env::new();
    let node = env.add(json!({"driver": "malloc", "node-name": "m0", "size": SIZE, "discard": "unmap"}));
    out.push(Target { name: "malloc", env, node, discard_zeroes: true, _dir: None });
    let mut env = Env::new();
    let node =
        env.add(json!({"driver": "malloc", "node-name": "m4k", "size": SIZE, "block-size": 4096, "discard": "unmap"}));
    out.push(Target { name: "malloc-4k", env, node, discard_zeroes: true, _dir: None });
    // raw over file, with a window offset.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE + (1 << 20)).unwrap();
    let mut env = Env::new();
    let node = env.add(json!({"driver": "raw", "node-name": "r0", "offset": 1 << 20, "size": SIZE, "discard": "unmap",
        "file": {"driver": "file", "filename": path.to_str().unwrap(), "discard": "unmap"}}));
    out.push(Target { name: "raw-offset", env, node, discard_zeroes: true, _dir: Some(dir) });
    // blkdebug without rules: a pass-through filter.
    let mut env = Env::new();
    let node = env.add(json!({"driver": "blkdebug", "node-name": "d0", "discard": "unmap",
        "image": {"driver": "malloc", "size": SIZE, "discard": "unmap"}}));
    out.push(Target { name: "blkdebug", env, node, discard_zeroes: true, _dir: None });
    out.push(qcow2_target(false));
    out.push(qcow2_target(true));
    // The simulated disk, completing each tick's requests in a seeded order.
    let mut env = Env::new();
    let node = env.add(
        json!({"driver": "x-sim", "node-name": "s0", "size": SIZE, "seed": 7, "reorder": true, "discard": "unmap"}),
    );
    out.push(Target { name: "x-sim", env, node, discard_zeroes: true, _dir: None });
    // qcow2 on it, laid out in memory.
    let opts = CreateOptions { size: SIZE, cluster_size: Some(4096), ..Default::default() };
    let disk = SimDisk::new(layout(&opts, 4).unwrap().to_bytes(), 9);
    // Tests run in parallel: one key per disk.
    static DISKS: AtomicU64 = AtomicU64::new(0);
    let key = format!("conformance-qcow2-{}", DISKS.fetch_add(1, Ordering::Relaxed));
    disk.register(&key);
    let mut env = Env::new();
    let node = env.add(
        json!({"driver": "qcow2", "node-name": "qs", "discard": "unmap", "file": {"driver": "x-sim", "sim": key}}),
    );
    out.push(Target { name: "qcow2-on-x-sim", env, node, discard_zeroes: true, _dir: None });
    out
}

/// A qcow2 image made by qemu-img, optionally over a backing file full of 0xb0.
fn qcow2_target(with_backing: bool) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let mut create = std::process::Command::new("qemu-img");
    create.args(["create", "-q", "-f", "qcow2"]);
    if with_backing {
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0xb0u8; SIZE as usize]).unwrap();
        create.args(["-o", "cluster_size=4096,backing_file=base.raw,backing_fmt=raw"]);
    }
    let out = create.arg(&img).arg(SIZE.to_string()).output().expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut env = Env::new();
    let node = env.add(json!({"driver": "qcow2", "node-name": "q", "discard": "unmap", "file": {"driver": "file", "filename": img.to_str().unwrap()}}));
    Target {
        name: if with_backing { "qcow2-backing" } else { "qcow2" },
        env,
        node,
        discard_zeroes: true,
        _dir: Some(dir),
    }
}

fn for_each(test: impl Fn(&Target)) {
    for t in targets() {
        eprintln!("-- {}", t.name);
        test(&t);
    }
}

async fn write_pattern(ch: &bdev::BlockChannel, offset: u64, len: usize, seed: u8) {
    let (_, res) = ch.write(offset, IoBuf::from_slice(&pattern(offset, len, seed)), IoFlags::NONE).await;
    res.unwrap();
}

async fn expect_pattern(ch: &bdev::BlockChannel, offset: u64, len: usize, seed: u8) {
    let got = ch.read(offset, len).await.unwrap();
    assert!(got[..] == pattern(offset, len, seed)[..], "pattern mismatch at {offset}+{len}");
}

async fn expect_zero(ch: &bdev::BlockChannel, offset: u64, len: usize) {
    let got = ch.read(offset, len).await.unwrap();
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!("byte {} not zero after zeroing {offset}+{len}", offset + i as u64);
    }
}

#[test]
fn read_after_write() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move {
            for (off, len) in [(0u64, 4096usize), (4096, 512), (65536, 65536), (SIZE - 4096, 4096), (1 << 20, 131072)] {
                write_pattern(&ch, off, len, 1).await;
                expect_pattern(&ch, off, len, 1).await;
            }
        });
    });
}

#[test]
fn unaligned_byte_ranges_round_trip() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move {
            write_pattern(&ch, 0, 16384, 2).await;
            write_pattern(&ch, 1000, 3, 3).await;
            expect_pattern(&ch, 1000, 3, 3).await;
            // Neighbours of the small write are untouched.
            expect_pattern(&ch, 0, 1000, 2).await;
            expect_pattern(&ch, 1003, 16384 - 1003, 2).await;
            write_pattern(&ch, 4090, 5000, 4).await;
            expect_pattern(&ch, 4090, 5000, 4).await;
            expect_pattern(&ch, 9090, 16384 - 9090, 2).await;
            // Unaligned zeroing keeps the edges.
            ch.write_zeroes(100, 5000, IoFlags::NONE).await.unwrap();
            expect_zero(&ch, 100, 5000).await;
            expect_pattern(&ch, 0, 100, 2).await;
        });
    });
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move {
            write_pattern(&ch, 0, 1 << 20, 5).await;
            ch.write_zeroes(4096, 65536, IoFlags::NONE).await.unwrap();
            expect_zero(&ch, 4096, 65536).await;
            ch.write_zeroes(131072, 131072, IoFlags::MAY_UNMAP).await.unwrap();
            expect_zero(&ch, 131072, 131072).await;
            expect_pattern(&ch, 0, 4096, 5).await;
            expect_pattern(&ch, 69632, 131072 - 69632, 5).await;
            expect_pattern(&ch, 262144, (1 << 20) - 262144, 5).await;
        });
    });
}

#[test]
fn discard_and_flush() {
    for_each(|t| {
        let zeroes = t.discard_zeroes;
        t.env.on(0, &t.node, move |ch| async move {
            write_pattern(&ch, 0, 1 << 20, 6).await;
            ch.flush().await.unwrap();
            ch.discard(65536, 262144).await.unwrap();
            if zeroes {
                expect_zero(&ch, 65536, 262144).await;
            }
            expect_pattern(&ch, 0, 65536, 6).await;
            let (_, res) = ch.write(0, IoBuf::from_slice(&pattern(0, 4096, 7)), IoFlags::FUA).await;
            res.unwrap();
            expect_pattern(&ch, 0, 4096, 7).await;
            ch.flush().await.unwrap();
        });
    });
}

#[test]
fn boundaries_are_enforced() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move {
            let size = ch.size();
            assert_eq!(size, SIZE);
            assert_eq!(ch.read(size - 512, 1024).await.unwrap_err(), IoError::OutOfRange);
            assert_eq!(ch.read(size, 512).await.unwrap_err(), IoError::OutOfRange);
            assert_eq!(ch.read(u64::MAX - 100, 512).await.unwrap_err(), IoError::OutOfRange);
            let (_, res) = ch.write(size, IoBuf::zeroed(512), IoFlags::NONE).await;
            assert_eq!(res.unwrap_err(), IoError::OutOfRange);
            assert_eq!(ch.write_zeroes(size - 512, 1024, IoFlags::NONE).await.unwrap_err(), IoError::OutOfRange);
            assert_eq!(ch.read(0, (bdev::IO_BYTES_MAX + 512) as usize).await.unwrap_err(), IoError::Invalid);
            // Zero-length requests succeed and touch nothing.
            assert_eq!(ch.read(0, 0).await.unwrap().len(), 0);
            // The last block works.
            write_pattern(&ch, size - 512, 512, 8).await;
            expect_pattern(&ch, size - 512, 512, 8).await;
        });
    });
}

#[test]
fn large_io() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move {
            write_pattern(&ch, 4096, 8 << 20, 9).await;
            expect_pattern(&ch, 4096, 8 << 20, 9).await;
        });
    });
}

#[test]
fn many_concurrent_requests() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move {
            let n = 256u64;
            let blk = 8192u64;
            let writes: Vec<_> = (0..n)
                .map(|i| {
                    let ch = ch.clone();
                    reactor::spawn_local(async move { write_pattern(&ch, i * blk, blk as usize, 10).await })
                })
                .collect();
            for w in writes {
                w.await;
            }
            let reads: Vec<_> = (0..n)
                .map(|i| {
                    let ch = ch.clone();
                    reactor::spawn_local(async move { expect_pattern(&ch, i * blk, blk as usize, 10).await })
                })
                .collect();
            for r in reads {
                r.await;
            }
        });
    });
}

#[test]
fn data_written_on_one_reactor_reads_on_another() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move { write_pattern(&ch, 12345, 70000, 11).await });
        t.env.on(1, &t.node, |ch| async move { expect_pattern(&ch, 12345, 70000, 11).await });
    });
}

#[test]
fn block_status_covers_the_queried_range() {
    for_each(|t| {
        t.env.on(0, &t.node, |ch| async move {
            write_pattern(&ch, 0, 65536, 12).await;
            let st = ch.block_status(0, SIZE).await.unwrap();
            assert!(st.len > 0 && st.len <= SIZE);
            assert!(st.allocated);
            assert!(st.data, "written data must show as data");
            assert!(ch.block_status(SIZE, 1).await.is_err());
        });
    });
}

#[test]
fn read_only_nodes_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![0x5a; 65536]).unwrap();
    let mut env = Env::new();
    let node =
        env.add(json!({"driver": "file", "node-name": "ro", "filename": path.to_str().unwrap(), "read-only": true}));
    env.on(0, &node, |ch| async move {
        assert!(ch.read_only());
        let (_, res) = ch.write(0, IoBuf::zeroed(512), IoFlags::NONE).await;
        assert_eq!(res.unwrap_err(), IoError::ReadOnly);
        assert_eq!(ch.write_zeroes(0, 512, IoFlags::NONE).await.unwrap_err(), IoError::ReadOnly);
        assert_eq!(ch.discard(0, 512).await.unwrap_err(), IoError::ReadOnly);
        assert!(ch.read(0, 512).await.unwrap().iter().all(|&b| b == 0x5a));
    });
}

#[test]
fn file_holes_report_zero_and_data_reports_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let mut env = Env::new();
    let node = env.add(json!({"driver": "file", "node-name": "s", "filename": path.to_str().unwrap()}));
    env.on(0, &node, |ch| async move {
        let st = ch.block_status(0, SIZE).await.unwrap();
        assert!(st.zero && !st.data, "a fresh sparse file is a hole: {st:?}");
        write_pattern(&ch, 1 << 20, 65536, 13).await;
        ch.flush().await.unwrap();
        let st = ch.block_status(0, SIZE).await.unwrap();
        assert!(st.zero && st.len <= 1 << 20, "hole before the data: {st:?}");
        let st = ch.block_status(1 << 20, SIZE).await.unwrap();
        assert!(st.data && st.offset == Some(1 << 20), "data run: {st:?}");
    });
}

#[test]
fn null_device_reads_zeroes_when_asked_and_accepts_everything() {
    let mut env = Env::new();
    let zeroes = env.add(json!({"driver": "null-co", "node-name": "nz", "size": 1 << 20, "read-zeroes": true}));
    let plain = env.add(json!({"driver": "null-co", "node-name": "np"}));
    assert_eq!(plain.size(), 1 << 30);
    env.on(0, &zeroes, |ch| async move {
        let mut buf = IoBuf::new(4096);
        buf.fill(0xff);
        let (io, res) = ch.submit_io(bdev::Io::read(0, buf)).await;
        res.unwrap();
        assert!(io.buf.unwrap().iter().all(|&b| b == 0));
        assert!(ch.block_status(0, 4096).await.unwrap().zero);
    });
    env.on(1, &plain, |ch| async move {
        let (_, res) = ch.write(0, IoBuf::zeroed(4096), IoFlags::FUA).await;
        res.unwrap();
        ch.flush().await.unwrap();
        ch.discard(0, 1 << 20).await.unwrap();
        assert!(ch.block_status(0, 4096).await.unwrap().data);
    });
    let slow = env.add(json!({"driver": "null-co", "node-name": "nl", "size": 1 << 20, "latency-ns": 2_000_000}));
    let t0 = std::time::Instant::now();
    env.on(0, &slow, |ch| async move { ch.read(0, 512).await.unwrap() });
    assert!(t0.elapsed() >= std::time::Duration::from_millis(2));
}

#[test]
fn detect_zeroes_turns_zero_writes_into_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dz.img");
    std::fs::write(&path, vec![0x11u8; 1 << 20]).unwrap();
    let mut env = Env::new();
    let node = env.add(json!({"driver": "file", "node-name": "dz", "filename": path.to_str().unwrap(), "detect-zeroes": "unmap", "discard": "unmap"}));
    env.on(0, &node, |ch| async move {
        let (_, res) = ch.write(0, IoBuf::zeroed(1 << 20), IoFlags::NONE).await;
        res.unwrap();
        expect_zero(&ch, 0, 1 << 20).await;
        ch.flush().await.unwrap();
        let st = ch.block_status(0, 1 << 20).await.unwrap();
        assert!(st.zero, "zero write with detect-zeroes=unmap must punch a hole: {st:?}");
    });
}

#[test]
fn discard_is_ignored_by_default() {
    let mut env = Env::new();
    let node = env.add(json!({"driver": "malloc", "node-name": "m", "size": 1 << 20}));
    env.on(0, &node, |ch| async move {
        write_pattern(&ch, 0, 65536, 14).await;
        ch.discard(0, 65536).await.unwrap();
        // discard=ignore (QEMU's default): the data stays.
        expect_pattern(&ch, 0, 65536, 14).await;
    });
}

#[test]
fn reads_across_end_of_file_return_zeroes_after_a_short_read() {
    // The node keeps its size when the file shrinks underneath it: a read
    // that straddles the new end of file gets a short read, continues, hits
    // end of file, and fills the rest with zeroes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shrink.img");
    std::fs::write(&path, vec![0x33u8; 1 << 20]).unwrap();
    let mut env = Env::new();
    let node = env.add(
        json!({"driver": "file", "node-name": "s", "filename": path.to_str().unwrap(), "cache": {"direct": false}}),
    );
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(512 << 10).unwrap();
    env.on(0, &node, |ch| async move {
        let got = ch.read(448 << 10, 128 << 10).await.unwrap();
        assert!(got[..64 << 10].iter().all(|&b| b == 0x33), "bytes before end of file");
        assert!(got[64 << 10..].iter().all(|&b| b == 0), "bytes past end of file read as zero");
    });
}
