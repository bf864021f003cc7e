//! Hostile and broken clients: each gets an error or a closed connection,
//! and the daemon keeps serving everyone else.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::qsd::{Peer, Qsd, Reply};
use support::{Daemon, Qmp};

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn read_reply(s: &UnixStream) -> Value {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn closed(mut s: &UnixStream) -> bool {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).is_ok()
}

#[test]
fn malformed_json_gets_a_parse_error_and_a_closed_connection() {
    let d = Daemon::start();
    let mut s = connect(&d);
    s.write_all(b"{\"jsonrpc\": \"2.0\", \"method\": }").unwrap();
    let r = read_reply(&s);
    assert_eq!(r["error"]["code"], -32700);
    assert_eq!(r["id"], Value::Null);
    assert!(closed(&s));
    d.ok("query-version", Value::Null);
}

#[test]
fn invalid_requests_get_invalid_request() {
    let d = Daemon::start();
    let mut s = connect(&d);
    for bad in [
        json!(42),
        json!({"jsonrpc": "1.0", "id": 1, "method": "quit"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": 5}),
        json!([]),
    ] {
        // A newline ends a bare number; objects and arrays end themselves.
        s.write_all(format!("{bad}\n").as_bytes()).unwrap();
        let r = read_reply(&s);
        assert_eq!(r["error"]["code"], -32600, "{bad} -> {r}");
    }
    d.ok("query-version", Value::Null);
}

#[test]
fn an_oversized_request_is_refused() {
    let d = Daemon::start();
    let mut s = connect(&d);
    let huge = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"query-version\",\"params\":{{\"x\":\"{}\"",
        "a".repeat(2 << 20)
    );
    let _ = s.write_all(huge.as_bytes());
    let r = read_reply(&s);
    assert_eq!(r["error"]["code"], -32700);
    assert!(r["error"]["message"].as_str().unwrap().contains("exceeds"), "{r}");
    d.ok("query-version", Value::Null);
}

#[test]
fn half_sent_requests_and_abrupt_disconnects_harm_nobody() {
    let d = Daemon::start();
    for _ in 0..20 {
        let mut s = connect(&d);
        s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"query-ver").unwrap();
        drop(s);
        let mut q = UnixStream::connect(&d.qmp).unwrap();
        q.write_all(b"{\"execute\":").unwrap();
        drop(q);
    }
    // A client that sends a request and leaves before the answer.
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 64 << 20}));
    let mut s = connect(&d);
    s.write_all(json!({"jsonrpc": "2.0", "id": 1, "method": "x-debug-io", "params": {"node-name": "m0", "command": "write -P 1 0 64M"}}).to_string().as_bytes()).unwrap();
    drop(s);
    d.debug_io("m0", "read -P 1 0 4k").ok();
    d.ok("query-version", Value::Null);
}

#[test]
fn a_client_that_never_reads_does_not_block_others() {
    let d = Daemon::start();
    let mut hog = connect(&d);
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": "query-named-block-nodes"}).to_string();
    hog.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    for _ in 0..20000 {
        if hog.write_all(req.as_bytes()).is_err() {
            break;
        }
    }
    for _ in 0..10 {
        d.ok("query-version", Value::Null);
    }
    drop(hog);
    d.ok("query-version", Value::Null);
}

#[test]
fn wrong_arguments_everywhere_get_clear_errors() {
    let d = Daemon::start();
    let cases = [
        ("blockdev-add", json!({"node-name": "x"}), "Parameter 'driver' is missing"),
        ("blockdev-add", json!({"driver": "malloc", "node-name": "x"}), "Parameter 'size' is missing"),
        (
            "blockdev-add",
            json!({"driver": "malloc", "node-name": "x", "size": 1048576, "zz": 1}),
            "Parameter 'zz' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "malloc", "node-name": "x", "size": -5}),
            "Parameter 'size' expects a non-negative integer",
        ),
        ("blockdev-add", json!({"driver": "malloc", "node-name": "-x", "size": 1048576}), "Invalid node-name: '-x'"),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "x", "filename": "/", "cache": {"direct": "yes"}}),
            "Invalid parameter type for 'cache.direct', expected: boolean",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x", "file": "nope"}),
            "Failed to find node with node-name='nope'",
        ),
        ("x-debug-io", json!({"node-name": "x"}), "Parameter 'command' is missing"),
        ("query-version", json!({"x": 1}), "Parameter 'x' is unexpected"),
        ("quit", json!([1, 2]), "params must be an object of named parameters"),
    ];
    for (method, params, want) in cases {
        let (_, msg, _) = d.err(method, params.clone());
        assert_eq!(msg, want, "{method} {params}");
    }
    assert_eq!(d.ok("query-named-block-nodes", Value::Null), json!([]), "failed adds leave nothing behind");
}

#[test]
fn qmp_input_errors_keep_the_session() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    q.send_raw(b"{\"execute\": }\n");
    assert_eq!(q.response()["error"]["class"], "GenericError");
    q.send_raw(b"{\"foo\": 1}\n");
    assert_eq!(q.response()["error"]["desc"], "QMP input member 'foo' is unexpected");
    q.send_raw(b"[1]\n");
    assert_eq!(q.response()["error"]["desc"], "QMP input must be a JSON object");
    q.send_raw(b"{\"execute\": \"query-version\", \"arguments\": []}\n");
    assert_eq!(q.response()["error"]["desc"], "QMP input member 'arguments' must be an object");
    assert!(q.execute("query-version", None)["return"].is_object());
}

#[test]
fn many_connections_at_once() {
    let d = Daemon::start();
    let conns: Vec<UnixStream> = (0..100).filter_map(|_| UnixStream::connect(&d.rpc).ok()).collect();
    // Past the cap, connections are closed by the daemon; it keeps serving.
    drop(conns);
    std::thread::sleep(Duration::from_millis(100));
    d.ok("query-version", Value::Null);
}

#[test]
fn a_request_trickled_byte_by_byte_is_answered() {
    let d = Daemon::start();
    let mut s = connect(&d);
    let req = json!({"jsonrpc": "2.0", "id": 5, "method": "query-version", "params": {}, "pad": "x".repeat(32 << 10)});
    // An unexpected member gets -32600; what matters is that the whole
    // value was framed, one byte per write.
    for b in req.to_string().as_bytes() {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    let r = read_reply(&s);
    assert_eq!(r["id"], 5);
    assert_eq!(r["error"]["code"], -32600);
    d.ok("query-version", Value::Null);
}

// ---------------------------------------------------------------------------
// Against qemu-storage-daemon: the same bad input to both, the same answer.

/// A Spindle and a qemu-storage-daemon, each with 4 MiB null-co nodes
/// `src` and `tgt` and an empty 4 MiB raw file `t.raw` in its directory.
struct Pair {
    spindle: Daemon,
    qsd: Qsd,
    qsd_dir: tempfile::TempDir,
}

impl Pair {
    fn start() -> Pair {
        let qsd_dir = tempfile::tempdir().unwrap();
        let p = Pair { qsd: Qsd::start(qsd_dir.path()), spindle: Daemon::start(), qsd_dir };
        for (sock, dir) in p.sides() {
            let mut q = Peer::negotiated(&sock);
            for node in ["src", "tgt"] {
                let r = q.execute("blockdev-add", json!({"driver": "null-co", "node-name": node, "size": 4 << 20}));
                assert_eq!(r, Reply::Return(json!({})), "{}", sock.display());
            }
            support::sparse_file(&dir.join("t.raw"), 4 << 20);
        }
        p
    }

    /// (QMP socket, directory) of qemu-storage-daemon, then of Spindle.
    fn sides(&self) -> [(PathBuf, PathBuf); 2] {
        [
            (self.qsd.qmp.clone(), self.qsd_dir.path().to_path_buf()),
            (self.spindle.qmp.clone(), self.spindle.dir.path().to_path_buf()),
        ]
    }
}

/// `args` with `@DIR@` replaced by `dir`.
fn in_dir(args: &Value, dir: &Path) -> Value {
    serde_json::from_str(&args.to_string().replace("@DIR@", &dir.display().to_string())).unwrap()
}

/// `blockdev-mirror` of src into tgt, with `extra` members (null removes one).
fn mirror(extra: Value) -> Value {
    let mut a = json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full"});
    for (k, v) in extra.as_object().unwrap() {
        match v {
            Value::Null => drop(a.as_object_mut().unwrap().remove(k)),
            v => a[k] = v.clone(),
        }
    }
    a
}

/// `drive-mirror` of src into the existing raw file `t.raw`, with `extra`.
fn drive_mirror(extra: Value) -> Value {
    let mut base = json!({"target": "@DIR@/t.raw", "format": "raw", "mode": "existing"});
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    mirror(base)
}

fn nbd_start(extra: Value) -> Value {
    let mut a = json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock"}}});
    for (k, v) in extra.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

#[test]
fn bad_arguments_get_the_words_qemu_storage_daemon_gives() {
    let p = Pair::start();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("blockdev-mirror", mirror(json!({"granularity": -1})), "Parameter 'granularity' expects uint32_t"),
        ("blockdev-mirror", mirror(json!({"granularity": 4294967296u64})), "Parameter 'granularity' expects uint32_t"),
        ("blockdev-mirror", mirror(json!({"granularity": "x"})), "Parameter 'granularity' expects uint64"),
        ("blockdev-mirror", mirror(json!({"granularity": 1.5})), "Parameter 'granularity' expects uint64"),
        (
            "blockdev-mirror",
            mirror(json!({"granularity": 100})),
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ),
        ("blockdev-mirror", mirror(json!({"granularity": 3000})), "Parameter 'granularity' expects a power of 2"),
        (
            "blockdev-mirror",
            mirror(json!({"granularity": 1 << 27})),
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ),
        ("blockdev-mirror", mirror(json!({"buf-size": -1})), "Invalid parameter 'buf-size'"),
        (
            "blockdev-mirror",
            mirror(json!({"buf-size": 1.5})),
            "Invalid parameter type for 'buf-size', expected: integer",
        ),
        (
            "blockdev-mirror",
            mirror(json!({"buf-size": 1u64 << 63})),
            "Invalid parameter type for 'buf-size', expected: integer",
        ),
        (
            "blockdev-mirror",
            mirror(json!({"buf-size": "x"})),
            "Invalid parameter type for 'buf-size', expected: integer",
        ),
        ("blockdev-mirror", mirror(json!({"speed": -1})), "Parameter 'speed' expects a non-negative value"),
        ("blockdev-mirror", mirror(json!({"speed": "x"})), "Invalid parameter type for 'speed', expected: integer"),
        ("blockdev-mirror", mirror(json!({"job-id2": "x"})), "Parameter 'job-id2' is unexpected"),
        ("blockdev-mirror", mirror(json!({"sync": "bogus"})), "Parameter 'sync' does not accept value 'bogus'"),
        ("blockdev-mirror", mirror(json!({"sync": 1})), "Invalid parameter type for 'sync', expected: string"),
        ("blockdev-mirror", mirror(json!({"sync": null})), "Parameter 'sync' is missing"),
        ("blockdev-mirror", mirror(json!({"sync": null, "bogus": 1})), "Parameter 'sync' is missing"),
        (
            "blockdev-mirror",
            mirror(json!({"on-source-error": "bogus"})),
            "Parameter 'on-source-error' does not accept value 'bogus'",
        ),
        (
            "blockdev-mirror",
            mirror(json!({"copy-mode": "bogus"})),
            "Parameter 'copy-mode' does not accept value 'bogus'",
        ),
        (
            "blockdev-mirror",
            mirror(json!({"auto-finalize": "x"})),
            "Invalid parameter type for 'auto-finalize', expected: boolean",
        ),
        ("blockdev-mirror", mirror(json!({"job-id": 5})), "Invalid parameter type for 'job-id', expected: string"),
        (
            "blockdev-mirror",
            mirror(json!({"filter-node-name": 5})),
            "Invalid parameter type for 'filter-node-name', expected: string",
        ),
        ("drive-mirror", drive_mirror(json!({"granularity": -1})), "Parameter 'granularity' expects uint32_t"),
        ("drive-mirror", drive_mirror(json!({"mode": "bogus"})), "Parameter 'mode' does not accept value 'bogus'"),
        ("drive-mirror", drive_mirror(json!({"format": 5})), "Invalid parameter type for 'format', expected: string"),
        ("drive-mirror", drive_mirror(json!({"unmap": "x"})), "Invalid parameter type for 'unmap', expected: boolean"),
        (
            "block-commit",
            json!({"job-id": "c", "device": "src", "speed": "x"}),
            "Invalid parameter type for 'speed', expected: integer",
        ),
        (
            "block-stream",
            json!({"job-id": "s", "device": "src", "on-error": "bogus"}),
            "Parameter 'on-error' does not accept value 'bogus'",
        ),
        (
            "block-job-set-speed",
            json!({"device": "j", "speed": "x"}),
            "Invalid parameter type for 'speed', expected: integer",
        ),
        ("block-job-set-speed", json!({"devce": "j", "speed": 1}), "Parameter 'device' is missing"),
        (
            "block-job-set-speed",
            json!({"device": "j", "speed": "x", "bogus": 1}),
            "Invalid parameter type for 'speed', expected: integer",
        ),
        (
            "block-job-cancel",
            json!({"device": "j", "force": 1}),
            "Invalid parameter type for 'force', expected: boolean",
        ),
        ("blockdev-del", json!({"node-name": ["a"]}), "Invalid parameter type for 'node-name', expected: string"),
        ("blockdev-del", json!({"bogus": 1}), "Parameter 'node-name' is missing"),
        ("query-version", json!({"x": 1}), "Parameter 'x' is unexpected"),
        ("query-jobs", json!({"x": 1}), "Parameter 'x' is unexpected"),
        ("nbd-server-start", nbd_start(json!({"max-connections": -1})), "Parameter 'max-connections' expects uint32_t"),
        (
            "nbd-server-start",
            nbd_start(json!({"max-connections": 4294967296u64})),
            "Parameter 'max-connections' expects uint32_t",
        ),
        ("nbd-server-start", nbd_start(json!({"max-connections": "x"})), "Parameter 'max-connections' expects uint64"),
        (
            "nbd-server-start",
            nbd_start(json!({"handshake-max-seconds": -1})),
            "Parameter 'handshake-max-seconds' expects uint32_t",
        ),
        ("nbd-server-start", json!({"addr": "x"}), "Invalid parameter type for 'addr', expected: object"),
        ("nbd-server-start", json!({"addr": {"type": "bogus"}}), "Parameter 'type' does not accept value 'bogus'"),
        ("nbd-server-start", json!({"addr": {"type": "unix", "data": {}}}), "Parameter 'addr.data.path' is missing"),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": 5}}}),
            "Invalid parameter type for 'addr.data.path', expected: string",
        ),
        ("block-export-del", json!({"id": 5}), "Invalid parameter type for 'id', expected: string"),
        ("block-export-del", json!({"id": "x", "mode": "bogus"}), "Parameter 'mode' does not accept value 'bogus'"),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "src", "writable": "yes"}),
            "Invalid parameter type for 'writable', expected: boolean",
        ),
        (
            "block-export-add",
            json!({"type": "bogus", "id": "e", "node-name": "src"}),
            "Parameter 'type' does not accept value 'bogus'",
        ),
        ("block-export-add", json!({"id": "e", "node-name": "src"}), "Parameter 'type' is missing"),
        ("block-export-add", json!({"type": "nbd", "id": "e"}), "Parameter 'node-name' is missing"),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "src", "bogus": 1}),
            "Parameter 'bogus' is unexpected",
        ),
    ];
    // The QMP envelope, sent as lines.
    let lines: &[(&str, &str)] = &[
        (r#"{"arguments": {}}"#, "QMP input lacks member 'execute'"),
        (r#"{"execute": 1}"#, "QMP input member 'execute' must be a string"),
        (r#"{"execute": "query-version", "bogus": 1}"#, "QMP input member 'bogus' is unexpected"),
        (r#"{"execute": "query-version", "arguments": []}"#, "QMP input member 'arguments' must be an object"),
        (r#"{"execute": "query-version", "arguments": null}"#, "QMP input member 'arguments' must be an object"),
        ("[1]", "QMP input must be a JSON object"),
        (r#""x""#, "QMP input must be a JSON object"),
    ];
    let mut wrong = Vec::new();
    for (sock, dir) in p.sides() {
        let mut q = Peer::negotiated(&sock);
        for (cmd, args, want) in &cases {
            let got = q.execute(cmd, in_dir(args, &dir));
            if got.desc() != Some(want) {
                wrong.push(format!("{}: {cmd} {args}: {got:?}, want {want:?}", sock.display()));
            }
        }
        for (line, want) in lines {
            q.send_raw(format!("{line}\n").as_bytes());
            let got = q.reply();
            if got.desc() != Some(want) {
                wrong.push(format!("{}: {line}: {got:?}, want {want:?}", sock.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    // Over JSON-RPC the same words, as invalid params.
    let (code, msg, _) = p.spindle.err("blockdev-mirror", mirror(json!({"granularity": -1})));
    assert_eq!((code, msg.as_str()), (-32602, "Parameter 'granularity' expects uint32_t"));
    assert_eq!(p.spindle.ok("query-named-block-nodes", json!({})).as_array().unwrap().len(), 2, "nothing was left");
}

#[test]
fn zero_granularity_and_buf_size_mean_the_default_as_in_qemu() {
    let p = Pair::start();
    for (sock, dir) in p.sides() {
        let mut q = Peer::negotiated(&sock);
        for (cmd, args) in [
            ("blockdev-mirror", mirror(json!({"granularity": 0, "buf-size": 0}))),
            ("drive-mirror", drive_mirror(json!({"granularity": 0, "buf-size": 0}))),
        ] {
            assert_eq!(q.execute(cmd, in_dir(&args, &dir)), Reply::Return(json!({})), "{}: {cmd}", sock.display());
            assert_eq!(q.execute("job-cancel", json!({"id": "m"})), Reply::Return(json!({})));
            let gone = q.wait_event(Duration::from_secs(30), |e| {
                e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == "m" && e["data"]["status"] == "null"
            });
            assert!(gone, "{}: {cmd}: the job did not end: {:?}", sock.display(), q.events);
            q.events.clear();
        }
    }
}

/// Reads the next JSON-RPC answer from `s`, or None once it closed.
fn try_reply(s: &UnixStream) -> Option<Value> {
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))),
        _ => None,
    }
}

#[test]
fn duplicate_keys_are_refused_on_both_transports_as_qemu_refuses_them() {
    let p = Pair::start();
    let refused = Reply::Error { class: "GenericError".into(), desc: "JSON parse error, duplicate key".into() };
    for (sock, _) in p.sides() {
        let mut q = Peer::negotiated(&sock);
        for line in [
            r#"{"execute":"query-version","execute":"quit"}"#,
            r#"{"execute":"query-version","arguments":{"a":1,"a":2}}"#,
            r#"{"execute":"query-version","id":{"a":1,"a":2}}"#,
            r#"{"execute":"blockdev-del","arguments":{"node-name":"src","node-name":"tgt"}}"#,
        ] {
            q.send_raw(format!("{line}\n").as_bytes());
            assert_eq!(q.reply(), refused, "{}: {line}", sock.display());
        }
        // Nothing ran (no quit, no node removed) and the session goes on.
        assert!(matches!(q.execute("query-version", json!({})), Reply::Return(_)), "{}", sock.display());
        let nodes = q.execute("query-named-block-nodes", json!({}));
        let Reply::Return(Value::Array(nodes)) = nodes else { panic!("{}: {nodes:?}", sock.display()) };
        assert_eq!(nodes.len(), 2, "{}", sock.display());
    }
    // JSON-RPC: a parse error, then the connection closes, as for any.
    let d = &p.spindle;
    let mut s = connect(d);
    s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"query-version","method":"quit"}"#).unwrap();
    let r = try_reply(&s).expect("an answer");
    assert_eq!(r["error"]["code"], -32700, "{r}");
    assert_eq!(r["error"]["message"], "JSON parse error, duplicate key");
    assert!(closed(&s));
    d.ok("query-version", Value::Null);
}

#[test]
fn deep_nesting_is_refused_at_once_on_both_transports() {
    let p = Pair::start();
    let too_deep = Reply::Error { class: "GenericError".into(), desc: "JSON nesting depth limit exceeded".into() };
    let mut input = vec![b'['; 100_000];
    input.push(b'\n');
    for (sock, _) in p.sides() {
        let mut q = Peer::negotiated(&sock);
        q.send_raw(&input);
        // QEMU answers more after this one (its parser resynchronises
        // differently); the first answer is what both must give.
        assert_eq!(q.reply(), too_deep, "{}", sock.display());
    }
    // Spindle skips the rest of the line and serves the session on, and
    // everyone else meanwhile.
    let d = &p.spindle;
    let mut q = Peer::negotiated(&d.qmp);
    q.send_raw(&input[..50_000]);
    assert_eq!(q.reply(), too_deep);
    d.ok("query-version", Value::Null);
    q.send_raw(&input[50_000..]);
    assert!(matches!(q.execute("query-version", json!({})), Reply::Return(_)));
    // JSON-RPC: a parse error at once (no newline, nowhere near the size
    // limit), then the connection closes.
    let mut s = connect(d);
    s.write_all(&input[..100_000]).unwrap();
    let r = try_reply(&s).expect("an answer before the request ends");
    assert_eq!(r["error"]["code"], -32700, "{r}");
    assert_eq!(r["error"]["message"], "JSON nesting depth limit exceeded");
    assert!(closed(&s));
    d.ok("query-version", Value::Null);
}
