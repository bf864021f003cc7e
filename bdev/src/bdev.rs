//! The device trait (control plane) and the channel trait (data plane).
//!
//! A [`Bdev`] is shared by every reactor and rarely called: it describes
//! the device and creates channels. A [`Channel`] belongs to one reactor and
//! carries that reactor's I/O; channels of different reactors share nothing
//! mutable. A driver whose state cannot be shared (a format driver with
//! metadata caches) gives non-home reactors a channel that forwards to its
//! home reactor; a driver that can (files, RAM) does I/O on every reactor.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{BdevError, IoError};
use crate::graph::Node;
use crate::io::{BlockStatus, Done, Io};
use crate::lock::Perms;

/// Where the device layer sends QMP events (`BLOCK_IMAGE_CORRUPTED`): the
/// daemon's event bus. Callable from any reactor.
pub type EventSink = Arc<dyn Fn(&str, serde_json::Value) + Send + Sync>;

/// A future on one reactor, boxed (control path and slow paths only).
pub type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// A block device: the control-plane half of a driver.
pub trait Bdev: Send + Sync + 'static {
    /// The driver name, as in `blockdev-add` (`file`, `null-co`, `malloc`, ...).
    fn driver(&self) -> &'static str;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// Alignment every request's offset and length must have (a power of
    /// two; 1 = byte granular). The common layer bounces unaligned requests.
    fn block_size(&self) -> u32;

    /// Writes are refused.
    fn read_only(&self) -> bool;

    /// Creates the channel for the calling reactor.
    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError>;

    /// Facts for `query-named-block-nodes`.
    fn info(&self) -> BdevInfo;

    /// The reactor this device's state lives on, if it has one (format
    /// drivers, filters): users do best to submit there.
    fn home(&self) -> Option<reactor::Handle> {
        None
    }

    /// Passes every request on to its one child (QEMU's filter drivers):
    /// what walks down a chain, such as finding a bitmap by name, walks
    /// through it; a filter cannot be a snapshot's overlay.
    fn is_filter(&self) -> bool {
        false
    }

    /// Reads what this layer does not hold from `backing` from now on and
    /// records `name` and `format` in the image (QEMU's change of backing
    /// file). Runs on the control thread; [`crate::Graph::change_backing`]
    /// moves the child link. Formats without a backing file refuse.
    fn change_backing(
        &self,
        _backing: Option<&Arc<Node>>,
        _name: Option<&str>,
        _format: Option<&str>,
    ) -> Result<(), BdevError> {
        Err(BdevError::Unsupported(format!("driver '{}' has no backing file", self.driver())))
    }

    /// Reads what this layer does not hold from `backing` from now on,
    /// without touching the image (`blockdev-snapshot` puts an overlay over
    /// a running disk). Formats without a backing file refuse.
    fn attach_backing(&self, _backing: Option<&Arc<Node>>) -> Result<(), BdevError> {
        Err(BdevError::invalid("The overlay does not support backing images"))
    }

    /// A copy-before-write filter's state: its id and home reactor (what
    /// `snapshot-access` reads through).
    fn cbw_state(&self) -> Option<(u64, reactor::Handle)> {
        None
    }

    /// Whether the format can have a backing file at all.
    fn supports_backing(&self) -> bool {
        false
    }

    /// Whether writes flagged [`crate::IoFlags::COMPRESS`] can be stored
    /// compressed (QEMU's `bdrv_supports_compressed_writes`: qcow2; no
    /// filter here passes them on). The front door refuses them elsewhere.
    fn supports_compressed_writes(&self) -> bool {
        false
    }

    /// The node's claims now add up to `perms` (what its users do and what
    /// they let others do). Drivers over files turn this into image locks
    /// and refuse what another user of the file forbids; an error leaves
    /// the previous permissions in force.
    fn set_perms(&self, _perms: Perms) -> Result<(), BdevError> {
        Ok(())
    }

    /// Moves the driver's state to reactor `to` (see [`crate::Graph::move_to`],
    /// which makes sure nobody has requests on the way). Drivers without
    /// state of their own have nothing to move.
    fn rehome(self: Arc<Self>, _to: &reactor::Handle) -> Result<(), BdevError> {
        Ok(())
    }

    /// The image-lock group of a file node, which a twin of the image
    /// joins (see [`crate::Graph::add_twin`]).
    fn lock_group(&self) -> Option<u64> {
        None
    }

    /// Called once, on the main reactor, after the node was flushed and
    /// before it is dropped: write back anything left (format drivers).
    fn close(self: Arc<Self>) -> LocalBoxFuture<Result<(), IoError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The data-plane half of a driver on one reactor.
///
/// `submit` must not call `done` before returning: completions arrive from
/// the reactor loop (a poller, a CQE, a deferred callback). Requests reach
/// the channel already checked by the common layer: inside the device,
/// aligned to its block size, writes only on writable devices.
pub trait Channel {
    fn submit(&self, io: Io, done: Done);

    /// What the range starting at `offset` (at most `len` bytes) holds.
    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>>;
}

/// Description of a device for queries.
#[derive(Debug, Clone, PartialEq)]
pub struct BdevInfo {
    /// File name, or a `json:{...}` description for devices without one (as QEMU prints).
    pub filename: String,
    /// O_DIRECT in use.
    pub direct: bool,
    /// Flushes are ignored.
    pub no_flush: bool,
    /// Bytes the device occupies on its host storage, when known.
    pub actual_size: Option<u64>,
    /// Driver-specific facts (`format-specific` in QEMU's ImageInfo).
    pub format_specific: Option<serde_json::Value>,
}
