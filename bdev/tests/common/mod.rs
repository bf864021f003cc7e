//! Test harness: two reactors and a graph, run from the test thread.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use bdev::{BlockChannel, Graph, Node};
use reactor::{PollMode, ReactorOptions, Reactors};
use serde_json::Value;

pub struct Env {
    pub graph: Graph,
    pub reactors: Reactors,
}

impl Env {
    pub fn new() -> Env {
        let cores = reactor::cpuset::allowed_cores().unwrap();
        let cores: Vec<usize> = cores.iter().copied().cycle().take(2).collect();
        let reactors =
            Reactors::start(&cores, false, ReactorOptions { poll_mode: PollMode::Adaptive, ..Default::default() })
                .unwrap();
        let graph = Graph::new(reactors.handles().to_vec());
        Env { graph, reactors }
    }

    pub fn add(&mut self, opts: Value) -> Arc<Node> {
        self.graph.add(opts).unwrap_or_else(|e| panic!("blockdev-add failed: {e}"))
    }

    /// Runs `f(channel)` as a task on reactor `idx`.
    pub fn on<F, Fut, T>(&self, idx: usize, node: &Arc<Node>, f: F) -> T
    where
        F: FnOnce(BlockChannel) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let node = Arc::clone(node);
        self.reactors.handles()[idx].run(move || async move { f(node.channel().unwrap()).await }).wait().unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.graph.close_all();
    }
}

/// Deterministic bytes for (offset, seed): each 8-byte word encodes its own offset.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut at = offset;
    while v.len() < len {
        let word = (at / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed);
        let bytes = word.to_le_bytes();
        let skip = (at % 8) as usize;
        for &b in &bytes[skip..] {
            if v.len() < len {
                v.push(b);
            }
        }
        at += (8 - skip) as u64;
    }
    v
}
