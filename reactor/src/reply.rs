//! Cross-thread one-shot replies: the answer channel of "send and await"
//! calls between the control plane and reactors, or between reactors.
//!
//! The receiving side either blocks (control-plane threads) or awaits (tasks
//! on a reactor). Replies are control-plane traffic: a mutex per reply is fine.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The sender went away without answering (its reactor stopped, or the work
/// panicked or was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the reply was dropped without an answer")]
pub struct Canceled;

/// Waiting for a reply took longer than the caller allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("the reply was dropped without an answer")]
    Canceled,
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
}

struct State<T> {
    value: Option<T>,
    closed: bool,
    waker: Option<Waker>,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    cond: Condvar,
}

/// The answering half.
pub struct ReplyTx<T> {
    inner: Option<Arc<Inner<T>>>,
}

/// The waiting half: `wait()` blocks, `.await` suspends a task.
pub struct Reply<T> {
    inner: Arc<Inner<T>>,
}

/// A fresh reply channel.
pub fn reply<T>() -> (ReplyTx<T>, Reply<T>) {
    let inner =
        Arc::new(Inner { state: Mutex::new(State { value: None, closed: false, waker: None }), cond: Condvar::new() });
    (ReplyTx { inner: Some(Arc::clone(&inner)) }, Reply { inner })
}

impl<T> ReplyTx<T> {
    pub fn send(mut self, value: T) {
        if let Some(inner) = self.inner.take() {
            finish(&inner, Some(value));
        }
    }
}

impl<T> Drop for ReplyTx<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            finish(&inner, None);
        }
    }
}

fn finish<T>(inner: &Inner<T>, value: Option<T>) {
    let waker = {
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.value = value;
        st.closed = true;
        st.waker.take()
    };
    inner.cond.notify_all();
    if let Some(w) = waker {
        w.wake();
    }
}

impl<T> Reply<T> {
    /// Blocks the calling thread until the answer arrives. Never call this on
    /// a reactor thread: use `.await` there.
    pub fn wait(self) -> Result<T, Canceled> {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        while !st.closed {
            st = self.inner.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.value.take().ok_or(Canceled)
    }

    /// Like `wait`, giving up after `timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> Result<T, WaitError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        while !st.closed {
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::TimedOut(timeout));
            }
            st = self.inner.cond.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        st.value.take().ok_or(WaitError::Canceled)
    }
}

impl<T> Future for Reply<T> {
    type Output = Result<T, Canceled>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            return Poll::Ready(st.value.take().ok_or(Canceled));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_wait_gets_value_from_another_thread() {
        let (tx, rx) = reply();
        std::thread::spawn(move || tx.send(42));
        assert_eq!(rx.wait(), Ok(42));
    }

    #[test]
    fn dropped_sender_cancels() {
        let (tx, rx) = reply::<u32>();
        drop(tx);
        assert_eq!(rx.wait(), Err(Canceled));
    }

    #[test]
    fn wait_timeout_times_out() {
        let (_tx, rx) = reply::<u32>();
        assert_eq!(rx.wait_timeout(Duration::from_millis(10)), Err(WaitError::TimedOut(Duration::from_millis(10))));
    }
}
