//! `x-blockdev-replace`: an export reads and writes another node from now
//! on — a filter put above its node (a copy-before-write filter for
//! fleecing), or the node under a filter (taking the filter out). Also a
//! `transaction` action, next to the `blockdev-add` of the filter, so the
//! filter sees every write from the instant it opens.
//!
//! The shape is that proposed for QEMU (`parent-type: export`,
//! `export-id`, `new-child`); node parents (`driver`) and devices (`qdev`)
//! are refused.

use std::sync::Arc;

use bdev::lock::perm;
use bdev::{Node, Perms};
use serde::Deserialize;
use serde_json::Value;

use super::transaction::{self, Action, Applied};
use crate::control::{Control, bdev_error};
use crate::error::RpcError;
use crate::registry::decode;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum ParentType {
    Export,
    Driver,
    Qdev,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ReplaceParams {
    parent_type: ParentType,
    #[serde(default)]
    export_id: Option<String>,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    child: Option<String>,
    #[serde(default)]
    qdev_id: Option<String>,
    new_child: String,
}

/// `x-blockdev-replace`.
pub(super) fn x_blockdev_replace(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    transaction::single(ctl, Action::Replace(decode(params)?))
}

/// The nodes the action touches (held while it applies).
pub(super) fn named_nodes(ctl: &Control, p: &ReplaceParams) -> Vec<String> {
    let mut names = vec![p.new_child.clone()];
    if let Some(r) = p.export_id.as_ref().and_then(|id| ctl.export_records.get(id)) {
        names.push(r.backend.root().name().to_string());
    }
    names
}

/// A copy-before-write filter keeps other writers of its file out once it
/// has users, so no write passes it by (QEMU's rule).
const CBW_FILE_IN_USE: Perms =
    Perms { perm: perm::CONSISTENT_READ | perm::WRITE, shared: perm::CONSISTENT_READ | perm::WRITE_UNCHANGED };

pub(super) fn replace_action(ctl: &mut Control, p: ReplaceParams) -> Result<Applied, RpcError> {
    let id = match p.parent_type {
        ParentType::Export => {
            p.export_id.ok_or_else(|| RpcError::invalid_params("Parameter 'export-id' is missing"))?
        }
        ParentType::Driver => {
            let _ = (p.parent, p.child);
            return Err(RpcError::failed(
                "Replacing a node's child is not supported; replace the root of an export (parent-type 'export')",
            ));
        }
        ParentType::Qdev => {
            let _ = p.qdev_id;
            return Err(RpcError::failed("There are no guest devices here; replace the root of an export"));
        }
    };
    let backend = match ctl.export_records.get(&id) {
        Some(r) => Arc::clone(&r.backend),
        None => return Err(RpcError::not_found(format!("Export '{id}' is not found"))),
    };
    let new = ctl.graph.get(&p.new_child).map_err(bdev_error)?;
    let old = backend.root();
    if Arc::ptr_eq(&old, &new) {
        return Ok(Applied::default());
    }
    if !new.reaches(&old) && !old.reaches(&new) {
        return Err(RpcError::failed(format!(
            "'{}' is neither a filter above '{}' nor a node below it: the export would read another disk",
            new.name(),
            old.name()
        )));
    }
    // Off a copy-before-write filter it was the last user of: the filter
    // lets others write its file again, this export first.
    let loosened = old.bdev().cbw_state().is_some()
        && old.users().len() == 1
        && old.child_perms("file").is_some_and(|p| p.shared & perm::WRITE == 0);
    if loosened {
        ctl.graph.reclaim_child(&old, "file", Perms::write()).map_err(bdev_error)?;
    }
    if let Err(e) = jobs::mirror::move_users(std::slice::from_ref(&backend), &new, Some(&old)) {
        if loosened && let Err(e) = ctl.graph.reclaim_child(&old, "file", CBW_FILE_IN_USE) {
            tracing::error!(node = %old.name(), error = %e, "a filter could not keep other writers out again");
        }
        return Err(RpcError::failed(e));
    }
    let tightened = tighten_cbw(ctl, &new).inspect_err(|_| {
        if let Err(e) = jobs::mirror::move_users(std::slice::from_ref(&backend), &old, None) {
            tracing::error!(error = %e, "moving an export back after a refused replace failed");
        }
    })?;
    Ok(Applied::undone_by(move |ctl: &mut Control| {
        if tightened && let Err(e) = ctl.graph.reclaim_child(&new, "file", Perms::write()) {
            tracing::error!(node = %new.name(), error = %e, "loosening a filter's file claim failed");
        }
        if let Err(e) = jobs::mirror::move_users(std::slice::from_ref(&backend), &old, None) {
            tracing::error!(error = %e, "moving an export back failed");
        }
        if loosened && let Err(e) = ctl.graph.reclaim_child(&old, "file", CBW_FILE_IN_USE) {
            tracing::error!(node = %old.name(), error = %e, "a filter could not keep other writers out again");
        }
    }))
}

/// A copy-before-write filter that just got its first user stops sharing
/// writes to its file. True if it changed.
fn tighten_cbw(ctl: &mut Control, node: &Arc<Node>) -> Result<bool, RpcError> {
    if node.bdev().cbw_state().is_none() || node.child_perms("file").is_some_and(|p| p.shared & perm::WRITE == 0) {
        return Ok(false);
    }
    ctl.graph.reclaim_child(node, "file", CBW_FILE_IN_USE).map_err(bdev_error)?;
    Ok(true)
}
