//! External snapshots: `blockdev-snapshot` puts an existing overlay node on
//! top of a running disk; `blockdev-snapshot-sync` creates the overlay's
//! qcow2 file first. The disk's users move to the overlay at one instant
//! (they are held meanwhile), and the old top becomes a read-only backing
//! layer.
//!
//! ```text
//!   export ──▶ disk            export ──▶ overlay ──backing──▶ disk (read-only)
//! ```

use std::sync::Arc;

use bdev::Node;
use serde::Deserialize;
use serde_json::{Value, json};

use super::jobs::{NewImageMode, create_target};
use super::transaction::{self, Action, Applied};
use crate::control::{Control, bdev_error, job_error};
use crate::error::RpcError;
use crate::registry::decode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SnapshotParams {
    node: String,
    overlay: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct SnapshotSyncParams {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    snapshot_file: String,
    #[serde(default)]
    snapshot_node_name: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    mode: Option<NewImageMode>,
}

/// `blockdev-snapshot`.
pub(super) fn blockdev_snapshot(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    transaction::single(ctl, Action::Snapshot(decode(params)?))
}

/// `blockdev-snapshot-sync`.
pub(super) fn blockdev_snapshot_sync(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    transaction::single(ctl, Action::SnapshotSync(decode(params)?))
}

pub(super) fn named_nodes(p: &SnapshotParams) -> Vec<String> {
    vec![p.node.clone(), p.overlay.clone()]
}

pub(super) fn sync_named_nodes(p: &SnapshotSyncParams) -> Vec<String> {
    p.device.iter().chain(p.node_name.iter()).cloned().collect()
}

fn lookup(ctl: &Control, device: Option<&str>, node: Option<&str>) -> Result<Arc<Node>, RpcError> {
    // Spindle names nodes, not devices: `device` names a node too.
    device.or(node).and_then(|n| ctl.graph.get(n).ok()).ok_or_else(|| {
        RpcError::failed(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or_default(),
            node.unwrap_or_default()
        ))
    })
}

/// The checks on the disk QEMU makes before anything is created: no job
/// owns it, and it is the top of its chain (no overlay reads it already).
fn check_disk(ctl: &Control, disk: &Arc<Node>) -> Result<(), RpcError> {
    ctl.jobs.check_free(disk).map_err(job_error)?;
    for parent in ctl.graph.nodes() {
        for (role, child) in parent.children() {
            if child.id() != disk.id() {
                continue;
            }
            let what = if role == "backing" { "backing hd".to_string() } else { format!("{role} child") };
            return Err(RpcError::busy(format!(
                "Node '{}' is busy: node is used as {what} of '{}'",
                disk.name(),
                parent.name()
            )));
        }
    }
    Ok(())
}

/// Writes back what the disk caches, so the snapshot point is on disk.
fn flush(ctl: &Control, disk: &Arc<Node>) -> Result<(), RpcError> {
    if disk.read_only() {
        return Ok(());
    }
    let node = Arc::clone(disk);
    let home = jobs::chain::home(&ctl.graph, disk);
    let res = home.run(move || async move {
        let ch = node.channel().map_err(|e| e.to_string())?;
        ch.flush().await.map_err(|e| e.to_string())
    });
    match res.wait() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RpcError::failed(format!("Could not flush '{}': {e}", disk.name()))),
        Err(_) => Err(RpcError::internal("the reactors stopped")),
    }
}

/// The action both commands end in: `overlay` reads what it lacks from
/// `disk`, and the disk's users move to it. Undone by moving them back
/// and detaching (and closing an overlay the action opened).
fn append(ctl: &mut Control, disk: Arc<Node>, overlay: Arc<Node>, opened: bool) -> Result<Applied, RpcError> {
    let close = |ctl: &mut Control| {
        if opened && let Err(e) = ctl.graph.remove_internal(overlay.name()) {
            tracing::error!(node = %overlay.name(), error = %e, "closing a snapshot overlay failed");
        }
    };
    let refuse = |ctl: &mut Control, msg: String| {
        close(ctl);
        Err(RpcError::failed(msg))
    };
    if overlay.perms_in_use().perm & bdev::lock::perm::CONSISTENT_READ != 0 {
        return refuse(ctl, "The overlay is already in use".into());
    }
    if overlay.bdev().is_filter() {
        return refuse(ctl, "Filters cannot be used as overlays".into());
    }
    if overlay.children().iter().any(|(r, _)| *r == "backing") {
        return refuse(ctl, "The overlay already has a backing image".into());
    }
    if !overlay.bdev().supports_backing() {
        return refuse(ctl, "The overlay does not support backing images".into());
    }
    if overlay.reaches(&disk) {
        return refuse(
            ctl,
            format!("Making '{}' a backing child of '{}' would create a cycle", disk.name(), overlay.name()),
        );
    }
    if let Err(e) = ctl.graph.attach_backing(&overlay, Some(&disk)) {
        close(ctl);
        return Err(bdev_error(e));
    }
    if let Err(e) = jobs::mirror::move_users(&disk.users(), &overlay, Some(&disk)) {
        if let Err(e) = ctl.graph.attach_backing(&overlay, None) {
            tracing::error!(node = %overlay.name(), error = %e, "detaching a snapshot overlay failed");
        }
        close(ctl);
        return Err(RpcError::failed(e));
    }
    let (d, o) = (Arc::clone(&disk), Arc::clone(&overlay));
    Ok(Applied::new(
        move |ctl: &mut Control| {
            // As QEMU reopens it: nobody writes the old top any more.
            if let Err(e) = ctl.graph.demote(&d) {
                tracing::warn!(node = %d.name(), error = %e, "the old top of a snapshot stays writable");
            }
        },
        move |ctl: &mut Control| {
            if let Err(e) = jobs::mirror::move_users(&o.users(), &disk, None) {
                tracing::error!(node = %disk.name(), error = %e, "moving users back from a snapshot overlay failed");
            }
            if let Err(e) = ctl.graph.attach_backing(&o, None) {
                tracing::error!(node = %o.name(), error = %e, "detaching a snapshot overlay failed");
            }
            if opened && let Err(e) = ctl.graph.remove_internal(o.name()) {
                tracing::error!(node = %o.name(), error = %e, "closing a snapshot overlay failed");
            }
        },
    ))
}

pub(super) fn blockdev_snapshot_action(ctl: &mut Control, p: SnapshotParams) -> Result<Applied, RpcError> {
    let disk = lookup(ctl, Some(&p.node), Some(&p.node))?;
    check_disk(ctl, &disk)?;
    flush(ctl, &disk)?;
    let overlay = lookup(ctl, Some(&p.overlay), Some(&p.overlay))?;
    append(ctl, disk, overlay, false)
}

pub(super) fn blockdev_snapshot_sync_action(ctl: &mut Control, p: SnapshotSyncParams) -> Result<Applied, RpcError> {
    let disk = lookup(ctl, p.device.as_deref(), p.node_name.as_deref())?;
    check_disk(ctl, &disk)?;
    flush(ctl, &disk)?;
    let format = p.format.as_deref().unwrap_or("qcow2");
    if p.node_name.is_some() && p.snapshot_node_name.is_none() {
        return Err(RpcError::failed("New overlay node-name missing"));
    }
    if let Some(n) = &p.snapshot_node_name
        && ctl.graph.get(n).is_ok()
    {
        return Err(RpcError::failed("New overlay node-name already in use"));
    }
    let mode = p.mode.unwrap_or_default();
    if !matches!(format, "qcow2" | "raw") {
        return Err(RpcError::invalid_params(format!("Unknown file format '{format}'")));
    }
    if mode == NewImageMode::AbsolutePaths && format != "qcow2" {
        return Err(RpcError::failed(format!("Backing file not supported for file format '{format}'")));
    }
    let mut opts = create_target(&disk, &p.snapshot_file, format, mode, Some(&disk))?;
    opts["backing"] = Value::Null;
    if let Some(n) = &p.snapshot_node_name {
        opts["node-name"] = json!(n);
    }
    let home = jobs::chain::home(&ctl.graph, &disk);
    let overlay = ctl.graph.add_on(&home, opts).map_err(bdev_error)?;
    append(ctl, disk, overlay, true)
}
