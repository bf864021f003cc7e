//! NBD: the wire codec, the export server and the NBD client driver. Kept
//! apart from `bdev` so the device layer never depends on networking.
//!
//! ```text
//!   server/ (exports, negotiate, transmit) ─┐         ┌─ client/ (the nbd driver)
//!                                           ▼         ▼
//!              handshake.rs, transmission.rs: the codec (no I/O)
//!                                           │
//!                      sock.rs: socket I/O on the reactor's io_uring
//! ```
//!
//! The codec does no I/O: it turns bytes into typed messages and back, for
//! both sides of the connection, and never panics on any input.
//!
//! - [`consts`]: every magic, flag, code and error value of the protocol,
//!   plus the size limits (`OPTION_BYTES_MAX`, header sizes, ...).
//! - [`handshake`]: newstyle negotiation — greeting, client flags, option
//!   requests and replies, the payloads of `NBD_OPT_INFO`/`GO`/`*_META_CONTEXT`
//!   and of `NBD_REP_SERVER`/`INFO`/`META_CONTEXT`, the `NBD_OPT_EXPORT_NAME`
//!   ending.
//! - [`transmission`]: requests (compact and extended headers), the
//!   incremental server-side [`RequestDecoder`](transmission::RequestDecoder),
//!   request validation, simple / structured / extended replies and their
//!   chunk payloads.
//! - [`error`]: [`ProtoError`], one variant per failing step.
//! - [`proto`]: the protocol's string rules and the shared bounds-checked
//!   cursor.
//! - [`server`]: the export server: listener, handshake, transmission.
//! - [`client`]: the `nbd` driver: a node backed by a remote export.
//! - [`sock`]: socket I/O on the reactor's io_uring.
//!
//! All integers are big-endian on the wire.

#![forbid(unsafe_code)]

pub mod client;
pub mod consts;
pub mod error;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod sock;
pub mod transmission;

pub use error::{ProtoError, Result};
