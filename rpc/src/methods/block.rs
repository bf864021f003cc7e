//! Node commands: `blockdev-add`, `blockdev-del`, `query-named-block-nodes`.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::control::{Control, bdev_error};
use crate::error::RpcError;
use crate::registry::decode;

/// `blockdev-add`: params are QEMU's BlockdevOptions, e.g.
/// `{"driver":"file","node-name":"f0","filename":"/path/disk.img"}`.
pub(super) fn blockdev_add(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let opts = match params {
        Some(v @ Value::Object(_)) => v,
        _ => return Err(RpcError::invalid_params("Parameter 'driver' is missing")),
    };
    ctl.graph.add(opts).map_err(bdev_error)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DelParams {
    node_name: String,
}

pub(super) fn blockdev_del(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: DelParams = decode(params)?;
    ctl.graph.remove(&p.node_name).map_err(bdev_error)?;
    ctl.placements.remove(&p.node_name);
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryParams {
    /// Accepted for QEMU compatibility; the output is always flat.
    #[serde(default)]
    #[allow(dead_code)]
    flat: Option<bool>,
}

pub(super) fn query_named_block_nodes(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: QueryParams = decode(params)?;
    Ok(Value::Array(ctl.graph.describe()))
}

/// Extents one `x-block-status` answer may hold.
const MAP_EXTENTS_MAX: usize = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StatusParams {
    node_name: String,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    length: Option<u64>,
}

/// `x-block-status`: what each range of a node holds and which layer of
/// its chain provides it, in `qemu-img map --output=json`'s shape.
pub(super) fn x_block_status(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: StatusParams = decode(params)?;
    let node = ctl.graph.get(&p.node_name).map_err(bdev_error)?;
    let offset = p.offset.unwrap_or(0);
    let length = p.length.unwrap_or(u64::MAX);
    ctl.main_reactor()
        .run(move || async move {
            let ch = node.channel().map_err(bdev_error)?;
            let end = offset.saturating_add(length).min(ch.size());
            let mut extents: Vec<Value> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let st = ch
                    .block_status(pos, end - pos)
                    .await
                    .map_err(|e| RpcError::failed(format!("block status failed: {e}")))?;
                merge_extent(&mut extents, pos, &st);
                if extents.len() > MAP_EXTENTS_MAX {
                    return Err(RpcError::failed(format!(
                        "more than {MAP_EXTENTS_MAX} extents; ask for a smaller range"
                    )));
                }
                pos += st.len;
            }
            Ok(Value::Array(extents))
        })
        .wait()
        .map_err(|_| RpcError::internal("the main reactor stopped"))?
}

/// Appends an extent, merging it into the previous one when nothing but
/// the position differs (as qemu-img map merges).
fn merge_extent(extents: &mut Vec<Value>, start: u64, st: &bdev::BlockStatus) {
    if let Some(last) = extents.last_mut() {
        let same = last["depth"] == json!(st.depth)
            && last["present"] == json!(st.allocated)
            && last["zero"] == json!(st.zero)
            && last["data"] == json!(st.data)
            && last["compressed"] == json!(st.compressed);
        let last_len = last["length"].as_u64().unwrap_or(0);
        let contiguous = match (last.get("offset").and_then(Value::as_u64), st.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + last_len == b,
            _ => false,
        };
        if same && contiguous && last["start"].as_u64().unwrap_or(0) + last_len == start {
            last["length"] = json!(last_len + st.len);
            return;
        }
    }
    let mut e = json!({
        "start": start, "length": st.len, "depth": st.depth, "present": st.allocated,
        "zero": st.zero, "data": st.data, "compressed": st.compressed,
    });
    if let Some(off) = st.offset {
        e["offset"] = json!(off);
    }
    extents.push(e);
}
