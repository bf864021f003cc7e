//! Reads and writes of files that live in memory, done by a few unpinned
//! threads instead of the reactor's ring.
//!
//! On tmpfs a read or write is a memory copy made by whichever thread runs
//! the system call, and the file system has no non-blocking path, so
//! io_uring hands such requests to kernel workers of the submitting thread.
//! Those workers inherit the reactor's pinning (the kernel intersects their
//! affinity with the one the reactor asked for): every copy of a job then
//! runs on the reactor's own core, competing with it, while other cores
//! idle. The offload threads float over every core the process may use.
//!
//! ```text
//!   reactor ── offload(op, cb, tag) ──▶ channel ──▶ thread: pread / pwritev2
//!      ▲                                                     │
//!      └──────── Handle::send: cb.op_done(tag, res, op) ◀────┘
//! ```
//!
//! The callback sees exactly what a ring completion would give it (bytes
//! moved or a negative errno, and the operation back with its buffer), so a
//! driver can send any read or write either way. The reactor keeps the
//! callback alive until the answer arrives; the thread owns the buffer
//! while it works.
//!
//! [`call`] runs any other blocking system call there (`lseek` with
//! SEEK_DATA, which walks a file's extents) and hands the answer back as a
//! future.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::OnceLock;

use crossbeam_channel::{Receiver, Sender};
use slab::Slab;

use crate::buf::IoBuf;
use crate::reactor::{Handle, current};
use crate::uring::{Op, OpCallback, SharedFd};

/// Threads at most, whatever the number of cores.
const THREADS_MAX: usize = 8;

/// What a thread is given.
enum Work {
    Io(Task),
    Call(Box<dyn FnOnce() + Send>),
}

struct Task {
    /// Key of the waiting callback on the submitting reactor.
    id: usize,
    reply: Handle,
    fd: SharedFd,
    write: bool,
    fua: bool,
    offset: u64,
    buf: IoBuf,
    at: usize,
    len: usize,
}

thread_local! {
    /// Callbacks of this reactor's operations that are on a thread.
    static WAITING: RefCell<Slab<(Rc<dyn OpCallback>, u64)>> = RefCell::new(Slab::new());
}

/// The threads' queues: reads go to whichever thread is free; writes to
/// one file always go to the same thread, since a file takes one write at
/// a time (a second writer would only spin on the file's lock).
struct Pool {
    any: Sender<Work>,
    writes: Vec<Sender<Work>>,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Runs a file read or write on an offload thread; `cb.op_done(tag, res,
/// op)` runs on this reactor afterwards, as for [`crate::Ring::submit_with`].
/// Must be called on a reactor thread.
///
/// # Panics
/// On operations other than `Op::Read` and `Op::Write`.
pub fn offload(op: Op, cb: Rc<dyn OpCallback>, tag: u64) {
    let (fd, write, fua, offset, buf, at, len) = match op {
        Op::Read { fd, offset, buf, at, len } => (fd, false, false, offset, buf, at, len),
        Op::Write { fd, offset, buf, at, len, fua } => (fd, true, fua, offset, buf, at, len),
        _ => panic!("only reads and writes are offloaded"),
    };
    assert!(at.checked_add(len).is_some_and(|end| end <= buf.len()), "offloaded range outside its buffer");
    let id = WAITING.with(|w| w.borrow_mut().insert((cb, tag)));
    let task = Task { id, reply: current().handle(), fd, write, fua, offset, buf, at, len };
    let pool = pool();
    let queue = if write && !pool.writes.is_empty() {
        &pool.writes[task.fd.as_raw_fd() as usize % pool.writes.len()]
    } else {
        &pool.any
    };
    if let Err(e) = queue.send(Work::Io(task)) {
        // The threads are gone (only while the process exits): fail the request.
        if let Work::Io(t) = e.into_inner() {
            finish(t.id, -libc::ESHUTDOWN, t.write, t.fd, t.fua, t.offset, t.buf, t.at, t.len);
        }
    }
}

/// Runs `f` on an offload thread; the reply resolves to what it returns
/// (or [`crate::reply::Canceled`] if the threads are gone). For blocking
/// calls that must not run on a reactor.
pub fn call<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> crate::reply::Reply<T> {
    let (tx, rx) = crate::reply::reply();
    // A refused send drops the closure and with it the reply's sender.
    let _ = pool().any.send(Work::Call(Box::new(move || tx.send(f()))));
    rx
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let (any, any_rx) = crossbeam_channel::unbounded();
        let cores = process_cores();
        let mut writes = Vec::new();
        for i in 0..cores.len().clamp(1, THREADS_MAX) {
            let (own, own_rx) = crossbeam_channel::unbounded();
            let any_rx = any_rx.clone();
            let cores = cores.clone();
            let spawned =
                std::thread::Builder::new().name(format!("offload-{i}")).spawn(move || serve(&own_rx, &any_rx, &cores));
            match spawned {
                Ok(_) => writes.push(own),
                Err(e) => tracing::error!(error = %e, "starting an offload thread failed"),
            }
        }
        Pool { any, writes }
    })
}

/// The cores of the process as a whole (its first thread's affinity: the
/// calling reactor's own is a single core).
fn process_cores() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    match sched_getaffinity(nix::unistd::getpid()) {
        Ok(set) => (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => vec![0],
    }
}

fn serve(own: &Receiver<Work>, any: &Receiver<Work>, cores: &[usize]) {
    // Threads start with their creator's affinity: a reactor's single core.
    let mut set = nix::sched::CpuSet::new();
    for &c in cores {
        let _ = set.set(c);
    }
    if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
        tracing::debug!(error = %e, "offload thread keeps its creator's affinity");
    }
    loop {
        // This thread's writes first: nobody else may do them.
        let next = match own.try_recv() {
            Ok(t) => Ok(t),
            Err(_) => crossbeam_channel::select! {
                recv(own) -> t => t,
                recv(any) -> t => t,
            },
        };
        let mut t = match next {
            Ok(Work::Io(t)) => t,
            Ok(Work::Call(f)) => {
                f();
                continue;
            }
            Err(_) => return,
        };
        let res = run(&mut t);
        let Task { id, reply, fd, write, fua, offset, buf, at, len } = t;
        reply.send(move || finish(id, res, write, fd, fua, offset, buf, at, len));
    }
}

/// One system call, as the ring would make it: bytes moved or -errno
/// (a FUA write adds a data sync, as RWF_DSYNC does on the ring).
fn run(t: &mut Task) -> i32 {
    let Ok(offset) = libc::off_t::try_from(t.offset) else { return -libc::EINVAL };
    let res = if t.write {
        nix::sys::uio::pwrite(&t.fd, &t.buf[t.at..t.at + t.len], offset)
            .and_then(|n| if t.fua { nix::unistd::fdatasync(&t.fd).map(|()| n) } else { Ok(n) })
    } else {
        nix::sys::uio::pread(&t.fd, &mut t.buf[t.at..t.at + t.len], offset)
    };
    match res {
        Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
        Err(e) => -(e as i32),
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(id: usize, res: i32, write: bool, fd: SharedFd, fua: bool, offset: u64, buf: IoBuf, at: usize, len: usize) {
    let Some((cb, tag)) = WAITING.with(|w| w.borrow_mut().try_remove(id)) else {
        return;
    };
    let op = if write { Op::Write { fd, offset, buf, at, len, fua } } else { Op::Read { fd, offset, buf, at, len } };
    cb.op_done(tag, res, op);
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use super::*;
    use crate::reactor::{Reactor, ReactorOptions};

    struct Seen(Cell<Option<(u64, i32, Vec<u8>)>>);

    impl OpCallback for Seen {
        fn op_done(&self, tag: u64, res: i32, op: Op) {
            let buf = op.into_buf().expect("reads and writes return their buffer");
            self.0.set(Some((tag, res, buf.to_vec())));
        }
    }

    fn wait(r: &Rc<Reactor>, seen: &Seen) -> (u64, i32, Vec<u8>) {
        for _ in 0..100_000 {
            r.poll_once();
            if let Some(v) = seen.0.take() {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        panic!("no completion");
    }

    #[test]
    fn reads_and_writes_complete_on_the_submitting_reactor() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        let _g = r.enter();
        let f = tempfile::tempfile().unwrap();
        let fd: SharedFd = Arc::new(OwnedFd::from(f));
        let seen = Rc::new(Seen(Cell::new(None)));

        let mut buf = IoBuf::new(8192);
        buf.fill(0xab);
        offload(Op::Write { fd: Arc::clone(&fd), offset: 4096, buf, at: 1024, len: 4096, fua: true }, seen.clone(), 7);
        let (tag, res, back) = wait(&r, &seen);
        assert_eq!((tag, res, back.len()), (7, 4096, 8192), "the write moved every byte and gave its buffer back");

        let buf = IoBuf::zeroed(8192);
        offload(Op::Read { fd: Arc::clone(&fd), offset: 0, buf, at: 0, len: 8192 }, seen.clone(), 8);
        let (tag, res, data) = wait(&r, &seen);
        assert_eq!((tag, res), (8, 8192));
        assert!(data[..4096].iter().all(|&b| b == 0), "a hole reads as zeroes");
        assert!(data[4096..].iter().all(|&b| b == 0xab), "the written bytes read back");

        // Past the end of the file: zero bytes, as the ring reports it.
        let buf = IoBuf::new(4096);
        offload(Op::Read { fd: Arc::clone(&fd), offset: 1 << 20, buf, at: 0, len: 4096 }, seen.clone(), 9);
        assert_eq!(wait(&r, &seen).1, 0);
    }

    #[test]
    fn calls_run_off_the_reactor_and_answer_it() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        let _g = r.enter();
        let me = std::thread::current().id();
        let reply = call(move || std::thread::current().id() != me);
        let mut fut = std::pin::pin!(reply);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        for _ in 0..100_000 {
            if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                assert_eq!(v, Ok(true), "the call ran on another thread");
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        panic!("no answer");
    }

    #[test]
    fn errors_come_back_as_negative_errno() {
        let r = Reactor::new(None, ReactorOptions::default()).unwrap();
        let _g = r.enter();
        // A read-only descriptor refuses writes.
        let path = tempfile::NamedTempFile::new().unwrap();
        let f = std::fs::File::open(path.path()).unwrap();
        let fd: SharedFd = Arc::new(OwnedFd::from(f));
        let seen = Rc::new(Seen(Cell::new(None)));
        offload(Op::Write { fd, offset: 0, buf: IoBuf::zeroed(4096), at: 0, len: 4096, fua: false }, seen.clone(), 1);
        assert_eq!(wait(&r, &seen).1, -libc::EBADF);
    }
}
