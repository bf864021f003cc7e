//! Daemon commands: versions, command lists, configuration, reactors, quit.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::control::{Control, ShutdownReason};
use crate::error::RpcError;
use crate::registry::decode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// `query-version`: QEMU's shape, carrying Spindle's own version.
pub(super) fn query_version(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: NoParams = decode(params)?;
    let i = &ctl.info;
    Ok(json!({"qemu": {"major": i.major, "minor": i.minor, "micro": i.micro}, "package": i.package}))
}

/// `query-commands`: `[{"name": ...}]` as QEMU returns it.
pub(super) fn query_commands(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: NoParams = decode(params)?;
    Ok(Value::Array(ctl.command_names.iter().map(|n| json!({"name": n})).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    /// SPDK's flags, accepted; every method is callable at any time here.
    #[serde(default)]
    #[allow(dead_code)]
    current: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    include_aliases: Option<bool>,
}

/// `rpc_get_methods`: SPDK style, a plain list of names.
pub(super) fn rpc_get_methods(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: GetMethods = decode(params)?;
    Ok(json!(ctl.command_names))
}

/// `quit`: answer, then shut down gracefully.
pub(super) fn quit(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: NoParams = decode(params)?;
    ctl.request_shutdown(ShutdownReason::Quit);
    Ok(json!({}))
}

/// `qmp_capabilities` reaching the registry (from JSON-RPC): nothing to negotiate.
pub(super) fn qmp_capabilities(_ctl: &mut Control, _params: Option<Value>) -> Result<Value, RpcError> {
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveConfig {
    /// Write the configuration to this file (atomically) instead of returning it.
    #[serde(default)]
    filename: Option<PathBuf>,
}

/// `save_config`: the commands that rebuild the current state, in the
/// format `serve --config` replays.
pub(super) fn save_config(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: SaveConfig = decode(params)?;
    let config = Value::Array(ctl.save_config());
    let Some(path) = p.filename else {
        return Ok(config);
    };
    let text = serde_json::to_string_pretty(&config).map_err(|e| RpcError::internal(e.to_string()))? + "\n";
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| RpcError::failed(format!("writing '{}' failed: {e}", path.display())))?;
    Ok(json!({}))
}

/// `framework_get_reactors`: per reactor (SPDK's name), its counters, the
/// fraction of its time it was busy, and what lives there: nodes with
/// state of their own, jobs, iothreads naming it.
pub(super) fn framework_get_reactors(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: NoParams = decode(params)?;
    let homed = ctl.graph.homed_nodes();
    let jobs = ctl.jobs.homes();
    let iothreads: Vec<(String, usize)> = ctl
        .objects
        .iter()
        .into_iter()
        .filter_map(|(id, _)| ctl.objects.iothread(id).map(|r| (id.to_string(), r)))
        .collect();
    let reactors: Vec<Value> = ctl
        .reactors
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let s = h.stats();
            let busy = s.busy_ns as f64 / (s.busy_ns + s.idle_ns).max(1) as f64;
            json!({
                "id": h.id(),
                "lcore": h.core(),
                "ticks": s.ticks,
                "busy_ns": s.busy_ns,
                "idle_ns": s.idle_ns,
                "busy_fraction": (busy * 1000.0).round() / 1000.0,
                "sleeps": s.sleeps,
                "msgs": s.msgs,
                "nodes": homed[i].iter().map(|n| n.name()).collect::<Vec<_>>(),
                "jobs": jobs.iter().filter(|(_, jh)| jh.id() == h.id()).map(|(id, _)| id).collect::<Vec<_>>(),
                "iothreads": iothreads.iter().filter(|(_, r)| *r == i).map(|(id, _)| id).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({"reactors": reactors}))
}
