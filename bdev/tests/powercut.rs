//! Power-cut simulation for the qcow2 driver.
//!
//! A guest writes to a qcow2 image that Spindle's qcow2 driver serves
//! over `x-journal` (see `journal/mod.rs`), which records every write and
//! flush the driver sends to the image file. Afterwards the record is
//! replayed into the images a disk with a volatile write cache could hold
//! after losing power — at a cut before each flush completes, the writes
//! made durable by earlier flushes, plus subsets of the others — and each
//! image is checked:
//!
//! - `qemu-img check` exits 0, or 3 (leaked clusters only), and prints no
//!   "ERROR";
//! - read through QEMU (`qemu-img convert -O raw`), every sector holds the
//!   newest guest write to it that was durable at the cut (acknowledged
//!   before a flush that was acknowledged before the cut, or a FUA write
//!   acknowledged before it), or a later one sent before the cut, or, where
//!   nothing durable went, the initial content or a write sent before the
//!   cut. A discard leaves zeroes or what it discarded.
//!
//! A SIGKILL cannot find ordering bugs between the driver and the disk:
//! the page cache survives a killed process. This can.
//!
//! Subsets checked per cut, of the `n` undecided writes in completion
//! order: every prefix (the disk wrote back in order and stopped), every
//! "all but one" (one write lost, the ones after it kept: a data write
//! missing under the metadata that points at it), and a few seeded random
//! subsets. The same set of writes is checked once, at the latest cut it
//! appears in (the strictest). When there are more than the budget, a
//! seeded sample is checked, plus every subset of the epochs that rewrite
//! the header (the refcount table moved). Tearing inside one write is not
//! modelled.
//!
//! Four workloads: `qcow2_plain` (one image), `qcow2_chain` (a top image
//! over a qcow2 backing file full of known data, so copy-on-write reads
//! the backing file), `qcow2_metadata` (512-byte clusters, 64-bit
//! refcounts, small caches, writes spread over 128 MiB: new L2 tables,
//! refcount blocks, refcount table growth and cache evictions) and
//! `qcow2_compressed` (as plain, half the writes compressed in whole
//! clusters, with data that compresses: packed compressed clusters,
//! normal writes into them, compressed writes over them, discards; an
//! entry written before its compressed data would not even decompress).
//! A fifth test checks the checks: replayed as if no flush had completed, the same
//! kind of workload must fail both `qemu-img check` and the data check.
//!
//! The driver runs with every metadata overlap check on (`overlap-check:
//! all`): a false alarm would fail the guest's requests.
//!
//! `SPINDLE_POWERCUT_SEED=N` reruns a seed (default: from the clock; a
//! failure prints it). The seed fixes the guest's requests and the subsets
//! drawn; the order in which the driver's own requests complete depends on
//! timing, so a failure may take a few reruns — a failing case keeps its
//! directory (the images that failed, the event record). Also:
//! `SPINDLE_POWERCUT_STATES` (images checked per workload, default 250;
//! 0: every one), `SPINDLE_POWERCUT_OPS` (guest requests per workload),
//! `SPINDLE_POWERCUT_VERBOSE=1` (a line per epoch).

mod common;
mod journal;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::{BlockChannel, IoFlags};
use common::Env;
use journal::{Cut, Event, Journal, Log, OpKind};
use reactor::IoBuf;
use serde_json::json;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const MAGIC: u64 = 0x5455_4352_4557_4f50; // "POWERCUT"
const DEFAULT_STATES: usize = 250;
/// Random subsets drawn per cut (besides prefixes and all-but-one).
const RANDOM_SUBSETS: usize = 4;
/// Failures collected before a workload stops checking.
const FAILURES_MAX: usize = 3;

// ---------------------------------------------------------------- seeds

/// splitmix64.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn base_seed() -> u64 {
    match std::env::var("SPINDLE_POWERCUT_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = if let Some(h) = s.strip_prefix("0x") { u64::from_str_radix(h, 16) } else { s.parse() };
            v.unwrap_or_else(|_| panic!("SPINDLE_POWERCUT_SEED={s}: not a number"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            Rng(t.as_nanos() as u64 ^ u64::from(std::process::id())).next() % 1_000_000_000_000
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{name}={s}: not a number")))
}

fn verbose() -> bool {
    std::env::var("SPINDLE_POWERCUT_VERBOSE").is_ok_and(|v| v != "0")
}

// ---------------------------------------------------------------- workloads

/// The shape of one workload.
#[derive(Debug, Clone)]
struct Shape {
    name: &'static str,
    /// Virtual size.
    size: u64,
    cluster: u64,
    refcount_bits: u32,
    /// A backing file with known data under the image.
    backing: bool,
    /// Guest requests (flushes included).
    ops: usize,
    /// Longest guest request, in sectors.
    max_sectors: u64,
    /// Half the requests land in the first `hot` bytes (rewrites), 0: none.
    hot: u64,
    /// qcow2 cache sizes (bytes), where not the driver's defaults.
    l2_cache: Option<u64>,
    refcount_cache: Option<u64>,
    /// Half the writes are compressed, in whole clusters, with data that
    /// compresses.
    compress: bool,
}

fn plain(r: &mut Rng) -> Shape {
    Shape {
        name: "qcow2_plain",
        size: 16 * MIB,
        cluster: r.pick(&[4 * KIB, 16 * KIB, 64 * KIB]),
        refcount_bits: 16,
        backing: false,
        ops: 300,
        max_sectors: 256,
        hot: 512 * KIB,
        l2_cache: None,
        refcount_cache: None,
        compress: false,
    }
}

fn compressed(r: &mut Rng) -> Shape {
    Shape { name: "qcow2_compressed", cluster: r.pick(&[4 * KIB, 64 * KIB]), compress: true, ..plain(r) }
}

fn chain(r: &mut Rng) -> Shape {
    Shape {
        name: "qcow2_chain",
        size: 8 * MIB,
        cluster: r.pick(&[4 * KIB, 64 * KIB]),
        refcount_bits: 16,
        backing: true,
        ops: 250,
        max_sectors: 256,
        hot: 512 * KIB,
        l2_cache: None,
        refcount_cache: None,
        compress: false,
    }
}

fn metadata(r: &mut Rng) -> Shape {
    Shape {
        name: "qcow2_metadata",
        size: 128 * MIB,
        cluster: 512,
        // 64-bit refcounts: a refcount block covers 32 KiB and the
        // image's one-cluster refcount table 2 MiB, so the table grows.
        refcount_bits: 64,
        backing: false,
        ops: 400,
        max_sectors: 128,
        hot: 0,
        l2_cache: Some(r.pick(&[8 * KIB, 32 * KIB])),
        refcount_cache: Some(2 * KIB),
        compress: false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GKind {
    /// `compress`: whole clusters, stored compressed.
    Write {
        fua: bool,
        compress: bool,
    },
    Zero {
        unmap: bool,
    },
    Discard,
    Flush,
}

/// One guest request; its id (in the data it writes) is its index + 1.
#[derive(Debug, Clone, Copy)]
struct GOp {
    kind: GKind,
    offset: u64,
    len: u64,
}

/// The guest's requests, in batches sent together (never overlapping
/// within a batch, so the order of two requests on a sector is the plan's).
#[derive(Debug)]
struct Plan {
    ops: Vec<GOp>,
    batches: Vec<Vec<usize>>,
    /// Guest data that compresses ([`sector_data`]).
    compressible: bool,
}

fn make_plan(shape: &Shape, r: &mut Rng) -> Plan {
    let total = env_usize("SPINDLE_POWERCUT_OPS").unwrap_or(shape.ops);
    let mut ops: Vec<GOp> = Vec::new();
    let mut batches = Vec::new();
    let sectors = shape.size / SECTOR;
    let cluster_sectors = shape.cluster / SECTOR;
    while ops.len() + 1 < total {
        let n = r.pick(&[1, 1, 2, 2, 3, 4]);
        let mut batch: Vec<usize> = Vec::new();
        let mut flushed = false;
        for _ in 0..n {
            let roll = r.below(100);
            if roll < 12 {
                if !flushed {
                    flushed = true;
                    batch.push(ops.len());
                    ops.push(GOp { kind: GKind::Flush, offset: 0, len: 0 });
                }
                continue;
            }
            let kind = match roll {
                12..20 => GKind::Zero { unmap: r.chance(1, 2) },
                20..27 => GKind::Discard,
                _ => GKind::Write { fua: r.chance(1, 20), compress: shape.compress && r.chance(1, 2) },
            };
            let whole = matches!(kind, GKind::Write { compress: true, .. });
            for _attempt in 0..4 {
                let mut len = match r.below(10) {
                    0..4 => r.range(1, 8),
                    4..8 => r.range(1, (2 * cluster_sectors).min(shape.max_sectors)),
                    _ => r.range(1, shape.max_sectors),
                };
                let area = if shape.hot > 0 && r.chance(1, 2) { shape.hot / SECTOR } else { sectors };
                let mut start = r.below(area);
                if whole || r.chance(1, 2) {
                    start = start / cluster_sectors * cluster_sectors;
                }
                if whole {
                    len = len.div_ceil(cluster_sectors) * cluster_sectors;
                }
                let len = len.min(sectors - start);
                let (offset, len) = (start * SECTOR, len * SECTOR);
                let overlaps = batch.iter().any(|&i| {
                    let o = ops[i];
                    o.kind != GKind::Flush && o.offset < offset + len && offset < o.offset + o.len
                });
                if !overlaps {
                    batch.push(ops.len());
                    ops.push(GOp { kind, offset, len });
                    break;
                }
            }
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
    }
    // A last flush: the final cut then holds everything durable.
    batches.push(vec![ops.len()]);
    ops.push(GOp { kind: GKind::Flush, offset: 0, len: 0 });
    Plan { ops, batches, compressible: shape.compress }
}

// ---------------------------------------------------------------- guest data

/// The content of sector `s` as written by guest request `id` (0: the
/// backing file's initial data): a magic, the sector, the id, then words
/// derived from both and their position — or, if `compressible`, the id
/// again up to the last word (what `classify` reads is the same).
fn sector_data(id: u64, s: u64, compressible: bool) -> [u8; SECTOR as usize] {
    const LAST: usize = SECTOR as usize / 8 - 1;
    let mut out = [0u8; SECTOR as usize];
    out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&s.to_le_bytes());
    out[16..24].copy_from_slice(&id.to_le_bytes());
    for (k, chunk) in out.chunks_mut(8).enumerate().skip(3) {
        let word = if compressible && k < LAST { id } else { fill_word(id, s, k) };
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

fn fill_word(id: u64, s: u64, k: usize) -> u64 {
    Rng(s.wrapping_mul(0x1000_0000_01b3) ^ id.rotate_left(32) ^ (k as u64).rotate_left(56)).next()
}

fn guest_data(id: u64, offset: u64, len: u64, compressible: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    for s in offset / SECTOR..(offset + len) / SECTOR {
        v.extend_from_slice(&sector_data(id, s, compressible));
    }
    v
}

/// What a sector holds, as far as the model can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Zero,
    /// Written by guest request `id` (0: initial backing data).
    Data(u64),
    Garbage,
}

/// Reads a sector: its header and last word (enough for whole-sector
/// writes: data of another sector or request, or shifted, fails).
fn classify(bytes: &[u8], s: u64) -> Val {
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    const LAST: usize = SECTOR as usize / 8 - 1;
    if word(0) == MAGIC && word(1) == s && word(LAST) == fill_word(word(2), s, LAST) {
        return Val::Data(word(2));
    }
    if bytes == [0u8; SECTOR as usize] { Val::Zero } else { Val::Garbage }
}

/// The backing file's data: two 64 KiB chunks of every three hold data
/// (id 0), the third reads as zeroes.
fn base_has_data(s: u64) -> bool {
    (s * SECTOR / (64 * KIB)) % 3 != 2
}

// ---------------------------------------------------------------- the guest

async fn guest(ch: BlockChannel, journal: Arc<Journal>, plan: Arc<Plan>) -> Vec<String> {
    let mut errors = Vec::new();
    for batch in &plan.batches {
        let jobs: Vec<_> = batch
            .iter()
            .map(|&i| {
                let (ch, journal, plan) = (ch.clone(), Arc::clone(&journal), Arc::clone(&plan));
                reactor::spawn_local(async move { one_request(&ch, &journal, &plan, i).await })
            })
            .collect();
        for job in jobs {
            if let Err(e) = job.await {
                errors.push(e);
            }
        }
    }
    errors
}

async fn one_request(ch: &BlockChannel, journal: &Journal, plan: &Plan, i: usize) -> Result<(), String> {
    let op = plan.ops[i];
    let id = i as u64 + 1;
    let buf = match op.kind {
        GKind::Write { .. } => Some(IoBuf::from_slice(&guest_data(id, op.offset, op.len, plan.compressible))),
        _ => None,
    };
    journal.mark(i as u64, false);
    let res = match op.kind {
        GKind::Write { fua, compress } => {
            let flags = if fua { IoFlags::FUA } else { IoFlags::NONE };
            let flags = if compress { flags | IoFlags::COMPRESS } else { flags };
            ch.write(op.offset, buf.expect("a write has data"), flags).await.1
        }
        GKind::Zero { unmap } => {
            ch.write_zeroes(op.offset, op.len, if unmap { IoFlags::MAY_UNMAP } else { IoFlags::NONE }).await
        }
        GKind::Discard => ch.discard(op.offset, op.len).await,
        GKind::Flush => ch.flush().await,
    };
    journal.mark(i as u64, true);
    res.map_err(|e| format!("guest request #{i} {op:?} failed: {e}"))
}

// ---------------------------------------------------------------- the model

/// What the guest was told, on the journal's time line.
struct Model {
    ops: Vec<GOp>,
    backing: bool,
    /// Event index of each request's sending and answer.
    sent: Vec<usize>,
    acked: Vec<Option<usize>>,
    /// Per touched sector, the requests that touched it, in order.
    history: BTreeMap<u64, Vec<usize>>,
}

impl Model {
    fn new(plan: &Plan, log: &Log, backing: bool) -> Model {
        let n = plan.ops.len();
        let (mut sent, mut acked) = (vec![usize::MAX; n], vec![None; n]);
        for (at, e) in log.events.iter().enumerate() {
            if let Event::Guest { tag, ack } = *e {
                if ack { acked[tag as usize] = Some(at) } else { sent[tag as usize] = at }
            }
        }
        let mut history: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        // Batches never overlap inside, so plan order is the order on every sector.
        for (i, op) in plan.ops.iter().enumerate() {
            if op.kind != GKind::Flush {
                for s in op.offset / SECTOR..(op.offset + op.len) / SECTOR {
                    history.entry(s).or_default().push(i);
                }
            }
        }
        Model { ops: plan.ops.clone(), backing, sent, acked, history }
    }

    fn initial(&self, s: u64) -> Val {
        if self.backing && base_has_data(s) { Val::Data(0) } else { Val::Zero }
    }

    /// The latest sending of a flush answered before `at`.
    fn flushed_upto(&self, at: usize) -> Option<usize> {
        (0..self.ops.len())
            .filter(|&i| self.ops[i].kind == GKind::Flush && self.acked[i].is_some_and(|a| a < at))
            .map(|i| self.sent[i])
            .max()
    }

    fn durable(&self, i: usize, at: usize, flushed_upto: Option<usize>) -> bool {
        let Some(a) = self.acked[i] else { return false };
        flushed_upto.is_some_and(|f| a < f) || (matches!(self.ops[i].kind, GKind::Write { fua: true, .. }) && a < at)
    }

    /// What sector `s` may hold at cut `at`.
    fn allowed(&self, s: u64, at: usize, flushed_upto: Option<usize>) -> Vec<Val> {
        let Some(hist) = self.history.get(&s) else { return vec![self.initial(s)] };
        let seen: Vec<usize> = hist.iter().copied().filter(|&i| self.sent[i] < at).collect();
        let value = |i: usize| match self.ops[i].kind {
            GKind::Write { .. } => Val::Data(i as u64 + 1),
            _ => Val::Zero,
        };
        let mut allowed = Vec::new();
        let from = match seen.iter().rposition(|&i| self.durable(i, at, flushed_upto)) {
            None => {
                allowed.push(self.initial(s));
                0
            }
            Some(mut d) => {
                // A discard may leave what it discarded.
                while self.ops[seen[d]].kind == GKind::Discard && d > 0 {
                    d -= 1;
                }
                if d == 0 && self.ops[seen[0]].kind == GKind::Discard {
                    allowed.push(self.initial(s));
                }
                d
            }
        };
        allowed.extend(seen[from..].iter().map(|&i| value(i)));
        allowed
    }

    /// `allowed(..).contains(&got)`, without allocating: newest first,
    /// down to the newest durable request (past it where it is a discard).
    /// Requests on one sector never overlap in time, so durability only
    /// grows towards older ones.
    fn is_allowed(&self, s: u64, got: Val, at: usize, flushed_upto: Option<usize>) -> bool {
        let Some(hist) = self.history.get(&s) else { return got == self.initial(s) };
        for &i in hist.iter().rev() {
            if self.sent[i] >= at {
                continue;
            }
            let kind = self.ops[i].kind;
            let value = if let GKind::Write { .. } = kind { Val::Data(i as u64 + 1) } else { Val::Zero };
            if value == got {
                return true;
            }
            if kind != GKind::Discard && self.durable(i, at, flushed_upto) {
                return false;
            }
        }
        got == self.initial(s)
    }

    /// Explains a sector that failed.
    fn describe(&self, s: u64, got: Val, at: usize, flushed_upto: Option<usize>) -> String {
        let mut m = format!(
            "sector {s} (guest offset {:#x}) holds {got:?}, allowed {:?}; initial {:?}; history:",
            s * SECTOR,
            self.allowed(s, at, flushed_upto),
            self.initial(s)
        );
        for &i in self.history.get(&s).map(Vec::as_slice).unwrap_or(&[]) {
            let _ = write!(
                m,
                "\n    #{i} (id {}) {:?} {:#x}+{:#x} sent@{} acked@{:?}{}{}",
                i + 1,
                self.ops[i].kind,
                self.ops[i].offset,
                self.ops[i].len,
                self.sent[i],
                self.acked[i],
                if self.sent[i] >= at { " (after the cut)" } else { "" },
                if self.durable(i, at, flushed_upto) { " durable" } else { "" },
            );
        }
        m
    }

    /// Checks the guest's view of an image (a raw file of the virtual
    /// size, sparse where it reads as zeroes); returns sectors checked.
    fn check_view(&self, raw: &Path, at: usize, size: u64) -> Result<u64, String> {
        use nix::unistd::{Whence, lseek};
        let f = std::fs::File::open(raw).map_err(|e| format!("{}: {e}", raw.display()))?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if len != size {
            return Err(format!("the converted image has {len} bytes, not {size}"));
        }
        let upto = self.flushed_upto(at);
        let mut checked = 0u64;
        let mut errors = Vec::new();
        let check = |s: u64, bytes: &[u8], errors: &mut Vec<String>| {
            let got = classify(bytes, s);
            let ok = self.is_allowed(s, got, at, upto);
            if !ok && errors.len() < 8 {
                errors.push(self.describe(s, got, at, upto));
            }
        };
        // Sectors that may not read as zeroes where the file has a hole.
        let interesting = |from: u64, to: u64| -> Vec<u64> {
            let mut v: Vec<u64> = self.history.range(from..to).map(|(&s, _)| s).collect();
            if self.backing {
                v.extend((from..to).filter(|&s| base_has_data(s) && !self.history.contains_key(&s)));
            }
            v
        };
        let zero = [0u8; SECTOR as usize];
        let mut pos = 0u64;
        let mut buf = vec![0u8; MIB as usize];
        while pos < size {
            let data = match lseek(&f, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => size,
                Err(e) => return Err(format!("SEEK_DATA: {e}")),
            };
            for s in interesting(pos / SECTOR, data / SECTOR) {
                check(s, &zero, &mut errors);
                checked += 1;
            }
            if data >= size {
                break;
            }
            let hole = match lseek(&f, data as i64, Whence::SeekHole) {
                Ok(h) => (h as u64).min(size),
                Err(e) => return Err(format!("SEEK_HOLE: {e}")),
            };
            let mut at_byte = data;
            while at_byte < hole {
                let n = (hole - at_byte).min(MIB) as usize;
                f.read_exact_at(&mut buf[..n], at_byte).map_err(|e| e.to_string())?;
                for (k, sector) in buf[..n].chunks(SECTOR as usize).enumerate() {
                    check(at_byte / SECTOR + k as u64, sector, &mut errors);
                    checked += 1;
                }
                at_byte += n as u64;
            }
            pos = hole;
        }
        if errors.is_empty() { Ok(checked) } else { Err(errors.join("\n")) }
    }
}

// ---------------------------------------------------------------- recording

/// A workload, run and recorded.
struct Recorded {
    shape: Shape,
    dir: PathBuf,
    /// The image file before the driver opened it.
    initial: Vec<u8>,
    plan: Arc<Plan>,
    log: Log,
    /// Events of the workload; the close's come after.
    end: usize,
    model: Model,
    workload_time: Duration,
}

fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img").args(args).output().expect("running qemu-img");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_img_ok(args: &[&str]) {
    let (code, text) = qemu_img(args);
    assert_eq!(code, 0, "qemu-img {args:?}: {text}");
}

/// Makes the image (and its backing file), runs the guest on it through
/// the qcow2 driver over `x-journal`, and closes it.
fn record(shape: &Shape, r: &mut Rng, dir: &Path) -> Recorded {
    let img = dir.join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    let layout = format!("cluster_size={},refcount_bits={}", shape.cluster, shape.refcount_bits);
    if shape.backing {
        let base_raw = dir.join("base.raw");
        let mut data = vec![0u8; shape.size as usize];
        for s in (0..shape.size / SECTOR).filter(|&s| base_has_data(s)) {
            let at = (s * SECTOR) as usize;
            data[at..at + SECTOR as usize].copy_from_slice(&sector_data(0, s, false));
        }
        std::fs::write(&base_raw, data).unwrap();
        let base = dir.join("base.qcow2");
        qemu_img_ok(&["convert", "-f", "raw", "-O", "qcow2", base_raw.to_str().unwrap(), base.to_str().unwrap()]);
        std::fs::remove_file(&base_raw).unwrap();
        let opts = format!("{layout},backing_file=base.qcow2,backing_fmt=qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &opts, img_s]);
    } else {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &layout, img_s, &shape.size.to_string()]);
    }
    let initial = std::fs::read(&img).unwrap();
    let plan = Arc::new(make_plan(shape, r));

    static NEXT_KEY: AtomicUsize = AtomicUsize::new(0);
    let key = format!("{}-{}", shape.name, NEXT_KEY.fetch_add(1, Ordering::Relaxed));
    let journal = Journal::new(&key);
    let t0 = Instant::now();
    let end = {
        let mut env = Env::new();
        journal::register(&mut env.graph);
        // block-size 512: sub-sector metadata updates reach the file as
        // read-modify-write of whole sectors, as with O_DIRECT. Every
        // overlap check is on: none may fire on a healthy image, whatever
        // the driver allocates and moves.
        let mut opts = json!({
            "driver": "qcow2", "node-name": "q", "discard": "unmap", "overlap-check": "all",
            "file": {"driver": journal::DRIVER, "journal": key, "block-size": 512,
                     "file": {"driver": "file", "filename": img_s, "cache": {"direct": false}}},
        });
        if let Some(b) = shape.l2_cache {
            opts["l2-cache-size"] = json!(b);
        }
        if let Some(b) = shape.refcount_cache {
            opts["refcount-cache-size"] = json!(b);
        }
        let q = env.add(opts);
        let (j, p) = (Arc::clone(&journal), Arc::clone(&plan));
        let errors = env.on(0, &q, move |ch| guest(ch, j, p));
        assert!(errors.is_empty(), "guest requests failed: {errors:?}");
        journal.len()
        // Dropping the graph closes the image (a last flush, recorded too).
    };
    let workload_time = t0.elapsed();
    let log = journal.snapshot();

    // The recorder itself: replaying everything gives the file as it is.
    assert!(log.ops.iter().all(|o| o.ok && o.completed.is_some()), "a request to the image file failed");
    let mut all: Vec<usize> = (0..log.ops.len()).filter(|&i| log.ops[i].kind != OpKind::Flush).collect();
    all.sort_by_key(|&i| log.ops[i].completed);
    assert!(
        log.image(&initial, all) == std::fs::read(&img).unwrap(),
        "replaying the whole journal does not give the image file"
    );

    if shape.compress {
        // The workload did store compressed clusters.
        let (code, map) = qemu_img(&["map", "--output=json", img_s]);
        assert_eq!(code, 0, "{map}");
        let map: serde_json::Value = serde_json::from_str(&map).unwrap();
        let compressed = map.as_array().unwrap().iter().filter(|e| e["compressed"] == true).count();
        assert!(compressed > 0, "no compressed cluster in the image: {map}");
    }
    let model = Model::new(&plan, &log, shape.backing);
    Recorded { shape: shape.clone(), dir: dir.to_path_buf(), initial, plan, log, end, model, workload_time }
}

// ---------------------------------------------------------------- states

/// One image to check: a cut, and which of its pending writes reached the disk.
#[derive(Debug, Clone)]
struct State {
    cut: usize,
    /// Positions in the cut's `pending`.
    chosen: Vec<usize>,
    label: String,
}

/// The subsets this test draws for a cut with `n` pending writes.
fn subsets(cut: usize, n: usize, r: &mut Rng) -> Vec<State> {
    let mut out: Vec<State> = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |chosen: Vec<usize>, label: String| {
        if seen.insert(chosen.clone()) {
            out.push(State { cut, chosen, label });
        }
    };
    for k in 0..=n {
        add((0..k).collect(), format!("prefix {k} of {n}"));
    }
    for k in 0..n {
        add((0..n).filter(|&i| i != k).collect(), format!("all but #{k} of {n}"));
    }
    if n >= 3 {
        for _ in 0..RANDOM_SUBSETS {
            let chosen: Vec<usize> = (0..n).filter(|_| r.chance(1, 2)).collect();
            let label = format!("random {chosen:?} of {n}");
            add(chosen, label);
        }
    }
    out
}

/// Every subset of every cut, cut down to `budget` (0: no limit) by a
/// seeded sample that keeps the last state (all writes of the last cut)
/// and those of epochs that rewrite the header;
/// then one state per set of writes on the medium, at the latest cut it
/// appears in (the strictest check). Returns the count before sampling too.
fn choose_states(log: &Log, cuts: &[Cut], r: &mut Rng, budget: usize) -> (usize, Vec<State>) {
    let mut states: Vec<State> = Vec::new();
    // Epochs that rewrite the header (the refcount table moved) are rare
    // and delicate: all their subsets are checked, whatever the budget.
    let mut always = 0;
    for (k, cut) in cuts.iter().enumerate() {
        let mut subs = subsets(k, cut.pending.len(), r);
        if cut.pending.iter().any(|&i| log.ops[i].kind == OpKind::Write && log.ops[i].offset == 0) {
            always += subs.len();
            states.splice(0..0, subs.drain(..));
        } else {
            states.extend(subs);
        }
    }
    let enumerated = states.len();
    if budget > 0 && states.len() > budget.max(always + 1) {
        let last = states.len() - 1;
        let mut idx: Vec<usize> = (always..last).collect();
        for i in (1..idx.len()).rev() {
            idx.swap(i, r.below(i as u64 + 1) as usize);
        }
        idx.truncate(budget.saturating_sub(always + 1));
        idx.extend(0..always);
        idx.push(last);
        idx.sort_unstable();
        states = idx.into_iter().map(|i| states[i].clone()).collect();
    }
    let mut by_ops: HashMap<Vec<usize>, usize> = HashMap::new();
    for (i, st) in states.iter().enumerate() {
        let cut = &cuts[st.cut];
        let mut ops: Vec<usize> =
            cut.durable.iter().copied().chain(st.chosen.iter().map(|&k| cut.pending[k])).collect();
        ops.sort_unstable();
        let e = by_ops.entry(ops).or_insert(i);
        if states[*e].cut < st.cut {
            *e = i;
        }
    }
    let mut unique: Vec<usize> = by_ops.into_values().collect();
    unique.sort_unstable();
    (enumerated, unique.into_iter().map(|i| states[i].clone()).collect())
}

// ---------------------------------------------------------------- checks

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailKind {
    /// `qemu-img check` found corruption (or could not check).
    Check,
    /// The guest's view lost a durable write (or could not be read).
    Data,
}

struct Failure {
    state: State,
    kinds: Vec<FailKind>,
    message: String,
    image: Vec<u8>,
}

#[derive(Default)]
struct Stats {
    checked: AtomicUsize,
    leaks: AtomicUsize,
    sectors: AtomicUsize,
}

/// What checking one image found.
struct Verdict {
    leaks: bool,
    sectors: u64,
    problems: Vec<(FailKind, String)>,
}

/// Checks one image file with QEMU's tools and the model (both checks
/// run whatever the first finds).
fn check_image(model: &Model, img: &Path, raw: &Path, at: usize, size: u64) -> Verdict {
    let img_s = img.to_str().unwrap();
    let mut v = Verdict { leaks: false, sectors: 0, problems: Vec::new() };
    let (code, text) = qemu_img(&["check", "-f", "qcow2", img_s]);
    if !(code == 0 || code == 3) || text.contains("ERROR") {
        v.problems.push((FailKind::Check, format!("qemu-img check exited {code}:\n{}", text.trim_end())));
    }
    v.leaks = code == 3;
    let (code, text) = qemu_img(&["convert", "-f", "qcow2", "-O", "raw", "-t", "unsafe", img_s, raw.to_str().unwrap()]);
    if code != 0 {
        v.problems.push((FailKind::Data, format!("qemu-img convert exited {code}:\n{}", text.trim_end())));
        return v;
    }
    match model.check_view(raw, at, size) {
        Ok(sectors) => v.sectors = sectors,
        Err(e) => v.problems.push((FailKind::Data, format!("guest data (read by qemu-img convert):\n{e}"))),
    }
    let _ = std::fs::remove_file(raw);
    v
}

/// Materialises and checks `states`, two at a time (one qemu-img each);
/// stops once `stop_after` failed.
fn check_states(rec: &Recorded, log: &Log, cuts: &[Cut], states: &[State], stop_after: usize) -> (Vec<Failure>, Stats) {
    let next = AtomicUsize::new(0);
    let failures: Mutex<Vec<Failure>> = Mutex::new(Vec::new());
    let stats = Stats::default();
    std::thread::scope(|sc| {
        for w in 0..2 {
            let (next, failures, stats) = (&next, &failures, &stats);
            sc.spawn(move || {
                let img = rec.dir.join(format!("state-{w}.qcow2"));
                let raw = rec.dir.join(format!("state-{w}.raw"));
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= states.len() || failures.lock().unwrap().len() >= stop_after {
                        break;
                    }
                    let st = &states[i];
                    let cut = &cuts[st.cut];
                    let bytes = log.image_of(&rec.initial, cut, &st.chosen);
                    std::fs::write(&img, &bytes).unwrap();
                    stats.checked.fetch_add(1, Ordering::Relaxed);
                    let v = check_image(&rec.model, &img, &raw, cut.at, rec.shape.size);
                    if v.problems.is_empty() {
                        stats.leaks.fetch_add(usize::from(v.leaks), Ordering::Relaxed);
                        stats.sectors.fetch_add(v.sectors as usize, Ordering::Relaxed);
                    } else {
                        let kinds = v.problems.iter().map(|p| p.0).collect();
                        let message = v.problems.into_iter().map(|p| p.1).collect::<Vec<_>>().join("\n");
                        failures.lock().unwrap().push(Failure { state: st.clone(), kinds, message, image: bytes });
                    }
                }
                let _ = std::fs::remove_file(&img);
            });
        }
    });
    (failures.into_inner().unwrap(), stats)
}

/// Writes the failing images and the event record into the case's
/// directory; returns the report.
fn report_failures(rec: &Recorded, log: &Log, cuts: &[Cut], failures: &[Failure]) -> String {
    std::fs::write(rec.dir.join("journal.txt"), log.dump(log.events.len())).unwrap();
    let mut report = String::new();
    for (n, f) in failures.iter().enumerate() {
        let name = format!("fail-{n}.qcow2");
        std::fs::write(rec.dir.join(&name), &f.image).unwrap();
        let cut = &cuts[f.state.cut];
        let chosen: Vec<usize> = f.state.chosen.iter().map(|&k| cut.pending[k]).collect();
        let _ = writeln!(
            report,
            "[{name}] epoch {} (cut before event {}): {} writes durable, pending ops {:?}, kept {} = ops {chosen:?}\n{}\n",
            f.state.cut,
            cut.at,
            cut.durable.len(),
            cut.pending,
            f.state.label,
            f.message
        );
    }
    report
}

fn work_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("spindle-powercut-");
    if shm.is_dir() { b.tempdir_in(shm) } else { b.tempdir() }.unwrap()
}

/// The seed of a workload, from the run's seed and its name.
fn workload_rng(seed: u64, name: &str) -> Rng {
    Rng(seed ^ Rng(name.bytes().fold(0u64, |h, b| h.wrapping_mul(131) ^ u64::from(b))).next())
}

/// Runs a workload and checks its states; the directory is kept and the
/// seed printed on failure.
fn run(name: &str, make: fn(&mut Rng) -> Shape) {
    let seed = base_seed();
    let mut r = workload_rng(seed, name);
    let shape = make(&mut r);
    let rerun = format!("SPINDLE_POWERCUT_SEED={seed} cargo test -p bdev --test powercut -- --exact {name}");
    let started = Instant::now();
    let dir = work_dir();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_checks(&shape, &mut r, dir.path())));
    let report = match res {
        Ok(report) => report,
        Err(p) => {
            let kept = dir.keep();
            eprintln!("{name}: panicked (seed {seed}); files kept in {}\nrerun: {rerun}", kept.display());
            std::panic::resume_unwind(p);
        }
    };
    if let Some(report) = report {
        let kept = dir.keep();
        panic!(
            "{name}: power-cut check failed (seed {seed}, {shape:?}):\n{report}files kept in {}\nrerun: {rerun}",
            kept.display()
        );
    }
    eprintln!("{name}: seed {seed}, {:.1} s", started.elapsed().as_secs_f64());
}

fn run_checks(shape: &Shape, r: &mut Rng, dir: &Path) -> Option<String> {
    let rec = record(shape, r, dir);
    let log = &rec.log;
    let cuts = log.cuts(rec.end);
    let budget = env_usize("SPINDLE_POWERCUT_STATES").unwrap_or(DEFAULT_STATES);
    let (enumerated, states) = choose_states(log, &cuts, r, budget);
    let t = Instant::now();
    let (failures, stats) = check_states(&rec, log, &cuts, &states, FAILURES_MAX);
    if verbose() {
        for (k, cut) in cuts.iter().enumerate() {
            eprintln!(
                "{}: epoch {k}, cut before event {}: {} durable, {} pending",
                shape.name,
                cut.at,
                cut.durable.len(),
                cut.pending.len()
            );
        }
    }
    let file_flushes = log.ops.iter().filter(|o| o.kind == OpKind::Flush).count();
    let header_writes = log.ops.iter().filter(|o| o.kind == OpKind::Write && o.offset == 0).count();
    eprintln!(
        "{}: cluster {}, refcount_bits {}: {} guest requests ({} flushes) in {:.2} s; the driver sent {} writes \
         ({} of the header), {} flushes, {} pairs overlapping in flight; {} epochs (up to {} writes pending), \
         {} subsets, {} images checked ({} with leaked clusters, {} sectors compared) in {:.1} s",
        shape.name,
        shape.cluster,
        shape.refcount_bits,
        rec.plan.ops.len(),
        rec.plan.ops.iter().filter(|o| o.kind == GKind::Flush).count(),
        rec.workload_time.as_secs_f64(),
        log.ops.len() - file_flushes,
        header_writes,
        file_flushes,
        log.concurrent_overlaps(),
        cuts.len(),
        cuts.iter().map(|c| c.pending.len()).max().unwrap_or(0),
        enumerated,
        stats.checked.load(Ordering::Relaxed),
        stats.leaks.load(Ordering::Relaxed),
        stats.sectors.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64(),
    );
    if failures.is_empty() { None } else { Some(report_failures(&rec, log, &cuts, &failures)) }
}

#[test]
fn qcow2_plain() {
    run("qcow2_plain", plain);
}

#[test]
fn qcow2_chain() {
    run("qcow2_chain", chain);
}

#[test]
fn qcow2_metadata() {
    run("qcow2_metadata", metadata);
}

#[test]
fn qcow2_compressed() {
    run("qcow2_compressed", compressed);
}

/// The clusters holding refcount blocks in a qcow2 image: (offset, length).
fn refcount_blocks(image: &[u8]) -> Vec<(u64, u64)> {
    let be64 = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
    let cluster = 1u64 << u32::from_be_bytes(image[20..24].try_into().unwrap());
    let table = be64(48) as usize;
    let entries = u32::from_be_bytes(image[56..60].try_into().unwrap()) as u64 * cluster / 8;
    (0..entries as usize).map(|i| be64(table + i * 8) & !511).filter(|&b| b != 0).map(|b| (b, cluster)).collect()
}

/// The checks themselves: replayed as if no flush had ever completed (a
/// disk that drops flushes, or a driver that never sends them), the same
/// kind of workload must fail: random halves of its writes lose guest data
/// the guest was told was flushed, and all writes but those to refcount
/// blocks leave clusters in use with a refcount of 0, which `qemu-img
/// check` must call corrupt.
#[test]
fn checks_catch_a_disk_that_loses_flushes() {
    let seed = base_seed();
    let name = "checks_catch_a_disk_that_loses_flushes";
    let rerun = format!("SPINDLE_POWERCUT_SEED={seed} cargo test -p bdev --test powercut -- --exact {name}");
    let mut r = workload_rng(seed, name);
    let mut shape = plain(&mut r);
    shape.ops = 120;
    let dir = work_dir();
    let rec = record(&shape, &mut r, dir.path());
    let log = rec.log.with_flushes_lost();
    let cut = log.cut_at(rec.end);
    assert!(cut.durable.is_empty());
    let n = cut.pending.len();
    let mut states: Vec<State> = (0..16)
        .map(|_| {
            let chosen: Vec<usize> = (0..n).filter(|_| r.chance(1, 2)).collect();
            State { cut: 0, chosen, label: "random".into() }
        })
        .collect();
    let blocks = refcount_blocks(&std::fs::read(dir.path().join("disk.qcow2")).unwrap());
    let no_refcounts: Vec<usize> = (0..n)
        .filter(|&k| {
            let o = &log.ops[cut.pending[k]];
            !blocks.iter().any(|&(b, len)| o.offset < b + len && b < o.offset + o.len)
        })
        .collect();
    assert!(no_refcounts.len() < n, "no write to a refcount block recorded");
    states.push(State { cut: 0, chosen: no_refcounts, label: "all but the refcount blocks".into() });
    let (failures, stats) = check_states(&rec, &log, &[cut], &states, usize::MAX);
    let count = |kind| failures.iter().filter(|f| f.kinds.contains(&kind)).count();
    eprintln!(
        "{name}: seed {seed}: {} of {} images fail ({} qemu-img check, {} guest data)",
        failures.len(),
        stats.checked.load(Ordering::Relaxed),
        count(FailKind::Check),
        count(FailKind::Data)
    );
    let random_data =
        failures.iter().filter(|f| f.state.label == "random" && f.kinds.contains(&FailKind::Data)).count();
    assert_eq!(
        random_data, 16,
        "random halves of the writes kept every flushed guest write (seed {seed}); rerun: {rerun}"
    );
    assert!(
        failures.iter().any(|f| f.state.label.starts_with("all but") && f.kinds.contains(&FailKind::Check)),
        "qemu-img check accepted an image without its refcount blocks (seed {seed}); rerun: {rerun}"
    );
}
