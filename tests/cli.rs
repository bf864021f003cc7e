//! `spindle rpc`: pretty JSON out, non-zero exit on errors, key=value params.

mod support;

use std::process::{Command, Output};

use serde_json::{Value, json};
use support::{BIN, Daemon};

fn rpc(d: &Daemon, args: &[&str]) -> Output {
    Command::new(BIN).arg("rpc").arg("-s").arg(&d.rpc).args(args).output().unwrap()
}

#[test]
fn key_value_and_json_params() {
    let d = Daemon::start();
    let out = rpc(&d, &["blockdev-add", "driver=malloc", "node-name=m0", "size=1048576"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{}");
    let out = rpc(&d, &["blockdev-add", r#"{"driver": "null-co", "node-name": "n0", "size": 1048576}"#]);
    assert!(out.status.success());
    let img = d.path("c.img");
    support::sparse_file(&img, 1 << 20);
    let out = rpc(
        &d,
        &["blockdev-add", "driver=file", "node-name=f0", &format!("filename={}", img.display()), "cache.direct=false"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = rpc(&d, &["query-named-block-nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\n  {\n"), "pretty printed: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[0]["cache"]["direct"], false);
    let out = rpc(&d, &["x-debug-io", "node-name=m0", "command=write -P 0x1 0 4k"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wrote 4096/4096"));
}

#[test]
fn errors_exit_non_zero_with_the_error() {
    let d = Daemon::start();
    let out = rpc(&d, &["blockdev-del", "node-name=nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["code"], -19);
    assert_eq!(err["data"]["class"], "DeviceNotFound");
    let out = rpc(&d, &["nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    let out = rpc(&d, &["blockdev-add", "a=1", "a=2"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn list_prints_every_method() {
    let d = Daemon::start();
    let out = rpc(&d, &["--list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for m in ["blockdev-add", "query-version", "x-debug-io"] {
        assert!(text.lines().any(|l| l == m), "{m} not listed:\n{text}");
    }
}

#[test]
fn missing_daemon_is_a_clear_error() {
    let out = Command::new(BIN).args(["rpc", "-s", "/nonexistent/spindle.sock", "query-version"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the daemon running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = json!(null);
}
