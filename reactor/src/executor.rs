//! A single-threaded task executor, one per reactor.
//!
//! Tasks are `!Send` futures spawned on the reactor they run on. A waker may
//! travel to any thread: waking from the owning reactor pushes the task on
//! its local ready queue; waking from elsewhere posts a message to the
//! reactor's inbox, so the task still only runs on its reactor.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use slab::Slab;

use crate::reactor::{Shared, current, try_current_id};

/// Ready tasks polled in one tick at most; the rest wait for the next tick so
/// completions and messages are not starved by a task storm.
const TASK_POLLS_PER_TICK_MAX: usize = 1024;

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

struct TaskSlot {
    fut: Option<LocalFuture>,
    waker: Waker,
    wake_state: Arc<TaskWaker>,
    generation: u64,
}

pub(crate) struct TaskWaker {
    reactor: Arc<Shared>,
    task: usize,
    queued: AtomicBool,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if try_current_id() == Some(self.reactor.id) {
            current().executor().schedule(self.task);
        } else {
            let task = self.task;
            self.reactor.post(Box::new(move || current().executor().schedule(task)));
        }
    }
}

#[derive(Default)]
pub(crate) struct Executor {
    tasks: RefCell<Slab<TaskSlot>>,
    ready: RefCell<VecDeque<usize>>,
    next_generation: std::cell::Cell<u64>,
    /// Scratch batch reused every tick.
    batch: RefCell<Vec<usize>>,
}

impl Executor {
    pub(crate) fn spawn(&self, shared: &Arc<Shared>, fut: LocalFuture) -> (usize, u64) {
        let generation = self.next_generation.get();
        self.next_generation.set(generation + 1);
        let mut tasks = self.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let task = entry.key();
        let wake_state = Arc::new(TaskWaker { reactor: Arc::clone(shared), task, queued: AtomicBool::new(true) });
        let waker = Waker::from(Arc::clone(&wake_state));
        entry.insert(TaskSlot { fut: Some(fut), waker, wake_state, generation });
        self.ready.borrow_mut().push_back(task);
        (task, generation)
    }

    pub(crate) fn schedule(&self, task: usize) {
        self.ready.borrow_mut().push_back(task);
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.tasks.borrow().len()
    }

    /// Drops a task's future if `generation` still names it.
    pub(crate) fn abort(&self, task: usize, generation: u64) {
        let fut = {
            let mut tasks = self.tasks.borrow_mut();
            match tasks.get(task) {
                Some(slot) if slot.generation == generation => match slot.fut {
                    // Being polled right now: the poll loop drops it when it returns.
                    None => {
                        tasks[task].generation = u64::MAX;
                        None
                    }
                    Some(_) => Some(tasks.remove(task)),
                },
                _ => None,
            }
        };
        // Dropped outside the borrow: the future's destructors may touch the executor.
        drop(fut);
    }

    /// Drops every task (shutdown). Futures are dropped one by one outside
    /// the table borrow.
    pub(crate) fn clear(&self) {
        loop {
            let slot = {
                let mut tasks = self.tasks.borrow_mut();
                let Some(key) = tasks.iter().map(|(k, _)| k).next() else {
                    break;
                };
                tasks.remove(key)
            };
            drop(slot);
        }
        self.ready.borrow_mut().clear();
    }

    /// Polls the tasks that are ready. Returns true if any ran.
    pub(crate) fn run_ready(&self) -> bool {
        let mut batch = std::mem::take(&mut *self.batch.borrow_mut());
        {
            let mut ready = self.ready.borrow_mut();
            let n = ready.len().min(TASK_POLLS_PER_TICK_MAX);
            batch.extend(ready.drain(..n));
        }
        let ran = !batch.is_empty();
        for &task in &batch {
            self.poll_task(task);
        }
        batch.clear();
        *self.batch.borrow_mut() = batch;
        ran
    }

    fn poll_task(&self, task: usize) {
        let (mut fut, waker, generation) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(slot) = tasks.get_mut(task) else {
                return;
            };
            let Some(fut) = slot.fut.take() else { return };
            slot.wake_state.queued.store(false, Ordering::Release);
            (fut, slot.waker.clone(), slot.generation)
        };
        let mut cx = Context::from_waker(&waker);
        let done = fut.as_mut().poll(&mut cx).is_ready();
        let finished_fut = {
            let mut tasks = self.tasks.borrow_mut();
            let aborted = tasks.get(task).is_none_or(|s| s.generation != generation);
            if done || aborted {
                if tasks.get(task).is_some_and(|s| s.fut.is_none()) {
                    tasks.remove(task);
                }
                Some(fut)
            } else {
                tasks[task].fut = Some(fut);
                None
            }
        };
        drop(finished_fut);
    }
}

struct JoinState<T> {
    result: Option<T>,
    waker: Option<Waker>,
}

/// Awaits the output of a task spawned with [`spawn_local`]. Dropping the
/// handle detaches the task; [`JoinHandle::abort`] stops it.
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
    task: usize,
    generation: u64,
}

impl<T> JoinHandle<T> {
    /// Drops the task's future at once (its in-flight I/O is abandoned
    /// safely). Must be called on the task's reactor.
    pub fn abort(&self) {
        current().executor().abort(self.task, self.generation);
    }

    /// True once the task finished and its output is waiting.
    pub fn is_finished(&self) -> bool {
        self.state.borrow().result.is_some()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut st = self.state.borrow_mut();
        match st.result.take() {
            Some(v) => Poll::Ready(v),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Runs `fut` as a task on the current reactor.
///
/// Panics when called off a reactor thread.
pub fn spawn_local<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let state = Rc::new(RefCell::new(JoinState { result: None, waker: None }));
    let st = Rc::clone(&state);
    let wrapped = async move {
        let v = fut.await;
        let waker = {
            let mut s = st.borrow_mut();
            s.result = Some(v);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    };
    let reactor = current();
    let (task, generation) = reactor.executor().spawn(reactor.shared(), Box::pin(wrapped));
    JoinHandle { state, task, generation }
}

/// Yields once, letting other tasks, messages and completions run.
pub async fn yield_now() {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldNow(false).await
}
