//! Timers for tasks: `sleep` and `timeout`, driven by the reactor's deadline
//! heap. A sleeping reactor wakes for the earliest deadline.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::reactor::current;

#[derive(Default)]
pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Reverse<(Instant, usize)>>>,
    wakers: RefCell<Slab<Option<Waker>>>,
}

impl Timers {
    fn add(&self, deadline: Instant) -> usize {
        let key = self.wakers.borrow_mut().insert(None);
        self.heap.borrow_mut().push(Reverse((deadline, key)));
        key
    }

    fn set_waker(&self, key: usize, waker: &Waker) {
        if let Some(slot) = self.wakers.borrow_mut().get_mut(key) {
            match slot {
                Some(w) if w.will_wake(waker) => {}
                _ => *slot = Some(waker.clone()),
            }
        }
    }

    fn remove(&self, key: usize) {
        let mut wakers = self.wakers.borrow_mut();
        if wakers.contains(key) {
            wakers.remove(key);
        }
        // The heap entry goes away lazily when it comes due.
    }

    /// Wakes every timer due at `now`; true if any fired.
    pub(crate) fn fire(&self, now: Instant) -> bool {
        let mut fired = false;
        loop {
            let key = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(Reverse((due, _))) if *due <= now => heap.pop().map(|Reverse((_, k))| k),
                    _ => None,
                }
            };
            let Some(key) = key else { break };
            let waker = self.wakers.borrow_mut().get_mut(key).and_then(Option::take);
            if let Some(w) = waker {
                fired = true;
                w.wake();
            }
        }
        fired
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.borrow().peek().map(|Reverse((d, _))| *d)
    }
}

/// Completes at a deadline. Created by [`sleep`] / [`sleep_until`].
pub struct Sleep {
    deadline: Instant,
    key: Option<usize>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(key) = self.key.take() {
                current().timers().remove(key);
            }
            return Poll::Ready(());
        }
        let reactor = current();
        let key = match self.key {
            Some(k) => k,
            None => {
                let k = reactor.timers().add(self.deadline);
                self.key = Some(k);
                k
            }
        };
        reactor.timers().set_waker(key, cx.waker());
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Some(r) = crate::reactor::try_current()
        {
            r.timers().remove(key);
        }
    }
}

/// Completes after `dur` (on the current reactor).
pub fn sleep(dur: Duration) -> Sleep {
    Sleep { deadline: Instant::now() + dur, key: None }
}

/// Completes at `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep { deadline, key: None }
}

/// `fut` did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out")]
pub struct Elapsed;

/// Runs `fut` for at most `dur`.
pub async fn timeout<F: Future>(dur: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(sleep(dur));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        timer.as_mut().poll(cx).map(|()| Err(Elapsed))
    })
    .await
}
