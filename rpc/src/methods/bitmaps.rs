//! Dirty bitmap commands, with QEMU's names, arguments and errors:
//! `block-dirty-bitmap-add`, `-remove`, `-clear`, `-enable`, `-disable`,
//! `-merge`, and `x-debug-block-dirty-bitmap-sha256`.

use std::sync::Arc;

use bdev::{Bitmap, Node};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::transaction::Applied;
use crate::control::Control;
use crate::error::RpcError;
use crate::registry::decode;

/// QEMU's limit on a bitmap's name (BDRV_BITMAP_MAX_NAME_SIZE).
const BITMAP_NAME_BYTES_MAX: usize = 1023;
/// Granularity when none is given and the node has no cluster size.
const GRANULARITY_DEFAULT: u64 = 64 << 10;
const GRANULARITY_MIN: u64 = 512;

fn node(ctl: &Control, name: &str) -> Result<Arc<Node>, RpcError> {
    ctl.graph.get(name).map_err(|_| RpcError::failed(format!("Cannot find device='{name}' nor node-name='{name}'")))
}

fn find(node: &Node, name: &str) -> Result<Arc<Bitmap>, RpcError> {
    node.bitmaps().find(name).ok_or_else(|| RpcError::failed(format!("Dirty bitmap '{name}' not found")))
}

/// What a command may do to a bitmap (QEMU's bdrv_dirty_bitmap_check).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// Change its bits or its recording: not busy, not inconsistent.
    Modify,
    /// Remove it, or turn recording on or off: not busy.
    Manage,
}

pub(super) fn check(b: &Bitmap, what: Use) -> Result<(), RpcError> {
    let name = b.name().unwrap_or_default();
    if b.busy() {
        return Err(RpcError::failed(format!(
            "Bitmap '{name}' is currently in use by another operation and cannot be used"
        )));
    }
    if what == Use::Modify && b.inconsistent() {
        return Err(RpcError::failed(format!("Bitmap '{name}' is inconsistent and cannot be used")));
    }
    Ok(())
}

/// The granularity a new bitmap of `node` gets: the image's cluster size,
/// else 64 KiB (QEMU's choice).
fn default_granularity(node: &Node) -> u64 {
    node.bdev().info().format_specific.and_then(|f| f["data"]["cluster-size"].as_u64()).unwrap_or(GRANULARITY_DEFAULT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddParams {
    pub(super) node: String,
    name: String,
    #[serde(default)]
    granularity: Option<u32>,
    #[serde(default)]
    persistent: Option<bool>,
    #[serde(default)]
    disabled: Option<bool>,
}

pub(super) fn block_dirty_bitmap_add(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    add(ctl, decode(params)?).map(|a| a.commit(ctl))
}

pub(super) fn block_dirty_bitmap_remove(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    remove(ctl, decode(params)?).map(|a| a.commit(ctl))
}

pub(super) fn block_dirty_bitmap_clear(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    clear(ctl, decode(params)?).map(|a| a.commit(ctl))
}

pub(super) fn block_dirty_bitmap_enable(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    set_recording(ctl, decode(params)?, true).map(|a| a.commit(ctl))
}

pub(super) fn block_dirty_bitmap_disable(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    set_recording(ctl, decode(params)?, false).map(|a| a.commit(ctl))
}

pub(super) fn block_dirty_bitmap_merge(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    merge(ctl, decode(params)?).map(|a| a.commit(ctl))
}

/// `block-dirty-bitmap-add`; undone by removing the bitmap.
pub(super) fn add(ctl: &mut Control, p: AddParams) -> Result<Applied, RpcError> {
    let node = node(ctl, &p.node)?;
    if p.name.is_empty() {
        return Err(RpcError::failed("Bitmap name cannot be empty"));
    }
    if p.name.len() > BITMAP_NAME_BYTES_MAX {
        return Err(RpcError::failed(format!("Bitmap name too long: {}", p.name)));
    }
    let granularity = match p.granularity {
        None => default_granularity(&node),
        Some(g) if u64::from(g).is_power_of_two() && u64::from(g) >= GRANULARITY_MIN => u64::from(g),
        Some(_) => return Err(RpcError::failed("Granularity must be power of 2 and at least 512")),
    };
    if node.bitmaps().find(&p.name).is_some() {
        return Err(RpcError::failed(format!("Bitmap already exists: {}", p.name)));
    }
    if p.persistent == Some(true) {
        // Stored in qcow2's bitmap extension: not written by Spindle yet.
        return Err(RpcError::failed(format!(
            "Can't store persistent bitmaps to {}: Operation not supported",
            node.name()
        )));
    }
    let recording = !p.disabled.unwrap_or(false);
    let b = Arc::new(Bitmap::new(Some(p.name), node.size(), granularity, recording));
    node.bitmaps().add(Arc::clone(&b));
    Ok(Applied::undone_by(move |_| node.bitmaps().remove(&b)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NameParams {
    pub(super) node: String,
    name: String,
}

/// `block-dirty-bitmap-remove`: the bitmap is busy until the removal is
/// final (a second action on it in the same transaction is refused).
pub(super) fn remove(ctl: &mut Control, p: NameParams) -> Result<Applied, RpcError> {
    let node = node(ctl, &p.node)?;
    let b = find(&node, &p.name)?;
    check(&b, Use::Manage)?;
    b.set_busy(true);
    let undo = Arc::clone(&b);
    Ok(Applied::new(
        move |_| {
            b.set_busy(false);
            node.bitmaps().remove(&b);
        },
        move |_| undo.set_busy(false),
    ))
}

/// `block-dirty-bitmap-clear`; undone by setting the cleared bits again.
pub(super) fn clear(ctl: &mut Control, p: NameParams) -> Result<Applied, RpcError> {
    let node = node(ctl, &p.node)?;
    let b = find(&node, &p.name)?;
    check(&b, Use::Modify)?;
    let before = b.bits().copy();
    b.bits().clear_all();
    Ok(Applied::undone_by(move |_| b.bits().merge_from(&before)))
}

/// `block-dirty-bitmap-enable` / `-disable`; undone by the opposite.
pub(super) fn set_recording(ctl: &mut Control, p: NameParams, on: bool) -> Result<Applied, RpcError> {
    let node = node(ctl, &p.node)?;
    let b = find(&node, &p.name)?;
    check(&b, Use::Manage)?;
    let was = b.recording();
    node.bitmaps().set_recording(&b, on);
    Ok(Applied::undone_by(move |_| node.bitmaps().set_recording(&b, was)))
}

/// A source of `block-dirty-bitmap-merge`: a bitmap of the target's node
/// by name, or of any node.
#[derive(Deserialize)]
#[serde(untagged)]
enum Source {
    Name(String),
    External { node: String, name: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MergeParams {
    pub(super) node: String,
    target: String,
    bitmaps: Vec<Source>,
}

/// `block-dirty-bitmap-merge`; undone by putting the target's bits back
/// (in a transaction nothing writes meanwhile).
pub(super) fn merge(ctl: &mut Control, p: MergeParams) -> Result<Applied, RpcError> {
    let node = node(ctl, &p.node)?;
    let target = find(&node, &p.target)?;
    check(&target, Use::Modify)?;
    // Every source is found and checked before any bit changes.
    let mut sources = Vec::with_capacity(p.bitmaps.len());
    for s in &p.bitmaps {
        let b = match s {
            Source::Name(name) => find(&node, name)?,
            Source::External { node: n, name } => find(&*self::node(ctl, n)?, name)?,
        };
        if b.inconsistent() {
            check(&b, Use::Modify)?;
        }
        if b.bits().size() != target.bits().size() {
            return Err(RpcError::failed("Bitmaps are of different sizes".to_string()));
        }
        sources.push(b);
    }
    let before = target.bits().copy();
    for b in sources {
        target.bits().merge_from(b.bits());
    }
    Ok(Applied::undone_by(move |_| {
        target.bits().clear_all();
        target.bits().merge_from(&before);
    }))
}

/// `x-debug-block-dirty-bitmap-sha256`: the SHA-256 of the bitmap laid out
/// as QEMU lays it out in memory, so QEMU and Spindle hash a bitmap alike.
pub(super) fn x_debug_block_dirty_bitmap_sha256(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NameParams = decode(params)?;
    let node = node(ctl, &p.node)?;
    let b = find(&node, &p.name)?;
    let digest = Sha256::digest(b.bits().to_le_bytes());
    let hex: String = digest.iter().map(|x| format!("{x:02x}")).collect();
    Ok(json!({"sha256": hex}))
}
