//! Spindle's control surface: one command table, two wire protocols.
//!
//! ```text
//!  JSON-RPC socket ──┐  reader thread: framing → jsonrpc / qmp → Dispatcher
//!  QMP socket ───────┤  writer thread: answers + events (EventBus)
//!                    ▼
//!           ControlSender ──▶ control thread: run_control_loop
//!                                  │  Registry<Control>::call
//!                                  ▼
//!                      methods/ (blockdev-add, x-debug-io, quit, ...)
//!                                  │  Graph, reactors
//! ```
//!
//! - [`framing`]: JSON values out of a byte stream (bounded in size and
//!   depth, each key once per object).
//! - [`jsonrpc`], [`qmp`]: the two protocols, as pure functions.
//! - [`server`]: Unix-socket listeners, per-connection threads.
//! - [`event`]: events fanned out to every client.
//! - [`registry`]: the command table and parameter decoding.
//! - [`control`]: the control thread and the state commands act on.
//! - [`methods`]: the commands.
//! - [`objects`]: user-created objects (`object-add`: iothreads).
//! - [`client`]: the blocking client behind `spindle rpc`.

#![forbid(unsafe_code)]

pub mod client;
pub mod control;
pub mod error;
pub mod event;
pub mod framing;
pub mod jsonrpc;
pub mod methods;
pub mod objects;
pub mod qmp;
pub mod registry;
pub mod server;

pub use error::{ErrorKind, RpcError};
pub use event::{Event, EventBus};
pub use qmp::ServerInfo;
pub use registry::{Registry, decode};
pub use server::{Dispatcher, Server, ServerConfig, ServerError};
