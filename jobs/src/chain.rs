//! Backing chains as commit and stream see them: finding layers by node
//! name or file name, and opening a writable twin of a read-only layer.

use std::path::Path;
use std::sync::Arc;

use bdev::{Graph, Node};
use serde_json::Value;

use crate::manager::JobError;

/// `node` followed by its backing chain, top first.
pub fn chain(node: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut out = vec![Arc::clone(node)];
    out.extend(crate::mirror::chain_below(node));
    out
}

/// Where a job on `node`'s chain runs: the node's home (its state lives
/// there), else a reactor placement picks.
pub fn home(graph: &Graph, node: &Node) -> reactor::Handle {
    node.home().unwrap_or_else(|| graph.place())
}

/// The file name a layer is known by (QEMU's `filename`).
pub fn filename(node: &Node) -> String {
    node.bdev().info().filename
}

fn same_file(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::canonicalize(Path::new(a)), std::fs::canonicalize(Path::new(b))) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The position in `chain` of the layer named by node name or file name.
pub fn find(chain: &[Arc<Node>], node_name: Option<&str>, file: Option<&str>, what: &str) -> Result<usize, JobError> {
    if let Some(n) = node_name {
        return chain.iter().position(|l| l.name() == n).ok_or_else(|| {
            JobError::Invalid(format!("Node '{n}' is not in the backing chain of '{}'", chain[0].name()))
        });
    }
    if let Some(f) = file {
        return chain
            .iter()
            .position(|l| same_file(&filename(l), f))
            .ok_or_else(|| JobError::Invalid(format!("Can't find '{f}' to use as {what}")));
    }
    Err(JobError::Invalid(format!("no {what} given")))
}

/// The format name written into an overlay's header for `base`.
pub fn format_name(base: &Node, mask_protocol: bool) -> String {
    match base.driver() {
        "file" | "host_device" | "nbd" if mask_protocol => "raw".into(),
        d => d.into(),
    }
}

/// A node to write `node`'s image through: `node` itself if writable,
/// else a writable twin opened from the same options (sharing its backing
/// node, and its image locks: the two are one image to everyone else).
/// The flag says whether a twin was made.
pub fn writable(graph: &mut Graph, node: &Arc<Node>) -> Result<(Arc<Node>, bool), JobError> {
    if !node.read_only() {
        return Ok((Arc::clone(node), false));
    }
    let mut opts = node.options().clone();
    let Some(map) = opts.as_object_mut() else {
        return Err(JobError::Failed(format!("Node '{}' cannot be reopened read-write", node.name())));
    };
    map.remove("node-name");
    map.insert("read-only".into(), Value::Bool(false));
    match map.get_mut("file") {
        Some(Value::Object(file)) => {
            file.remove("node-name");
            file.insert("read-only".into(), Value::Bool(false));
        }
        _ => {
            return Err(JobError::Failed(format!(
                "Node '{}' is read-only and its file is a separate node; add it read-write to commit into it",
                node.name()
            )));
        }
    }
    let backing = node.children().into_iter().find(|(r, _)| *r == "backing").map(|(_, b)| b);
    if node.driver() == "qcow2" {
        map.insert("backing".into(), backing.map_or(Value::Null, |b| Value::String(b.name().to_string())));
    }
    let twin = graph
        .add_twin(node, opts)
        .map_err(|e| JobError::Failed(format!("Could not reopen '{}' read-write: {e}", node.name())))?;
    Ok((twin, true))
}
