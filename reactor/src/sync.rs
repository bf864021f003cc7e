//! Synchronisation between tasks of one reactor (never across threads).
//!
//! [`LocalMutex`] serialises async sections that span I/O — a format
//! driver's metadata updates, for example — without blocking the reactor:
//! waiters are parked tasks, woken in FIFO order.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct State {
    locked: Cell<bool>,
    /// Waiting lockers in arrival order, by ticket.
    waiters: RefCell<VecDeque<(u64, Option<Waker>)>>,
    next_ticket: Cell<u64>,
    /// The ticket allowed to take the lock next (handed over on unlock).
    handed_to: Cell<Option<u64>>,
}

/// An async mutual-exclusion lock for tasks on one reactor.
#[derive(Clone, Default)]
pub struct LocalMutex {
    state: Rc<State>,
}

/// Holds the lock; dropping it hands the lock to the next waiter.
pub struct LocalMutexGuard {
    state: Rc<State>,
}

impl LocalMutex {
    pub fn new() -> LocalMutex {
        LocalMutex::default()
    }

    /// Waits until the lock is free, in FIFO order.
    pub fn lock(&self) -> Lock {
        Lock { state: Rc::clone(&self.state), ticket: None }
    }

    /// Takes the lock if it is free right now.
    pub fn try_lock(&self) -> Option<LocalMutexGuard> {
        let st = &self.state;
        if st.locked.get() || !st.waiters.borrow().is_empty() {
            return None;
        }
        st.locked.set(true);
        Some(LocalMutexGuard { state: Rc::clone(st) })
    }

    pub fn is_locked(&self) -> bool {
        self.state.locked.get()
    }
}

/// The future returned by [`LocalMutex::lock`].
pub struct Lock {
    state: Rc<State>,
    ticket: Option<u64>,
}

impl Future for Lock {
    type Output = LocalMutexGuard;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LocalMutexGuard> {
        let st = Rc::clone(&self.state);
        match self.ticket {
            None => {
                if !st.locked.get() && st.waiters.borrow().is_empty() {
                    st.locked.set(true);
                    return Poll::Ready(LocalMutexGuard { state: st });
                }
                let t = st.next_ticket.get();
                st.next_ticket.set(t + 1);
                st.waiters.borrow_mut().push_back((t, Some(cx.waker().clone())));
                self.ticket = Some(t);
                Poll::Pending
            }
            Some(t) => {
                if st.handed_to.get() == Some(t) {
                    st.handed_to.set(None);
                    self.ticket = None;
                    return Poll::Ready(LocalMutexGuard { state: st });
                }
                if let Some(w) = st.waiters.borrow_mut().iter_mut().find(|(wt, _)| *wt == t) {
                    w.1 = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let Some(t) = self.ticket else { return };
        let st = &self.state;
        if st.handed_to.get() == Some(t) {
            // The lock was handed to us but we left: pass it on.
            st.handed_to.set(None);
            release(st);
        } else {
            st.waiters.borrow_mut().retain(|(wt, _)| *wt != t);
        }
    }
}

fn release(st: &State) {
    let next = st.waiters.borrow_mut().pop_front();
    match next {
        Some((t, waker)) => {
            // Stays locked: ownership moves straight to the next waiter.
            st.handed_to.set(Some(t));
            if let Some(w) = waker {
                w.wake();
            }
        }
        None => st.locked.set(false),
    }
}

impl Drop for LocalMutexGuard {
    fn drop(&mut self) {
        release(&self.state);
    }
}

/// Wakes one waiting task; a notification given while nobody waits is
/// kept (one permit) for the next wait.
#[derive(Clone, Default)]
pub struct LocalNotify {
    state: Rc<NotifyState>,
}

#[derive(Default)]
struct NotifyState {
    permit: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    pub fn new() -> LocalNotify {
        LocalNotify::default()
    }

    pub fn notify(&self) {
        self.state.permit.set(true);
        if let Some(w) = self.state.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Completes once notified (at once if a permit is waiting).
    pub fn notified(&self) -> Notified {
        Notified { state: Rc::clone(&self.state) }
    }
}

/// The future returned by [`LocalNotify::notified`].
pub struct Notified {
    state: Rc<NotifyState>,
}

impl Future for Notified {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.permit.replace(false) {
            return Poll::Ready(());
        }
        *self.state.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Reactor, ReactorOptions, sleep, spawn_local};
    use std::time::Duration;

    #[test]
    fn fifo_exclusion_across_awaits() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        let log = r.block_on(async {
            let m = LocalMutex::new();
            let log = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for i in 0..5 {
                let (m, log) = (m.clone(), Rc::clone(&log));
                tasks.push(spawn_local(async move {
                    let _g = m.lock().await;
                    log.borrow_mut().push(format!("in{i}"));
                    sleep(Duration::from_millis(2)).await;
                    log.borrow_mut().push(format!("out{i}"));
                }));
            }
            for t in tasks {
                t.await;
            }
            assert!(!m.is_locked());
            Rc::try_unwrap(log).unwrap().into_inner()
        });
        let want: Vec<String> = (0..5).flat_map(|i| [format!("in{i}"), format!("out{i}")]).collect();
        assert_eq!(log, want);
    }

    #[test]
    fn notify_keeps_one_permit() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        r.block_on(async {
            let n = LocalNotify::new();
            n.notify();
            n.notify();
            n.notified().await;
            let n2 = n.clone();
            let waiter = spawn_local(async move {
                n2.notified().await;
                1
            });
            crate::yield_now().await;
            assert!(!waiter.is_finished(), "only one permit was kept");
            n.notify();
            assert_eq!(waiter.await, 1);
        });
    }

    #[test]
    fn a_dropped_waiter_does_not_keep_the_lock() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        r.block_on(async {
            let m = LocalMutex::new();
            let g = m.lock().await;
            assert!(m.try_lock().is_none());
            let m2 = m.clone();
            let waiter = spawn_local(async move {
                let _g = m2.lock().await;
            });
            crate::yield_now().await;
            waiter.abort();
            drop(g);
            assert!(!m.is_locked(), "the aborted waiter must not hold the lock");
            let m3 = m.clone();
            let w2 = spawn_local(async move {
                let _g = m3.lock().await;
                7
            });
            assert_eq!(w2.await, 7);
        });
    }
}
