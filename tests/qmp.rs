//! The daemon over QMP: QEMU's greeting, negotiation, replies, error
//! classes and events — and a real QMP client (Python qemu.qmp) driving it.

mod support;

use std::process::Command;

use serde_json::json;
use support::{Daemon, Qmp, run, sparse_file};

#[test]
fn greeting_negotiation_and_commands() {
    let d = Daemon::start();
    let mut q = Qmp::connect(&d.qmp);
    let v = &q.greeting["QMP"]["version"];
    assert_eq!(q.greeting["QMP"]["version"]["package"], json!(format!("spindle {}", env!("CARGO_PKG_VERSION"))));
    assert!(v["qemu"]["major"].is_u64());
    assert!(q.greeting["QMP"]["capabilities"].is_array());
    let r = q.execute("query-version", None);
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(r["error"]["desc"], "Expecting capabilities negotiation with 'qmp_capabilities'");
    assert_eq!(q.execute("qmp_capabilities", None), json!({"return": {}}));
    let r = q.execute("query-version", None);
    assert_eq!(r["return"]["package"], q.greeting["QMP"]["version"]["package"]);
    q.send_raw(b"{\"execute\": \"query-version\", \"id\": \"abc\"}\n");
    assert_eq!(q.response()["id"], "abc");
    let img = d.path("q.img");
    sparse_file(&img, 1 << 20);
    let r = q.execute("blockdev-add", Some(json!({"driver": "file", "node-name": "f0", "filename": img})));
    assert_eq!(r, json!({"return": {}}));
    let r = q.execute("blockdev-add", Some(json!({"driver": "file", "node-name": "f0", "filename": img})));
    assert_eq!(r["error"], json!({"class": "GenericError", "desc": "Duplicate nodes with node-name='f0'"}));
    let r = q.execute("blockdev-del", Some(json!({"node-name": "nope"})));
    assert_eq!(r["error"]["class"], "DeviceNotFound");
    let r = q.execute("nosuch", None);
    assert_eq!(r["error"]["class"], "CommandNotFound");
    let r = q.execute("x-debug-io", Some(json!({"node-name": "f0", "command": "write -P 7 0 4k"})));
    assert!(r["return"].as_str().unwrap().starts_with("wrote 4096/4096"));
    let r = q.execute("query-named-block-nodes", None);
    assert_eq!(r["return"][0]["node-name"], "f0");
}

#[test]
fn shutdown_event_reaches_both_sockets() {
    let d = Daemon::start();
    let mut watcher = Qmp::negotiated(&d.qmp);
    let mut q = Qmp::negotiated(&d.qmp);
    assert_eq!(q.execute("quit", None), json!({"return": {}}));
    for client in [&mut watcher, &mut q] {
        let ev = client.event("SHUTDOWN");
        assert_eq!(ev["data"], json!({"guest": false, "reason": "host-qmp-quit"}));
        assert!(ev["timestamp"]["seconds"].is_u64() && ev["timestamp"]["microseconds"].is_u64());
    }
}

#[test]
fn python_qemu_qmp_client_drives_the_daemon() {
    let d = Daemon::start();
    let img = d.path("py.img");
    sparse_file(&img, 1 << 20);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/qmp_client.py");
    let out = run(Command::new("python3").arg(script).arg(&d.qmp).arg(&img));
    assert!(out.contains("OK"), "{out}");
    let mut d = d;
    assert!(d.wait_exit().success(), "quit from the Python client must stop the daemon cleanly");
}
