//! Crash tests: a daemon serving the top of a qcow2 chain over NBD, a guest
//! writing to it with periodic flushes, a block job running on the chain,
//! and a SIGKILL at a seeded random moment. Then the files left behind are
//! checked with QEMU's tools against a model of what the guest was told.
//!
//! One test per job type: intermediate commit, active commit, stream,
//! `blockdev-mirror` and `drive-mirror` (both with a pivot), and backup. Each runs
//! `SPINDLE_CRASH_ITERATIONS` cases (default 10); every case draws its
//! images, write load, job options and kill moment from one seed. A failing
//! case prints its seed and keeps its files (images, daemon log, event
//! log); `SPINDLE_CRASH_SEED=N SPINDLE_CRASH_ITERATIONS=1 cargo test -p
//! spindle --test crash -- --exact KIND` runs that case again (the first
//! case of a run uses the seed as given, later ones seeds derived from it
//! and the job type). The seed fixes everything but thread timing, so a
//! rare interleaving may take a few reruns. Without `SPINDLE_CRASH_SEED` a
//! run starts from a seed taken from the clock. `SPINDLE_CRASH_VERBOSE=1`
//! prints a line per kill; `scripts/soak.sh` runs many.
//!
//! The write load: one NBD connection, 1–4 requests in flight, writes of
//! 4 KiB–256 KiB (half of them in a 256 KiB hot spot, so blocks are
//! rewritten often), one in 12 a write-zeroes, one in 20 with FUA, a flush
//! every 3, 8 or 32 requests.
//!
//! The guest's writes cover whole 4 KiB blocks; every 512-byte sector
//! written carries a magic, its own sector number and the write's id (ids
//! grow with every write sent; two writes in flight never overlap, so on
//! every block a larger id is newer). The initial layers hold plain fill
//! bytes, write-zeroes reads as zeroes. After the kill, for a "view" (an
//! image read through its on-disk backing chain with `qemu-img convert`)
//! and a cut-off point in the event log, every sector must hold either the
//! newest write to its block that was durable at the cut-off (acknowledged
//! before a flush that was acknowledged before the cut-off, or written with
//! FUA and acknowledged), or something written to that block later, acked
//! or not (or the initial content if nothing durable was written there).
//! Anything else — older data, data of another sector, garbage — fails.
//! What each job type checks is written at `check_case`.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Daemon;
use support::nbd_client::NbdClient;
use support::rng::Rng;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// The unit of the model: writes cover whole blocks.
const BLOCK: u64 = 4 * KIB;
const SECTORS_PER_BLOCK: u64 = BLOCK / SECTOR;
const DEFAULT_ITERATIONS: u64 = 10;
const MAGIC: u64 = 0x5350_4e44_4c45_4352;
/// How long to wait for READY or COMPLETED before killing anyway.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- seeds

impl Rng {
    /// A delay in µs: often short, sometimes up to `max_ms`.
    fn delay_us(&mut self, max_ms: u64) -> u64 {
        match self.below(3) {
            0 => self.below(2_000),
            1 => self.below(max_ms * 1000 / 8),
            _ => self.below(max_ms * 1000),
        }
    }
}

fn derive(seed: u64, i: u64) -> u64 {
    Rng(seed ^ i.wrapping_mul(0xd6e8_feb8_6659_fd93)).next()
}

fn base_seed() -> (u64, bool) {
    match std::env::var("SPINDLE_CRASH_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = if let Some(h) = s.strip_prefix("0x") { u64::from_str_radix(h, 16) } else { s.parse() };
            (v.unwrap_or_else(|_| panic!("SPINDLE_CRASH_SEED={s}: not a number")), true)
        }
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            (Rng(t.as_nanos() as u64 ^ u64::from(std::process::id())).next() % 1_000_000_000_000, false)
        }
    }
}

fn iterations() -> u64 {
    std::env::var("SPINDLE_CRASH_ITERATIONS")
        .map(|s| s.trim().parse().expect("SPINDLE_CRASH_ITERATIONS"))
        .unwrap_or(DEFAULT_ITERATIONS)
}

// ---------------------------------------------------------------- cases

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    CommitIntermediate,
    CommitActive,
    Stream,
    Mirror,
    DriveMirror,
    Backup,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::CommitIntermediate => "commit_intermediate",
            Kind::CommitActive => "commit_active",
            Kind::Stream => "stream",
            Kind::Mirror => "mirror",
            Kind::DriveMirror => "drive_mirror",
            Kind::Backup => "backup",
        }
    }
    /// Mirror-like: READY, then `job-complete` moves the users.
    fn pivots(self) -> bool {
        matches!(self, Kind::CommitActive | Kind::Mirror | Kind::DriveMirror)
    }
}

/// When the kill comes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// A random delay after the job started.
    Running,
    /// A random delay after BLOCK_JOB_READY.
    Ready,
    /// A random (short) delay after `job-complete` was sent.
    Pivoting,
    /// Commit and stream with `auto-finalize: false`: a random (short)
    /// delay after `job-finalize` was sent, to land in the graph change.
    Finalizing,
    /// A random delay after BLOCK_JOB_COMPLETED.
    Done,
}

#[derive(Debug)]
struct Config {
    seed: u64,
    kind: Kind,
    disk: u64,
    cluster: u64,
    /// Writes in flight.
    qd: usize,
    /// One request in `flush_every` is a flush.
    flush_every: u64,
    /// Pause after each reply, µs.
    pace_us: u64,
    /// Guest writing alone before the job starts, ms.
    warmup_ms: u64,
    /// Job speed limit, bytes/s (0: none).
    speed: u64,
    phase: Phase,
    /// Delay before `job-complete` (Pivoting), µs.
    pre_complete_us: u64,
    /// Delay before the kill, µs.
    delay_us: u64,
    stream_to_base: bool,
    copy_mode: &'static str,
    sync: &'static str,
}

impl Config {
    fn new(kind: Kind, seed: u64) -> Config {
        let mut r = Rng(seed);
        let disk = r.pick(&[8 * MIB, 16 * MIB, 16 * MIB, 32 * MIB]);
        let cluster = r.pick(&[4 * KIB, 16 * KIB, 64 * KIB, 64 * KIB]);
        let qd = r.range(1, 4) as usize;
        let flush_every = r.pick(&[3, 8, 32]);
        let pace_us = r.pick(&[0, 20, 100, 300]);
        let warmup_ms = r.below(40);
        let phase = if kind.pivots() {
            r.pick(&[Phase::Running, Phase::Ready, Phase::Pivoting, Phase::Pivoting, Phase::Done])
        } else {
            r.pick(&[Phase::Running, Phase::Running, Phase::Running, Phase::Finalizing, Phase::Finalizing, Phase::Done])
        };
        // A limited mirror would not converge under the guest's writes.
        let limited = phase == Phase::Running && r.chance(1, 3);
        let speed = if limited { r.pick(&[16 * MIB, 48 * MIB]) } else { 0 };
        let pre_complete_us = r.delay_us(20);
        let delay_us = match phase {
            Phase::Running => r.delay_us(400),
            Phase::Ready | Phase::Done => r.delay_us(100),
            Phase::Pivoting => r.delay_us(40),
            Phase::Finalizing => r.delay_us(8),
        };
        let stream_to_base = r.chance(1, 2);
        let copy_mode = r.pick(&["background", "background", "write-blocking"]);
        let sync = r.pick(&["top", "full"]);
        Config {
            seed,
            kind,
            disk,
            cluster,
            qd,
            flush_every,
            pace_us,
            warmup_ms,
            speed,
            phase,
            pre_complete_us,
            delay_us,
            stream_to_base,
            copy_mode,
            sync,
        }
    }
    fn blocks(&self) -> u64 {
        self.disk / BLOCK
    }
}

// ---------------------------------------------------------------- sector contents

fn sector_filler(sector: u64, id: u64) -> [u8; 8] {
    Rng(sector.wrapping_mul(0x1000_0000_01b3) ^ id).next().to_le_bytes()
}

/// The bytes write `id` puts in `sector`.
fn fill_sector(buf: &mut [u8], sector: u64, id: u64) {
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&sector.to_le_bytes());
    buf[16..24].copy_from_slice(&id.to_le_bytes());
    let f = sector_filler(sector, id);
    for c in buf[24..].chunks_exact_mut(8) {
        c.copy_from_slice(&f);
    }
}

#[derive(Debug, PartialEq)]
enum Seen {
    /// Every byte the same (zeroes included).
    Fill(u8),
    /// Written by write `id`.
    Data(u64),
    /// A written sector that belongs elsewhere.
    Misplaced {
        sector: u64,
        id: u64,
    },
    Garbage,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Fill(x) => write!(f, "fill {x:#04x}"),
            Seen::Data(id) => write!(f, "#{id}"),
            Seen::Misplaced { sector, id } => write!(f, "#{id} of sector {sector}"),
            Seen::Garbage => write!(f, "garbage"),
        }
    }
}

fn decode(buf: &[u8], sector: u64) -> Seen {
    // Slice comparisons (memcmp), not byte loops: the tests build unoptimised.
    if buf[1..] == buf[..buf.len() - 1] {
        return Seen::Fill(buf[0]);
    }
    let u = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
    if u(0) != MAGIC {
        return Seen::Garbage;
    }
    let (s, id) = (u(8), u(16));
    let mut want = [0u8; SECTOR as usize];
    fill_sector(&mut want, s, id);
    if buf != want {
        return Seen::Garbage;
    }
    if s != sector { Seen::Misplaced { sector: s, id } } else { Seen::Data(id) }
}

// ---------------------------------------------------------------- the event log

/// Everything that happened, in one order: the writer's requests and
/// replies, the job's events and the harness' own steps.
#[derive(Debug, Clone)]
enum Ev {
    Sent {
        id: u64,
        first: u64,
        n: u64,
        zero: bool,
        fua: bool,
    },
    Acked {
        id: u64,
        error: u32,
    },
    FlushSent {
        id: u64,
    },
    FlushAcked {
        id: u64,
        error: u32,
    },
    JobStarted,
    /// The command that started the job answered.
    JobAnswered,
    /// A QMP event for the job: name and data.
    Job(String, Value),
    CompleteSent,
    FinalizeSent,
    Kill,
}

struct Shared {
    log: Mutex<Vec<Ev>>,
    /// When each entry of `log` was pushed, µs since `t0`.
    times: Mutex<Vec<u64>>,
    t0: Instant,
    stop: AtomicBool,
}

impl Shared {
    fn push(&self, e: Ev) {
        let mut log = self.log.lock().unwrap();
        log.push(e);
        self.times.lock().unwrap().push(self.t0.elapsed().as_micros() as u64);
    }
    fn position(&self, f: impl Fn(&Ev) -> bool) -> Option<usize> {
        self.log.lock().unwrap().iter().position(f)
    }
    fn has_job_event(&self, name: &str) -> bool {
        self.position(|e| matches!(e, Ev::Job(n, _) if n == name)).is_some()
    }
    /// Waits for a job event; false on timeout.
    fn wait_job_event(&self, name: &str) -> bool {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while Instant::now() < deadline {
            if self.has_job_event(name) {
                return true;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        false
    }
}

// ---------------------------------------------------------------- the guest

struct WriterCfg {
    blocks: u64,
    qd: usize,
    flush_every: u64,
    pace_us: u64,
    seed: u64,
}

/// Writes until the connection dies (or `stop`); returns protocol errors.
fn guest(sock: PathBuf, cfg: WriterCfg, shared: Arc<Shared>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut c = match NbdClient::connect(&sock, "disk") {
        Ok(c) => c,
        Err(e) => return vec![format!("NBD connect: {e}")],
    };
    let mut r = Rng(cfg.seed);
    let hot = r.below(cfg.blocks.saturating_sub(64));
    // Requests in flight: id → (first block, blocks), flushes with n = 0.
    let mut inflight: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut flushing = false;
    let mut next_id = 1u64;
    let mut buf = Vec::new();
    'run: while !shared.stop.load(Ordering::Relaxed) {
        while inflight.len() < cfg.qd {
            let id = next_id;
            if !flushing && r.chance(1, cfg.flush_every) {
                next_id += 1;
                flushing = true;
                inflight.insert(id, (0, 0));
                shared.push(Ev::FlushSent { id });
                if c.send_flush(id).is_err() {
                    break 'run;
                }
                continue;
            }
            let n = match r.below(20) {
                0 => r.range(33, 64),
                1..=3 => r.range(5, 32),
                _ => r.range(1, 4),
            }
            .min(cfg.blocks);
            let first =
                if r.chance(1, 2) { (hot + r.below(64)).min(cfg.blocks - n) } else { r.below(cfg.blocks - n + 1) };
            if inflight.values().any(|&(f, m)| m > 0 && f < first + n && first < f + m) {
                break;
            }
            next_id += 1;
            let zero = r.chance(1, 12);
            let fua = r.chance(1, 20);
            inflight.insert(id, (first, n));
            shared.push(Ev::Sent { id, first, n, zero, fua });
            let res = if zero {
                c.send_write_zeroes(id, first * BLOCK, (n * BLOCK) as u32, fua)
            } else {
                buf.resize((n * BLOCK) as usize, 0);
                for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
                    fill_sector(s, first * SECTORS_PER_BLOCK + i as u64, id);
                }
                c.send_write(id, first * BLOCK, &buf, fua)
            };
            if res.is_err() {
                break 'run;
            }
        }
        let Ok(reply) = c.recv_reply() else { break };
        let Some((_, n)) = inflight.remove(&reply.handle) else {
            errors.push(format!("reply to unknown handle {}", reply.handle));
            break;
        };
        if n == 0 {
            flushing = false;
            shared.push(Ev::FlushAcked { id: reply.handle, error: reply.error });
        } else {
            shared.push(Ev::Acked { id: reply.handle, error: reply.error });
        }
        if reply.error != 0 {
            errors.push(format!("request {} failed with NBD error {}", reply.handle, reply.error));
        }
        if cfg.pace_us > 0 {
            std::thread::sleep(Duration::from_micros(cfg.pace_us));
        }
    }
    errors
}

/// Reads QMP events into the log until the daemon goes away.
fn qmp_events(path: PathBuf, shared: Arc<Shared>, ready: std::sync::mpsc::Sender<()>) {
    let stream = UnixStream::connect(&path).expect("QMP connect");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    writer.write_all(b"{\"execute\": \"qmp_capabilities\"}\n").unwrap();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
        if v.get("return").is_some() {
            break;
        }
    }
    let _ = ready.send(());
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else { continue };
        if let Some(name) = v["event"].as_str()
            && (name.starts_with("BLOCK_JOB") || name == "JOB_STATUS_CHANGE")
        {
            shared.push(Ev::Job(name.to_string(), v["data"].clone()));
        }
    }
}

// ---------------------------------------------------------------- the model

#[derive(Debug)]
struct WriteRec {
    id: u64,
    first: u64,
    n: u64,
    zero: bool,
    fua: bool,
    ack_pos: Option<usize>,
}

struct Model {
    writes: BTreeMap<u64, WriteRec>,
    /// (position of FlushSent, position of a successful FlushAcked)
    flushes: Vec<(usize, Option<usize>)>,
    /// Write ids per block, in id order.
    per_block: Vec<Vec<u64>>,
    initial: Vec<u8>,
}

impl Model {
    fn new(log: &[Ev], initial: Vec<u8>) -> Model {
        let mut writes = BTreeMap::new();
        let mut flush_idx = BTreeMap::new();
        let mut flushes = Vec::new();
        let mut per_block = vec![Vec::new(); initial.len()];
        for (pos, e) in log.iter().enumerate() {
            match *e {
                Ev::Sent { id, first, n, zero, fua } => {
                    writes.insert(id, WriteRec { id, first, n, zero, fua, ack_pos: None });
                    for b in first..first + n {
                        per_block[b as usize].push(id);
                    }
                }
                Ev::Acked { id, error: 0 } => writes.get_mut(&id).unwrap().ack_pos = Some(pos),
                Ev::FlushSent { id } => {
                    flush_idx.insert(id, flushes.len());
                    flushes.push((pos, None));
                }
                Ev::FlushAcked { id, error: 0 } => flushes[flush_idx[&id]].1 = Some(pos),
                _ => {}
            }
        }
        Model { writes, flushes, per_block, initial }
    }

    /// Is write `w` durable at log position `cut`?
    fn durable(&self, w: &WriteRec, cut: usize) -> bool {
        let Some(ack) = w.ack_pos else { return false };
        if ack >= cut {
            return false;
        }
        if w.fua {
            return true;
        }
        self.flushes.iter().any(|&(sent, acked)| ack < sent && acked.is_some_and(|a| a < cut))
    }

    fn durable_count(&self, cut: usize) -> usize {
        self.writes.values().filter(|w| self.durable(w, cut)).count()
    }

    /// Checks an image's contents against the model at `cut`.
    fn check(&self, data: &[u8], cut: usize) -> Result<(), String> {
        if data.len() as u64 != self.initial.len() as u64 * BLOCK {
            return Err(format!(
                "the image reads {} bytes, the disk has {}",
                data.len(),
                self.initial.len() as u64 * BLOCK
            ));
        }
        // The newest durable write of each block.
        let mut durable_id = vec![None; self.initial.len()];
        for w in self.writes.values().filter(|w| self.durable(w, cut)) {
            for b in w.first..w.first + w.n {
                let d: &mut Option<u64> = &mut durable_id[b as usize];
                *d = Some(d.map_or(w.id, |x| x.max(w.id)));
            }
        }
        let mut bad = Vec::new();
        let mut bad_count = 0;
        let mut bad_blocks = 0;
        for (b, ids) in self.per_block.iter().enumerate() {
            let floor = durable_id[b];
            let allowed: Vec<u64> = ids.iter().copied().filter(|&id| floor.is_none_or(|f| id >= f)).collect();
            let initial_ok = floor.is_none();
            let zero_ok = allowed.iter().any(|id| self.writes[id].zero);
            let block = &data[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            let mut seen_bad = Vec::new();
            for (i, s) in block.chunks(SECTOR as usize).enumerate() {
                let sector = b as u64 * SECTORS_PER_BLOCK + i as u64;
                let seen = decode(s, sector);
                let ok = match seen {
                    Seen::Fill(x) => (initial_ok && x == self.initial[b]) || (x == 0 && zero_ok),
                    Seen::Data(id) => allowed.contains(&id) && !self.writes[&id].zero,
                    _ => false,
                };
                if !ok {
                    bad_count += 1;
                    seen_bad.push(format!("{i}: {seen}"));
                }
            }
            if !seen_bad.is_empty() {
                bad_blocks += 1;
                if bad.len() < 8 {
                    bad.push(self.explain(b, &seen_bad, floor, &allowed, cut));
                }
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("{bad_count} bad sectors in {bad_blocks} blocks, first ones:\n{}", bad.join("\n")))
        }
    }

    fn explain(&self, b: usize, seen: &[String], floor: Option<u64>, allowed: &[u64], cut: usize) -> String {
        let desc = |id: &u64| {
            let w = &self.writes[id];
            format!(
                "#{id}{}{} (ack at {:?}, durable: {})",
                if w.zero { " zeroes" } else { "" },
                if w.fua { " fua" } else { "" },
                w.ack_pos,
                self.durable(w, cut)
            )
        };
        let all: Vec<String> = self.per_block[b].iter().map(desc).collect();
        let history = if all.is_empty() { "never written".to_string() } else { all.join(", ") };
        format!(
            "  block {b} (offset {:#x}) reads, by sector: {}; initial fill {:#04x}; newest durable write: {}; \
             allowed: {}{:?}; writes to this block: {history}",
            b as u64 * BLOCK,
            seen.join(", "),
            self.initial[b],
            floor.map_or("none".to_string(), |f| format!("#{f}")),
            if floor.is_none() { "initial, " } else { "" },
            allowed,
        )
    }
}

// ---------------------------------------------------------------- images

fn run_out(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_img(args: &[&str]) -> String {
    support::run(Command::new("qemu-img").args(args))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Content of one layer: a fill byte per block, None where unallocated.
type Layer = Vec<Option<u8>>;

/// What to put in a new layer: `extents` random extents of `fill`, then
/// `zeroes` of zeroes, each up to `max_blocks` long.
struct Fill {
    fill: u8,
    extents: u64,
    max_blocks: u64,
    zeroes: u64,
}

/// Creates a qcow2 image and writes random extents into it; returns what it
/// holds.
fn make_layer(cfg: &Config, r: &mut Rng, path: &Path, backing: Option<&Path>, spec: Fill) -> Layer {
    let Fill { fill, extents, max_blocks, zeroes } = spec;
    let cluster = format!("cluster_size={}", cfg.cluster);
    let size = cfg.disk.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &cluster];
    if let Some(b) = backing {
        args.extend(["-b", p(b), "-F", "qcow2"]);
    }
    args.extend([p(path), &size]);
    qemu_img(&args);
    let mut layer = vec![None; cfg.blocks() as usize];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for i in 0..extents + zeroes {
        let n = r.range(1, max_blocks).min(cfg.blocks());
        let first = r.below(cfg.blocks() - n + 1);
        let (byte, c) = if i < extents {
            (fill, format!("write -P {fill:#x} {} {}", first * BLOCK, n * BLOCK))
        } else {
            (0, format!("write -z {} {}", first * BLOCK, n * BLOCK))
        };
        cmd.args(["-c", &c]);
        for b in first..first + n {
            layer[b as usize] = Some(byte);
        }
    }
    if extents + zeroes > 0 {
        let (code, out) = run_out(cmd.arg(path));
        assert!(code == 0 && !out.contains("error") && !out.contains("fail"), "qemu-io on {}: {out}", path.display());
    }
    layer
}

/// What a chain of layers (top first) reads as.
fn flatten(layers: &[&Layer]) -> Vec<u8> {
    (0..layers[0].len()).map(|b| layers.iter().find_map(|l| l[b]).unwrap_or(0)).collect()
}

/// An image read through its on-disk backing chain.
fn read_view(img: &Path, scratch: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(scratch);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(img), p(scratch)]);
    let data = std::fs::read(scratch).unwrap();
    let _ = std::fs::remove_file(scratch);
    data
}

/// File names of `qemu-img info --backing-chain`, top first.
fn backing_chain(img: &Path) -> Vec<PathBuf> {
    let out = qemu_img(&["info", "--output=json", "--backing-chain", p(img)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().iter().map(|i| PathBuf::from(i["filename"].as_str().unwrap())).collect()
}

/// `qemu-img check`: no corruption. Returns true if clusters leaked.
fn check_image(img: &Path) -> Result<bool, String> {
    let (code, out) = run_out(Command::new("qemu-img").args(["check", "--output=json", p(img)]));
    match code {
        0 => Ok(false),
        3 => Ok(true),
        _ => Err(format!("qemu-img check {} exited with {code}:\n{out}", img.display())),
    }
}

// ---------------------------------------------------------------- one case

/// What a case saw, for the summary.
#[derive(Default)]
struct Outcome {
    phase: String,
    timeline: String,
    result: String,
    acked: usize,
    flushes: usize,
    durable: usize,
    leaks: usize,
}

struct Images {
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
    target: Option<PathBuf>,
    initial: Vec<u8>,
    base_only: Vec<u8>,
    mid_over_base: Vec<u8>,
}

fn make_images(cfg: &Config, dir: &Path) -> Images {
    let mut r = Rng(derive(cfg.seed, 1));
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    let nb = cfg.blocks();
    let lb = make_layer(cfg, &mut r, &base, None, Fill { fill: 0x11, extents: 10, max_blocks: nb / 4, zeroes: 0 });
    let lm =
        make_layer(cfg, &mut r, &mid, Some(&base), Fill { fill: 0x22, extents: 10, max_blocks: nb / 16, zeroes: 3 });
    let lt = make_layer(cfg, &mut r, &top, Some(&mid), Fill { fill: 0x33, extents: 6, max_blocks: nb / 32, zeroes: 0 });
    let target = match cfg.kind {
        Kind::Mirror | Kind::Backup => {
            let t = dir.join("tgt.qcow2");
            make_layer(cfg, &mut r, &t, None, Fill { fill: 0, extents: 0, max_blocks: 1, zeroes: 0 });
            Some(t)
        }
        Kind::DriveMirror => Some(dir.join("new.qcow2")),
        _ => None,
    };
    Images {
        initial: flatten(&[&lt, &lm, &lb]),
        base_only: flatten(&[&lb]),
        mid_over_base: flatten(&[&lm, &lb]),
        base,
        mid,
        top,
        target,
    }
}

fn job_command(cfg: &Config, im: &Images) -> (&'static str, Value) {
    let mut args = match cfg.kind {
        Kind::CommitIntermediate => ("block-commit", json!({"device": "top", "top-node": "mid", "base-node": "base"})),
        Kind::CommitActive => ("block-commit", json!({"device": "top", "base-node": "base"})),
        Kind::Stream if cfg.stream_to_base => ("block-stream", json!({"device": "top", "base-node": "base"})),
        Kind::Stream => ("block-stream", json!({"device": "top"})),
        Kind::Mirror => {
            ("blockdev-mirror", json!({"device": "top", "target": "tgt", "sync": "full", "copy-mode": cfg.copy_mode}))
        }
        Kind::Backup => ("blockdev-backup", json!({"device": "top", "target": "tgt", "sync": "full"})),
        Kind::DriveMirror => (
            "drive-mirror",
            json!({"device": "top", "target": im.target.as_ref().unwrap(), "sync": cfg.sync,
                   "format": "qcow2", "node-name": "new", "copy-mode": cfg.copy_mode}),
        ),
    };
    args.1["job-id"] = json!("job");
    if cfg.speed > 0 {
        args.1["speed"] = json!(cfg.speed);
    }
    if cfg.phase == Phase::Finalizing {
        args.1["auto-finalize"] = json!(false);
    }
    args
}

/// Sends `verb` for the job from a thread, so that the kill may land
/// before its answer.
fn job_verb(d: &Daemon, verb: &'static str) -> std::thread::JoinHandle<Result<Value, rpc::client::ClientError>> {
    let rpc = d.rpc.clone();
    std::thread::spawn(move || {
        rpc::client::Client::connect(&rpc, Duration::from_secs(30))
            .and_then(|mut c| c.call(verb, Some(json!({"id": "job"}))))
    })
}

fn run_case(cfg: &Config, dir: &Path) -> Outcome {
    let t_case = Instant::now();
    let im = make_images(cfg, dir);
    let t_images = t_case.elapsed();
    let read_only: Vec<&PathBuf> = match cfg.kind {
        Kind::CommitIntermediate | Kind::CommitActive => vec![&im.mid],
        _ => vec![&im.base, &im.mid],
    };
    let originals: Vec<Vec<u8>> = read_only.iter().map(|f| std::fs::read(f).unwrap()).collect();

    let mut d = Daemon::start();
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": {"driver": "file", "filename": im.base, "read-only": true}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
               "file": {"driver": "file", "filename": im.mid, "read-only": true}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
               "file": {"driver": "file", "filename": im.top}}),
    );
    if matches!(cfg.kind, Kind::Mirror | Kind::Backup) {
        d.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "tgt",
                   "file": {"driver": "file", "filename": im.target.as_ref().unwrap()}}),
        );
    }
    let t_daemon = t_case.elapsed();
    let nbd_sock = d.path("nbd.sock");
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": nbd_sock}}}));
    d.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "disk", "node-name": "top", "name": "disk", "writable": true}),
    );

    let shared = Arc::new(Shared {
        log: Mutex::new(Vec::new()),
        times: Mutex::new(Vec::new()),
        t0: Instant::now(),
        stop: AtomicBool::new(false),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let events = {
        let (qmp, shared) = (d.qmp.clone(), shared.clone());
        std::thread::spawn(move || qmp_events(qmp, shared, tx))
    };
    rx.recv_timeout(Duration::from_secs(10)).expect("QMP session");
    let writer = {
        let wcfg = WriterCfg {
            blocks: cfg.blocks(),
            qd: cfg.qd,
            flush_every: cfg.flush_every,
            pace_us: cfg.pace_us,
            seed: derive(cfg.seed, 2),
        };
        let shared = shared.clone();
        std::thread::spawn(move || guest(nbd_sock, wcfg, shared))
    };
    std::thread::sleep(Duration::from_millis(cfg.warmup_ms));

    let (cmd, args) = job_command(cfg, &im);
    shared.push(Ev::JobStarted);
    d.ok(cmd, args);
    shared.push(Ev::JobAnswered);
    let sleep_us = |us: u64| std::thread::sleep(Duration::from_micros(us));
    let mut phase = format!("{:?}", cfg.phase).to_lowercase();
    let mut completer = None;
    match cfg.phase {
        Phase::Running => sleep_us(cfg.delay_us),
        Phase::Ready => {
            if !shared.wait_job_event("BLOCK_JOB_READY") {
                phase = "ready-timeout".into();
            }
            sleep_us(cfg.delay_us);
        }
        Phase::Finalizing => {
            if shared.wait_job_event("BLOCK_JOB_PENDING") {
                sleep_us(cfg.pre_complete_us / 8);
                shared.push(Ev::FinalizeSent);
                completer = Some(job_verb(&d, "job-finalize"));
            } else {
                phase = "pending-timeout".into();
            }
            sleep_us(cfg.delay_us);
        }
        Phase::Pivoting | Phase::Done if !cfg.kind.pivots() => {
            if !shared.wait_job_event("BLOCK_JOB_COMPLETED") {
                phase = "completed-timeout".into();
            }
            sleep_us(cfg.delay_us);
        }
        Phase::Pivoting | Phase::Done => {
            if shared.wait_job_event("BLOCK_JOB_READY") {
                sleep_us(cfg.pre_complete_us);
                shared.push(Ev::CompleteSent);
                completer = Some(job_verb(&d, "job-complete"));
                if cfg.phase == Phase::Done && !shared.wait_job_event("BLOCK_JOB_COMPLETED") {
                    phase = "completed-timeout".into();
                }
            } else {
                phase = "ready-timeout".into();
            }
            sleep_us(cfg.delay_us);
        }
    }
    shared.push(Ev::Kill);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let status = d.wait_exit();
    support::wait_unlocked_dir(dir);
    shared.stop.store(true, Ordering::Relaxed);
    let writer_errors = writer.join().expect("writer thread");
    events.join().expect("event thread");
    let complete_answer = completer.map(|t| t.join().unwrap());
    let log = std::mem::take(&mut *shared.log.lock().unwrap());
    let times = std::mem::take(&mut *shared.times.lock().unwrap());
    std::fs::write(dir.join("daemon.log"), d.log_text()).unwrap();
    let text: String = log.iter().zip(&times).enumerate().map(|(i, (e, t))| format!("{i} {t}us {e:?}\n")).collect();
    std::fs::write(dir.join("events.log"), text).unwrap();
    let at = |f: &dyn Fn(&Ev) -> bool| log.iter().position(f).map(|i| times[i] / 1000);
    let started = at(&|e| matches!(e, Ev::JobStarted)).unwrap_or(0);
    let timeline = format!(
        "job at {started} ms, ready {:?}, complete sent {:?}, completed {:?}, kill {:?} (ms)",
        at(&|e| matches!(e, Ev::Job(n, _) if n == "BLOCK_JOB_READY")),
        at(&|e| matches!(e, Ev::CompleteSent)),
        at(&|e| matches!(e, Ev::Job(n, _) if n == "BLOCK_JOB_COMPLETED")),
        at(&|e| matches!(e, Ev::Kill)),
    );

    assert_eq!(status.signal(), Some(9), "the daemon died before the kill ({status})");
    assert!(writer_errors.is_empty(), "guest errors: {writer_errors:?}");
    for e in &log {
        if let Ev::Job(name, data) = e {
            let failed = name == "BLOCK_JOB_ERROR"
                || name == "BLOCK_JOB_CANCELLED"
                || (name == "BLOCK_JOB_COMPLETED" && data.get("error").is_some());
            assert!(!failed, "the job failed: {name} {data}");
        }
    }
    if let Some(Err(e)) = &complete_answer
        && let rpc::client::ClientError::Rpc { message, .. } = e
    {
        panic!("job-complete or job-finalize refused: {message}");
    }

    let t_kill = t_case.elapsed();
    let mut out = check_case(cfg, &im, &log, dir);
    for (f, original) in read_only.iter().zip(originals) {
        assert!(std::fs::read(f).unwrap() == original, "{} is read-only in the daemon but changed", f.display());
    }
    out.phase = phase;
    out.timeline = format!(
        "{timeline}; images {} ms, daemon up {} ms, killed {} ms, checked {} ms",
        t_images.as_millis(),
        t_daemon.as_millis(),
        t_kill.as_millis(),
        t_case.elapsed().as_millis()
    );
    out.acked = log.iter().filter(|e| matches!(e, Ev::Acked { .. })).count();
    out.flushes = log.iter().filter(|e| matches!(e, Ev::FlushAcked { .. })).count();
    out
}

/// The checks after the kill.
///
/// Every job type: `qemu-img check` on every image of the chain (and the
/// mirror target) exits 0 or 3 (leaked clusters only); images the daemon
/// opened read-only are unchanged byte for byte; the job reported no error.
///
/// - Intermediate commit (mid into base, guest on top): top's backing file
///   is mid (not applied) or base (applied), and base if
///   BLOCK_JOB_COMPLETED was seen; top read through whatever chain its
///   header names holds every flushed write; base on its own reads, block
///   by block, either as it was or as mid over base (never guest data).
/// - Stream (mid, or mid and base, into top): top's backing file is mid or
///   the new base (base or none), the new one if BLOCK_JOB_COMPLETED was
///   seen; top through its chain holds every flushed write.
/// - Backup (top into a fresh qcow2, `sync=full`): top's chain is unchanged
///   and top through it holds every flushed write (the filter passed them
///   all); the target passes `qemu-img check`, and once BLOCK_JOB_COMPLETED
///   was seen it holds the point in time: every write flushed before the
///   command was sent, and no write sent after it answered.
/// - Active commit, blockdev-mirror, drive-mirror (the source is top through
///   its chain; the target is base on its own, the mirror target, or the
///   drive-mirror image through its chain, which must name the expected
///   backing file): before `job-complete` was sent the source is
///   authoritative and holds every flushed write. Once it was sent the
///   source still holds every write flushed before it was sent (it is never
///   written after the pivot), and the source or the target holds every
///   flushed write (a pivot may have happened without its event reaching
///   us). After BLOCK_JOB_COMPLETED the target holds every flushed write.
fn check_case(cfg: &Config, im: &Images, log: &[Ev], dir: &Path) -> Outcome {
    let mut out = Outcome::default();
    let mut images = vec![&im.base, &im.mid, &im.top];
    if let Some(t) = &im.target {
        images.push(t);
    }
    let mut problems = Vec::new();
    for img in &images {
        match check_image(img) {
            Ok(leaked) => out.leaks += leaked as usize,
            Err(e) => problems.push(e),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let model = Model::new(log, im.initial.clone());
    let end = log.len();
    let completed = log.iter().position(|e| matches!(e, Ev::Job(n, _) if n == "BLOCK_JOB_COMPLETED"));
    let complete_sent = log.iter().position(|e| matches!(e, Ev::CompleteSent));
    let scratch = dir.join("view.raw");
    let view = |img: &Path, cut: usize, what: &str| {
        model.check(&read_view(img, &scratch), cut).map_err(|e| format!("{what} ({}): {e}", img.display()))
    };
    let top_chain = backing_chain(&im.top);
    let chain = |v: &[&PathBuf]| v.iter().map(|p| p.to_path_buf()).collect::<Vec<_>>();
    out.durable = model.durable_count(end);

    match cfg.kind {
        Kind::CommitIntermediate | Kind::Stream => {
            let old = chain(&[&im.top, &im.mid, &im.base]);
            let new = match cfg.kind {
                Kind::CommitIntermediate => chain(&[&im.top, &im.base]),
                _ if cfg.stream_to_base => chain(&[&im.top, &im.base]),
                _ => chain(&[&im.top]),
            };
            let applied = top_chain == new;
            assert!(applied || top_chain == old, "top's backing chain is {top_chain:?}");
            assert!(applied || completed.is_none(), "BLOCK_JOB_COMPLETED was seen but the chain is {top_chain:?}");
            out.result = if applied { "applied" } else { "not applied" }.into();
            if let Err(e) = view(&im.top, end, "top through its chain") {
                panic!("{e}");
            }
            if cfg.kind == Kind::CommitIntermediate {
                let base = read_view(&im.base, &scratch);
                for b in 0..im.initial.len() {
                    let blk = &base[b * BLOCK as usize..(b + 1) * BLOCK as usize];
                    let ok = blk.chunks(SECTOR as usize).all(
                        |s| matches!(decode(s, 0), Seen::Fill(x) if x == im.base_only[b] || x == im.mid_over_base[b]),
                    );
                    assert!(
                        ok,
                        "base block {b} is neither its old content {:#04x} nor mid over base {:#04x}: {}",
                        im.base_only[b],
                        im.mid_over_base[b],
                        decode(&blk[..SECTOR as usize], b as u64 * SECTORS_PER_BLOCK)
                    );
                }
            }
        }
        Kind::Backup => {
            assert_eq!(top_chain, chain(&[&im.top, &im.mid, &im.base]), "the source's backing chain changed");
            view(&im.top, end, "the source").unwrap_or_else(|e| panic!("{e}"));
            let target = im.target.clone().unwrap();
            assert_eq!(backing_chain(&target), chain(&[&target]), "the target's backing chain");
            out.result = "source".into();
            if completed.is_some() {
                // The point in time is between the command and its answer.
                let start = log.iter().position(|e| matches!(e, Ev::JobStarted)).expect("the job started");
                let answered = log.iter().position(|e| matches!(e, Ev::JobAnswered)).expect("the job answered");
                view(&target, start, "the backup at its start").unwrap_or_else(|e| panic!("{e}"));
                let last_before = log[..answered].iter().filter_map(|e| match e {
                    Ev::Sent { id, .. } => Some(*id),
                    _ => None,
                });
                let last_before = last_before.max().unwrap_or(0);
                let backup = read_view(&target, &scratch);
                for (i, s) in backup.chunks(SECTOR as usize).enumerate() {
                    if let Seen::Data(id) = decode(s, i as u64) {
                        assert!(
                            id <= last_before,
                            "sector {i} of the backup holds write {id}, sent after the job began"
                        );
                    }
                }
                out.result = "backed up".into();
            }
        }
        Kind::CommitActive | Kind::Mirror | Kind::DriveMirror => {
            assert_eq!(top_chain, chain(&[&im.top, &im.mid, &im.base]), "the source's backing chain changed");
            let target = match cfg.kind {
                Kind::CommitActive => im.base.clone(),
                _ => im.target.clone().unwrap(),
            };
            let expect = match cfg.kind {
                Kind::DriveMirror if cfg.sync == "top" => chain(&[&target, &im.mid, &im.base]),
                _ => chain(&[&target]),
            };
            assert_eq!(backing_chain(&target), expect, "the target's backing chain");
            match (complete_sent, completed) {
                (None, _) => {
                    view(&im.top, end, "the source, no job-complete sent").unwrap_or_else(|e| panic!("{e}"));
                    out.result = "source".into();
                }
                (Some(c), None) => {
                    view(&im.top, c, "the source at job-complete").unwrap_or_else(|e| panic!("{e}"));
                    let src = view(&im.top, end, "the source");
                    let tgt = view(&target, end, "the target");
                    out.result = match (&src, &tgt) {
                        (Ok(()), Ok(())) => "complete sent: source and target current",
                        (Ok(()), Err(_)) => "complete sent: source current",
                        (Err(_), Ok(())) => "complete sent: target current",
                        (Err(a), Err(b)) => {
                            panic!("neither the source nor the target holds every flushed write:\n{a}\n{b}")
                        }
                    }
                    .into();
                }
                (Some(c), Some(_)) => {
                    view(&target, end, "the target after BLOCK_JOB_COMPLETED").unwrap_or_else(|e| panic!("{e}"));
                    view(&im.top, c, "the source at job-complete").unwrap_or_else(|e| panic!("{e}"));
                    out.result = "pivoted".into();
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------- the tests

fn kind_salt(kind: Kind) -> u64 {
    kind.name().bytes().fold(0xcbf2_9ce4_8422_2325, |h, c| (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3))
}

fn run_kind(kind: Kind) {
    let (base, given) = base_seed();
    let n = iterations();
    let started = Instant::now();
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut results: BTreeMap<String, usize> = BTreeMap::new();
    let (mut acked, mut flushes, mut durable, mut leaks) = (0, 0, 0, 0);
    for i in 0..n {
        let seed = if i == 0 { base } else { derive(base ^ kind_salt(kind), i) % 1_000_000_000_000 };
        let cfg = Config::new(kind, seed);
        let dir = tempfile::Builder::new().prefix("spindle-crash-").tempdir().unwrap().keep();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&cfg, &dir)));
        match res {
            Ok(o) => {
                if std::env::var_os("SPINDLE_CRASH_VERBOSE").is_some() {
                    eprintln!(
                        "{} seed {seed}: {} -> {}; {}; {} writes, {} flushes acked, {} durable; {cfg:?}",
                        kind.name(),
                        o.phase,
                        o.result,
                        o.timeline,
                        o.acked,
                        o.flushes,
                        o.durable
                    );
                }
                *phases.entry(o.phase).or_default() += 1;
                *results.entry(o.result).or_default() += 1;
                acked += o.acked;
                flushes += o.flushes;
                durable += o.durable;
                leaks += o.leaks;
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e) => {
                eprintln!(
                    "\nCRASH CASE FAILED: {} case {i} of {n}, seed {seed}{}\n  {cfg:?}\n  files kept in {}\n  \
                     rerun: SPINDLE_CRASH_SEED={seed} SPINDLE_CRASH_ITERATIONS=1 cargo test -p spindle --test crash -- --exact {}\n",
                    kind.name(),
                    if given { "" } else { " (seed from the clock)" },
                    dir.display(),
                    kind.name(),
                );
                std::panic::resume_unwind(e);
            }
        }
    }
    println!(
        "crash {}: {n} kills in {:.1} s (first seed {base}); kill phase {phases:?}; outcome {results:?}; \
         {acked} writes and {flushes} flushes acknowledged, {durable} writes durable at the kill; \
         {leaks} images with leaked clusters",
        kind.name(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn commit_intermediate() {
    run_kind(Kind::CommitIntermediate);
}

#[test]
fn commit_active() {
    run_kind(Kind::CommitActive);
}

#[test]
fn stream() {
    run_kind(Kind::Stream);
}

#[test]
fn mirror() {
    run_kind(Kind::Mirror);
}

#[test]
fn drive_mirror() {
    run_kind(Kind::DriveMirror);
}

#[test]
fn backup() {
    run_kind(Kind::Backup);
}

/// The checker itself: lost, stale, misplaced and torn data are refused;
/// what the guest may see after a crash is accepted.
#[test]
fn the_checker_refuses_lost_stale_and_misplaced_writes() {
    let write = |id, first, n| Ev::Sent { id, first, n, zero: false, fua: false };
    // Block 0: #1 flushed, then #3 sent and never acknowledged. Block 1: #2
    // acknowledged but not flushed. Block 2: #4 zeroes, acknowledged, then
    // flushed (#5). Block 3: never written, initial fill 0x22.
    let log = vec![
        write(1, 0, 1),
        Ev::Acked { id: 1, error: 0 },
        Ev::FlushSent { id: 10 },
        write(2, 1, 1),
        Ev::FlushAcked { id: 10, error: 0 },
        Ev::Sent { id: 4, first: 2, n: 1, zero: true, fua: false },
        Ev::Acked { id: 4, error: 0 },
        Ev::FlushSent { id: 5 },
        Ev::Acked { id: 2, error: 0 },
        Ev::FlushAcked { id: 5, error: 0 },
        write(3, 0, 1),
        Ev::Kill,
    ];
    let model = Model::new(&log, vec![0x11, 0x11, 0x11, 0x22]);
    let image = |blocks: [Option<u64>; 4], fills: [u8; 4]| {
        let mut data = vec![0u8; 4 * BLOCK as usize];
        for (b, blk) in data.chunks_mut(BLOCK as usize).enumerate() {
            for (i, s) in blk.chunks_mut(SECTOR as usize).enumerate() {
                match blocks[b] {
                    Some(id) => fill_sector(s, b as u64 * SECTORS_PER_BLOCK + i as u64, id),
                    None => s.fill(fills[b]),
                }
            }
        }
        data
    };
    let end = log.len();
    // Allowed: #1 or #3 on block 0, old or #2 on block 1, zeroes on block 2.
    model.check(&image([Some(1), None, None, None], [0, 0x11, 0, 0x22]), end).unwrap();
    model.check(&image([Some(3), Some(2), None, None], [0, 0, 0, 0x22]), end).unwrap();
    // Block 0 lost its flushed write.
    let e = model.check(&image([None, None, None, None], [0x11, 0x11, 0, 0x22]), end).unwrap_err();
    assert!(e.contains("block 0 ") && e.contains("8 bad sectors in 1 blocks"), "{e}");
    // Block 2's flushed zeroes are gone.
    assert!(model.check(&image([Some(1), None, None, None], [0, 0x11, 0x11, 0x22]), end).is_err());
    // Block 3 never written but reads something else.
    assert!(model.check(&image([Some(1), None, None, None], [0, 0x11, 0, 0x33]), end).is_err());
    // Before flush #10 was acknowledged, nothing was durable on block 0.
    let before_flush = 4;
    model.check(&image([None, None, None, None], [0x11, 0x11, 0x11, 0x22]), before_flush).unwrap();
    // A sector of block 0 holding block 1's data (misplaced), one torn sector.
    let mut data = image([Some(1), None, None, None], [0, 0x11, 0, 0x22]);
    let (a, b) = data.split_at_mut(BLOCK as usize);
    fill_sector(&mut b[..SECTOR as usize], SECTORS_PER_BLOCK, 2);
    a[..SECTOR as usize].copy_from_slice(&b[..SECTOR as usize]);
    assert!(model.check(&data, end).unwrap_err().contains("of sector 8"));
    let mut data = image([Some(1), None, None, None], [0, 0x11, 0, 0x22]);
    data[100] ^= 1;
    assert!(model.check(&data, end).unwrap_err().contains("garbage"));
}
