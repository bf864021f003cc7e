//! NBD commands, with QEMU's names and shapes: `nbd-server-start`,
//! `nbd-server-stop`, `block-export-add`, `block-export-del`,
//! `query-block-exports`, and the older `nbd-server-add` / `nbd-server-remove`.

use std::net::ToSocketAddrs;
use std::sync::Arc;

use bdev::{Access, Backend, Bitmap, Node};
use nbd::server::{CONNECTIONS_MAX_DEFAULT, Export, ExportedBitmap, ListenAddr, NbdServer};
use reactor::Handle;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::bitmaps::{self, Use};
use crate::control::{Control, ExportRecord, bdev_error};
use crate::error::RpcError;
use crate::registry::decode;

/// Longest export name the protocol allows.
const EXPORT_NAME_BYTES_MAX: usize = 4096;

/// QEMU's SocketAddressLegacy (`{"type": .., "data": {..}}`) or the flat
/// SocketAddress (`{"type": .., "host": ..}`) as a listen address.
pub(crate) fn parse_addr(v: &Value) -> Result<ListenAddr, RpcError> {
    let obj =
        v.as_object().ok_or_else(|| RpcError::invalid_params("Invalid parameter type for 'addr', expected: object"))?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("Parameter 'addr.type' is missing"))?;
    // Members are named as QEMU names them: `addr.data.path` in the
    // legacy form, `addr.path` in the flat one.
    let (data, prefix): (&Map<String, Value>, &str) = match obj.get("data") {
        Some(Value::Object(d)) => (d, "addr.data"),
        Some(_) => return Err(RpcError::invalid_params("Invalid parameter type for 'addr.data', expected: object")),
        None => (obj, "addr"),
    };
    let field = |k: &str| -> Result<String, RpcError> {
        match data.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            // QEMU wants a string; `spindle rpc addr.data.port=10809` sends a number.
            Some(Value::Number(n)) if k == "port" => Ok(n.to_string()),
            Some(_) => {
                Err(RpcError::invalid_params(format!("Invalid parameter type for '{prefix}.{k}', expected: string")))
            }
            None => Err(RpcError::invalid_params(format!("Parameter '{prefix}.{k}' is missing"))),
        }
    };
    match kind {
        "inet" => {
            let (host, port) = (field("host")?, field("port")?);
            let port: u16 =
                port.parse().map_err(|_| RpcError::invalid_params(format!("'{port}' is not a valid port")))?;
            let addr = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| RpcError::invalid_params(format!("address '{host}': {e}")))?
                .next()
                .ok_or_else(|| RpcError::invalid_params(format!("address '{host}' resolves to nothing")))?;
            Ok(ListenAddr::Tcp(addr))
        }
        "unix" => Ok(ListenAddr::Unix(field("path")?.into())),
        // QEMU names the union's discriminator without its parent.
        other => Err(RpcError::invalid_params(format!("Parameter 'type' does not accept value '{other}'"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StartParams {
    addr: Value,
    /// QEMU's uint32, as `handshake-max-seconds`.
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    tls_creds: Option<String>,
    #[serde(default)]
    tls_authz: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    handshake_max_seconds: Option<u32>,
}

pub(super) fn nbd_server_start(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let original = params.clone().unwrap_or(Value::Null);
    let p: StartParams = decode(params)?;
    if p.tls_creds.is_some() || p.tls_authz.is_some() {
        return Err(RpcError::invalid_params("TLS is not supported"));
    }
    if ctl.nbd.is_some() {
        return Err(RpcError::failed("NBD server already running"));
    }
    let addr = parse_addr(&p.addr)?;
    let max = match p.max_connections {
        None | Some(0) => CONNECTIONS_MAX_DEFAULT,
        Some(n) => n as usize,
    };
    let server = NbdServer::start(addr, max, ctl.reactors.clone(), Arc::clone(&ctl.exports))
        .map_err(|e| RpcError::failed(e.to_string()))?;
    ctl.nbd = Some((server, original));
    Ok(json!({}))
}

pub(super) fn nbd_server_stop(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    let _: NoParams = decode(params)?;
    if ctl.nbd.is_none() {
        return Err(RpcError::failed("NBD server not running"));
    }
    ctl.stop_nbd();
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExportAddParams {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    node_name: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    writable: Option<bool>,
    #[serde(default)]
    writethrough: Option<bool>,
    #[serde(default)]
    fixed_iothread: Option<bool>,
    #[serde(default)]
    iothread: Option<String>,
    #[serde(default, deserialize_with = "present")]
    bitmaps: Option<Vec<Value>>,
    #[serde(default, deserialize_with = "present")]
    allocation_depth: Option<bool>,
}

/// An optional member that may be absent but not null (QEMU refuses null
/// where it wants an array or a boolean).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// One entry of an export's `bitmaps` (QEMU's BlockDirtyBitmapOrStr).
enum BitmapRef {
    /// A bitmap of the exported node, or of a node further down its chain
    /// (a filter's child, a backing file), the nearest first.
    Local(String),
    /// The bitmap `name` of node `node`.
    External { node: String, name: String },
}

/// The metadata contexts an export publishes besides `base:allocation`.
#[derive(Default)]
struct Contexts {
    bitmaps: Vec<BitmapRef>,
    allocation_depth: bool,
}

/// Reads `bitmaps` entries, with QEMU's words for malformed ones.
fn parse_bitmap_refs(list: &[Value]) -> Result<Vec<BitmapRef>, RpcError> {
    let mut refs = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let r = match v {
            Value::String(name) => BitmapRef::Local(name.clone()),
            Value::Object(m) => {
                let member = |k: &str| match m.get(k) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(_) => Err(RpcError::invalid_params(format!(
                        "Invalid parameter type for 'bitmaps[{i}].{k}', expected: string"
                    ))),
                    None => Err(RpcError::invalid_params(format!("Parameter 'bitmaps[{i}].{k}' is missing"))),
                };
                let (node, name) = (member("node")?, member("name")?);
                if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "node" | "name")) {
                    return Err(RpcError::invalid_params(format!("Parameter 'bitmaps[{i}].{k}' is unexpected")));
                }
                BitmapRef::External { node, name }
            }
            // QEMU 10 names no member here: its words, as they are.
            _ => {
                return Err(RpcError::invalid_params(
                    "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
                ));
            }
        };
        refs.push(r);
    }
    Ok(refs)
}

/// Finds the bitmaps an export publishes and checks them as QEMU does. A
/// bare name is looked for on the exported node, then down its chain; a
/// recording bitmap of a writable node would change under a read-only
/// export's clients, so it is refused there. Any bitmap must be free (not
/// used by a job or another export) and consistent.
fn resolve_bitmaps(
    ctl: &Control,
    node: &Arc<Node>,
    refs: &[BitmapRef],
    writable: bool,
) -> Result<Vec<Arc<Bitmap>>, RpcError> {
    let mut found = Vec::with_capacity(refs.len());
    for r in refs {
        let bitmap = match r {
            BitmapRef::Local(name) => {
                let mut at = Some(Arc::clone(node));
                let (owner, bitmap) = loop {
                    let Some(n) = at else {
                        return Err(RpcError::failed(format!("Bitmap '{name}' is not found")));
                    };
                    if let Some(b) = n.bitmaps().find(name) {
                        break (n, b);
                    }
                    at = n.chain_next();
                };
                if !writable && !owner.read_only() && bitmap.recording() {
                    return Err(RpcError::failed(format!("Enabled bitmap '{name}' incompatible with readonly export")));
                }
                bitmap
            }
            BitmapRef::External { node, name } => {
                let n = ctl.graph.get(node).map_err(|_| RpcError::failed(format!("Node '{node}' not found")))?;
                n.bitmaps().find(name).ok_or_else(|| RpcError::failed(format!("Dirty bitmap '{name}' not found")))?
            }
        };
        bitmaps::check(&bitmap, Use::Modify)?;
        found.push(bitmap);
    }
    Ok(found)
}

pub(super) fn block_export_add(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let original = params.clone().unwrap_or(Value::Null);
    let p: ExportAddParams = decode(params)?;
    if p.kind != "nbd" {
        return Err(RpcError::invalid_params(format!("Parameter 'type' does not accept value '{}'", p.kind)));
    }
    let contexts = Contexts {
        bitmaps: parse_bitmap_refs(p.bitmaps.as_deref().unwrap_or_default())?,
        allocation_depth: p.allocation_depth.unwrap_or(false),
    };
    let _ = p.writethrough;
    let name = p.name.unwrap_or_else(|| p.node_name.clone());
    check_export(ctl, &p.id, &name)?;
    if ctl.graph.get(&p.node_name).is_err() {
        // QEMU's words for an export of a node that is not there.
        let n = &p.node_name;
        return Err(RpcError::not_found(format!("Cannot find device='' nor node-name='{n}'")));
    }
    let reactor = match &p.iothread {
        Some(t) => Some(place_export(ctl, &p.node_name, t, p.fixed_iothread.unwrap_or(false))?),
        None => None,
    };
    let writable = p.writable.unwrap_or(false);
    add_export(ctl, p.id, name, p.node_name, p.description, writable, reactor, contexts, original)
}

/// An export's `iothread`: the node moves there (QEMU moves the node to
/// the iothread's context); a node that cannot move is an error with
/// `fixed-iothread`, else it stays where it is. Returns the reactor.
fn place_export(ctl: &mut Control, node_name: &str, iothread: &str, fixed: bool) -> Result<Handle, RpcError> {
    let idx =
        ctl.objects.iothread(iothread).ok_or_else(|| RpcError::failed(format!("iothread \"{iothread}\" not found")))?;
    let to = ctl.reactors[idx].clone();
    let node = ctl.graph.get(node_name).map_err(bdev_error)?;
    if node.home().is_some_and(|h| h.id() != to.id()) {
        match ctl.graph.move_to(node_name, &to) {
            Ok(()) => {}
            Err(e) if fixed => return Err(bdev_error(e)),
            Err(e) => tracing::warn!(node = node_name, error = %e, "the export's node stays on its reactor"),
        }
    }
    Ok(to)
}

/// What an export needs before anything changes: a running server, a new
/// id, a name that fits and is free.
fn check_export(ctl: &Control, id: &str, name: &str) -> Result<(), RpcError> {
    if ctl.nbd.is_none() {
        return Err(RpcError::failed("NBD server not running"));
    }
    if ctl.export_records.contains_key(id) {
        return Err(RpcError::exists(format!("Block export id '{id}' is already in use")));
    }
    if name.len() > EXPORT_NAME_BYTES_MAX {
        return Err(RpcError::invalid_params(format!("export name longer than {EXPORT_NAME_BYTES_MAX} bytes")));
    }
    if ctl.export_records.values().any(|r| r.name == name) {
        return Err(RpcError::exists(format!("NBD server already has export named '{name}'")));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn add_export(
    ctl: &mut Control,
    id: String,
    name: String,
    node_name: String,
    description: Option<String>,
    writable: bool,
    reactor: Option<Handle>,
    contexts: Contexts,
    original: Value,
) -> Result<Value, RpcError> {
    check_export(ctl, &id, &name)?;
    let node = ctl.graph.get(&node_name).map_err(bdev_error)?;
    let access = if writable { Access::Write } else { Access::Read };
    let backend = Backend::new(&node, format!("export '{id}'"), access).map_err(bdev_error)?;
    // Checked after the node is claimed, as QEMU does; a refusal drops the claim.
    let bitmaps = resolve_bitmaps(ctl, &node, &contexts.bitmaps, writable)?;
    let mut export = Export::new(id.clone(), name.clone(), description, Arc::clone(&backend), writable);
    export.reactor = reactor;
    // Busy from here until the export is gone.
    export.bitmaps = bitmaps.into_iter().map(ExportedBitmap::new).collect();
    export.allocation_depth = contexts.allocation_depth;
    let export = Arc::new(export);
    ctl.exports.insert(export);
    ctl.export_records.insert(id, ExportRecord { name, backend, config: original });
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportDelParams {
    id: String,
    #[serde(default)]
    mode: Option<String>,
}

pub(super) fn block_export_del(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: ExportDelParams = decode(params)?;
    del_export(ctl, &p.id, p.mode.as_deref())
}

fn del_export(ctl: &mut Control, id: &str, mode: Option<&str>) -> Result<Value, RpcError> {
    let hard = match mode {
        None | Some("safe") => false,
        Some("hard") => true,
        Some(other) => {
            return Err(RpcError::invalid_params(format!("Parameter 'mode' does not accept value '{other}'")));
        }
    };
    let Some(record) = ctl.export_records.get(id) else {
        return Err(RpcError::not_found(format!("Export '{id}' is not found")));
    };
    let name = record.name.clone();
    if let Some((server, _)) = &ctl.nbd {
        if !hard && server.export_connections(&name) > 0 {
            return Err(RpcError::busy(format!("export '{id}' still in use")));
        }
        // New connections can no longer find it; existing ones are cut.
        ctl.exports.remove(&name);
        server.disconnect_export(&name);
    } else {
        ctl.exports.remove(&name);
    }
    ctl.export_records.remove(id);
    ctl.events.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    Ok(json!({}))
}

pub(super) fn query_block_exports(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    let _: NoParams = decode(params)?;
    Ok(Value::Array(
        ctl.export_records
            .iter()
            .map(|(id, r)| json!({"type": "nbd", "id": id, "node-name": r.backend.root().name(), "shutting-down": false}))
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyAddParams {
    device: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    writable: Option<bool>,
    #[serde(default)]
    bitmap: Option<String>,
}

/// QEMU's older `nbd-server-add`: the export id is its name.
pub(super) fn nbd_server_add(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: LegacyAddParams = decode(params)?;
    let name = p.name.unwrap_or_else(|| p.device.clone());
    let mut config = json!({"type": "nbd", "id": name, "node-name": p.device, "name": name, "writable": p.writable.unwrap_or(false)});
    // Its one `bitmap` is a `bitmaps` of one name.
    let contexts =
        Contexts { bitmaps: p.bitmap.iter().cloned().map(BitmapRef::Local).collect(), allocation_depth: false };
    if let Some(b) = &p.bitmap {
        config["bitmaps"] = json!([b]);
    }
    add_export(ctl, name.clone(), name, p.device, p.description, p.writable.unwrap_or(false), None, contexts, config)
}

pub(super) fn nbd_server_remove(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        name: String,
        #[serde(default)]
        mode: Option<String>,
    }
    let p: P = decode(params)?;
    let id = ctl.export_records.iter().find(|(_, r)| r.name == p.name).map(|(id, _)| id.clone());
    match id {
        Some(id) => del_export(ctl, &id, p.mode.as_deref()),
        None => Err(RpcError::not_found(format!("Export '{}' is not found", p.name))),
    }
}
