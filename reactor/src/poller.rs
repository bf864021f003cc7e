//! Pollers: functions a reactor calls on every tick (active) or on a period
//! (timed), each reporting whether it did work.
//!
//! A reactor only sleeps after every active poller reported [`PollStatus::Idle`],
//! and while asleep no active poller runs. So an active poller may only watch
//! state that changes through this reactor's own messages, tasks or
//! completions — never an external source with no wake-up (use an io_uring
//! operation or a timed poller for those).

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use slab::Slab;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// The poller did work; the reactor stays awake.
    Busy,
    /// Nothing to do.
    Idle,
}

impl PollStatus {
    pub fn from_busy(busy: bool) -> PollStatus {
        if busy { PollStatus::Busy } else { PollStatus::Idle }
    }
}

/// Names a registered poller on its reactor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PollerId(usize);

type PollFn = Box<dyn FnMut() -> PollStatus>;

struct PollerSlot {
    name: String,
    /// Taken out while the poller runs, so it may (un)register pollers.
    f: Option<PollFn>,
    period: Option<Duration>,
    unregistered: bool,
    runs: u64,
    busy_runs: u64,
}

/// Per-poller counters, for introspection (`thread_get_pollers`-style).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollerInfo {
    pub name: String,
    pub period: Option<Duration>,
    pub runs: u64,
    pub busy_runs: u64,
}

#[derive(Default)]
pub(crate) struct Pollers {
    slots: RefCell<Slab<PollerSlot>>,
    active: RefCell<Vec<usize>>,
    /// Timed pollers by next deadline.
    timed: RefCell<BinaryHeap<Reverse<(Instant, usize)>>>,
    /// Set when `active` changed during a run, so the snapshot is refreshed.
    active_gen: Cell<u64>,
    scratch: RefCell<Vec<usize>>,
}

impl Pollers {
    pub(crate) fn register(&self, name: &str, period: Option<Duration>, f: PollFn) -> PollerId {
        let id = self.slots.borrow_mut().insert(PollerSlot {
            name: name.to_string(),
            f: Some(f),
            period,
            unregistered: false,
            runs: 0,
            busy_runs: 0,
        });
        match period {
            None => {
                self.active.borrow_mut().push(id);
                self.active_gen.set(self.active_gen.get() + 1);
            }
            Some(p) => self.timed.borrow_mut().push(Reverse((Instant::now() + p, id))),
        }
        PollerId(id)
    }

    pub(crate) fn unregister(&self, id: PollerId) {
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(id.0) else {
            return;
        };
        if slot.f.is_none() {
            // Running right now: removed when it returns.
            slot.unregistered = true;
            return;
        }
        let period = slot.period;
        slots.remove(id.0);
        drop(slots);
        if period.is_none() {
            self.active.borrow_mut().retain(|&p| p != id.0);
            self.active_gen.set(self.active_gen.get() + 1);
        }
        // Timed entries are dropped lazily when they come due.
    }

    pub(crate) fn run_active(&self) -> bool {
        let mut batch = std::mem::take(&mut *self.scratch.borrow_mut());
        batch.extend_from_slice(&self.active.borrow());
        let mut busy = false;
        for &id in &batch {
            busy |= self.run_one(id) == Some(PollStatus::Busy);
        }
        batch.clear();
        *self.scratch.borrow_mut() = batch;
        busy
    }

    /// Runs timed pollers whose deadline passed; returns true if any was busy.
    pub(crate) fn run_timed(&self, now: Instant) -> bool {
        let mut busy = false;
        loop {
            let id = {
                let mut timed = self.timed.borrow_mut();
                match timed.peek() {
                    Some(Reverse((due, _))) if *due <= now => timed.pop().map(|Reverse((_, id))| id),
                    _ => None,
                }
            };
            let Some(id) = id else { break };
            let period = match self.slots.borrow().get(id) {
                Some(slot) => slot.period,
                None => continue,
            };
            busy |= self.run_one(id) == Some(PollStatus::Busy);
            if let Some(p) = period
                && self.slots.borrow().contains(id)
            {
                self.timed.borrow_mut().push(Reverse((now + p, id)));
            }
        }
        busy
    }

    fn run_one(&self, id: usize) -> Option<PollStatus> {
        let mut f = self.slots.borrow_mut().get_mut(id)?.f.take()?;
        let status = f();
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[id];
        slot.runs += 1;
        slot.busy_runs += u64::from(status == PollStatus::Busy);
        if slot.unregistered {
            let period = slot.period;
            slots.remove(id);
            drop(slots);
            if period.is_none() {
                self.active.borrow_mut().retain(|&p| p != id);
            }
            drop(f);
        } else {
            slot.f = Some(f);
        }
        Some(status)
    }

    /// Earliest deadline among timed pollers.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timed.borrow().peek().map(|Reverse((d, _))| *d)
    }

    pub(crate) fn info(&self) -> Vec<PollerInfo> {
        self.slots
            .borrow()
            .iter()
            .map(|(_, s)| PollerInfo { name: s.name.clone(), period: s.period, runs: s.runs, busy_runs: s.busy_runs })
            .collect()
    }

    pub(crate) fn clear(&self) {
        let slots = std::mem::take(&mut *self.slots.borrow_mut());
        self.active.borrow_mut().clear();
        self.timed.borrow_mut().clear();
        drop(slots);
    }
}
