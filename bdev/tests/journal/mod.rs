//! Test support: `x-journal`, a pass-through filter that records every
//! write, write-zeroes, discard and flush it passes to its `file` child,
//! and a replayer that turns the record into the disk images a real disk
//! could hold after a power cut at some point of it.
//!
//! ```text
//!   format driver ──▶ x-journal ──▶ file child (the I/O happens for real)
//!                        │
//!                        └─▶ Log: Submit(op) / Complete(op) / Guest(tag),
//!                            one total order (a mutex), op data copied
//! ```
//!
//! The model of the disk: a write that completed before a flush was
//! *submitted* is durable once that flush completes (a flush covers what
//! completed before it started, not what completes while it runs); a FUA
//! write is durable once it completes. Every other write submitted before
//! the cut may or may not have reached the medium, in any combination: the
//! disk's cache writes back in any order. Where two writes overlap, one
//! that reached the medium is newer than the one it overwrote (they are
//! applied in completion order). A write reaches the medium whole or not at
//! all: tearing inside a write (some sectors persisted, others not) is not
//! modelled.
//!
//! Cuts are taken just before each flush completes, and at the end: at that
//! point the durable set is that of the epoch the flush closes and the set
//! of undecided writes is the largest of the epoch, so every image a cut
//! inside the epoch can leave is one of its subsets.
//!
//! Reads pass through unrecorded. The driver exists only in tests: register
//! it with [`register`] on a test's graph.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bdev::{
    Bdev, BdevError, BdevInfo, BlockChannel, BlockStatus, Channel, Done, Graph, Io, IoDone, IoError, IoFlags, IoKind,
    LocalBoxFuture, Node, OpenCtx, OptReader, Perms,
};

pub const DRIVER: &str = "x-journal";

/// What a recorded request did to its child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Write,
    Zero,
    Discard,
    Flush,
}

/// One recorded request to the child.
#[derive(Debug, Clone)]
pub struct FileOp {
    pub kind: OpKind,
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
    /// The bytes written (writes only), as they were at submission.
    pub data: Option<Arc<[u8]>>,
    /// Index of its `Submit` event.
    pub submitted: usize,
    /// Index of its `Complete` event.
    pub completed: Option<usize>,
    pub ok: bool,
}

/// One entry of the total order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Submit(usize),
    Complete(usize),
    /// A marker of the test's own: `tag` means what the test says
    /// (`ack` false for a request sent, true for its answer).
    Guest {
        tag: u64,
        ack: bool,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Log {
    pub events: Vec<Event>,
    pub ops: Vec<FileOp>,
}

/// A node's record, shared by its channels and the test.
#[derive(Debug, Default)]
pub struct Journal {
    log: Mutex<Log>,
}

/// Journals by key, so the driver's open function (a plain `fn`) finds
/// the one a test made.
static JOURNALS: Mutex<Vec<(String, Weak<Journal>)>> = Mutex::new(Vec::new());

impl Journal {
    /// A new, empty journal that `{"driver": "x-journal", "journal": key}` records into.
    pub fn new(key: &str) -> Arc<Journal> {
        let j = Arc::new(Journal::default());
        let mut all = JOURNALS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(k, w)| w.strong_count() > 0 && k != key);
        all.push((key.to_string(), Arc::downgrade(&j)));
        j
    }

    fn find(key: &str) -> Option<Arc<Journal>> {
        let all = JOURNALS.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|(k, _)| k == key).and_then(|(_, w)| w.upgrade())
    }

    pub fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a marker of the test's; returns its index.
    pub fn mark(&self, tag: u64, ack: bool) -> usize {
        let mut log = self.lock();
        log.events.push(Event::Guest { tag, ack });
        log.events.len() - 1
    }

    /// Events so far.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn snapshot(&self) -> Log {
        self.lock().clone()
    }

    fn submit(&self, io: &Io) -> usize {
        let kind = match io.kind {
            IoKind::Write => OpKind::Write,
            IoKind::WriteZeroes => OpKind::Zero,
            IoKind::Discard => OpKind::Discard,
            IoKind::Flush => OpKind::Flush,
            IoKind::Read => unreachable!("reads are not recorded"),
        };
        let data = if kind == OpKind::Write { io.buf.as_deref().map(Arc::from) } else { None };
        let mut log = self.lock();
        let op = log.ops.len();
        let submitted = log.events.len();
        log.events.push(Event::Submit(op));
        log.ops.push(FileOp {
            kind,
            offset: io.offset,
            len: io.len,
            fua: io.flags.contains(IoFlags::FUA),
            data,
            submitted,
            completed: None,
            ok: false,
        });
        op
    }

    fn complete(&self, op: usize, ok: bool) {
        let mut log = self.lock();
        let at = log.events.len();
        log.events.push(Event::Complete(op));
        log.ops[op].completed = Some(at);
        log.ops[op].ok = ok;
    }
}

// ------------------------------------------------------------------ driver

/// Makes `x-journal` available on `graph`.
pub fn register(graph: &mut Graph) {
    graph.register_driver(DRIVER, open);
}

struct JournalBdev {
    file: Arc<Node>,
    journal: Arc<Journal>,
    block_size: u32,
    read_only: bool,
}

/// Options: `file` (the child), `journal` (the key given to
/// [`Journal::new`]), `block-size` (the alignment to ask of users; at
/// least the child's — 512 makes a buffered file look like O_DIRECT, so
/// sub-sector metadata updates arrive as read-modify-write of whole
/// sectors, as on a real disk).
fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let file = opts.take("file").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("file"))?;
    let key = opts.str_req("journal")?;
    let block_size = opts.u64_opt("block-size")?.unwrap_or(1);
    opts.finish()?;
    if !block_size.is_power_of_two() || block_size > 65536 {
        return Err(BdevError::invalid(format!("block-size {block_size} must be a power of two up to 65536")));
    }
    let journal = Journal::find(&key).ok_or_else(|| BdevError::invalid(format!("no journal '{key}'")))?;
    let read_only = ctx.common().read_only;
    let file = ctx.open_child("file", file, if read_only { Perms::read() } else { Perms::write() })?;
    let read_only = read_only || file.read_only();
    let block_size = (block_size as u32).max(file.bdev().block_size());
    Ok(Arc::new(JournalBdev { file, journal, block_size, read_only }))
}

impl Bdev for JournalBdev {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let file = self.file.channel()?;
        let inflight = Rc::new(Inflight { journal: Arc::clone(&self.journal), slots: RefCell::new(HashMap::new()) });
        Ok(Rc::new(JournalChannel { file, inflight, next: std::cell::Cell::new(0) }))
    }

    fn home(&self) -> Option<reactor::Handle> {
        self.file.home()
    }

    /// The child's description, file name included: a format driver above
    /// resolves relative backing file names against it.
    fn info(&self) -> BdevInfo {
        self.file.bdev().info()
    }
}

/// Requests the child holds: the caller's completion and the op recorded.
struct Inflight {
    journal: Arc<Journal>,
    slots: RefCell<HashMap<u64, (Done, usize)>>,
}

impl IoDone for Inflight {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        let (done, op) = self.slots.borrow_mut().remove(&tag).expect("a recorded request completes once");
        self.journal.complete(op, res.is_ok());
        done.complete(io, res);
    }
}

struct JournalChannel {
    file: BlockChannel,
    inflight: Rc<Inflight>,
    next: std::cell::Cell<u64>,
}

impl Channel for JournalChannel {
    fn submit(&self, io: Io, done: Done) {
        if io.kind == IoKind::Read {
            return self.file.raw().submit(io, done);
        }
        let op = self.inflight.journal.submit(&io);
        let tag = self.next.get();
        self.next.set(tag + 1);
        self.inflight.slots.borrow_mut().insert(tag, (done, op));
        let me: Rc<dyn IoDone> = Rc::clone(&self.inflight) as Rc<dyn IoDone>;
        self.file.raw().submit(io, Done::new(me, tag));
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let file = self.file.clone();
        Box::pin(async move { file.block_status(offset, len).await })
    }
}

// ------------------------------------------------------------------ replay

/// A power cut: the events before `at` happened, the rest did not.
#[derive(Debug, Clone)]
pub struct Cut {
    pub at: usize,
    /// Ops on the medium for certain, in the order they apply.
    pub durable: Vec<usize>,
    /// Ops that may or may not be on the medium, in the order they apply
    /// (completion order; those still in flight last, by submission).
    pub pending: Vec<usize>,
}

impl Log {
    /// Completion order; requests not completed by the cut after the rest.
    fn order_key(&self, op: usize, at: usize) -> (usize, usize) {
        let o = &self.ops[op];
        (o.completed.filter(|&c| c < at).unwrap_or(usize::MAX), o.submitted)
    }

    /// The cut just before event `at`.
    pub fn cut_at(&self, at: usize) -> Cut {
        let done_before = |o: &FileOp, t: usize| o.ok && o.completed.is_some_and(|c| c < t);
        // The latest submission of a flush that completed: everything that
        // completed before it is durable.
        let flushed_upto =
            self.ops.iter().filter(|o| o.kind == OpKind::Flush && done_before(o, at)).map(|o| o.submitted).max();
        let mut durable = Vec::new();
        let mut pending = Vec::new();
        for (i, o) in self.ops.iter().enumerate() {
            if o.kind == OpKind::Flush || o.submitted >= at {
                continue;
            }
            let is_durable = flushed_upto.is_some_and(|f| done_before(o, f)) || (o.fua && done_before(o, at));
            if is_durable { durable.push(i) } else { pending.push(i) }
        }
        durable.sort_by_key(|&i| self.order_key(i, at));
        pending.sort_by_key(|&i| self.order_key(i, at));
        Cut { at, durable, pending }
    }

    /// One cut per epoch among the first `end` events: just before each
    /// flush completes, and at `end`.
    pub fn cuts(&self, end: usize) -> Vec<Cut> {
        let mut points: Vec<usize> = self
            .ops
            .iter()
            .filter(|o| o.kind == OpKind::Flush)
            .filter_map(|o| o.completed)
            .filter(|&c| c < end)
            .collect();
        points.push(end);
        points.sort_unstable();
        points.dedup();
        points.into_iter().map(|at| self.cut_at(at)).collect()
    }

    /// The medium after `initial` received `ops` (applied in the order given).
    pub fn image(&self, initial: &[u8], ops: impl IntoIterator<Item = usize>) -> Vec<u8> {
        let ops: Vec<usize> = ops.into_iter().collect();
        // Sized once and copied with memcpy: this runs for every image
        // checked, in debug builds too.
        let len = ops
            .iter()
            .map(|&i| &self.ops[i])
            .filter(|o| matches!(o.kind, OpKind::Write | OpKind::Zero))
            .map(|o| (o.offset + o.len) as usize)
            .fold(initial.len(), usize::max);
        let mut img = vec![0u8; len];
        img[..initial.len()].copy_from_slice(initial);
        for i in ops {
            let o = &self.ops[i];
            let (start, end) = (o.offset as usize, (o.offset + o.len) as usize);
            match (o.kind, &o.data) {
                (OpKind::Write, Some(d)) => img[start..end].copy_from_slice(d),
                // Punching a hole reads as zeroes and never grows a file.
                (OpKind::Write | OpKind::Zero | OpKind::Discard, _) => zero(&mut img, start, end),
                (OpKind::Flush, _) => {}
            }
        }
        img
    }

    /// The medium after the durable ops of `cut` and the pending ones at
    /// positions `chosen` (indices into `cut.pending`).
    pub fn image_of(&self, initial: &[u8], cut: &Cut, chosen: &[usize]) -> Vec<u8> {
        let mut ops: Vec<usize> = cut.durable.iter().copied().chain(chosen.iter().map(|&k| cut.pending[k])).collect();
        ops.sort_by_key(|&i| self.order_key(i, cut.at));
        self.image(initial, ops)
    }

    /// Pairs of writes that overlap while both in flight: their order on
    /// the medium is not defined, and the replay applies them in completion
    /// order. Returned for diagnostics.
    pub fn concurrent_overlaps(&self) -> usize {
        let writes: Vec<&FileOp> = self.ops.iter().filter(|o| o.kind != OpKind::Flush).collect();
        let mut n = 0;
        for (i, a) in writes.iter().enumerate() {
            let a_end = a.completed.unwrap_or(usize::MAX);
            // Ops are in submission order: once one starts after `a` ended, all later ones do.
            for b in &writes[i + 1..] {
                if b.submitted > a_end {
                    break;
                }
                let b_end = b.completed.unwrap_or(usize::MAX);
                let in_flight_together = b.submitted < a_end && a.submitted < b_end;
                let overlap = a.offset < b.offset + b.len && b.offset < a.offset + a.len;
                if in_flight_together && overlap {
                    n += 1;
                }
            }
        }
        n
    }

    /// The same record with no flush ever completing: a disk that lost
    /// them all (for testing the checks).
    pub fn with_flushes_lost(&self) -> Log {
        let mut log = self.clone();
        for o in log.ops.iter_mut().filter(|o| o.kind == OpKind::Flush) {
            o.completed = None;
            o.ok = false;
        }
        log
    }

    /// The events as text, one a line (for a failing case's directory).
    pub fn dump(&self, end: usize) -> String {
        let mut s = String::new();
        for (i, e) in self.events.iter().enumerate().take(end) {
            let _ = match *e {
                Event::Submit(op) => {
                    let o = &self.ops[op];
                    writeln!(
                        s,
                        "{i:6} submit   op{op:<5} {:?} {:#x}+{:#x}{}",
                        o.kind,
                        o.offset,
                        o.len,
                        if o.fua { " fua" } else { "" }
                    )
                }
                Event::Complete(op) => writeln!(s, "{i:6} complete op{op:<5} ok={}", self.ops[op].ok),
                Event::Guest { tag, ack } => writeln!(s, "{i:6} guest    #{tag} {}", if ack { "ack" } else { "sent" }),
            };
        }
        s
    }
}

/// Zeroes `img[start..end]` (clipped to its length) with memcpy.
fn zero(img: &mut [u8], start: usize, end: usize) {
    const ZEROES: [u8; 4096] = [0; 4096];
    let end = end.min(img.len());
    let mut at = start;
    while at < end {
        let n = (end - at).min(ZEROES.len());
        img[at..at + n].copy_from_slice(&ZEROES[..n]);
        at += n;
    }
}
