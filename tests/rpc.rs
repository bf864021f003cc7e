//! The daemon over JSON-RPC: node commands, x-debug-io verified with
//! qemu-io, error codes, events as notifications.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Daemon, qemu_io, sparse_file};

#[test]
fn nodes_are_added_described_and_deleted() {
    let d = Daemon::start();
    let img = d.path("disk.img");
    sparse_file(&img, 4 << 20);
    d.ok("blockdev-add", json!({"driver": "file", "node-name": "f0", "filename": img}));
    d.ok("blockdev-add", json!({"driver": "null-co", "node-name": "n0", "size": 1048576}));
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 8 << 20}));
    d.ok("blockdev-add", json!({"driver": "raw", "node-name": "r0", "file": "f0"}));
    let nodes = d.ok("query-named-block-nodes", Value::Null);
    let names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["r0", "m0", "n0", "f0"]);
    let f0 = &nodes[3];
    assert_eq!(f0["drv"], "file");
    assert_eq!(f0["file"], json!(img));
    assert_eq!(f0["image"]["virtual-size"], 4 << 20);
    assert_eq!(nodes[1]["image"]["virtual-size"], 8 << 20);
    // In use by r0.
    let (code, msg, data) = d.err("blockdev-del", json!({"node-name": "f0"}));
    assert_eq!(code, -16);
    assert_eq!(msg, "Node 'f0' is in use by node 'r0' (file child)");
    assert_eq!(data.unwrap()["class"], "GenericError");
    d.ok("blockdev-del", json!({"node-name": "r0"}));
    d.ok("blockdev-del", json!({"node-name": "f0"}));
    let (code, msg, data) = d.err("blockdev-del", json!({"node-name": "f0"}));
    assert_eq!((code, msg.as_str()), (-19, "Failed to find node with node-name='f0'"));
    assert_eq!(data.unwrap()["class"], "DeviceNotFound");
    assert_eq!(d.ok("query-named-block-nodes", json!({"flat": true})).as_array().unwrap().len(), 2);
}

#[test]
fn debug_io_writes_what_qemu_io_reads_and_reads_what_it_writes() {
    let d = Daemon::start();
    for direct in [false, true] {
        let img = d.path(&format!("d{direct}.img"));
        sparse_file(&img, 8 << 20);
        let name = format!("f{}", u8::from(direct));
        d.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": name, "filename": img, "cache": {"direct": direct}}),
        );
        let out = d.debug_io(&name, "write -P 0xab 64k 128k").unwrap();
        assert!(out.as_str().unwrap().starts_with("wrote 131072/131072 bytes at offset 65536"), "{out}");
        d.debug_io(&name, "flush").unwrap();
        qemu_io(&img, "read -P 0xab 64k 128k");
        qemu_io(&img, "read -P 0 0 64k");
        qemu_io(&img, "write -P 0x5c 1M 4k");
        d.debug_io(&name, "read -P 0x5c 1M 4k").unwrap();
        // Unaligned ranges go through the bounce path with O_DIRECT.
        d.debug_io(&name, "write -P 0x11 1000 3000").unwrap();
        d.debug_io(&name, "flush").unwrap();
        qemu_io(&img, "read -P 0x11 1000 3000");
        qemu_io(&img, "read -P 0 0 1000");
        d.debug_io(&name, "write -z 64k 64k").unwrap();
        d.debug_io(&name, "read -P 0 64k 64k").unwrap();
        d.debug_io(&name, "read -P 0xab 128k 64k").unwrap();
        assert_eq!(d.debug_io(&name, "length").unwrap(), json!("8 MiB\n"));
    }
}

#[test]
fn debug_io_on_malloc_and_null() {
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 4 << 20}));
    d.debug_io("m0", "write -P 0x42 0 1M").unwrap();
    d.debug_io("m0", "read -P 0x42 0 1M").unwrap();
    let dump = d.debug_io("m0", "read -v 0 32").unwrap();
    assert!(dump.as_str().unwrap().starts_with("00000000:  42 42 42"), "{dump}");
    d.ok("blockdev-add", json!({"driver": "null-co", "node-name": "n0", "read-zeroes": true}));
    d.debug_io("n0", "write -P 0x42 0 1M").unwrap();
    d.debug_io("n0", "read -P 0 0 1M").unwrap();
}

#[test]
fn debug_io_failures_are_errors() {
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 1 << 20}));
    d.debug_io("m0", "write -P 1 0 4k").unwrap();
    let (code, msg, _) = d.err("x-debug-io", json!({"node-name": "m0", "command": "read -P 2 0 4k"}));
    assert_eq!(code, -5);
    assert_eq!(msg, "Pattern verification failed at offset 0, 4096 bytes");
    let (code, msg, _) = d.err("x-debug-io", json!({"node-name": "m0", "command": "read 1M 512"}));
    assert_eq!(code, -5);
    assert!(msg.contains("beyond the end"), "{msg}");
    let (code, msg, _) = d.err("x-debug-io", json!({"node-name": "m0", "command": "frob"}));
    assert_eq!(code, -32602);
    assert!(msg.contains("unknown command"), "{msg}");
    let (code, _, _) = d.err("x-debug-io", json!({"node-name": "nope", "command": "flush"}));
    assert_eq!(code, -19);
}

#[test]
fn error_codes_tell_conditions_apart() {
    let d = Daemon::start();
    let (code, msg, data) = d.err("no-such-command", Value::Null);
    assert_eq!(code, -32601);
    assert!(msg.contains("no-such-command"), "{msg}");
    assert_eq!(data.unwrap()["class"], "CommandNotFound");
    let (code, msg, _) = d.err("blockdev-del", json!({}));
    assert_eq!((code, msg.as_str()), (-32602, "Parameter 'node-name' is missing"));
    let (code, msg, _) = d.err("blockdev-del", json!({"node-name": "x", "extra": 1}));
    assert_eq!((code, msg.as_str()), (-32602, "Parameter 'extra' is unexpected"));
    let (code, msg, _) = d.err("blockdev-del", json!({"node-name": 7}));
    assert_eq!((code, msg.as_str()), (-32602, "Invalid parameter type for 'node-name', expected: string"));
    d.ok("blockdev-add", json!({"driver": "null-co", "node-name": "n0"}));
    let (code, msg, _) = d.err("blockdev-add", json!({"driver": "null-co", "node-name": "n0"}));
    assert_eq!((code, msg.as_str()), (-17, "Duplicate nodes with node-name='n0'"));
    let (code, msg, _) = d.err("blockdev-add", json!({"driver": "null-co", "node-name": "n1", "size": "big"}));
    assert_eq!((code, msg.as_str()), (-32602, "Invalid parameter type for 'size', expected: integer"));
    let (code, msg, _) =
        d.err("blockdev-add", json!({"driver": "file", "node-name": "f", "filename": d.path("missing.img")}));
    assert_eq!(code, -5);
    assert!(msg.contains("No such file or directory"), "{msg}");
}

#[test]
fn version_and_command_lists() {
    let d = Daemon::start();
    let v = d.ok("query-version", Value::Null);
    assert_eq!(v["package"], json!(format!("spindle {}", env!("CARGO_PKG_VERSION"))));
    assert!(v["qemu"]["major"].is_u64() && v["qemu"]["minor"].is_u64() && v["qemu"]["micro"].is_u64());
    let cmds = d.ok("query-commands", Value::Null);
    let names: Vec<&str> = cmds.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for c in [
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "query-version",
        "query-commands",
        "quit",
        "x-debug-io",
        "save_config",
        "rpc_get_methods",
    ] {
        assert!(names.contains(&c), "{c} missing from query-commands");
    }
    let methods = d.ok("rpc_get_methods", Value::Null);
    assert_eq!(methods.as_array().unwrap().len(), names.len());
    let reactors = d.ok("framework_get_reactors", Value::Null);
    assert!(!reactors["reactors"].as_array().unwrap().is_empty());
}

#[test]
fn batches_and_notifications_through_the_daemon() {
    let d = Daemon::start();
    let mut s = UnixStream::connect(&d.rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "blockdev-add", "params": {"driver": "null-co", "node-name": "n0"}},
        {"jsonrpc": "2.0", "method": "blockdev-add", "params": {"driver": "null-co", "node-name": "n1"}},
        {"jsonrpc": "2.0", "id": "q", "method": "query-named-block-nodes"},
        {"jsonrpc": "2.0", "id": 3, "method": "nope"}
    ]);
    s.write_all(batch.to_string().as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let replies: Value = serde_json::from_str(&line).unwrap();
    let replies = replies.as_array().unwrap();
    assert_eq!(replies.len(), 3, "the notification gets no reply: {replies:?}");
    assert_eq!(replies[0]["id"], 1);
    assert_eq!(replies[1]["id"], "q");
    assert_eq!(replies[1]["result"].as_array().unwrap().len(), 2, "the notification ran");
    assert_eq!(replies[2]["error"]["code"], -32601);
}

#[test]
fn events_reach_json_rpc_clients_as_notifications() {
    let d = Daemon::start();
    let listener = UnixStream::connect(&d.rpc).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Make sure the listener is registered before the event fires.
    let mut w = listener.try_clone().unwrap();
    w.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"query-version"}"#).unwrap();
    let mut reader = BufReader::new(listener);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    d.ok("quit", Value::Null);
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "connection closed before the SHUTDOWN event");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["method"] == "SHUTDOWN" {
            assert_eq!(v["jsonrpc"], "2.0");
            assert!(v.get("id").is_none());
            assert_eq!(v["params"]["guest"], false);
            assert_eq!(v["params"]["reason"], "host-qmp-quit");
            assert!(v["params"]["timestamp"]["seconds"].is_u64());
            break;
        }
    }
}
