//! Range locks on one reactor: a job's copy operations and the writes a
//! filter passes through (a mirror's write-blocking writes, a backup's
//! copy-before-write) keep out of each other's ranges, in whatever units
//! the user chooses (a bitmap's chunks). A waiter re-checks whenever any
//! lock is released.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;

#[derive(Default)]
pub struct RangeLocks {
    held: RefCell<Slab<(u64, u64)>>,
    waiters: RefCell<Vec<Waker>>,
}

/// A held range `[a, b)` of chunks; released when dropped.
pub struct RangeGuard {
    locks: Rc<RangeLocks>,
    key: usize,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.held.borrow_mut().remove(self.key);
        for w in self.locks.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

impl RangeLocks {
    pub fn new() -> Rc<RangeLocks> {
        Rc::new(RangeLocks::default())
    }

    /// Is any chunk of `[a, b)` locked?
    pub fn overlaps(&self, a: u64, b: u64) -> bool {
        self.held.borrow().iter().any(|(_, &(x, y))| x < b && a < y)
    }

    pub fn is_empty(&self) -> bool {
        self.held.borrow().is_empty()
    }

    /// Locks `[a, b)`, which must be free.
    pub fn insert(self: &Rc<Self>, a: u64, b: u64) -> RangeGuard {
        debug_assert!(!self.overlaps(a, b));
        let key = self.held.borrow_mut().insert((a, b));
        RangeGuard { locks: Rc::clone(self), key }
    }

    /// Waits until `[a, b)` is free (it is not locked by this call).
    pub fn wait_free(self: &Rc<Self>, a: u64, b: u64) -> WaitFree {
        WaitFree { locks: Rc::clone(self), a, b }
    }

    /// Waits until `[a, b)` is free, then locks it.
    pub async fn lock(self: &Rc<Self>, a: u64, b: u64) -> RangeGuard {
        self.wait_free(a, b).await;
        self.insert(a, b)
    }
}

pub struct WaitFree {
    locks: Rc<RangeLocks>,
    a: u64,
    b: u64,
}

impl Future for WaitFree {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.locks.overlaps(self.a, self.b) {
            self.locks.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reactor::{Reactor, ReactorOptions, spawn_local};
    use std::cell::Cell;

    #[test]
    fn overlapping_lockers_wait_and_disjoint_ones_do_not() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        r.block_on(async {
            let locks = RangeLocks::new();
            let g = locks.lock(0, 4).await;
            let _other = locks.lock(4, 8).await;
            let got = Rc::new(Cell::new(false));
            let (l2, got2) = (Rc::clone(&locks), Rc::clone(&got));
            let t = spawn_local(async move {
                let _g = l2.lock(3, 5).await;
                got2.set(true);
            });
            reactor::yield_now().await;
            assert!(!got.get());
            drop(_other);
            reactor::yield_now().await;
            assert!(!got.get(), "still overlaps the first lock");
            drop(g);
            t.await;
            assert!(got.get());
            assert!(locks.is_empty());
        });
    }
}
