//! `x-blkdebug-set-rules`: replace the error-injection rules of a
//! `blkdebug` node while it runs. For tests and fault-injection scripts.
//!
//! ```json
//! {"method": "x-blkdebug-set-rules",
//!  "params": {"node-name": "d0", "inject-error": [{"event": "read_aio", "errno": 28, "sector": 8}]}}
//! ```
//! An empty `inject-error` list clears the rules.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::control::{Control, bdev_error};
use crate::error::RpcError;
use crate::registry::decode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Params {
    node_name: String,
    /// QEMU's `BlkdebugInjectErrorOptions` list, checked by the driver.
    inject_error: Vec<Value>,
}

pub(super) fn x_blkdebug_set_rules(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: Params = decode(params)?;
    let node = ctl.graph.get(&p.node_name).map_err(bdev_error)?;
    bdev::drivers::blkdebug::set_rules(&node, Value::Array(p.inject_error)).map_err(bdev_error)?;
    Ok(json!({}))
}
