//! The walk of the jobs that copy an image from start to end (intermediate
//! commit, stream), with copies in flight at once.
//!
//! The walk ([`Walk`]) stays in order — block status, then a copy per range
//! that needs one — but each copy runs as its own task ([`Copies`]), up to
//! [`COPIES_MAX`] at once, so the next ranges are read while earlier ones
//! are written. A failed copy comes back to the walk with its range; the job
//! applies its error policy and may hand the range back to be copied again.
//! Before pausing or ending, the walk drains every copy, so a paused job
//! moves no data and its progress stands still.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;

use bdev::IoError;
use reactor::LocalNotify;

use crate::job::{ErrorAction, JobCtx, OnError};

/// Copies running at once at most.
pub const COPIES_MAX: usize = 8;

/// A copy that failed: its range, which side failed and how.
#[derive(Debug)]
pub struct Failure {
    pub offset: u64,
    pub len: u64,
    pub read: bool,
    pub error: IoError,
}

#[derive(Default)]
struct State {
    running: Cell<usize>,
    /// Bytes of copies finished since the walk last looked.
    done: Cell<u64>,
    failed: RefCell<VecDeque<Failure>>,
    wake: LocalNotify,
}

/// The copies of one job; lives on the job's reactor.
#[derive(Default)]
pub struct Copies {
    st: Rc<State>,
}

impl Copies {
    pub fn new() -> Copies {
        Copies::default()
    }

    /// Runs `copy` for `[offset, offset + len)` as a task. The copy reports
    /// which side failed (`true` for the read) with the error.
    pub fn start(&self, offset: u64, len: u64, copy: impl Future<Output = Result<(), (bool, IoError)>> + 'static) {
        let st = Rc::clone(&self.st);
        st.running.set(st.running.get() + 1);
        reactor::spawn_local(async move {
            match copy.await {
                Ok(()) => st.done.set(st.done.get() + len),
                Err((read, error)) => st.failed.borrow_mut().push_back(Failure { offset, len, read, error }),
            }
            st.running.set(st.running.get() - 1);
            st.wake.notify();
        });
    }

    /// Waits until another copy may start.
    pub async fn room(&self) {
        while self.st.running.get() >= COPIES_MAX {
            self.st.wake.notified().await;
        }
    }

    /// Waits for every running copy to end.
    pub async fn drain(&self) {
        while self.st.running.get() > 0 {
            self.st.wake.notified().await;
        }
    }

    /// The oldest failure not yet handled.
    pub fn failure(&self) -> Option<Failure> {
        self.st.failed.borrow_mut().pop_front()
    }

    /// Bytes copied since the last call (for the job's progress).
    pub fn take_done(&self) -> u64 {
        self.st.done.replace(0)
    }

    pub fn running(&self) -> usize {
        self.st.running.get()
    }
}

/// What the walk does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Look at `[at, at + len)` (block status, then maybe a copy).
    Range { at: u64, len: u64 },
    /// Copies ended meanwhile: handle how they ended, then ask again.
    Again,
    /// A forced cancel: every copy has ended.
    Cancelled,
    /// The whole image is done and every copy has ended.
    Done,
}

/// The walk over an image in `step`-sized ranges, with the ranges to look
/// at again (failed copies, the rest of a retried range) ahead of the next
/// new one.
pub struct Walk {
    pub copies: Copies,
    size: u64,
    step: u64,
    pos: u64,
    retry: VecDeque<(u64, u64)>,
}

impl Walk {
    pub fn new(size: u64, step: u64) -> Walk {
        Walk { copies: Copies::new(), size, step, pos: 0, retry: VecDeque::new() }
    }

    /// Waits out a pause (letting the running copies end first, so nothing
    /// moves while paused) and picks the next range.
    pub async fn next(&mut self, ctx: &JobCtx) -> Next {
        if (ctx.pause_requested() || ctx.cancelled()) && self.copies.running() > 0 {
            self.copies.drain().await;
            return Next::Again;
        }
        ctx.pause_point().await;
        if ctx.cancelled() {
            self.copies.drain().await;
            return Next::Cancelled;
        }
        match self.retry.pop_front() {
            Some((at, len)) => Next::Range { at, len },
            None if self.pos < self.size => Next::Range { at: self.pos, len: self.step.min(self.size - self.pos) },
            None if self.copies.running() > 0 => {
                // The last copies may still fail and need another go.
                self.copies.drain().await;
                Next::Again
            }
            None => Next::Done,
        }
    }

    /// The range `[at, at + len)` is to be looked at again later.
    pub fn again(&mut self, at: u64, len: u64) {
        self.retry.push_back((at, len));
    }

    /// Block status answered `done` bytes of the range `[at, at + len)`
    /// given by [`Walk::next`]: the walk moves past them.
    pub fn advance(&mut self, at: u64, len: u64, done: u64) {
        if at == self.pos {
            self.pos += done;
        } else if done < len {
            self.retry.push_front((at + done, len - done));
        }
    }

    /// Counts the finished copies' bytes and applies the job's error
    /// policy to the failed ones: `report` lets the other copies end and
    /// fails the walk, `stop` hands the range back (the job pauses in
    /// [`Walk::next`]), and `ignore` is `on_ignore`'s, where jobs differ.
    pub async fn settle(
        &mut self,
        ctx: &JobCtx,
        on_error: OnError,
        mut on_ignore: impl FnMut(&mut Walk, Failure),
    ) -> Result<(), String> {
        ctx.add_progress(self.copies.take_done());
        while let Some(f) = self.copies.failure() {
            match ctx.io_error(f.read, f.error, on_error) {
                ErrorAction::Report => {
                    self.copies.drain().await;
                    return Err(f.error.to_string());
                }
                ErrorAction::Stop => self.again(f.offset, f.len),
                ErrorAction::Ignore => on_ignore(self, f),
            }
        }
        Ok(())
    }

    /// Looking at `[at, at + len)` failed: the next call gives it again
    /// (after a pause, for `stop`).
    pub fn failed(&mut self, at: u64, len: u64) {
        if at != self.pos {
            self.retry.push_front((at, len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reactor::{Reactor, ReactorOptions};

    #[test]
    fn copies_run_together_up_to_the_limit_and_report_failures() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        let (most, failures, done) = r.block_on(async {
            let copies = Copies::new();
            let now = Rc::new(Cell::new(0usize));
            let most = Rc::new(Cell::new(0usize));
            for i in 0..20u64 {
                copies.room().await;
                let (now, most) = (Rc::clone(&now), Rc::clone(&most));
                copies.start(i << 20, 1 << 20, async move {
                    now.set(now.get() + 1);
                    most.set(most.get().max(now.get()));
                    reactor::sleep(std::time::Duration::from_millis(1)).await;
                    now.set(now.get() - 1);
                    if i == 7 { Err((true, IoError::Io)) } else { Ok(()) }
                });
            }
            copies.drain().await;
            let mut failures = Vec::new();
            while let Some(f) = copies.failure() {
                failures.push((f.offset, f.len, f.read, f.error));
            }
            (most.get(), failures, copies.take_done())
        });
        assert_eq!(most, COPIES_MAX, "as many copies at once as allowed, no more");
        assert_eq!(failures, vec![(7 << 20, 1 << 20, true, IoError::Io)]);
        assert_eq!(done, 19 << 20, "finished copies count, the failed one does not");
    }

    #[test]
    fn the_walk_moves_past_what_block_status_answered_and_queues_the_rest() {
        const M: u64 = 1 << 20;
        let mut w = Walk::new(10 * M, M);
        // A new range answered in part: the walk moves on by that much.
        w.advance(0, M, M / 4);
        assert_eq!(w.pos, M / 4);
        // A failed copy comes back; taken again and answered in part, its
        // rest is next, ahead of anything queued later.
        w.again(5 * M, M);
        w.again(8 * M, M);
        assert_eq!(w.retry.pop_front(), Some((5 * M, M)));
        w.advance(5 * M, M, M / 2);
        assert_eq!(w.retry.front(), Some(&(5 * M + M / 2, M / 2)));
        assert_eq!(w.pos, M / 4, "a retried range does not move the walk");
        // Block status failing on a retried range keeps it first in line;
        // on the new range at the walk's position nothing is queued.
        w.failed(9 * M, M);
        w.failed(M / 4, M);
        assert_eq!(Vec::from(w.retry.clone()), vec![(9 * M, M), (5 * M + M / 2, M / 2), (8 * M, M)]);
    }
}
