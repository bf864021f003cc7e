//! `block-commit`: merge the layers from `top` down to just above `base`
//! into `base`.
//!
//! ```text
//!   overlay ─▶ top ─▶ mid ─▶ base        intermediate: copy top..mid into base,
//!   overlay ─────────────▶ base            then re-point overlay to base
//!
//!   top (active) ─▶ mid ─▶ base          active: the mirror engine with base as
//!   users ───────────────▶ base            target, READY, job-complete pivots
//! ```
//!
//! A read-only base is written through a writable twin (the same image
//! opened again read-write); the overlay ends up on the twin.

use std::sync::Arc;

use bdev::{BdevError, Graph, IoFlags, Node, Perms};

use crate::chain::{self, filename, format_name};
use crate::copies::{Next, Walk};
use crate::job::{ErrorAction, JobCtx, JobShared, JobType, OnError};
use crate::manager::{JobError, JobHooks, JobManager, NewJob};
use crate::mirror::{self, CopyMode, MirrorConfig, SyncMode};

/// Bytes per copy (QEMU copies 512 KiB at a time, one copy after another;
/// here up to `COPIES_MAX` copies run at once).
pub const STEP: u64 = 1 << 20;

/// `block-commit`'s arguments, resolved to names.
#[derive(Debug, Clone, Default)]
pub struct CommitArgs {
    pub job_id: String,
    pub device: String,
    pub base_node: Option<String>,
    pub base: Option<String>,
    pub top_node: Option<String>,
    pub top: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: bool,
    pub speed: u64,
    pub on_error: OnError,
    pub filter_node_name: Option<String>,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

/// Checks the arguments and starts an intermediate or an active commit.
pub fn start(graph: &mut Graph, jobs: &mut JobManager, a: CommitArgs) -> Result<(), JobError> {
    let bdev_err = |e: BdevError| JobError::Failed(e.to_string());
    let device = graph.get(&a.device).map_err(|e| JobError::Invalid(e.to_string()))?;
    if !device.parents().is_empty() {
        return Err(JobError::Invalid("Need a root block node".into()));
    }
    let chain = chain::chain(&device);
    let top_i = if a.top_node.is_some() || a.top.is_some() {
        chain::find(&chain, a.top_node.as_deref(), a.top.as_deref(), "top")?
    } else {
        0
    };
    let base_i = if a.base_node.is_some() || a.base.is_some() {
        chain::find(&chain, a.base_node.as_deref(), a.base.as_deref(), "base")?
    } else {
        chain.len() - 1
    };
    if top_i == base_i {
        return Err(JobError::Invalid("Invalid files for merge: top and base are the same".into()));
    }
    if base_i < top_i {
        return Err(JobError::Invalid(format!(
            "Node '{}' is not a backing file of '{}'",
            chain[base_i].name(),
            chain[top_i].name()
        )));
    }
    let (top, base) = (Arc::clone(&chain[top_i]), Arc::clone(&chain[base_i]));
    let active = top_i == 0;
    if active && a.backing_file.is_some() {
        return Err(JobError::Invalid("'backing-file' specified, but 'top' is the active layer".into()));
    }
    jobs.check_new_id(&a.job_id)?;
    for n in &chain[top_i..=base_i] {
        jobs.check_free(n)?;
    }
    let (base_w, twin) = chain::writable(graph, &base)?;
    let drop_twin = |graph: &mut Graph| {
        if twin {
            let _ = graph.remove_internal(base_w.name());
        }
    };
    let depth = (base_i - top_i) as u32;

    if active {
        let cfg = MirrorConfig {
            job_id: a.job_id,
            kind: JobType::Commit,
            source: Arc::clone(&top),
            target: Arc::clone(&base_w),
            sync: SyncMode::AboveBase { depth },
            speed: a.speed,
            granularity: None,
            buf_size: None,
            on_source_error: a.on_error,
            on_target_error: a.on_error,
            unmap: true,
            copy_mode: CopyMode::Background,
            auto_finalize: a.auto_finalize,
            auto_dismiss: a.auto_dismiss,
            filter_node_name: a.filter_node_name,
            extra_claims: Vec::new(),
            extra_nodes: chain[1..base_i].to_vec(),
            on_pivot: None,
            on_abort: twin.then(|| {
                let name = base_w.name().to_string();
                Box::new(move |g: &mut Graph| {
                    let _ = g.remove_internal(&name);
                }) as mirror::GraphFn
            }),
        };
        return mirror::start(graph, jobs, cfg).inspect_err(|_| drop_twin(graph));
    }

    let overlay = Arc::clone(&chain[top_i - 1]);
    let holder = format!("job '{}'", a.job_id);
    // The data written into base is what the layers above already show.
    let claim = match base_w.claim(holder.clone(), Perms::write_unchanged()) {
        Ok(c) => c,
        Err(e) => {
            drop_twin(graph);
            return Err(bdev_err(e));
        }
    };
    let backing_name = a.backing_file.clone().unwrap_or_else(|| filename(&base));
    let backing_format = format_name(&base, a.backing_mask_protocol);
    let hooks = CommitHooks { overlay, base: Arc::clone(&base_w), twin, backing_name, backing_format, done: false };
    let (t, b, on_error) = (Arc::clone(&top), Arc::clone(&base_w), a.on_error);
    let run: crate::manager::RunFn = Box::new(move |ctx| Box::pin(run(ctx, t, b, depth, on_error)));
    let mut nodes = chain[top_i..=base_i].to_vec();
    nodes.push(Arc::clone(&base_w));
    jobs.start(NewJob {
        id: a.job_id,
        kind: JobType::Commit,
        home: Some(chain::home(graph, &top)),
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
        speed: a.speed,
        nodes,
        claims: vec![claim],
        hooks: Box::new(hooks),
        run,
    })
    .inspect_err(|_| drop_twin(graph))?;
    Ok(())
}

/// The intermediate commit's copy loop: every range some layer from top
/// down to just above base holds goes into base, several ranges at once.
async fn run(ctx: JobCtx, top: Arc<Node>, base: Arc<Node>, depth: u32, on_error: OnError) -> Result<(), String> {
    let io = |e: BdevError| e.to_string();
    let (top_ch, base_ch) = (top.channel().map_err(io)?, base.channel().map_err(io)?);
    let size = top.size();
    ctx.set_total(size);
    let mut walk = Walk::new(size, STEP);
    loop {
        // Ignore retries the range (stop does too, after the pause).
        walk.settle(&ctx, on_error, |w, f| w.again(f.offset, f.len)).await?;
        let (at, step) = match walk.next(&ctx).await {
            Next::Range { at, len } => (at, len),
            Next::Again => continue,
            Next::Cancelled => return Ok(()),
            Next::Done => break,
        };
        let st = match top_ch.block_status(at, step).await {
            Ok(st) => st,
            Err(e) => {
                walk.failed(at, step);
                match ctx.io_error(true, e, on_error) {
                    ErrorAction::Report => {
                        walk.copies.drain().await;
                        return Err(e.to_string());
                    }
                    _ => continue,
                }
            }
        };
        let len = st.len.clamp(1, step);
        walk.advance(at, step, len);
        if st.allocated && st.depth < depth {
            walk.copies.room().await;
            let (src, dst) = (top_ch.clone(), base_ch.clone());
            let zero = st.zero && !st.data;
            walk.copies.start(at, len, async move {
                if zero {
                    return dst.write_zeroes(at, len, IoFlags::NONE).await.map_err(|e| (false, e));
                }
                let buf = src.read(at, len as usize).await.map_err(|e| (true, e))?;
                dst.write(at, buf, IoFlags::NONE).await.1.map_err(|e| (false, e))
            });
            ctx.rate_limit(if zero { 0 } else { len }).await;
        } else {
            ctx.add_progress(len);
        }
    }
    ctx.add_progress(walk.copies.take_done());
    base_ch.flush().await.map_err(|e| e.to_string())
}

struct CommitHooks {
    overlay: Arc<Node>,
    base: Arc<Node>,
    twin: bool,
    backing_name: String,
    backing_format: String,
    done: bool,
}

impl JobHooks for CommitHooks {
    fn prepare(&mut self, graph: &mut Graph, _job: &JobShared) -> Result<(), String> {
        graph
            .change_backing(&self.overlay, Some(&self.base), Some(&self.backing_name), Some(&self.backing_format))
            .map_err(|e| e.to_string())?;
        self.done = true;
        Ok(())
    }

    fn clean(&mut self, graph: &mut Graph, _job: &JobShared) {
        if self.twin && !self.done {
            let _ = graph.remove_internal(self.base.name());
        }
    }
}
