//! Forwarding to a home reactor, for drivers whose state lives on one
//! reactor (format drivers with metadata caches): the channel other
//! reactors get sends each request to the home reactor and the completion
//! back, like QEMU's AioContext for a node graph.
//!
//! The request's `Done` stays on the submitting reactor (in a per-thread
//! table); only the `Io` — plain data that owns its buffer — crosses.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use reactor::Handle;
use slab::Slab;

use crate::bdev::{Channel, LocalBoxFuture};
use crate::error::{BdevError, IoError};
use crate::io::{BlockStatus, Done, Io, IoDone};

/// Finds the driver's channel on its home reactor (called there).
pub type Resolve = Arc<dyn Fn() -> Result<Rc<dyn Channel>, BdevError> + Send + Sync>;

thread_local! {
    /// Completions waiting for forwarded requests submitted on this thread.
    static PENDING: RefCell<Slab<Done>> = const { RefCell::new(Slab::new()) };
}

/// Sends requests to the home reactor.
pub struct ForwardChannel {
    home: Handle,
    resolve: Resolve,
}

impl ForwardChannel {
    pub fn new(home: Handle, resolve: Resolve) -> ForwardChannel {
        ForwardChannel { home, resolve }
    }
}

/// Completes requests on the home reactor by sending them back.
struct ReturnTo {
    origin: Handle,
}

impl IoDone for ReturnTo {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        self.origin.send(move || {
            let done = PENDING.with(|p| p.borrow_mut().try_remove(tag as usize));
            match done {
                Some(done) => done.complete(io, res),
                None => tracing::error!(tag, "forwarded completion for an unknown request"),
            }
        });
    }
}

impl Channel for ForwardChannel {
    fn submit(&self, io: Io, done: Done) {
        let tag = PENDING.with(|p| p.borrow_mut().insert(done)) as u64;
        let origin = reactor::current().handle();
        let resolve = Arc::clone(&self.resolve);
        self.home.send(move || {
            let back: Rc<dyn IoDone> = Rc::new(ReturnTo { origin });
            match resolve() {
                Ok(ch) => ch.submit(io, Done::new(back, tag)),
                Err(e) => {
                    tracing::error!(error = %e, "forwarding a request to its home reactor failed");
                    back.io_done(tag, io, Err(IoError::Canceled));
                }
            }
        });
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let resolve = Arc::clone(&self.resolve);
        let reply = self.home.run(move || async move {
            match resolve() {
                Ok(ch) => ch.block_status(offset, len).await,
                Err(_) => Err(IoError::Canceled),
            }
        });
        Box::pin(async move { reply.await.unwrap_or(Err(IoError::Canceled)) })
    }
}
