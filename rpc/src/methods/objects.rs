//! `object-add`, `object-del`, `query-objects`, `query-iothreads`, and
//! placing nodes on iothreads (`x-blockdev-set-iothread`).

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::control::{Control, bdev_error};
use crate::error::RpcError;
use crate::objects::{IoThread, Object};
use crate::registry::decode;

/// Properties of an iothread: QEMU's (accepted and shown) and Spindle's
/// `x-reactor` (which reactor it names).
const IOTHREAD_PROPS: [&str; 6] =
    ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch", "thread-pool-min", "thread-pool-max"];

/// QEMU's identifier rule: a letter, then letters, digits, `-`, `.`, `_`.
fn well_formed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|c| c.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn take_str(m: &mut Map<String, Value>, key: &str) -> Result<String, RpcError> {
    match m.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(RpcError::invalid_params(format!("Invalid parameter type for '{key}', expected: string"))),
        None => Err(RpcError::invalid_params(format!("Parameter '{key}' is missing"))),
    }
}

/// `object-add`: `{"qom-type": "iothread", "id": "io0", ...}`.
pub(super) fn object_add(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let mut m = match params {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(RpcError::invalid_params("params must be an object of named parameters")),
    };
    let qom_type = take_str(&mut m, "qom-type")?;
    let id = take_str(&mut m, "id")?;
    if !well_formed(&id) {
        return Err(RpcError::invalid_params("Parameter 'id' expects an identifier"));
    }
    let object = match qom_type.as_str() {
        "iothread" => Object::IoThread(iothread(ctl, m)?),
        other => {
            return Err(RpcError::invalid_params(format!("Parameter 'qom-type' does not accept value '{other}'")));
        }
    };
    if ctl.objects.contains(&id) {
        return Err(RpcError::failed(format!("attempt to add duplicate property '{id}' to object (type 'container')")));
    }
    ctl.objects.insert(id, object);
    Ok(json!({}))
}

fn iothread(ctl: &Control, mut m: Map<String, Value>) -> Result<IoThread, RpcError> {
    let reactor = match m.remove("x-reactor") {
        None => {
            // The reactor with the fewest iothreads, then the fewest nodes.
            let nodes: Vec<usize> = ctl.graph.homed_nodes().iter().map(Vec::len).collect();
            (0..ctl.reactors.len()).min_by_key(|&i| (ctl.objects.iothreads_on(i), nodes[i], i)).unwrap_or(0)
        }
        Some(v) => match v.as_u64() {
            Some(i) if (i as usize) < ctl.reactors.len() => i as usize,
            _ => {
                return Err(RpcError::invalid_params(format!(
                    "x-reactor must be a reactor index below {}",
                    ctl.reactors.len()
                )));
            }
        },
    };
    let mut props = Map::new();
    for key in IOTHREAD_PROPS {
        match m.remove(key) {
            None => {}
            Some(v) if v.as_i64().is_some_and(|n| n >= 0) => {
                props.insert(key.to_string(), v);
            }
            Some(v) if v.is_i64() || v.is_u64() => {
                return Err(RpcError::invalid_params(format!("{key} value must be in range [0, {}]", i64::MAX)));
            }
            Some(_) => {
                return Err(RpcError::invalid_params(format!("Invalid parameter type for '{key}', expected: integer")));
            }
        }
    }
    if let Some(k) = m.keys().next() {
        return Err(RpcError::invalid_params(format!("Parameter '{k}' is unexpected")));
    }
    Ok(IoThread { reactor, props })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdParams {
    id: String,
}

/// `object-del`: refused while a node or an export is placed on it.
pub(super) fn object_del(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    if !ctl.objects.contains(&p.id) {
        return Err(RpcError::failed(format!("object '{}' not found", p.id)));
    }
    let placed = ctl.placements.values().any(|t| t.as_deref() == Some(p.id.as_str()));
    let exported = ctl.export_records.values().any(|r| r.config.get("iothread").and_then(Value::as_str) == Some(&p.id));
    if placed || exported {
        return Err(RpcError::busy(format!("object '{}' is in use, can not be deleted", p.id)));
    }
    ctl.objects.remove(&p.id);
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// `query-objects`: every object's id and type.
pub(super) fn query_objects(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: NoParams = decode(params)?;
    Ok(Value::Array(
        ctl.objects.iter().into_iter().map(|(id, o)| json!({"id": id, "qom-type": o.qom_type()})).collect(),
    ))
}

/// `query-iothreads`: QEMU's IOThreadInfo, the thread being the reactor's.
pub(super) fn query_iothreads(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: NoParams = decode(params)?;
    let list = ctl
        .objects
        .iter()
        .into_iter()
        .map(|(id, o)| match o {
            Object::IoThread(t) => {
                let prop = |k: &str, default: i64| t.props.get(k).and_then(Value::as_i64).unwrap_or(default);
                json!({
                    "id": id,
                    "thread-id": ctl.reactors[t.reactor].thread_id(),
                    "poll-max-ns": prop("poll-max-ns", 32768),
                    "poll-grow": prop("poll-grow", 0),
                    "poll-shrink": prop("poll-shrink", 0),
                    "aio-max-batch": prop("aio-max-batch", 0),
                })
            }
        })
        .collect();
    Ok(Value::Array(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SetIoThreadParams {
    node_name: String,
    iothread: Option<String>,
    #[serde(default)]
    force: bool,
}

/// The reactor index an iothread name (or None: the main reactor) names.
pub(crate) fn iothread_reactor(ctl: &Control, iothread: Option<&str>) -> Result<usize, String> {
    match iothread {
        None => Ok(0),
        Some(id) => ctl.objects.iothread(id).ok_or_else(|| format!("Cannot find iothread {id}")),
    }
}

/// `x-blockdev-set-iothread`: moves a node (and the nodes below it) to an
/// iothread's reactor, or with `null` to the main one. Like QEMU, a node
/// with users is refused unless `force`; unlike QEMU, even with `force`
/// Spindle moves only nodes whose users have no requests on the way, which
/// it knows only when there are none.
pub(super) fn x_blockdev_set_iothread(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: SetIoThreadParams = decode(params)?;
    let node = ctl.graph.get(&p.node_name).map_err(bdev_error)?;
    let reactor = iothread_reactor(ctl, p.iothread.as_deref()).map_err(RpcError::failed)?;
    if !p.force && !node.users().is_empty() {
        return Err(RpcError::failed(format!(
            "Node {} is associated with a BlockBackend and could be in use (use force=true to override this check)",
            p.node_name
        )));
    }
    let to = ctl.reactors[reactor].clone();
    ctl.graph.move_to(&p.node_name, &to).map_err(bdev_error)?;
    ctl.placements.insert(p.node_name, p.iothread);
    Ok(json!({}))
}
