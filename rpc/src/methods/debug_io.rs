//! `x-debug-io`: run a qemu-io command against a node inside the daemon,
//! like QEMU's monitor `qemu-io` command. For tests and scripts.
//!
//! ```json
//! {"method": "x-debug-io", "params": {"node-name": "m0", "command": "write -P 0xab 0 64k"}}
//! ```
//! returns qemu-io's output text; a failed I/O or a pattern mismatch is an error.

use std::time::Instant;

use bdev::lock::perm;
use bdev::{IoFlags, Node, Perms};
use reactor::IoBuf;
use serde::Deserialize;
use serde_json::{Value, json};

use super::qemu_io::{IoCommand, hexdump, human_size, parse};
use crate::control::{Control, bdev_error};
use crate::error::RpcError;
use crate::registry::decode;

/// Bytes moved per request; longer commands loop.
const CHUNK_BYTES: u64 = 4 << 20;
/// `read -v` dumps at most this much (the reply must stay small).
const DUMP_BYTES_MAX: u64 = 64 << 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Params {
    node_name: String,
    command: String,
}

pub(super) fn x_debug_io(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: Params = decode(params)?;
    let cmd = parse(&p.command).map_err(RpcError::invalid_params)?;
    let node = ctl.graph.get(&p.node_name).map_err(bdev_error)?;
    if let IoCommand::Read { verbose: true, len, .. } = cmd
        && len > DUMP_BYTES_MAX
    {
        return Err(RpcError::invalid_params(format!("read -v dumps at most {DUMP_BYTES_MAX} bytes")));
    }
    // Writes need the write permission for their duration, as qemu-io's
    // do: a node whose users forbid writes (a backing file, a job's
    // target) refuses them. Reads take nothing; a read-only node refuses
    // writes in the device layer.
    let writes = matches!(cmd, IoCommand::Write { .. } | IoCommand::Discard { .. }) && !node.read_only();
    let _claim = match writes {
        true => Some(node.claim("x-debug-io", Perms { perm: perm::WRITE, shared: perm::ALL }).map_err(bdev_error)?),
        false => None,
    };
    let out = ctl
        .main_reactor()
        .run(move || async move { execute(&node, cmd).await })
        .wait()
        .map_err(|_| RpcError::internal("the main reactor stopped"))??;
    Ok(json!(out))
}

fn stats(verb: &str, offset: u64, len: u64, t0: Instant) -> String {
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    format!(
        "{verb} {len}/{len} bytes at offset {offset}\n{}, 1 ops; {secs:.4} sec ({:.3} MiB/sec and {:.4} ops/sec)\n",
        human_size(len),
        len as f64 / secs / (1 << 20) as f64,
        1.0 / secs
    )
}

fn io_failed(verb: &str, e: bdev::IoError) -> RpcError {
    RpcError::failed(format!("{verb} failed: {e}"))
}

async fn execute(node: &Node, cmd: IoCommand) -> Result<String, RpcError> {
    let ch = node.channel().map_err(bdev_error)?;
    let t0 = Instant::now();
    match cmd {
        IoCommand::Read { offset, len, pattern, verbose, quiet } => {
            let mut dump = String::new();
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(CHUNK_BYTES);
                let buf = ch.read(at, n as usize).await.map_err(|e| io_failed("read", e))?;
                if let Some(p) = pattern
                    && let Some(i) = buf.iter().position(|&b| b != p)
                {
                    return Err(RpcError::failed(format!(
                        "Pattern verification failed at offset {}, {len} bytes",
                        at + i as u64
                    )));
                }
                if verbose {
                    dump.push_str(&hexdump(at, &buf));
                }
                at += n;
            }
            Ok(if quiet { dump } else { dump + &stats("read", offset, len, t0) })
        }
        IoCommand::Write { offset, len, pattern, zero, unmap, no_fallback, compressed, fua, quiet } => {
            let mut flags = if fua { IoFlags::FUA } else { IoFlags::NONE };
            if zero {
                if unmap {
                    flags = flags | IoFlags::MAY_UNMAP;
                }
                if no_fallback {
                    flags = flags | IoFlags::NO_FALLBACK;
                }
                ch.write_zeroes(offset, len, flags).await.map_err(|e| io_failed("write", e))?;
            } else {
                if compressed {
                    flags = flags | IoFlags::COMPRESS;
                }
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(CHUNK_BYTES);
                    let mut buf = IoBuf::new(n as usize);
                    buf.fill(pattern);
                    ch.write(at, buf, flags).await.1.map_err(|e| io_failed("write", e))?;
                    at += n;
                }
            }
            Ok(if quiet { String::new() } else { stats("wrote", offset, len, t0) })
        }
        IoCommand::Discard { offset, len, quiet } => {
            ch.discard(offset, len).await.map_err(|e| io_failed("discard", e))?;
            Ok(if quiet { String::new() } else { stats("discard", offset, len, t0) })
        }
        IoCommand::Flush => {
            ch.flush().await.map_err(|e| io_failed("flush", e))?;
            Ok(String::new())
        }
        IoCommand::Length => Ok(format!("{}\n", human_size(ch.size()))),
    }
}
