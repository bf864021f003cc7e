//! Built-in drivers. Each opens from `blockdev-add` options through an
//! [`OpenFn`](crate::graph::OpenFn) registered by name.

pub mod blkdebug;
pub mod delay;
pub mod file;
pub mod malloc;
pub mod null;
pub mod qcow2;
mod queue;
pub mod raw;
pub mod sim;

use crate::graph::Graph;

pub(crate) fn register_builtin(graph: &mut Graph) {
    graph.register_driver("file", file::open);
    graph.register_driver("null-co", null::open);
    graph.register_driver("malloc", malloc::open);
    graph.register_driver("raw", raw::open);
    graph.register_driver("qcow2", qcow2::open);
    graph.register_driver("blkdebug", blkdebug::open);
    graph.register_driver("delay", delay::open);
    graph.register_driver("copy-before-write", crate::cbw::open);
    graph.register_driver("snapshot-access", crate::cbw::open_snapshot_access);
    graph.register_driver(sim::DRIVER, sim::open);
}
