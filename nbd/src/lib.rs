//! NBD: the wire codec, the export server and the NBD client driver. Kept
//! apart from `bdev` so the device layer never depends on networking.
//!
//! The crate is reserved in the workspace; the protocol lands with the NBD
//! work.

#![forbid(unsafe_code)]
