//! `blockdev-backup` and `drive-backup`, with QEMU's arguments (BackupCommon,
//! BackupPerf) and its refusals, in its order.

use std::sync::Arc;

use bdev::Node;
use jobs::OnError;
use jobs::backup::{BackupConfig, BackupSync, BitmapMode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::jobs::{NewImageMode, create_target, format_of, job_id, speed};
use super::transaction::{self, Action, Applied};
use crate::control::{Control, bdev_error, job_error};
use crate::error::RpcError;
use crate::registry::decode;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Sync {
    Full,
    Top,
    None,
    Incremental,
    Bitmap,
}

impl Sync {
    fn name(self) -> &'static str {
        match self {
            Sync::Full => "full",
            Sync::Top => "top",
            Sync::None => "none",
            Sync::Incremental => "incremental",
            Sync::Bitmap => "bitmap",
        }
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    OnSuccess,
    Never,
    Always,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::OnSuccess => "on-success",
            Mode::Never => "never",
            Mode::Always => "always",
        }
    }
}

/// QEMU's BackupPerf (`x-perf`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Perf {
    /// Accepted: copies go through the nodes either way.
    #[serde(default)]
    #[allow(dead_code)]
    use_copy_range: Option<bool>,
    #[serde(default)]
    max_workers: Option<i64>,
    #[serde(default)]
    max_chunk: Option<i64>,
    #[serde(default)]
    #[allow(dead_code)]
    min_cluster_size: Option<u64>,
}

/// The arguments both commands share (QEMU's BackupCommon) and their own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct BackupParams {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    target: String,
    sync: Sync,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default)]
    bitmap: Option<String>,
    #[serde(default)]
    bitmap_mode: Option<Mode>,
    #[serde(default)]
    compress: Option<bool>,
    #[serde(default)]
    on_source_error: OnError,
    #[serde(default)]
    on_target_error: OnError,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    discard_source: Option<bool>,
    #[serde(default)]
    x_perf: Option<Perf>,
    /// drive-backup only.
    #[serde(default)]
    format: Option<String>,
    /// drive-backup only.
    #[serde(default)]
    mode: Option<NewImageMode>,
}

fn node(ctl: &Control, name: &str) -> Result<Arc<Node>, RpcError> {
    ctl.graph.get(name).map_err(|_| RpcError::failed(format!("Cannot find device='{name}' nor node-name='{name}'")))
}

/// What sync, bitmap and bitmap-mode resolve to.
struct Copying {
    sync: BackupSync,
    bitmap: Option<Arc<bdev::Bitmap>>,
    mode: Option<BitmapMode>,
}

/// QEMU's checks of sync, bitmap and bitmap-mode, in its order.
fn bitmap_settings(source: &Node, p: &BackupParams) -> Result<Copying, RpcError> {
    let mut sync = p.sync;
    let mut mode = p.bitmap_mode;
    if sync == Sync::Incremental {
        if let Some(m) = mode
            && m != Mode::OnSuccess
        {
            return Err(RpcError::failed("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"));
        }
        mode = Some(Mode::OnSuccess);
    }
    let bitmap = match &p.bitmap {
        Some(name) => {
            let b = source
                .bitmaps()
                .find(name)
                .ok_or_else(|| RpcError::failed(format!("Bitmap '{name}' could not be found")))?;
            let Some(m) = mode else {
                return Err(RpcError::failed("Bitmap sync mode must be given when providing a bitmap"));
            };
            if b.busy() {
                return Err(RpcError::failed(format!(
                    "Bitmap '{name}' is currently in use by another operation and cannot be used"
                )));
            }
            if b.inconsistent() {
                return Err(RpcError::failed(format!("Bitmap '{name}' is inconsistent and cannot be used")));
            }
            if sync == Sync::None {
                return Err(RpcError::failed("sync mode 'none' does not produce meaningful bitmap outputs"));
            }
            if m == Mode::Never && !matches!(sync, Sync::Bitmap | Sync::Incremental) {
                return Err(RpcError::failed(format!(
                    "Bitmap sync mode '{}' has no meaningful effect when combined with sync mode '{}'",
                    m.name(),
                    sync.name()
                )));
            }
            Some(b)
        }
        None => {
            if p.bitmap_mode.is_some() {
                return Err(RpcError::failed("Cannot specify bitmap sync mode without a bitmap"));
            }
            None
        }
    };
    if matches!(sync, Sync::Bitmap | Sync::Incremental) && bitmap.is_none() {
        return Err(RpcError::failed(format!("must provide a valid bitmap name for '{}' sync mode", sync.name())));
    }
    if sync == Sync::Incremental {
        sync = Sync::Bitmap;
    }
    let sync = match sync {
        Sync::Full => BackupSync::Full,
        Sync::Top => BackupSync::Top,
        Sync::None => BackupSync::None,
        Sync::Incremental | Sync::Bitmap => BackupSync::Bitmap,
    };
    let mode = mode.map(|m| match m {
        Mode::OnSuccess => BitmapMode::OnSuccess,
        Mode::Never => BitmapMode::Never,
        Mode::Always => BitmapMode::Always,
    });
    Ok(Copying { sync, bitmap, mode })
}

/// The job's settings once the target node is known.
fn config(
    id: String,
    source: Arc<Node>,
    target: Arc<Node>,
    p: BackupParams,
    copying: Copying,
) -> Result<BackupConfig, RpcError> {
    let Copying { sync, bitmap, mode: bitmap_mode } = copying;
    // QEMU's order: the same node twice, then compression, then x-perf.
    if Arc::ptr_eq(&source, &target) {
        return Err(RpcError::failed("Source and target cannot be the same"));
    }
    let compress = p.compress.unwrap_or(false);
    if compress && !target.bdev().supports_compressed_writes() {
        return Err(RpcError::failed(jobs::backup::COMPRESS_UNSUPPORTED));
    }
    let perf = p.x_perf.unwrap_or_default();
    if perf.max_workers.is_some_and(|w| w < 1) {
        return Err(RpcError::invalid_params("max-workers must be greater than zero"));
    }
    let max_chunk = match perf.max_chunk {
        Some(c) if c < 0 => {
            return Err(RpcError::invalid_params("max-chunk must be zero (which means no limit) or positive"));
        }
        Some(c) => c as u64,
        None => 0,
    };
    Ok(BackupConfig {
        job_id: id,
        source,
        target,
        sync,
        bitmap,
        bitmap_mode,
        speed: speed(p.speed)?,
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
        auto_finalize: p.auto_finalize.unwrap_or(true),
        auto_dismiss: p.auto_dismiss.unwrap_or(true),
        filter_node_name: p.filter_node_name,
        discard_source: p.discard_source.unwrap_or(false),
        compress,
        max_chunk,
        on_end: None,
    })
}

/// `blockdev-backup`: a point-in-time copy of `device` into the existing
/// node `target` (a transaction of one action).
pub(super) fn blockdev_backup(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: BackupParams = decode(params)?;
    transaction::single(ctl, Action::BlockdevBackup(p))
}

/// `drive-backup`: as `blockdev-backup`, into the file `target`, created
/// first (`mode: absolute-paths`, the default; over the source's backing
/// file for `sync=top`, over the source for `sync=none`) or opened as it
/// is (`existing`). The target is closed when the job ends.
pub(super) fn drive_backup(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: BackupParams = decode(params)?;
    transaction::single(ctl, Action::DriveBackup(p))
}

/// The nodes a backup action names (held while a transaction runs).
pub(super) fn named_nodes(p: &BackupParams) -> Vec<String> {
    vec![p.device.clone(), p.target.clone()]
}

/// Undoes a job the transaction under way created.
fn undo_job(id: String) -> Applied {
    Applied::undone_by(move |ctl: &mut Control| ctl.jobs.abort_txn_job(&mut ctl.graph, &id))
}

/// The blockdev-backup action: the job is set up (filter in place, bitmap
/// frozen) and runs once the transaction commits.
pub(super) fn blockdev_backup_action(ctl: &mut Control, p: BackupParams) -> Result<Applied, RpcError> {
    if p.format.is_some() || p.mode.is_some() {
        let k = if p.format.is_some() { "format" } else { "mode" };
        return Err(RpcError::invalid_params(format!("Parameter '{k}' is unexpected")));
    }
    let id = job_id(p.job_id.clone())?;
    let source = node(ctl, &p.device)?;
    let copying = bitmap_settings(&source, &p)?;
    let target = node(ctl, &p.target)?;
    let cfg = config(id.clone(), source, target, p, copying)?;
    jobs::backup::start(&mut ctl.graph, &mut ctl.jobs, cfg).map_err(job_error)?;
    Ok(undo_job(id))
}

/// The drive-backup action.
pub(super) fn drive_backup_action(ctl: &mut Control, p: BackupParams) -> Result<Applied, RpcError> {
    let id = job_id(p.job_id.clone())?;
    ctl.jobs.check_new_id(&id).map_err(job_error)?;
    let source = node(ctl, &p.device)?;
    let copying = bitmap_settings(&source, &p)?;
    let image_mode = p.mode.unwrap_or_default();
    let format = match (&p.format, image_mode) {
        (Some(f), _) => f.clone(),
        (None, NewImageMode::Existing) => String::new(),
        (None, NewImageMode::AbsolutePaths) => format_of(&source).to_string(),
    };
    if !format.is_empty() && format != "qcow2" && format != "raw" {
        return Err(RpcError::invalid_params(format!("Parameter 'format' does not accept value '{format}'")));
    }
    // The layer the target reads where it holds nothing.
    let below = match copying.sync {
        BackupSync::Top => source.children().into_iter().find(|(r, _)| *r == "backing").map(|(_, b)| b),
        BackupSync::None => Some(Arc::clone(&source)),
        _ => None,
    };
    let mut opts = create_target(&source, &p.target, &format, image_mode, below.as_ref())?;
    if image_mode == NewImageMode::AbsolutePaths && format == "qcow2" {
        opts["backing"] = below.as_ref().map_or(Value::Null, |b| json!(b.name()));
    }
    let target = ctl.graph.add_implicit(opts).map_err(bdev_error)?;
    let name = target.name().to_string();
    let mut cfg = match config(id.clone(), source, target, p, copying) {
        Ok(c) => c,
        Err(e) => {
            let _ = ctl.graph.remove_internal(&name);
            return Err(e);
        }
    };
    let end_name = name.clone();
    cfg.on_end = Some(Box::new(move |g: &mut bdev::Graph| {
        if let Err(e) = g.remove_internal(&end_name) {
            tracing::error!(node = %end_name, error = %e, "closing a drive-backup target failed");
        }
    }));
    if let Err(e) = jobs::backup::start(&mut ctl.graph, &mut ctl.jobs, cfg) {
        let _ = ctl.graph.remove_internal(&name);
        return Err(job_error(e));
    }
    Ok(undo_job(id))
}
