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
