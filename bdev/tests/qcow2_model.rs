//! Model-based test of the qcow2 driver: random sequences of writes
//! (aligned and not, inside one cluster and across several), compressed
//! writes of whole clusters (of data that compresses and of data that
//! does not), write-zeroes with and without MAY_UNMAP, discards, flushes
//! and reopens go to a qcow2
//! node and to a flat buffer, and after every step the node must read as
//! the buffer. Each sequence runs twice: on the simulated disk (`x-sim`,
//! completing requests in a seeded order) and on a real file, which
//! `qemu-img check` must then find free of corruption.
//!
//! Cluster sizes of 512 B and 4 KiB (and QEMU's 64 KiB), 16- and 64-bit
//! refcounts and small caches: sequences make new L2 tables and refcount
//! blocks, evict from both caches and, with 64-bit refcounts and 512-byte
//! clusters, grow the refcount table.
//!
//! `PROPTEST_CASES` sets the number of sequences (default 12 per test).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bdev::drivers::qcow2::create::{CreateOptions, layout};
use bdev::drivers::sim::SimDisk;
use bdev::{IoFlags, Node};
use common::Env;
use proptest::prelude::*;
use reactor::IoBuf;
use serde_json::{Value, json};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The image's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    size: u64,
    cluster: u64,
    refcount_bits: u32,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        seed: u8,
    },
    /// Whole clusters, stored compressed where `text` (data that compresses).
    Compressed {
        offset: u64,
        len: u64,
        seed: u8,
        text: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
    Reopen,
}

fn shape() -> impl Strategy<Value = Shape> {
    (prop_oneof![Just(512u64), Just(4 * KIB), Just(64 * KIB)], prop_oneof![Just(16u32), Just(64)]).prop_map(
        |(cluster, refcount_bits)| Shape {
            size: if cluster == 512 { 3 * MIB } else { 8 * MIB },
            cluster,
            refcount_bits,
        },
    )
}

/// A range: aligned to the cluster, to a sector, or to nothing; short,
/// about a cluster, or a few clusters long.
fn range(shape: Shape) -> impl Strategy<Value = (u64, u64)> {
    let cs = shape.cluster;
    let size = shape.size;
    (0..size, 0u8..3, 0u8..3, 1u64..4096).prop_map(move |(at, align, kind, n)| {
        let offset = match align {
            0 => at / cs * cs,
            1 => at / 512 * 512,
            _ => at,
        };
        let len = match kind {
            0 => n % 1024 + 1,
            1 => cs - (offset % cs) + n % 600,
            _ => (n % 4 + 1) * cs + n % 512,
        };
        (offset, len.min(size - offset).max(1))
    })
}

fn op(shape: Shape) -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (range(shape), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        4 => (0..shape.size / shape.cluster, 1u64..4, any::<u8>(), prop::bool::weighted(0.8)).prop_map(
            move |(c, n, seed, text)| {
                let offset = c * shape.cluster;
                Op::Compressed { offset, len: (n * shape.cluster).min(shape.size - offset), seed, text }
            }
        ),
        3 => (range(shape), any::<bool>()).prop_map(|((offset, len), unmap)| Op::Zero { offset, len, unmap }),
        2 => range(shape).prop_map(|(offset, len)| Op::Discard { offset, len }),
        2 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn case() -> impl Strategy<Value = (Shape, Vec<Op>)> {
    shape().prop_flat_map(|s| (Just(s), prop::collection::vec(op(s), 1..60)))
}

fn pattern(offset: u64, len: u64, seed: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|at| ((at / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (at % 8 * 8)) as u8 ^ seed)
        .collect()
}

/// Bytes that compress: lines naming their place.
fn text(offset: u64, len: u64, seed: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|at| match at % 32 {
            0..8 => ((at / 32) >> (at % 8 * 8)) as u8,
            8 => seed,
            k => b'a' + (k % 26) as u8,
        })
        .collect()
}

fn data(op: Op) -> Vec<u8> {
    match op {
        Op::Write { offset, len, seed } | Op::Compressed { offset, len, seed, text: false } => {
            pattern(offset, len, seed)
        }
        Op::Compressed { offset, len, seed, text: true } => text(offset, len, seed),
        _ => Vec::new(),
    }
}

/// The flat model of the disk.
fn model(flat: &mut [u8], op: Op, cluster: u64) {
    match op {
        Op::Write { offset, len, .. } | Op::Compressed { offset, len, .. } => {
            flat[offset as usize..(offset + len) as usize].copy_from_slice(&data(op))
        }
        Op::Zero { offset, len, .. } => flat[offset as usize..(offset + len) as usize].fill(0),
        // A discard drops whole clusters (they read as zeroes) and leaves
        // the parts of clusters it covers partly as they were, as QEMU does.
        Op::Discard { offset, len } => {
            let (start, end) = (offset.next_multiple_of(cluster), (offset + len) / cluster * cluster);
            if start < end {
                flat[start as usize..end as usize].fill(0);
            }
        }
        Op::Flush | Op::Reopen => {}
    }
}

/// What to compare after `op`: its range widened by a cluster each side.
fn window(op: Op, shape: Shape) -> Option<(u64, u64)> {
    let (offset, len) = match op {
        Op::Write { offset, len, .. }
        | Op::Compressed { offset, len, .. }
        | Op::Zero { offset, len, .. }
        | Op::Discard { offset, len } => (offset, len),
        Op::Flush => return None,
        Op::Reopen => return Some((0, shape.size)),
    };
    let start = offset.saturating_sub(shape.cluster);
    Some((start, (offset + len + shape.cluster).min(shape.size) - start))
}

async fn send(ch: &bdev::BlockChannel, op: Op) -> Result<(), String> {
    let res = match op {
        Op::Write { offset, .. } => ch.write(offset, IoBuf::from_slice(&data(op)), IoFlags::NONE).await.1,
        Op::Compressed { offset, .. } => ch.write(offset, IoBuf::from_slice(&data(op)), IoFlags::COMPRESS).await.1,
        Op::Zero { offset, len, unmap } => {
            ch.write_zeroes(offset, len, if unmap { IoFlags::MAY_UNMAP } else { IoFlags::NONE }).await
        }
        Op::Discard { offset, len } => ch.discard(offset, len).await,
        Op::Flush => ch.flush().await,
        Op::Reopen => Ok(()),
    };
    res.map_err(|e| format!("{op:?} failed: {e}"))
}

/// Reads `want.len()` bytes at `start` and compares them with `want`.
async fn compare(ch: &bdev::BlockChannel, start: u64, want: &[u8]) -> Result<(), String> {
    let len = want.len();
    let got = ch.read(start, len).await.map_err(|e| format!("read {start:#x}+{len:#x}: {e}"))?;
    match (0..len).find(|&i| got[i] != want[i]) {
        None => Ok(()),
        Some(i) => Err(format!("byte {:#x} reads {:#x}, the model has {:#x}", start + i as u64, got[i], want[i])),
    }
}

fn qcow2_opts(file: &Value) -> Value {
    json!({"driver": "qcow2", "node-name": "q", "discard": "unmap", "file": file, "overlap-check": "all",
        "l2-cache-size": 4 * 4096, "refcount-cache-size": 4 * 4096})
}

/// Runs `ops` on a qcow2 node over `file` (a node name or inline
/// options); the first difference from the model, if any.
fn run_ops(env: &mut Env, file: Value, shape: Shape, ops: &[Op]) -> Result<(), String> {
    let mut node: Arc<Node> = env.add(qcow2_opts(&file));
    let mut flat = vec![0u8; shape.size as usize];
    for (step, &op) in ops.iter().enumerate() {
        model(&mut flat, op, shape.cluster);
        if matches!(op, Op::Reopen) {
            env.graph.remove("q").map_err(|e| format!("step {step}: closing: {e}"))?;
            node = env.graph.add(qcow2_opts(&file)).map_err(|e| format!("step {step}: reopening: {e}"))?;
        }
        let want = window(op, shape).map(|(s, l)| (s, flat[s as usize..(s + l) as usize].to_vec()));
        let res = env.on(0, &node, move |ch| async move {
            send(&ch, op).await?;
            match want {
                Some((start, want)) => compare(&ch, start, &want).await,
                None => Ok(()),
            }
        });
        res.map_err(|e| format!("step {step}, {op:?}: {e}"))?;
    }
    let whole = flat.clone();
    env.on(0, &node, move |ch| async move { compare(&ch, 0, &whole).await }).map_err(|e| format!("at the end: {e}"))?;
    env.graph.remove("q").map_err(|e| format!("closing: {e}"))
}

fn on_sim(shape: Shape, ops: &[Op], seed: u64) -> Result<(), String> {
    static KEYS: AtomicU64 = AtomicU64::new(0);
    let opts = CreateOptions { size: shape.size, cluster_size: Some(shape.cluster), ..Default::default() };
    let order = shape.refcount_bits.trailing_zeros();
    let disk = SimDisk::with_options(layout(&opts, order).unwrap().to_bytes(), seed, 512, true);
    let key = format!("qcow2-model-{}", KEYS.fetch_add(1, Ordering::Relaxed));
    disk.register(&key);
    let mut env = Env::new();
    env.add(json!({"driver": "x-sim", "node-name": "disk", "sim": key}));
    run_ops(&mut env, json!("disk"), shape, ops)
}

fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn on_file(shape: Shape, ops: &[Op], dir: &Path) -> Result<(), String> {
    let path = dir.join("model.qcow2");
    let _ = std::fs::remove_file(&path);
    let p = path.to_str().unwrap();
    let o = format!("cluster_size={},refcount_bits={}", shape.cluster, shape.refcount_bits);
    let (code, text) = qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, p, &shape.size.to_string()]);
    assert_eq!(code, 0, "{text}");
    // Opened with each qcow2 node: a file node's size is fixed when it
    // opens, and the image grows.
    let mut env = Env::new();
    run_ops(&mut env, json!({"driver": "file", "filename": p}), shape, ops)?;
    drop(env);
    let (code, text) = qemu_img(&["check", "-f", "qcow2", p]);
    if code != 0 {
        return Err(format!("qemu-img check exited {code}:\n{text}"));
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn qcow2_on_the_simulated_disk_reads_as_the_model((shape, ops) in case(), seed in any::<u64>()) {
        if let Err(e) = on_sim(shape, &ops, seed) {
            prop_assert!(false, "{shape:?}, disk seed {seed}: {e}");
        }
    }

    #[test]
    fn qcow2_on_a_file_reads_as_the_model_and_checks_clean((shape, ops) in case()) {
        let dir = tempfile::tempdir().unwrap();
        if let Err(e) = on_file(shape, &ops, dir.path()) {
            prop_assert!(false, "{shape:?}: {e}");
        }
    }
}

/// Ten rounds of writing the whole disk and discarding all of it, through
/// a node with `discard: unmap`, without a flush: the image file stays
/// within 10 % of its size after the first round, and checks clean.
#[test]
fn discard_churn_keeps_the_image_file_size() {
    let shm = Path::new("/dev/shm");
    // tmpfs: buffered, so the file is not grown ahead of the allocator.
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let path = dir.path().join("churn.qcow2");
    let p = path.to_str().unwrap();
    let size = 8 * MIB;
    let (code, text) = qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, &size.to_string()]);
    assert_eq!(code, 0, "{text}");
    let mut env = Env::new();
    let node = env.add(qcow2_opts(&json!({"driver": "file", "filename": p})));
    let len = || std::fs::metadata(&path).unwrap().len();
    let mut after_first = 0;
    for round in 0..10u8 {
        env.on(0, &node, move |ch| async move {
            for k in 0..size / (64 * KIB) {
                let at = k * 64 * KIB;
                ch.write(at, IoBuf::from_slice(&pattern(at, 64 * KIB, round)), IoFlags::NONE).await.1.unwrap();
            }
            ch.discard(0, size).await.unwrap();
        });
        if round == 0 {
            after_first = len();
        }
    }
    let last = len();
    assert!(last * 10 <= after_first * 11, "the image file grew from {after_first} to {last} bytes in 10 rounds");
    env.graph.remove("q").unwrap();
    drop(env);
    let (code, text) = qemu_img(&["check", "-f", "qcow2", p]);
    assert_eq!(code, 0, "{text}");
}
