//! Start-up, configuration replay, save_config, signals and quit.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{BIN, Daemon, qemu_io, sparse_file};

#[test]
fn sigterm_flushes_closes_and_removes_sockets() {
    let d = Daemon::start();
    let img = d.path("disk.img");
    sparse_file(&img, 4 << 20);
    d.ok("blockdev-add", json!({"driver": "file", "node-name": "f0", "filename": img, "cache": {"direct": false}}));
    d.debug_io("f0", "write -P 0x77 0 1M").unwrap();
    let (rpc, qmp) = (d.rpc.clone(), d.qmp.clone());
    let mut d = d;
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}: {}", d.log_text());
    assert!(!rpc.exists() && !qmp.exists(), "sockets must be removed on exit");
    qemu_io(&img, "read -P 0x77 0 1M");
}

#[test]
fn quit_answers_then_exits_zero() {
    let mut d = Daemon::start();
    assert_eq!(d.ok("quit", Value::Null), json!({}));
    assert!(d.wait_exit().success());
    assert!(!d.rpc.exists());
}

#[test]
fn a_second_signal_forces_exit() {
    let mut d = Daemon::start();
    // Closing this node at shutdown waits out its 3 s flush latency.
    d.ok("blockdev-add", json!({"driver": "null-co", "node-name": "slow", "latency-ns": 3_000_000_000u64}));
    let t0 = Instant::now();
    d.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert!(!status.success(), "a forced exit is not a clean one");
    assert!(t0.elapsed() < Duration::from_millis(2500), "the second signal must not wait for the flush");
}

#[test]
fn save_config_round_trips_through_a_restart() {
    let d = Daemon::start();
    // The image outlives the first daemon's directory.
    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("a.img");
    sparse_file(&img, 2 << 20);
    d.ok("blockdev-add", json!({"driver": "file", "node-name": "f0", "filename": img}));
    d.ok("blockdev-add", json!({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 1048576}));
    d.ok("blockdev-add", json!({"driver": "raw", "node-name": "r1", "file": {"driver": "file", "filename": img}}));
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 1048576}));
    let cfg = d.ok("save_config", Value::Null);
    assert_eq!(cfg.as_array().unwrap().len(), 4);
    let cfg_file = d.path("saved.json");
    d.ok("save_config", json!({"filename": cfg_file}));
    let before = d.ok("query-named-block-nodes", Value::Null);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&cfg_file, dir.path().join("cfg.json")).unwrap();
    assert!(d.stop().success());
    let d2 = Daemon::start_in(dir, &["--config", "cfg.json"]);
    let after = d2.ok("query-named-block-nodes", Value::Null);
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .filter(|n| !n.starts_with('#'))
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&before), names(&after));
    assert_eq!(after.as_array().unwrap().len(), before.as_array().unwrap().len());
}

#[test]
fn a_bad_config_entry_stops_start_up_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.json"),
        json!([
            {"method": "blockdev-add", "params": {"driver": "null-co", "node-name": "n0"}},
            {"method": "blockdev-add", "params": {"driver": "file", "node-name": "f0", "filename": "/nonexistent/x.img"}}
        ])
        .to_string(),
    )
    .unwrap();
    let mut d = Daemon::spawn_in(dir, &["--config", "bad.json"]);
    let status = d.wait_exit();
    assert!(!status.success());
    let log = d.log_text();
    assert!(log.contains("config entry 2 (blockdev-add): Could not open '/nonexistent/x.img'"), "{log}");
    assert!(!d.rpc.exists());
}

#[test]
fn sockets_are_private() {
    let d = Daemon::start();
    for sock in [&d.rpc, &d.qmp] {
        let meta = std::fs::metadata(sock).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", sock.display());
    }
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let d = Daemon::start();
    let out = Command::new(BIN).args(["serve", "--rpc-socket"]).arg(&d.rpc).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    // The first daemon is unharmed.
    d.ok("query-version", Value::Null);
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("rpc.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let d = Daemon::start_in(dir, &[]);
    d.ok("query-version", Value::Null);
}

#[test]
fn bad_start_options_are_reported() {
    let out = Command::new(BIN).args(["serve", "--cpumask", "[4096]"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpumask"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(BIN).args(["serve", "--poll-mode", "sometimes"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("poll mode 'sometimes'"));
}

#[test]
fn every_poll_mode_serves() {
    for mode in ["adaptive", "poll", "interrupt"] {
        let d = Daemon::start_with(&["--poll-mode", mode, "--cpumask", "0x1"]);
        d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 1 << 20}));
        d.debug_io("m0", "write -P 9 0 64k").unwrap();
        d.debug_io("m0", "read -P 9 0 64k").unwrap();
        assert!(d.stop().success(), "{mode}");
    }
}
