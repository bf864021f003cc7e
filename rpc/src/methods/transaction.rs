//! `transaction`: several actions that take effect at one instant, or not
//! at all.
//!
//! ```text
//!   decode every action ─▶ hold the users of every node named
//!     ─▶ apply each action in order ──fails──▶ undo those applied, newest first
//!     ─▶ commit each action; run the jobs created ─▶ let the users go
//! ```
//!
//! While the users are held no client request is in flight on any node the
//! actions touch, so a bitmap added next to a backup starts recording at
//! the instant the backup copies, and two disks are snapshotted at the same
//! point. Jobs created by backup actions stay `created` until the commit;
//! with `completion-mode: grouped` they also finish as one (a failure or
//! cancel of one cancels the others, and their bitmaps roll back).
//!
//! `blockdev-backup`, `drive-backup`, `blockdev-snapshot` and
//! `blockdev-snapshot-sync` are transactions of one action, as in QEMU.

use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};

use super::backup::{self, BackupParams};
use super::bitmaps::{self, AddParams, MergeParams, NameParams};
use super::replace::{self, ReplaceParams};
use super::snapshot::{self, SnapshotParams, SnapshotSyncParams};
use crate::control::{Control, bdev_error};
use crate::error::RpcError;
use crate::registry::decode;

type Step = Box<dyn FnOnce(&mut Control)>;

/// What an action did: how to make it final, and how to undo it.
#[derive(Default)]
pub(super) struct Applied {
    commit: Option<Step>,
    abort: Option<Step>,
}

impl Applied {
    pub(super) fn new(
        commit: impl FnOnce(&mut Control) + 'static,
        abort: impl FnOnce(&mut Control) + 'static,
    ) -> Applied {
        Applied { commit: Some(Box::new(commit)), abort: Some(Box::new(abort)) }
    }

    /// An action that is final as applied, undone by `abort`.
    pub(super) fn undone_by(abort: impl FnOnce(&mut Control) + 'static) -> Applied {
        Applied { commit: None, abort: Some(Box::new(abort)) }
    }

    /// Makes the action final; answers a command's empty result.
    pub(super) fn commit(self, ctl: &mut Control) -> Value {
        if let Some(c) = self.commit {
            c(ctl);
        }
        json!({})
    }

    fn abort(self, ctl: &mut Control) {
        if let Some(a) = self.abort {
            a(ctl);
        }
    }
}

/// The kinds of action, with QEMU's names.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Abort,
    BlockDirtyBitmapAdd,
    BlockDirtyBitmapRemove,
    BlockDirtyBitmapClear,
    BlockDirtyBitmapEnable,
    BlockDirtyBitmapDisable,
    BlockDirtyBitmapMerge,
    BlockdevBackup,
    DriveBackup,
    BlockdevSnapshot,
    BlockdevSnapshotSync,
    BlockdevSnapshotInternalSync,
    BlockdevAdd,
    #[serde(rename = "x-blockdev-replace")]
    XBlockdevReplace,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Abort => "abort",
            Kind::BlockDirtyBitmapAdd => "block-dirty-bitmap-add",
            Kind::BlockDirtyBitmapRemove => "block-dirty-bitmap-remove",
            Kind::BlockDirtyBitmapClear => "block-dirty-bitmap-clear",
            Kind::BlockDirtyBitmapEnable => "block-dirty-bitmap-enable",
            Kind::BlockDirtyBitmapDisable => "block-dirty-bitmap-disable",
            Kind::BlockDirtyBitmapMerge => "block-dirty-bitmap-merge",
            Kind::BlockdevBackup => "blockdev-backup",
            Kind::DriveBackup => "drive-backup",
            Kind::BlockdevSnapshot => "blockdev-snapshot",
            Kind::BlockdevSnapshotSync => "blockdev-snapshot-sync",
            Kind::BlockdevSnapshotInternalSync => "blockdev-snapshot-internal-sync",
            Kind::BlockdevAdd => "blockdev-add",
            Kind::XBlockdevReplace => "x-blockdev-replace",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[serde(rename = "type")]
    kind: Kind,
    data: Value,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum CompletionMode {
    #[default]
    Individual,
    Grouped,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Properties {
    #[serde(default)]
    completion_mode: CompletionMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransactionParams {
    actions: Vec<RawAction>,
    #[serde(default)]
    properties: Option<Properties>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// An action, decoded.
pub(super) enum Action {
    Abort,
    BitmapAdd(AddParams),
    BitmapRemove(NameParams),
    BitmapClear(NameParams),
    BitmapEnable(NameParams),
    BitmapDisable(NameParams),
    BitmapMerge(MergeParams),
    BlockdevBackup(BackupParams),
    DriveBackup(BackupParams),
    Snapshot(SnapshotParams),
    SnapshotSync(SnapshotSyncParams),
    BlockdevAdd(Value),
    Replace(ReplaceParams),
}

impl Action {
    /// Decodes action `i`'s data; errors name the member as QEMU does
    /// (`actions[0].data.node`).
    fn decode(i: usize, kind: Kind, data: Value) -> Result<Action, RpcError> {
        fn at<T: serde::de::DeserializeOwned>(i: usize, data: Value) -> Result<T, RpcError> {
            decode(Some(data)).map_err(|mut e| {
                if let Some(q) = e.message.find('\'') {
                    e.message.insert_str(q + 1, &format!("actions[{i}].data."));
                }
                e
            })
        }
        Ok(match kind {
            Kind::Abort => {
                at::<Empty>(i, data)?;
                Action::Abort
            }
            Kind::BlockDirtyBitmapAdd => Action::BitmapAdd(at(i, data)?),
            Kind::BlockDirtyBitmapRemove => Action::BitmapRemove(at(i, data)?),
            Kind::BlockDirtyBitmapClear => Action::BitmapClear(at(i, data)?),
            Kind::BlockDirtyBitmapEnable => Action::BitmapEnable(at(i, data)?),
            Kind::BlockDirtyBitmapDisable => Action::BitmapDisable(at(i, data)?),
            Kind::BlockDirtyBitmapMerge => Action::BitmapMerge(at(i, data)?),
            Kind::BlockdevBackup => Action::BlockdevBackup(at(i, data)?),
            Kind::DriveBackup => Action::DriveBackup(at(i, data)?),
            Kind::BlockdevSnapshot => Action::Snapshot(at(i, data)?),
            Kind::BlockdevSnapshotSync => Action::SnapshotSync(at(i, data)?),
            Kind::BlockdevAdd => match data {
                Value::Object(_) if data.get("node-name").is_some() => Action::BlockdevAdd(data),
                Value::Object(_) => {
                    return Err(RpcError::invalid_params(format!(
                        "Parameter 'actions[{i}].data.node-name' is missing"
                    )));
                }
                _ => {
                    return Err(RpcError::invalid_params(format!(
                        "Invalid parameter type for 'actions[{i}].data', expected: object"
                    )));
                }
            },
            Kind::XBlockdevReplace => Action::Replace(at(i, data)?),
            Kind::BlockdevSnapshotInternalSync => {
                return Err(RpcError::failed("Internal snapshots are not supported; use blockdev-snapshot"));
            }
        })
    }

    /// The node names the action touches, whose users are held.
    fn nodes(&self, ctl: &Control) -> Vec<String> {
        match self {
            Action::Abort => Vec::new(),
            Action::BitmapAdd(p) => vec![p.node.clone()],
            Action::BitmapRemove(p) | Action::BitmapClear(p) | Action::BitmapEnable(p) | Action::BitmapDisable(p) => {
                vec![p.node.clone()]
            }
            Action::BitmapMerge(p) => vec![p.node.clone()],
            Action::BlockdevBackup(p) | Action::DriveBackup(p) => backup::named_nodes(p),
            Action::Snapshot(p) => snapshot::named_nodes(p),
            Action::SnapshotSync(p) => snapshot::sync_named_nodes(p),
            // The node is new: nobody uses it yet; what it opens over is
            // held by the replace that puts it in front of users.
            Action::BlockdevAdd(_) => Vec::new(),
            Action::Replace(p) => replace::named_nodes(ctl, p),
        }
    }

    fn apply(self, ctl: &mut Control) -> Result<Applied, RpcError> {
        match self {
            Action::Abort => Err(RpcError::failed("Transaction aborted using Abort action")),
            Action::BitmapAdd(p) => bitmaps::add(ctl, p),
            Action::BitmapRemove(p) => bitmaps::remove(ctl, p),
            Action::BitmapClear(p) => bitmaps::clear(ctl, p),
            Action::BitmapEnable(p) => bitmaps::set_recording(ctl, p, true),
            Action::BitmapDisable(p) => bitmaps::set_recording(ctl, p, false),
            Action::BitmapMerge(p) => bitmaps::merge(ctl, p),
            Action::BlockdevBackup(p) => backup::blockdev_backup_action(ctl, p),
            Action::DriveBackup(p) => backup::drive_backup_action(ctl, p),
            Action::Snapshot(p) => snapshot::blockdev_snapshot_action(ctl, p),
            Action::SnapshotSync(p) => snapshot::blockdev_snapshot_sync_action(ctl, p),
            Action::BlockdevAdd(opts) => {
                let node = ctl.graph.add(opts).map_err(bdev_error)?;
                let name = node.name().to_string();
                drop(node);
                Ok(Applied::undone_by(move |ctl: &mut Control| {
                    if let Err(e) = ctl.graph.remove(&name) {
                        tracing::error!(node = %name, error = %e, "removing a node a failed transaction added failed");
                    }
                }))
            }
            Action::Replace(p) => replace::replace_action(ctl, p),
        }
    }
}

/// `transaction`.
pub(super) fn transaction(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: TransactionParams = decode(params)?;
    let mode = p.properties.unwrap_or_default().completion_mode;
    if mode == CompletionMode::Grouped
        && let Some(a) = p.actions.iter().find(|a| !matches!(a.kind, Kind::BlockdevBackup | Kind::DriveBackup))
    {
        return Err(RpcError::failed(format!(
            "Action '{}' does not support transaction property completion-mode = grouped",
            a.kind.name()
        )));
    }
    let actions =
        p.actions.into_iter().enumerate().map(|(i, a)| Action::decode(i, a.kind, a.data)).collect::<Result<_, _>>()?;
    run(ctl, actions, mode == CompletionMode::Grouped)?;
    Ok(json!({}))
}

/// A command that is a transaction of one action.
pub(super) fn single(ctl: &mut Control, action: Action) -> Result<Value, RpcError> {
    run(ctl, vec![action], false)?;
    Ok(json!({}))
}

/// Applies `actions` as one: all of them, or none.
fn run(ctl: &mut Control, actions: Vec<Action>, grouped: bool) -> Result<(), RpcError> {
    let nodes: Vec<_> = actions.iter().flat_map(|a| a.nodes(ctl)).filter_map(|n| ctl.graph.get(&n).ok()).collect();
    let held = ctl.graph.hold_users(&nodes, Instant::now() + bdev::DRAIN_WAIT_MAX).map_err(bdev_error)?;
    ctl.jobs.begin_txn(grouped);
    let mut applied = Vec::with_capacity(actions.len());
    for a in actions {
        match a.apply(ctl) {
            Ok(x) => applied.push(x),
            Err(e) => {
                for x in applied.into_iter().rev() {
                    x.abort(ctl);
                }
                ctl.jobs.abort_txn(&mut ctl.graph);
                drop(held);
                return Err(e);
            }
        }
    }
    for x in applied {
        x.commit(ctl);
    }
    ctl.jobs.commit_txn();
    drop(held);
    Ok(())
}
