//! Per-core polled reactors: Spindle's execution model.
//!
//! ```text
//!   any thread ──Handle::send/call/run──▶ inbox (lock-free, bounded)
//!                                            │
//!   ┌──────────────── reactor thread (pinned to one core) ─────────────┐
//!   │ tick: outbox retry → inbox batch → deferred → ready tasks        │
//!   │       → active pollers → timed pollers/timers → io_uring enter   │
//!   │       → reap completions (callbacks, task wake-ups)              │
//!   │ idle past idle_spin: sleep in io_uring_enter (eventfd + timeout) │
//!   └──────────────────────────────────────────────────────────────────┘
//! ```
//!
//! - [`reactor`]: the loop, [`Handle`] for other threads, poll modes.
//! - [`executor`]: `!Send` tasks on their reactor ([`spawn_local`]).
//! - [`offload`](mod@offload): file reads and writes (tmpfs copies) and other blocking
//!   calls (`lseek` for block status) on unpinned threads.
//! - [`poller`]: busy/idle pollers, active and timed.
//! - [`timer`]: `sleep` and `timeout` for tasks.
//! - [`reply`](mod@reply): one-shot answers for cross-thread calls.
//! - [`sync`]: an async mutex for tasks of one reactor.
//! - [`uring`]: the io_uring, its in-flight table and [`Op`]s — `unsafe`.
//! - [`buf`]: aligned [`IoBuf`]s, their per-thread pool, [`MemRegion`] — `unsafe`.
//! - [`group`]: starting one pinned reactor per core.
//! - [`cpuset`]: `--cpumask` parsing and pinning.
//!
//! Only `uring` and `buf` hold `unsafe` code; each block carries a
//! `// SAFETY:` comment naming its invariant.

pub mod buf;
pub mod cpuset;
pub mod executor;
pub mod group;
pub mod offload;
pub mod poller;
pub mod reactor;
pub mod reply;
pub mod sync;
pub mod timer;
pub mod uring;

pub use buf::{IO_ALIGN, IoBuf, MemRegion};
pub use executor::{JoinHandle, spawn_local, yield_now};
pub use group::{Reactors, StartError};
pub use offload::offload;
pub use poller::{PollStatus, PollerId};
pub use reactor::{Handle, PollMode, Reactor, ReactorOptions, ReactorStats, current, defer, try_current};
pub use reply::{Canceled, Reply, ReplyTx, WaitError, reply};
pub use sync::{LocalMutex, LocalMutexGuard, LocalNotify};
pub use timer::{Elapsed, sleep, sleep_until, timeout};
pub use uring::{IOV_MAX, Op, OpCallback, OpFuture, Ring, SharedFd, accept};
