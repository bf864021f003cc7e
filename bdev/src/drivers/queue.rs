//! The completion queue of synchronous drivers (null, malloc): requests are
//! queued on submit and completed by a poller on the next tick, so no caller
//! ever sees its completion inside `submit` (SPDK's null bdev does the same).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use reactor::{PollStatus, PollerId};

use crate::error::IoError;
use crate::io::{Done, Io};

/// Requests completed per poller run at most; the rest wait a tick so one
/// busy device cannot monopolise its reactor.
const COMPLETIONS_PER_POLL_MAX: usize = 1024;

type Queue = Rc<RefCell<VecDeque<(Io, Done)>>>;

/// A FIFO of submitted requests and the poller that executes and completes them.
pub(crate) struct CompletionQueue {
    queue: Queue,
    poller: PollerId,
}

impl CompletionQueue {
    /// Registers a poller on the current reactor that runs `execute` on each
    /// queued request, in submission order, and completes it.
    pub(crate) fn new(
        name: &str,
        mut execute: impl FnMut(&mut Io) -> Result<(), IoError> + 'static,
    ) -> CompletionQueue {
        let queue: Queue = Rc::new(RefCell::new(VecDeque::with_capacity(256)));
        let q = Rc::clone(&queue);
        let poller = reactor::current().register_poller(name, move || {
            let n = q.borrow().len().min(COMPLETIONS_PER_POLL_MAX);
            for _ in 0..n {
                let Some((mut io, done)) = q.borrow_mut().pop_front() else {
                    break;
                };
                let res = execute(&mut io);
                done.complete(io, res);
            }
            PollStatus::from_busy(n > 0)
        });
        CompletionQueue { queue, poller }
    }

    pub(crate) fn push(&self, io: Io, done: Done) {
        self.queue.borrow_mut().push_back((io, done));
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        if let Some(r) = reactor::try_current() {
            r.unregister_poller(self.poller);
        }
        // Requests still queued when the channel goes away are failed, not lost.
        for (io, done) in self.queue.borrow_mut().drain(..) {
            done.complete_later(io, Err(IoError::Canceled));
        }
    }
}
