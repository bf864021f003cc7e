//! The `blkdebug` filter through the daemon: rules set with
//! `x-blkdebug-set-rules` fail `x-debug-io` requests with their errno, and
//! clearing them lets I/O through again.

mod support;

use serde_json::json;
use support::Daemon;

#[test]
fn rules_set_at_run_time_fail_io_until_cleared() {
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 1 << 20}));
    d.ok("blockdev-add", json!({"driver": "blkdebug", "node-name": "d0", "image": "m0"}));
    d.debug_io("d0", "write -P 0x5a 0 64k").unwrap();

    d.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "d0", "inject-error": [{"event": "read_aio", "errno": 28, "sector": 8}]}),
    );
    let (code, msg, data) = d.err("x-debug-io", json!({"node-name": "d0", "command": "read -P 0x5a 4k 4k"}));
    assert_eq!(code, -5, "{msg}");
    assert_eq!(msg, "read failed: No space left on device");
    assert_eq!(data.unwrap()["class"], "GenericError");
    // Reads not covering sector 8, and writes covering it, pass.
    d.debug_io("d0", "read -P 0x5a 0 4k").unwrap();
    d.debug_io("d0", "write -P 0x5a 4k 4k").unwrap();
    // The image itself has no rules.
    d.debug_io("m0", "read -P 0x5a 4k 4k").unwrap();

    d.ok("x-blkdebug-set-rules", json!({"node-name": "d0", "inject-error": []}));
    d.debug_io("d0", "read -P 0x5a 0 64k").unwrap();
}

#[test]
fn blockdev_add_rules_and_mistakes() {
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 1 << 20}));
    d.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "d0", "image": "m0",
            "inject-error": [{"event": "flush_to_disk", "once": true}]}),
    );
    let (code, msg, _) = d.err("x-debug-io", json!({"node-name": "d0", "command": "flush"}));
    assert_eq!((code, msg.as_str()), (-5, "flush failed: Input/output error"));
    d.debug_io("d0", "flush").unwrap();

    let (code, msg, _) = d.err(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "d1", "image": "m0", "inject-error": [{"event": "nope"}]}),
    );
    assert_eq!((code, msg.as_str()), (-32602, "Parameter 'event' does not accept value 'nope'"));
    let (code, msg, _) = d.err("x-blkdebug-set-rules", json!({"node-name": "m0", "inject-error": []}));
    assert_eq!((code, msg.as_str()), (-32602, "Node 'm0' is not a blkdebug node (driver 'malloc')"));
    let (code, _, _) = d.err("x-blkdebug-set-rules", json!({"node-name": "nope", "inject-error": []}));
    assert_eq!(code, -19);
    let (code, msg, _) = d.err("x-blkdebug-set-rules", json!({"node-name": "d0"}));
    assert_eq!((code, msg.as_str()), (-32602, "Parameter 'inject-error' is missing"));
    let (code, msg, _) =
        d.err("x-blkdebug-set-rules", json!({"node-name": "d0", "inject-error": [{"event": "none", "errno": -1}]}));
    assert_eq!(code, -32602, "{msg}");
}
