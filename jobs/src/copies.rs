//! Copies in flight at once for the jobs that walk an image from start to
//! end (intermediate commit, stream).
//!
//! The walk stays in order — block status, then a copy per range that
//! needs one — but each copy runs as its own task, up to [`COPIES_MAX`] at
//! once, so the next ranges are read while earlier ones are written. A
//! failed copy comes back to the walk with its range; the walk applies the
//! job's error policy and may copy the range again. Before pausing or
//! ending, the walk drains every copy, so a paused job moves no data and
//! its progress stands still.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;

use bdev::IoError;
use reactor::LocalNotify;

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
}
