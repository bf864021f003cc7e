//! `block-stream`: pull the data of the backing chain (down to, not
//! including, `base`) up into the top image, then re-point the top to
//! `base` (or to nothing).
//!
//! ```text
//!   top ─▶ mid ─▶ base        copy what mid holds and top lacks into top,
//!   top ─────────▶ base         then top's header names base
//! ```
//!
//! Clients keep writing to the top meanwhile: copies are written with
//! [`IoFlags::FILL_UNALLOCATED`], so a cluster a client wrote after the
//! job read the backing data keeps the client's data.

use std::sync::Arc;

use bdev::{BdevError, Graph, IoFlags, Node};

use crate::chain::{self, filename, format_name};
use crate::copies::{Next, Walk};
use crate::job::{ErrorAction, JobCtx, JobShared, JobType, OnError};
use crate::manager::{JobError, JobHooks, JobManager, NewJob};

/// Bytes per copy (QEMU streams 512 KiB at a time, one copy after
/// another; here up to `COPIES_MAX` copies run at once).
pub const STEP: u64 = 1 << 20;

/// `block-stream`'s arguments.
#[derive(Debug, Clone, Default)]
pub struct StreamArgs {
    pub job_id: String,
    pub device: String,
    pub base: Option<String>,
    pub base_node: Option<String>,
    pub bottom: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: bool,
    pub speed: u64,
    pub on_error: OnError,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

/// Checks the arguments and starts the job.
pub fn start(graph: &mut Graph, jobs: &mut JobManager, a: StreamArgs) -> Result<(), JobError> {
    let invalid = JobError::Invalid;
    let top = graph.get(&a.device).map_err(|e| invalid(e.to_string()))?;
    let given = [a.base.is_some(), a.base_node.is_some(), a.bottom.is_some()].iter().filter(|&&b| b).count();
    if given > 1 {
        return Err(invalid("'base', 'base-node' and 'bottom' are mutually exclusive".into()));
    }
    if a.bottom.is_some() && a.backing_file.is_some() {
        return Err(invalid("'backing-file' cannot be used with 'bottom'".into()));
    }
    let chain = chain::chain(&top);
    // The index of the base in the chain (chain.len(): no base, stream everything).
    let base_i = if let Some(b) = &a.bottom {
        let i = chain::find(&chain, Some(b), None, "bottom")?;
        if i == 0 {
            return Err(invalid("'bottom' must be below the top".into()));
        }
        i + 1
    } else if a.base.is_some() || a.base_node.is_some() {
        let i = chain::find(&chain, a.base_node.as_deref(), a.base.as_deref(), "base")?;
        if i == 0 {
            return Err(invalid(format!("Node '{}' is not a backing file of itself", top.name())));
        }
        i
    } else {
        chain.len()
    };
    if top.read_only() {
        return Err(invalid(format!("Node '{}' is read-only; streaming writes into it", top.name())));
    }
    if chain.len() > 1 && top.driver() != "qcow2" {
        return Err(invalid(format!("Node '{}' (driver '{}') cannot take streamed data", top.name(), top.driver())));
    }
    jobs.check_new_id(&a.job_id)?;
    for n in &chain[..base_i] {
        jobs.check_free(n)?;
    }
    let base = chain.get(base_i).cloned();
    let backing_name = match &base {
        Some(b) => Some(a.backing_file.clone().unwrap_or_else(|| filename(b))),
        None => None,
    };
    let backing_format = base.as_ref().map(|b| format_name(b, a.backing_mask_protocol));
    let hooks = StreamHooks { top: Arc::clone(&top), base, backing_name, backing_format };
    let (t, depth, on_error) = (Arc::clone(&top), base_i as u32, a.on_error);
    let run: crate::manager::RunFn = Box::new(move |ctx| Box::pin(run(ctx, t, depth, on_error)));
    jobs.start(NewJob {
        id: a.job_id,
        kind: JobType::Stream,
        home: Some(chain::home(graph, &top)),
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
        speed: a.speed,
        nodes: chain[..base_i].to_vec(),
        claims: Vec::new(),
        hooks: Box::new(hooks),
        run,
    })?;
    Ok(())
}

/// Copies into the top every range some layer above the base (`depth`
/// layers down) holds and the top lacks.
async fn run(ctx: JobCtx, top: Arc<Node>, depth: u32, on_error: OnError) -> Result<(), String> {
    let ch = top.channel().map_err(|e: BdevError| e.to_string())?;
    let size = top.size();
    ctx.set_total(size);
    if depth <= 1 {
        // The top's backing already is the base: nothing to pull up.
        ctx.add_progress(size);
        return Ok(());
    }
    let cluster =
        top.bdev().info().format_specific.and_then(|f| f["data"]["cluster-size"].as_u64()).unwrap_or(64 << 10);
    let step = STEP.max(cluster);
    // With `ignore`, the job carries on and fails at the end, so the
    // backing file is not dropped.
    let mut ignored: Option<String> = None;
    let mut walk = Walk::new(size, step);
    loop {
        walk.settle(&ctx, on_error, |_, f| {
            ignored.get_or_insert(f.error.to_string());
            ctx.add_progress(f.len);
        })
        .await?;
        let (at, n) = match walk.next(&ctx).await {
            Next::Range { at, len } => (at, len),
            Next::Again => continue,
            Next::Cancelled => return Ok(()),
            Next::Done => break,
        };
        let st = match ch.block_status(at, n).await {
            Ok(st) => st,
            Err(e) => match ctx.io_error(true, e, on_error) {
                ErrorAction::Report => {
                    walk.copies.drain().await;
                    return Err(e.to_string());
                }
                ErrorAction::Stop => {
                    walk.failed(at, n);
                    continue;
                }
                ErrorAction::Ignore => {
                    ignored.get_or_insert(e.to_string());
                    walk.advance(at, n, n);
                    ctx.add_progress(n);
                    continue;
                }
            },
        };
        let len = st.len.clamp(1, n);
        walk.advance(at, n, len);
        if st.allocated && st.depth > 0 && st.depth < depth {
            walk.copies.room().await;
            let c = ch.clone();
            walk.copies.start(at, len, async move {
                let buf = c.read(at, len as usize).await.map_err(|e| (true, e))?;
                c.write(at, buf, IoFlags::FILL_UNALLOCATED).await.1.map_err(|e| (false, e))
            });
            ctx.rate_limit(len).await;
        } else {
            ctx.add_progress(len);
        }
    }
    ctx.add_progress(walk.copies.take_done());
    if let Some(e) = ignored {
        return Err(e);
    }
    ch.flush().await.map_err(|e| e.to_string())
}

struct StreamHooks {
    top: Arc<Node>,
    base: Option<Arc<Node>>,
    backing_name: Option<String>,
    backing_format: Option<String>,
}

impl JobHooks for StreamHooks {
    fn prepare(&mut self, graph: &mut Graph, _job: &JobShared) -> Result<(), String> {
        let current = self.top.children().into_iter().find(|(r, _)| *r == "backing").map(|(_, b)| b);
        let unchanged = match (&current, &self.base) {
            (Some(c), Some(b)) => Arc::ptr_eq(c, b),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return Ok(());
        }
        graph
            .change_backing(&self.top, self.base.as_ref(), self.backing_name.as_deref(), self.backing_format.as_deref())
            .map_err(|e| e.to_string())
    }
}
