//! Spindle's block device layer.
//!
//! ```text
//!        users (NBD exports, jobs, x-debug-io, perf) ── Backend (backend.rs):
//!                              │  Io + Done           a root that jobs replace
//!                    ┌─────────▼──────────┐
//!                    │ BlockChannel       │ bounds, read-only, discard /
//!                    │ (channel.rs)       │ detect-zeroes, alignment bounce
//!                    └─────────┬──────────┘
//!                  dyn Channel │ one per (node, reactor); ForwardChannel
//!                              │ (forward.rs) to a driver's home reactor
//!   formats and filters:  qcow2 (drivers/qcow2/), raw, blkdebug, delay
//!                              │ child claims (graph.rs, lock.rs)
//!   storage:              file (io_uring), malloc (RAM), null-co, x-sim
//!                         (nbd, the client driver, lives in the nbd crate)
//! ```
//!
//! - [`io`]: the request ([`Io`]) and completion ([`Done`]) types, block status.
//! - [`bdev`]: the device trait ([`Bdev`], control plane) and channel trait
//!   ([`Channel`], data plane).
//! - [`channel`]: the common front door and the `async` helpers.
//! - [`graph`]: named nodes, children, claims; `blockdev-add`/`-del`.
//! - [`bitmap`]: dirty bitmaps, owned by nodes, marked by every write.
//! - [`lock`]: permissions of claims, QEMU-compatible image locks, and the
//!   registry of open files that keeps files in use from being recreated.
//! - [`backend`]: users' handles on a replaceable root.
//! - [`locks`]: range locks jobs and filters share on one reactor.
//! - [`options`]: QEMU-shaped option reading.
//! - [`forward`]: channels that send requests to a driver's home reactor.
//! - [`drivers`]: `file`, `malloc`, `null-co`, `raw`, `qcow2`, `blkdebug`,
//!   `delay`, and `x-sim` (a simulated disk for tests).
//!
//! Completions are never delivered inside `submit`; every failure travels
//! the completion path.

#![forbid(unsafe_code)]

mod align;
pub mod backend;
pub mod bdev;
pub mod bitmap;
pub mod cbw;
pub mod channel;
pub mod drivers;
pub mod error;
pub mod forward;
pub mod graph;
pub mod io;
pub mod lock;
pub mod locks;
pub mod options;

pub use backend::{Backend, BackendChannel, DRAIN_WAIT_MAX, DrainTimeout, Held};
pub use bdev::{Bdev, BdevInfo, Channel, EventSink, LocalBoxFuture};
pub use bitmap::{Bitmap, BitmapSet, DirtyBits};
pub use channel::{BlockChannel, ChannelPolicy, IO_BYTES_MAX, IoFuture};
pub use error::{BdevError, IoError};
pub use graph::{Access, Child, Claim, Graph, Node, OpenCtx, OpenFn};
pub use io::{BlockStatus, Done, Io, IoDone, IoFlags, IoKind};
pub use lock::{CreateLock, LockMode, Perms};
pub use options::{CommonOptions, DetectZeroes, DirectMode, DiscardMode, OptReader};
