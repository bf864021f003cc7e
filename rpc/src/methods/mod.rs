//! Command implementations, registered in one table.

mod backup;
mod bitmaps;
mod blkdebug;
mod block;
mod daemon;
mod debug_io;
pub(crate) mod jobs;
pub(crate) mod nbd;
pub(crate) mod objects;
mod perf;
pub mod qemu_io;
mod replace;
mod snapshot;
mod transaction;

use crate::control::Control;
use crate::registry::Registry;

/// Every command the daemon serves.
pub fn registry() -> Registry<Control> {
    let mut r = Registry::new();
    r.add("blockdev-add", "Open a node from QEMU-shaped options", block::blockdev_add);
    r.add("blockdev-del", "Close a node nobody uses", block::blockdev_del);
    r.add("query-named-block-nodes", "Describe every node", block::query_named_block_nodes);
    r.add("x-block-status", "Map a node: data, zero, allocation and depth per range", block::x_block_status);
    r.add("query-version", "Spindle's version, in QEMU's shape", daemon::query_version);
    r.add("query-commands", "List commands, QEMU style", daemon::query_commands);
    r.add("rpc_get_methods", "List commands, SPDK style", daemon::rpc_get_methods);
    r.add("qmp_capabilities", "Finish QMP capability negotiation", daemon::qmp_capabilities);
    r.add("quit", "Stop the daemon gracefully", daemon::quit);
    r.add("save_config", "The commands that rebuild the current state", daemon::save_config);
    r.add("framework_get_reactors", "Per-reactor counters", daemon::framework_get_reactors);
    r.add("x-debug-io", "Run a qemu-io command on a node", debug_io::x_debug_io);
    r.add("block-dirty-bitmap-add", "Add a dirty bitmap to a node", bitmaps::block_dirty_bitmap_add);
    r.add("block-dirty-bitmap-remove", "Remove a dirty bitmap", bitmaps::block_dirty_bitmap_remove);
    r.add("block-dirty-bitmap-clear", "Clear every bit of a dirty bitmap", bitmaps::block_dirty_bitmap_clear);
    r.add("block-dirty-bitmap-enable", "Let a dirty bitmap record writes", bitmaps::block_dirty_bitmap_enable);
    r.add("block-dirty-bitmap-disable", "Stop a dirty bitmap recording writes", bitmaps::block_dirty_bitmap_disable);
    r.add("block-dirty-bitmap-merge", "Merge dirty bitmaps into another", bitmaps::block_dirty_bitmap_merge);
    r.add(
        "x-debug-block-dirty-bitmap-sha256",
        "SHA-256 of a dirty bitmap, laid out as QEMU lays it out",
        bitmaps::x_debug_block_dirty_bitmap_sha256,
    );
    r.add("object-add", "Create an object (iothread)", objects::object_add);
    r.add("object-del", "Delete an object nobody uses", objects::object_del);
    r.add("query-objects", "List objects: id and qom-type", objects::query_objects);
    r.add("query-iothreads", "List iothreads and the reactor threads they name", objects::query_iothreads);
    r.add(
        "x-blockdev-set-iothread",
        "Move a node and those below it to an iothread's reactor",
        objects::x_blockdev_set_iothread,
    );
    r.add("x-blkdebug-set-rules", "Replace a blkdebug node's error-injection rules", blkdebug::x_blkdebug_set_rules);
    r.add("nbd-server-start", "Start the NBD server on a TCP or Unix address", nbd::nbd_server_start);
    r.add("nbd-server-stop", "Stop the NBD server and remove its exports", nbd::nbd_server_stop);
    r.add("block-export-add", "Export a node over NBD", nbd::block_export_add);
    r.add("block-export-del", "Remove an export (mode safe or hard)", nbd::block_export_del);
    r.add("query-block-exports", "List the exports", nbd::query_block_exports);
    r.add("nbd-server-add", "Export a node over NBD (older form of block-export-add)", nbd::nbd_server_add);
    r.add("nbd-server-remove", "Remove an NBD export by name", nbd::nbd_server_remove);
    r.add("perf_start", "Start a bdevperf-style run on a node; answers its id at once", perf::perf_start);
    r.add("perf_results", "Progress of a perf run, or its results once finished", perf::perf_results);
    r.add("query-jobs", "List jobs (QEMU's JobInfo)", jobs::query_jobs);
    r.add("query-block-jobs", "List block jobs (QEMU's BlockJobInfo)", jobs::query_block_jobs);
    r.add("job-pause", "Pause a job", jobs::job_pause);
    r.add("job-resume", "Resume a paused job", jobs::job_resume);
    r.add("job-cancel", "Cancel a job (always forced)", jobs::job_cancel);
    r.add("job-complete", "Complete a ready job (mirror pivot)", jobs::job_complete);
    r.add("job-finalize", "Finalize a pending job", jobs::job_finalize);
    r.add("job-dismiss", "Remove a concluded job", jobs::job_dismiss);
    r.add("block-job-pause", "Pause a block job", jobs::block_job_pause);
    r.add("block-job-resume", "Resume a paused block job", jobs::block_job_resume);
    r.add("block-job-cancel", "Cancel a block job (soft for a ready mirror unless force)", jobs::block_job_cancel);
    r.add("block-job-complete", "Complete a ready block job", jobs::block_job_complete);
    r.add("block-job-finalize", "Finalize a pending block job", jobs::block_job_finalize);
    r.add("block-job-dismiss", "Remove a concluded block job", jobs::block_job_dismiss);
    r.add("block-job-set-speed", "Change a block job's speed limit (bytes/s)", jobs::block_job_set_speed);
    r.add("blockdev-mirror", "Mirror a node into an existing node", jobs::blockdev_mirror);
    r.add("blockdev-backup", "Copy a node as it is now into an existing node", backup::blockdev_backup);
    r.add("drive-backup", "Copy a node as it is now into a new (or existing) image file", backup::drive_backup);
    r.add("blockdev-snapshot", "Put an existing overlay node on top of a running node", snapshot::blockdev_snapshot);
    r.add(
        "blockdev-snapshot-sync",
        "Create a qcow2 overlay file and put it on top of a running node",
        snapshot::blockdev_snapshot_sync,
    );
    r.add(
        "x-blockdev-replace",
        "Point an export at a filter above its node, or at the node below a filter",
        replace::x_blockdev_replace,
    );
    r.add("transaction", "Apply several actions at one instant, or none", transaction::transaction);
    r.add("drive-mirror", "Mirror a node into a new (or existing) image file", jobs::drive_mirror);
    r.add("block-commit", "Merge a chain's layers down into a lower one", jobs::block_commit);
    r.add("block-stream", "Pull backing data up into an image", jobs::block_stream);
    r
}
