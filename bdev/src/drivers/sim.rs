//! `x-sim`: a simulated disk in memory with a volatile write cache, for
//! tests. It is a real backend (the same [`Bdev`]/[`Channel`] traits as a
//! file), so a format driver runs on it unchanged; what a test gets on top
//! is control and a record:
//!
//! ```text
//!   submit ──▶ queue ──poller (next tick)──▶ rule? ── hold: kept until released
//!                 │                            │  └── fail: completes with the error
//!                 │                            └─── execute: reads see every completed write
//!                 └─▶ record: writes kept until durable (flush) or cut (crash_image)
//! ```
//!
//! - **Crash model.** Like a disk with a volatile cache: a write (or
//!   write-zeroes, discard) that completed before a flush was submitted is
//!   durable once that flush completes; a FUA write once it completes.
//!   Every other write submitted so far — completed or still in flight —
//!   may or may not be on the medium after a power cut, in any
//!   combination; kept ones apply in completion order (those in flight
//!   last). [`SimDisk::crash_image`] gives one such medium, chosen by a
//!   seed. Writes persist whole (no tearing).
//! - **Control.** [`Rule`]s hold requests in flight until the rule is
//!   removed (a slow fsync, a write that lands late) or fail them with an
//!   error. `reorder` completes each tick's requests in a seeded order
//!   instead of submission order.
//! - **Record.** Counters per request type and, on request, the offset
//!   and length of every read.
//!
//! Like a file, the disk grows when written past its end (write-zeroes
//! only with [`IoFlags::GROW`]), and reads past the end return zeroes.
//! Completions come from a poller, never inside `submit`; while a request
//! is held the poller reports work, so its reactor keeps polling and sees
//! the release (a test device: it spins while anything is held).
//!
//! Options: `size` (bytes of a new, zeroed disk; default 0), `block-size`
//! (default 512), `seed` (default 0), `reorder` (default false), or `sim`:
//! the key of a disk a test made with [`SimDisk::register`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use reactor::{PollStatus, PollerId};
use serde_json::json;

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::channel::{BlockChannel, ChannelPolicy};
use crate::error::{BdevError, IoError};
use crate::graph::OpenCtx;
use crate::io::{BlockStatus, Done, Io, IoFlags, IoKind};
use crate::options::{DetectZeroes, DiscardMode, OptReader};

pub const DRIVER: &str = "x-sim";
const BLOCK_SIZE_DEFAULT: u64 = 512;
/// Requests executed per poller run at most.
const COMPLETIONS_PER_POLL_MAX: usize = 256;

/// What a [`Rule`] does to the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep the request in flight until the rule is removed.
    Hold,
    /// Complete it with this error; nothing reaches the disk.
    Fail(IoError),
}

/// Which requests an [`Action`] applies to: of the given kinds, and (if a
/// range is given) overlapping it. Flushes have no range.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub kinds: &'static [IoKind],
    pub range: Option<(u64, u64)>,
    pub action: Action,
}

impl Rule {
    /// Holds every request of `kinds`.
    pub fn hold(kinds: &'static [IoKind]) -> Rule {
        Rule { kinds, range: None, action: Action::Hold }
    }

    /// Fails every request of `kinds` with `error`.
    pub fn fail(kinds: &'static [IoKind], error: IoError) -> Rule {
        Rule { kinds, range: None, action: Action::Fail(error) }
    }

    /// Only requests overlapping `[offset, offset + len)`.
    pub fn within(self, offset: u64, len: u64) -> Rule {
        Rule { range: Some((offset, offset + len)), ..self }
    }

    fn matches(&self, io: &Io) -> bool {
        self.kinds.contains(&io.kind)
            && match self.range {
                None => true,
                Some((start, end)) => io.kind != IoKind::Flush && io.offset < end && start < io.end(),
            }
    }
}

/// Requests executed, by type (held ones count when they execute).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub zeroes: u64,
    pub discards: u64,
    pub flushes: u64,
    pub failed: u64,
}

/// Which of the writes that may or may not be on the medium a crash keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Only what is durable.
    None,
    /// Everything submitted.
    All,
    /// Each write with probability one half, drawn from the seed.
    Random(u64),
    /// The first `n` in the order they apply (the cache wrote back in
    /// order and stopped).
    Prefix(usize),
    /// All but the `k`-th (one write lost, the ones after it kept).
    AllBut(usize),
}

/// Called as each flush executes, before it makes anything durable: the
/// cut where a power failure leaves the most undecided writes.
pub type FlushHook = Box<dyn FnMut(&Cut<'_>) + Send>;

/// The disk at a cut: what a power failure there could leave.
pub struct Cut<'a> {
    sim: &'a Sim,
}

impl Cut<'_> {
    /// Writes that may or may not be on the medium.
    pub fn undecided(&self) -> usize {
        self.sim.pending.len()
    }

    /// One medium a power failure here could leave.
    pub fn image(&self, keep: Keep) -> Vec<u8> {
        self.sim.crash_image(keep)
    }
}

/// A write (or zeroing) that reached the disk's cache, or is on its way,
/// and is not durable yet: `data` None means zeroes.
#[derive(Debug, Clone)]
struct Pending {
    id: u64,
    offset: u64,
    len: u64,
    data: Option<(Arc<[u8]>, usize)>,
    /// Zeroes that may make the disk longer.
    grow: bool,
    /// Completion sequence number; None while in flight.
    completed: Option<u64>,
}

#[derive(Default)]
struct Sim {
    /// What reads return: every completed write applied.
    data: Vec<u8>,
    /// The medium for certain.
    durable: Vec<u8>,
    /// Writes that may or may not be on the medium.
    pending: Vec<Pending>,
    next_id: u64,
    /// Write completions so far (the next completion's sequence number).
    completions: u64,
    rules: Vec<(u64, Rule)>,
    next_rule: u64,
    /// Requests currently held by a rule.
    held: usize,
    stats: SimStats,
    read_log: Option<Vec<(u64, u64)>>,
    on_flush: Option<FlushHook>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("len", &self.data.len()).field("undecided", &self.pending.len()).finish()
    }
}

/// A simulated disk, shared by its channels (on any reactor) and the test.
#[derive(Debug)]
pub struct SimDisk {
    sim: Mutex<Sim>,
    block_size: u32,
    seed: u64,
    reorder: bool,
}

/// Disks by key, so `{"driver": "x-sim", "sim": key}` finds the one a test made.
static DISKS: Mutex<Vec<(String, Weak<SimDisk>)>> = Mutex::new(Vec::new());

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn apply(img: &mut Vec<u8>, offset: u64, len: u64, data: Option<&[u8]>, grow: bool) {
    let (start, mut end) = (offset as usize, (offset + len) as usize);
    if end > img.len() {
        if grow || data.is_some() {
            img.resize(end, 0);
        } else {
            end = img.len();
        }
    }
    if start >= end {
        return;
    }
    match data {
        Some(d) => img[start..end].copy_from_slice(&d[..end - start]),
        None => img[start..end].fill(0),
    }
}

impl Pending {
    fn bytes(&self) -> Option<&[u8]> {
        self.data.as_ref().map(|(d, at)| &d[*at..*at + self.len as usize])
    }

    /// What is left of this write outside `[start, end)`: a newer durable
    /// write there hides it whether it lands or not.
    fn clip(self, start: u64, end: u64) -> Vec<Pending> {
        let my_end = self.offset + self.len;
        if end <= self.offset || my_end <= start {
            return vec![self];
        }
        let mut out = Vec::new();
        let piece = |from: u64, to: u64| Pending {
            offset: from,
            len: to - from,
            data: self.data.as_ref().map(|(d, at)| (Arc::clone(d), at + (from - self.offset) as usize)),
            ..self.clone()
        };
        if self.offset < start {
            out.push(piece(self.offset, start));
        }
        if end < my_end {
            out.push(piece(end, my_end));
        }
        out
    }
}

impl Sim {
    fn record(&mut self, io: &Io) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let data = match io.kind {
            IoKind::Write => io.buf.as_deref().map(|b| (Arc::from(b), 0)),
            _ => None,
        };
        let grows = io.kind == IoKind::Write || (io.kind == IoKind::WriteZeroes && io.flags.contains(IoFlags::GROW));
        let len = if grows { io.len } else { io.len.min((self.data.len() as u64).saturating_sub(io.offset)) };
        if len > 0 && io.kind != IoKind::Flush && io.kind != IoKind::Read {
            self.pending.push(Pending { id, offset: io.offset, len, data, grow: grows, completed: None });
        }
        id
    }

    fn forget(&mut self, id: u64) {
        self.pending.retain(|p| p.id != id);
    }

    fn execute(&mut self, io: &mut Io, id: u64, flush_mark: u64) {
        match io.kind {
            IoKind::Read => {
                self.stats.reads += 1;
                self.stats.read_bytes += io.len;
                if let Some(log) = &mut self.read_log {
                    log.push((io.offset, io.len));
                }
                let start = (io.offset as usize).min(self.data.len());
                let buf = io.buf_mut();
                let n = (self.data.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&self.data[start..start + n]);
                buf[n..].fill(0);
            }
            IoKind::Flush => {
                self.stats.flushes += 1;
                if let Some(mut hook) = self.on_flush.take() {
                    hook(&Cut { sim: self });
                    self.on_flush = Some(hook);
                }
                self.make_durable(|p| p.completed.is_some_and(|c| c < flush_mark));
            }
            IoKind::Write | IoKind::WriteZeroes | IoKind::Discard => {
                match io.kind {
                    IoKind::Write => {
                        self.stats.writes += 1;
                        self.stats.write_bytes += io.len;
                    }
                    IoKind::WriteZeroes => self.stats.zeroes += 1,
                    _ => self.stats.discards += 1,
                }
                let grow = io.kind == IoKind::WriteZeroes && io.flags.contains(IoFlags::GROW);
                apply(&mut self.data, io.offset, io.len, io.buf.as_deref().filter(|_| io.kind == IoKind::Write), grow);
                let seq = self.completions;
                self.completions += 1;
                if let Some(p) = self.pending.iter_mut().find(|p| p.id == id) {
                    p.completed = Some(seq);
                }
                if io.flags.contains(IoFlags::FUA) {
                    self.make_durable(|p| p.id == id);
                }
            }
        }
    }

    /// Moves the pending writes `which` selects onto the medium, in
    /// completion order, and clips older pending writes they cover.
    fn make_durable(&mut self, which: impl Fn(&Pending) -> bool) {
        let (mut now, rest): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending).into_iter().partition(which);
        now.sort_by_key(|p| p.completed);
        self.pending = rest;
        for p in &now {
            apply(&mut self.durable, p.offset, p.len, p.bytes(), p.grow);
            let done = p.completed.unwrap_or(u64::MAX);
            let (end, start) = (p.offset + p.len, p.offset);
            self.pending = std::mem::take(&mut self.pending)
                .into_iter()
                .flat_map(|q| if q.completed.is_some_and(|c| c < done) { q.clip(start, end) } else { vec![q] })
                .collect();
        }
    }

    fn crash_image(&self, keep: Keep) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mut order: Vec<&Pending> = self.pending.iter().collect();
        order.sort_by_key(|p| (p.completed.unwrap_or(u64::MAX), p.id));
        let mut state = match keep {
            Keep::Random(seed) => seed,
            _ => 0,
        };
        for (i, p) in order.into_iter().enumerate() {
            let kept = match keep {
                Keep::None => false,
                Keep::All => true,
                Keep::Random(_) => splitmix(&mut state) & 1 == 1,
                Keep::Prefix(n) => i < n,
                Keep::AllBut(k) => i != k,
            };
            if kept {
                apply(&mut img, p.offset, p.len, p.bytes(), p.grow);
            }
        }
        img
    }

    fn rule_for(&self, io: &Io) -> Option<Action> {
        self.rules.iter().find(|(_, r)| r.matches(io)).map(|(_, r)| r.action)
    }
}

impl SimDisk {
    /// A disk holding `contents`, all of it durable.
    pub fn new(contents: Vec<u8>, seed: u64) -> Arc<SimDisk> {
        SimDisk::with_options(contents, seed, BLOCK_SIZE_DEFAULT as u32, false)
    }

    /// A disk asking `block_size` alignment of its users, completing each
    /// poll's requests in an order drawn from `seed` if `reorder`.
    pub fn with_options(contents: Vec<u8>, seed: u64, block_size: u32, reorder: bool) -> Arc<SimDisk> {
        assert!(block_size.is_power_of_two());
        let sim = Sim { durable: contents.clone(), data: contents, ..Sim::default() };
        Arc::new(SimDisk { sim: Mutex::new(sim), block_size, seed, reorder })
    }

    /// Makes this disk what `{"driver": "x-sim", "sim": key}` opens.
    pub fn register(self: &Arc<Self>, key: &str) {
        let mut all = DISKS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(k, w)| w.strong_count() > 0 && k != key);
        all.push((key.to_string(), Arc::downgrade(self)));
    }

    fn find(key: &str) -> Option<Arc<SimDisk>> {
        let all = DISKS.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|(k, _)| k == key).and_then(|(_, w)| w.upgrade())
    }

    fn lock(&self) -> MutexGuard<'_, Sim> {
        self.sim.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A channel on the current reactor that takes requests anywhere (the
    /// disk grows), as a format driver's file channel does.
    pub fn channel(self: &Arc<Self>) -> BlockChannel {
        let raw = Arc::clone(self).create_channel().expect("a simulated disk always makes a channel");
        BlockChannel::new(
            raw,
            ChannelPolicy {
                size: u64::MAX,
                block_size: self.block_size,
                read_only: false,
                discard: DiscardMode::Unmap,
                detect_zeroes: DetectZeroes::Off,
                compress: false,
            },
        )
    }

    /// What reads return now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// One medium a power cut now could leave (see the module notes).
    pub fn crash_image(&self, keep: Keep) -> Vec<u8> {
        self.lock().crash_image(keep)
    }

    /// Calls `hook` at every flush from now on (see [`FlushHook`]).
    pub fn on_flush(&self, hook: FlushHook) {
        self.lock().on_flush = Some(hook);
    }

    /// Writes that may or may not be on the medium.
    pub fn undecided(&self) -> usize {
        self.lock().pending.len()
    }

    /// Applies `rule` until [`SimDisk::remove_rule`]; the first matching
    /// rule decides. Returns its id.
    pub fn add_rule(&self, rule: Rule) -> u64 {
        let mut sim = self.lock();
        let id = sim.next_rule;
        sim.next_rule += 1;
        sim.rules.push((id, rule));
        id
    }

    /// Removes a rule: requests it held go on at the next poll.
    pub fn remove_rule(&self, id: u64) {
        self.lock().rules.retain(|(i, _)| *i != id);
    }

    /// Requests held right now.
    pub fn held(&self) -> usize {
        self.lock().held
    }

    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// Starts (or restarts) recording the offset and length of every read.
    pub fn record_reads(&self) {
        self.lock().read_log = Some(Vec::new());
    }

    /// The reads recorded since [`SimDisk::record_reads`].
    pub fn reads(&self) -> Vec<(u64, u64)> {
        self.lock().read_log.clone().unwrap_or_default()
    }
}

pub fn open(_ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let key = opts.str_opt("sim")?;
    let size = opts.u64_opt("size")?;
    let block_size = opts.u64_opt("block-size")?.unwrap_or(BLOCK_SIZE_DEFAULT);
    let seed = opts.u64_opt("seed")?.unwrap_or(0);
    let reorder = opts.bool_opt("reorder")?.unwrap_or(false);
    opts.finish()?;
    if !block_size.is_power_of_two() || block_size > 65536 {
        return Err(BdevError::invalid(format!("block-size {block_size} must be a power of two up to 65536")));
    }
    let disk = match key {
        Some(key) => SimDisk::find(&key).ok_or_else(|| BdevError::invalid(format!("no simulated disk '{key}'")))?,
        None => {
            let size = size.unwrap_or(0);
            let len = usize::try_from(size).map_err(|_| BdevError::invalid(format!("size {size} is too large")))?;
            SimDisk::with_options(vec![0; len], seed, block_size as u32, reorder)
        }
    };
    Ok(disk)
}

impl Bdev for SimDisk {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let state = Rc::new(RefCell::new(Queues {
            queue: VecDeque::new(),
            held: Vec::new(),
            rng: self.seed ^ 0x5349_4d44_4953_4b21,
        }));
        let (disk, q) = (Arc::clone(&self), Rc::clone(&state));
        let poller = reactor::current().register_poller(DRIVER, move || poll(&disk, &q));
        Ok(Rc::new(SimChannel { disk: self, state, poller }))
    }

    fn info(&self) -> BdevInfo {
        let desc = json!({"driver": DRIVER, "size": self.size()});
        BdevInfo {
            filename: format!("json:{desc}"),
            direct: false,
            no_flush: false,
            actual_size: Some(self.size()),
            format_specific: None,
        }
    }
}

/// A request on its way: the record's id, and for a flush the write
/// completions it covers.
struct Req {
    io: Io,
    done: Done,
    id: u64,
    flush_mark: u64,
}

struct Queues {
    queue: VecDeque<Req>,
    held: Vec<Req>,
    rng: u64,
}

fn poll(disk: &SimDisk, q: &RefCell<Queues>) -> PollStatus {
    let batch: Vec<Req> = {
        let mut q = q.borrow_mut();
        let n = q.queue.len().min(COMPLETIONS_PER_POLL_MAX);
        let mut batch: Vec<Req> = std::mem::take(&mut q.held);
        batch.extend(q.queue.drain(..n));
        if disk.reorder {
            for i in (1..batch.len()).rev() {
                let j = (splitmix(&mut q.rng) % (i as u64 + 1)) as usize;
                batch.swap(i, j);
            }
        }
        batch
    };
    if batch.is_empty() {
        return PollStatus::Idle;
    }
    let mut done = Vec::with_capacity(batch.len());
    {
        let mut sim = disk.lock();
        sim.held = 0;
        for mut r in batch {
            match sim.rule_for(&r.io) {
                Some(Action::Hold) => {
                    sim.held += 1;
                    q.borrow_mut().held.push(r);
                }
                Some(Action::Fail(e)) => {
                    sim.stats.failed += 1;
                    sim.forget(r.id);
                    done.push((r, Err(e)));
                }
                None => {
                    sim.execute(&mut r.io, r.id, r.flush_mark);
                    done.push((r, Ok(())));
                }
            }
        }
    }
    // Completions run outside the disk's lock: they may submit again.
    for (r, res) in done {
        r.done.complete(r.io, res);
    }
    PollStatus::Busy
}

struct SimChannel {
    disk: Arc<SimDisk>,
    state: Rc<RefCell<Queues>>,
    poller: PollerId,
}

impl Channel for SimChannel {
    fn submit(&self, io: Io, done: Done) {
        let (id, flush_mark) = {
            let mut sim = self.disk.lock();
            (sim.record(&io), sim.completions)
        };
        self.state.borrow_mut().queue.push_back(Req { io, done, id, flush_mark });
    }

    fn block_status(&self, _offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        Box::pin(async move { Ok(BlockStatus::data(len, None)) })
    }
}

impl Drop for SimChannel {
    fn drop(&mut self) {
        if let Some(r) = reactor::try_current() {
            r.unregister_poller(self.poller);
        }
        let mut q = self.state.borrow_mut();
        let q = &mut *q;
        let left: Vec<Req> = q.queue.drain(..).chain(q.held.drain(..)).collect();
        // Off a reactor (a test unwinding), nobody is left to tell.
        if reactor::try_current().is_some() {
            for r in left {
                r.done.complete_later(r.io, Err(IoError::Canceled));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use reactor::{IoBuf, Reactor, ReactorOptions};

    use super::*;

    fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
        Reactor::new(None, ReactorOptions::default()).unwrap().block_on(f)
    }

    async fn write(ch: &BlockChannel, offset: u64, byte: u8, len: usize, flags: IoFlags) {
        ch.write(offset, IoBuf::from_slice(&vec![byte; len]), flags).await.1.unwrap();
    }

    #[test]
    fn reads_see_completed_writes_and_the_disk_grows_like_a_file() {
        let disk = SimDisk::new(vec![7; 1024], 1);
        let d = Arc::clone(&disk);
        run(async move {
            let ch = d.channel();
            write(&ch, 4096, 1, 512, IoFlags::NONE).await;
            assert_eq!(d.size(), 4608);
            let got = ch.read(0, 512).await.unwrap();
            assert!(got.iter().all(|&b| b == 7));
            assert!(ch.read(1024, 512).await.unwrap().iter().all(|&b| b == 0), "a hole reads as zeroes");
            assert!(ch.read(8192, 512).await.unwrap().iter().all(|&b| b == 0), "past the end too");
            ch.write_zeroes(8192, 512, IoFlags::NONE).await.unwrap();
            assert_eq!(d.size(), 4608, "write-zeroes grows only when asked to");
            ch.write_zeroes(8192, 512, IoFlags::GROW).await.unwrap();
            assert_eq!(d.size(), 8704);
        });
        assert_eq!(disk.stats().writes, 1);
        assert_eq!(disk.stats().zeroes, 2);
    }

    #[test]
    fn a_crash_keeps_what_a_flush_covered_and_any_mix_of_the_rest() {
        let disk = SimDisk::new(vec![0; 4096], 1);
        let d = Arc::clone(&disk);
        run(async move {
            let ch = d.channel();
            write(&ch, 0, 1, 512, IoFlags::NONE).await;
            ch.flush().await.unwrap();
            write(&ch, 0, 2, 512, IoFlags::NONE).await;
            write(&ch, 512, 3, 512, IoFlags::NONE).await;
            write(&ch, 1024, 4, 512, IoFlags::FUA).await;
        });
        let none = disk.crash_image(Keep::None);
        assert_eq!((none[0], none[512], none[1024]), (1, 0, 4), "flushed and FUA writes are durable");
        let all = disk.crash_image(Keep::All);
        assert_eq!((all[0], all[512], all[1024]), (2, 3, 4));
        assert_eq!(all, disk.contents());
        let mut seen = std::collections::HashSet::new();
        for seed in 0..64 {
            let img = disk.crash_image(Keep::Random(seed));
            assert!(matches!((img[0], img[512]), (1 | 2, 0 | 3)));
            assert_eq!(img, disk.crash_image(Keep::Random(seed)), "a seed gives one image");
            seen.insert((img[0], img[512]));
        }
        assert_eq!(seen.len(), 4, "every combination comes up");
    }

    #[test]
    fn an_older_write_never_lands_over_a_newer_durable_one() {
        let disk = SimDisk::new(vec![0; 4096], 1);
        let d = Arc::clone(&disk);
        run(async move {
            let ch = d.channel();
            write(&ch, 0, 1, 2048, IoFlags::NONE).await;
            write(&ch, 512, 2, 512, IoFlags::FUA).await;
        });
        let img = disk.crash_image(Keep::All);
        assert_eq!((img[0], img[512], img[1024]), (1, 2, 1));
        assert_eq!(disk.undecided(), 2, "the older write, clipped around the newer one");
    }

    #[test]
    fn a_flush_covers_only_what_completed_before_it_was_sent() {
        let disk = SimDisk::new(vec![0; 4096], 1);
        let d = Arc::clone(&disk);
        run(async move {
            let ch = d.channel();
            let hold = d.add_rule(Rule::hold(&[IoKind::Write]));
            let c2 = ch.clone();
            let late = reactor::spawn_local(async move { write(&c2, 0, 9, 512, IoFlags::NONE).await });
            reactor::yield_now().await;
            reactor::yield_now().await;
            assert_eq!(d.held(), 1);
            ch.flush().await.unwrap();
            assert_eq!(d.crash_image(Keep::None)[0], 0, "the held write is not durable");
            assert_eq!(d.crash_image(Keep::All)[0], 9, "but it may land");
            d.remove_rule(hold);
            late.await;
            let fail = d.add_rule(Rule::fail(&[IoKind::Flush], IoError::Io));
            assert_eq!(ch.flush().await, Err(IoError::Io));
            d.remove_rule(fail);
            ch.flush().await.unwrap();
        });
        assert_eq!(disk.crash_image(Keep::None)[0], 9);
        assert_eq!(disk.stats().failed, 1);
    }

    #[test]
    fn held_reads_wait_and_reads_are_recorded() {
        let disk = SimDisk::new(vec![5; 8192], 1);
        disk.record_reads();
        let d = Arc::clone(&disk);
        run(async move {
            let ch = d.channel();
            let hold = d.add_rule(Rule::hold(&[IoKind::Read]).within(4096, 512));
            let c2 = ch.clone();
            let held = reactor::spawn_local(async move { c2.read(4096, 512).await.unwrap() });
            assert_eq!(ch.read(0, 512).await.unwrap()[0], 5, "other reads pass");
            reactor::yield_now().await;
            assert!(!held.is_finished());
            write(&ch, 4096, 6, 512, IoFlags::NONE).await;
            d.remove_rule(hold);
            assert_eq!(held.await[0], 6, "the held read executes when released");
        });
        assert_eq!(disk.reads(), vec![(0, 512), (4096, 512)]);
    }

    #[test]
    fn reordering_is_seeded() {
        let order = |seed: u64| {
            let disk = SimDisk::with_options(vec![0; 4096], seed, 512, true);
            let d = Arc::clone(&disk);
            run(async move {
                let ch = d.channel();
                let jobs: Vec<_> = (0..8u8)
                    .map(|i| {
                        let ch = ch.clone();
                        reactor::spawn_local(async move { write(&ch, 0, i, 512, IoFlags::NONE).await })
                    })
                    .collect();
                for j in jobs {
                    j.await;
                }
                ch.read(0, 1).await.unwrap()[0]
            })
        };
        assert_eq!(order(3), order(3));
        assert!((0..16).map(order).collect::<std::collections::HashSet<_>>().len() > 1);
    }
}
