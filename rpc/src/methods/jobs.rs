//! Job commands: the verbs (`job-*`, `block-job-*`), the queries, and the
//! commands that start jobs (`blockdev-mirror`, `drive-mirror`,
//! `block-commit`, `block-stream`), with QEMU's argument names.

use jobs::commit::CommitArgs;
use jobs::mirror::{CopyMode, MirrorConfig, SyncMode};
use jobs::stream::StreamArgs;
use jobs::{JobType, OnError};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use bdev::BdevError;

use crate::control::{Control, bdev_error, job_error};
use crate::error::RpcError;
use crate::registry::decode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdParams {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceParams {
    device: String,
}

pub(super) fn job_pause(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.pause(&p.id, false).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn job_resume(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.resume(&p.id, false).map_err(job_error)?;
    Ok(json!({}))
}

/// `job-cancel` is always a forced cancel.
pub(super) fn job_cancel(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.cancel(&mut ctl.graph, &p.id, true, false).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn job_complete(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.complete(&p.id, false).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn job_finalize(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.finalize(&mut ctl.graph, &p.id, false).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn job_dismiss(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.dismiss(&p.id, false).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn block_job_pause(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: DeviceParams = decode(params)?;
    ctl.jobs.pause(&p.device, true).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn block_job_resume(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: DeviceParams = decode(params)?;
    ctl.jobs.resume(&p.device, true).map_err(job_error)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockCancelParams {
    device: String,
    #[serde(default)]
    force: bool,
}

/// `block-job-cancel`: without `force`, a ready mirror finishes without pivoting.
pub(super) fn block_job_cancel(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: BlockCancelParams = decode(params)?;
    ctl.jobs.cancel(&mut ctl.graph, &p.device, p.force, true).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn block_job_complete(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: DeviceParams = decode(params)?;
    ctl.jobs.complete(&p.device, true).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn block_job_finalize(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.finalize(&mut ctl.graph, &p.id, true).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn block_job_dismiss(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: IdParams = decode(params)?;
    ctl.jobs.dismiss(&p.id, true).map_err(job_error)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSpeedParams {
    device: String,
    speed: i64,
}

pub(super) fn block_job_set_speed(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: SetSpeedParams = decode(params)?;
    ctl.jobs.set_speed(&p.device, p.speed).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn query_jobs(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = decode_empty(params)?;
    Ok(Value::Array(ctl.jobs.query_jobs()))
}

pub(super) fn query_block_jobs(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = decode_empty(params)?;
    Ok(Value::Array(ctl.jobs.query_block_jobs()))
}

fn decode_empty(params: Option<Value>) -> Result<serde_json::Map<String, Value>, RpcError> {
    let m: serde_json::Map<String, Value> = decode(params)?;
    if let Some(k) = m.keys().next() {
        return Err(RpcError::invalid_params(format!("Parameter '{k}' is unexpected")));
    }
    Ok(m)
}

/// A job id: given, well formed, or QEMU's error for node-only configurations.
pub(super) fn job_id(id: Option<String>) -> Result<String, RpcError> {
    id.ok_or_else(|| RpcError::invalid_params("An explicit job ID is required"))
}

pub(super) fn speed(speed: Option<i64>) -> Result<u64, RpcError> {
    match speed {
        Some(s) if s < 0 => Err(RpcError::invalid_params("Parameter 'speed' expects a non-negative value")),
        Some(s) => Ok(s as u64),
        None => Ok(0),
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum MirrorSync {
    Full,
    Top,
    None,
    Incremental,
    Bitmap,
}

#[derive(Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "kebab-case")]
enum MirrorCopyMode {
    #[default]
    Background,
    WriteBlocking,
}

fn sync_mode(s: MirrorSync) -> Result<SyncMode, RpcError> {
    match s {
        MirrorSync::Full => Ok(SyncMode::Full),
        MirrorSync::Top => Ok(SyncMode::Top),
        MirrorSync::None => Ok(SyncMode::None),
        MirrorSync::Incremental | MirrorSync::Bitmap => {
            Err(RpcError::invalid_params("Sync mode 'incremental' and 'bitmap' are not supported by mirror"))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockdevMirrorParams {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    target: String,
    #[serde(default)]
    replaces: Option<String>,
    sync: MirrorSync,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default, deserialize_with = "granularity")]
    granularity: Option<u64>,
    #[serde(default)]
    buf_size: Option<i64>,
    #[serde(default)]
    on_source_error: OnError,
    #[serde(default)]
    on_target_error: OnError,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    copy_mode: MirrorCopyMode,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
}

/// QEMU's `granularity` (a uint32): 0, as absence, means the default.
fn granularity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<u32>::deserialize(d)?.filter(|&g| g != 0).map(u64::from))
}

fn check_replaces(replaces: Option<&str>, device: &str) -> Result<(), RpcError> {
    match replaces {
        Some(r) if r != device => Err(RpcError::invalid_params(format!(
            "Cannot replace node '{r}': only the mirrored node '{device}' itself can be replaced"
        ))),
        _ => Ok(()),
    }
}

/// `blockdev-mirror`: mirror `device` into the existing node `target`.
pub(super) fn blockdev_mirror(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: BlockdevMirrorParams = decode(params)?;
    check_replaces(p.replaces.as_deref(), &p.device)?;
    let cfg = MirrorConfig {
        job_id: job_id(p.job_id)?,
        kind: JobType::Mirror,
        source: ctl.graph.get(&p.device).map_err(bdev_error)?,
        target: ctl.graph.get(&p.target).map_err(bdev_error)?,
        sync: sync_mode(p.sync)?,
        speed: speed(p.speed)?,
        granularity: p.granularity,
        buf_size: p.buf_size,
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
        unmap: true,
        copy_mode: copy_mode(p.copy_mode),
        auto_finalize: p.auto_finalize.unwrap_or(true),
        auto_dismiss: p.auto_dismiss.unwrap_or(true),
        filter_node_name: p.filter_node_name,
        extra_claims: Vec::new(),
        extra_nodes: Vec::new(),
        on_pivot: None,
        on_abort: None,
    };
    jobs::mirror::start(&mut ctl.graph, &mut ctl.jobs, cfg).map_err(job_error)?;
    Ok(json!({}))
}

fn copy_mode(m: MirrorCopyMode) -> CopyMode {
    match m {
        MirrorCopyMode::Background => CopyMode::Background,
        MirrorCopyMode::WriteBlocking => CopyMode::WriteBlocking,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockCommitParams {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    #[serde(default)]
    base_node: Option<String>,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    top_node: Option<String>,
    #[serde(default)]
    top: Option<String>,
    #[serde(default)]
    backing_file: Option<String>,
    #[serde(default)]
    backing_mask_protocol: bool,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default)]
    on_error: OnError,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
}

/// `block-commit`: merge `top` (default: the active layer) down into
/// `base` (default: the bottom of the chain).
pub(super) fn block_commit(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: BlockCommitParams = decode(params)?;
    if p.base.is_some() && p.base_node.is_some() {
        return Err(RpcError::invalid_params("'base' and 'base-node' are mutually exclusive"));
    }
    if p.top.is_some() && p.top_node.is_some() {
        return Err(RpcError::invalid_params("'top' and 'top-node' are mutually exclusive"));
    }
    let args = CommitArgs {
        job_id: job_id(p.job_id)?,
        device: p.device,
        base_node: p.base_node,
        base: p.base,
        top_node: p.top_node,
        top: p.top,
        backing_file: p.backing_file,
        backing_mask_protocol: p.backing_mask_protocol,
        speed: speed(p.speed)?,
        on_error: p.on_error,
        filter_node_name: p.filter_node_name,
        auto_finalize: p.auto_finalize.unwrap_or(true),
        auto_dismiss: p.auto_dismiss.unwrap_or(true),
    };
    jobs::commit::start(&mut ctl.graph, &mut ctl.jobs, args).map_err(job_error)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockStreamParams {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    base_node: Option<String>,
    #[serde(default)]
    bottom: Option<String>,
    #[serde(default)]
    backing_file: Option<String>,
    #[serde(default)]
    backing_mask_protocol: bool,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default)]
    on_error: OnError,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
}

/// `block-stream`: pull the chain above `base` (default: all of it) into `device`.
pub(super) fn block_stream(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: BlockStreamParams = decode(params)?;
    // Streaming needs no filter node here; the name is accepted for compatibility.
    let _ = p.filter_node_name;
    let args = StreamArgs {
        job_id: job_id(p.job_id)?,
        device: p.device,
        base: p.base,
        base_node: p.base_node,
        bottom: p.bottom,
        backing_file: p.backing_file,
        backing_mask_protocol: p.backing_mask_protocol,
        speed: speed(p.speed)?,
        on_error: p.on_error,
        auto_finalize: p.auto_finalize.unwrap_or(true),
        auto_dismiss: p.auto_dismiss.unwrap_or(true),
    };
    jobs::stream::start(&mut ctl.graph, &mut ctl.jobs, args).map_err(job_error)?;
    Ok(json!({}))
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub(super) enum NewImageMode {
    Existing,
    #[default]
    AbsolutePaths,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DriveMirrorParams {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    target: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    replaces: Option<String>,
    sync: MirrorSync,
    #[serde(default)]
    mode: NewImageMode,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default, deserialize_with = "granularity")]
    granularity: Option<u64>,
    #[serde(default)]
    buf_size: Option<i64>,
    #[serde(default)]
    on_source_error: OnError,
    #[serde(default)]
    on_target_error: OnError,
    #[serde(default)]
    unmap: Option<bool>,
    #[serde(default)]
    copy_mode: MirrorCopyMode,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
}

/// The image format of a node, as a target file would be created in.
pub(super) fn format_of(node: &bdev::Node) -> &'static str {
    match node.driver() {
        "qcow2" => "qcow2",
        _ => "raw",
    }
}

/// `drive-mirror`: mirror `device` into the file `target`, created first
/// (`mode: absolute-paths`, with the backing the sync mode needs) or
/// opened as it is (`mode: existing`).
pub(super) fn drive_mirror(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: DriveMirrorParams = decode(params)?;
    check_replaces(p.replaces.as_deref(), &p.device)?;
    let id = job_id(p.job_id)?;
    ctl.jobs.check_new_id(&id).map_err(job_error)?;
    let sync = sync_mode(p.sync)?;
    let source = ctl.graph.get(&p.device).map_err(bdev_error)?;
    let format = match (&p.format, p.mode) {
        (Some(f), _) => f.clone(),
        (None, NewImageMode::Existing) => String::new(),
        (None, NewImageMode::AbsolutePaths) => format_of(&source).to_string(),
    };
    if !format.is_empty() && format != "qcow2" && format != "raw" {
        return Err(RpcError::invalid_params(format!("Parameter 'format' does not accept value '{format}'")));
    }
    let backing_node = source.children().into_iter().find(|(r, _)| *r == "backing").map(|(_, b)| b);
    // The layer the target reads where it holds nothing.
    let below = match sync {
        SyncMode::Top => backing_node,
        SyncMode::None => Some(Arc::clone(&source)),
        _ => None,
    };
    let mut opts = create_target(&source, &p.target, &format, p.mode, below.as_ref())?;
    if p.mode == NewImageMode::AbsolutePaths && format == "qcow2" {
        // A target over the source itself gets that backing at the
        // pivot: until then the source must stay a root.
        let now = if sync == SyncMode::None { None } else { below.as_ref() };
        opts["backing"] = now.map_or(Value::Null, |b| json!(b.name()));
    }
    let target = match &p.node_name {
        Some(name) => {
            opts["node-name"] = json!(name);
            ctl.graph.add(opts).map_err(bdev_error)?
        }
        None => ctl.graph.add_implicit(opts).map_err(bdev_error)?,
    };
    let target_name = target.name().to_string();
    let explicit = p.node_name.is_some();
    let format_is_qcow2 = target.driver() == "qcow2";
    let new_overlay = sync == SyncMode::None && p.mode == NewImageMode::AbsolutePaths && format_is_qcow2;
    let (target_node, source_node) = (Arc::clone(&target), Arc::clone(&source));
    let cfg = MirrorConfig {
        job_id: id,
        kind: JobType::Mirror,
        source,
        target,
        sync,
        speed: speed(p.speed)?,
        // A new qcow2 for sync=none gets the source as backing only at the
        // pivot: until then a write of part of a cluster would fill the rest
        // with zeroes. Dirty chunks of a whole cluster make the job copy
        // whole clusters from the source (QEMU's default too).
        granularity: p.granularity.or(new_overlay.then_some(CLUSTER_SIZE_CREATED)),
        buf_size: p.buf_size,
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
        unmap: p.unmap.unwrap_or(true),
        copy_mode: copy_mode(p.copy_mode),
        auto_finalize: p.auto_finalize.unwrap_or(true),
        auto_dismiss: p.auto_dismiss.unwrap_or(true),
        filter_node_name: None,
        extra_claims: Vec::new(),
        extra_nodes: Vec::new(),
        on_pivot: new_overlay.then(|| {
            let (target, source) = (Arc::clone(&target_node), Arc::clone(&source_node));
            Box::new(move |g: &mut bdev::Graph| {
                let (name, fmt) = (jobs::chain::filename(&source), format_of(&source));
                if let Err(e) = g.change_backing(&target, Some(&source), Some(&name), Some(fmt)) {
                    tracing::error!(error = %e, "attaching the mirror target's backing failed");
                }
            }) as jobs::mirror::GraphFn
        }),
        // The job opened the target: it goes when the job ends without a pivot.
        on_abort: Some(Box::new(move |g: &mut bdev::Graph| {
            let _ = if explicit { g.remove(&target_name) } else { g.remove_internal(&target_name) };
        })),
    };
    let name = cfg.target.name().to_string();
    if let Err(e) = jobs::mirror::start(&mut ctl.graph, &mut ctl.jobs, cfg) {
        let _ = if explicit { ctl.graph.remove(&name) } else { ctl.graph.remove_internal(&name) };
        return Err(job_error(e));
    }
    Ok(json!({}))
}

/// The target file of `drive-mirror` and `drive-backup`: created empty
/// (`absolute-paths`) as `format` (qcow2 or raw) the size of `source`,
/// naming `below` as its backing file in the header, or opened as it is
/// (`existing`, format probed when not given). Returns `blockdev-add`
/// options for it, without a node name. A file any node has open is
/// refused, as qemu-storage-daemon refuses it.
pub(super) fn create_target(
    source: &bdev::Node,
    target: &str,
    format: &str,
    mode: NewImageMode,
    below: Option<&Arc<bdev::Node>>,
) -> Result<Value, RpcError> {
    use bdev::drivers::qcow2::create::{CreateOptions, create, create_raw};
    let path = std::path::PathBuf::from(target);
    if mode == NewImageMode::AbsolutePaths {
        let size = source.size();
        let made = if format == "qcow2" {
            let (file, fmt) = match below {
                Some(b) => (Some(jobs::chain::filename(b)), Some(format_of(b).to_string())),
                None => (None, None),
            };
            create(&path, &CreateOptions { size, cluster_size: None, backing_file: file, backing_format: fmt })
        } else {
            create_raw(&path, size)
        };
        made.map_err(|e| match e {
            // QEMU's words, as qemu-storage-daemon answers.
            BdevError::Locked(_) => bdev_error(e),
            e => RpcError::failed(format!("Could not create '{target}': {e}")),
        })?;
    }
    let driver = if format.is_empty() { probe(&path)?.to_string() } else { format.to_string() };
    Ok(json!({"driver": driver, "file": {"driver": "file", "filename": target}}))
}

/// The cluster size of the qcow2 images drive-mirror creates (the default).
const CLUSTER_SIZE_CREATED: u64 = 64 << 10;

/// qcow2 when the file starts with the qcow2 magic, raw otherwise.
fn probe(path: &std::path::Path) -> Result<&'static str, RpcError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| RpcError::failed(format!("Could not open '{}': {e}", path.display())))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" { "qcow2" } else { "raw" })
}
