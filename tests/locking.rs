//! Files in use are protected: image locks compatible with QEMU's (both
//! ways, with qemu-img, qemu-io and qemu-storage-daemon), no command that
//! creates or truncates a file some node has open, and no second way to
//! write a node or a file that its users forbid. Each case is a regression
//! test: the command used to succeed and destroy data.

mod support;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Daemon, run};

const MIB: u64 = 1 << 20;
const WRITE_LOCK: &str = "Failed to get \"write\" lock";
const SHARED_WRITE_LOCK: &str = "Failed to get shared \"write\" lock";

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// qemu-io on a qcow2 image; returns (success, stdout + stderr).
fn qemu_io(args: &[&str], img: &Path) -> (bool, String) {
    let out = output(Command::new("qemu-io").args(args).arg(img));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ok = out.status.success() && !text.contains("failed") && !text.contains("can't open");
    (ok, text)
}

/// Reads `len` bytes at `at` and checks they hold `pattern`, sharing the
/// image with whoever has it open.
fn verify(img: &Path, pattern: u8, at: u64, len: u64) {
    let cmd = format!("read -P {pattern:#x} {at} {len}");
    let (ok, text) = qemu_io(&["-r", "-U", "-f", "qcow2", "-c", &cmd], img);
    assert!(ok && !text.contains("Pattern verification"), "{}: {text}", img.display());
}

/// A qcow2 image with `pattern` in its first MiB (and a backing file).
fn image(dir: &Path, name: &str, backing: Option<&Path>, pattern: u8) -> PathBuf {
    let p = dir.join(name);
    support::qcow2_image(&p, "64M", backing);
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", &format!("write -P {pattern:#x} 0 1M")], &p);
    assert!(ok, "{text}");
    p
}

fn add_qcow2(d: &Daemon, node: &str, path: &Path) {
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": path}}));
}

fn err_msg(d: &Daemon, method: &str, params: Value) -> String {
    d.err(method, params).1
}

fn info_backing(img: &Path) -> Option<String> {
    let out = qemu_img(&["info", "-U", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["backing-filename"].as_str().map(str::to_string)
}

#[test]
fn drive_mirror_refuses_to_create_over_files_in_use() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let base = image(dir, "base.qcow2", None, 0xaa);
    let top = image(dir, "top.qcow2", Some(&base), 0xbb);
    let other = image(dir, "other.qcow2", None, 0xcc);
    let link = dir.join("link-to-base.qcow2");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    add_qcow2(&d, "src", &top);
    add_qcow2(&d, "oth", &other);
    for target in [&top, &base, &other, &link] {
        for mode in ["absolute-paths", "existing"] {
            let e = err_msg(
                &d,
                "drive-mirror",
                json!({"job-id": "d", "device": "src", "target": target, "sync": "full",
                       "format": "qcow2", "mode": mode}),
            );
            assert_eq!(e, WRITE_LOCK, "{} ({mode})", target.display());
        }
    }
    assert_eq!(d.ok("query-jobs", json!({})), json!([]));
    // Nothing was touched: data, backing links and metadata are intact.
    verify(&top, 0xbb, 0, MIB);
    verify(&base, 0xaa, 0, MIB);
    verify(&other, 0xcc, 0, MIB);
    assert_eq!(info_backing(&top).as_deref(), base.to_str());
    for img in [&top, &base, &other] {
        qemu_img(&["check", "-q", "-U", img.to_str().unwrap()]);
    }
    // A free file is still a valid target.
    let free = dir.join("free.qcow2");
    d.ok("drive-mirror", json!({"job-id": "d", "device": "src", "target": free, "sync": "full", "format": "qcow2"}));
    d.ok("block-job-cancel", json!({"device": "d", "force": true}));
}

#[test]
fn files_in_use_are_not_recreated_even_without_locks() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let img = image(dir, "a.qcow2", None, 0x11);
    let raw = dir.join("r.img");
    std::fs::write(&raw, vec![0x22u8; MIB as usize]).unwrap();
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "a",
               "file": {"driver": "file", "filename": img, "locking": "off"}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": raw, "locking": "off"}}),
    );
    // No image locks are held, so QEMU's tools could: Spindle itself does not.
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "read 0 4k"], &img);
    assert!(ok, "locking=off holds no locks: {text}");
    for (target, node) in [(&img, "a"), (&raw, "r")] {
        let e = err_msg(&d, "drive-mirror", json!({"job-id": "d", "device": "a", "target": target, "sync": "full"}));
        assert!(e.contains(&format!("it is in use by node '{node}'")) || e.contains("in use by node '#block"), "{e}");
    }
    verify(&img, 0x11, 0, MIB);
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0x22u8; MIB as usize]);
}

#[test]
fn qemu_tools_cannot_write_what_spindle_has_open() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let base = image(dir, "base.qcow2", None, 0xaa);
    let top = image(dir, "top.qcow2", Some(&base), 0xbb);
    add_qcow2(&d, "top", &top);
    // The image Spindle writes: no writer, no reader that needs it consistent.
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "write 0 4k"], &top);
    assert!(!ok && text.contains(WRITE_LOCK) && text.contains("Is another process using the image"), "{text}");
    let out = output(Command::new("qemu-img").args(["info"]).arg(&top));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(SHARED_WRITE_LOCK));
    // force-share (-U) readers are welcome, as with QEMU.
    verify(&top, 0xbb, 0, MIB);
    // Its backing file, open read-only: readers fine, writers not.
    qemu_img(&["check", "-q", base.to_str().unwrap()]);
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "write 0 4k"], &base);
    assert!(!ok && text.contains(WRITE_LOCK), "{text}");
    // Gone from Spindle, free for everyone.
    d.ok("blockdev-del", json!({"node-name": "top"}));
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "write -P 0xdd 0 4k"], &top);
    assert!(ok, "{text}");
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "write -P 0xdd 0 4k"], &base);
    assert!(ok, "{text}");
}

#[test]
fn read_only_and_force_share_and_locking_off_behave_as_in_qemu() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let a = image(dir, "a.qcow2", None, 0x11);
    let b = image(dir, "b.qcow2", None, 0x22);
    let c = image(dir, "c.qcow2", None, 0x33);
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ro", "read-only": true,
               "file": {"driver": "file", "filename": a}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fs", "read-only": true, "force-share": true,
               "file": {"driver": "file", "filename": b}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "off",
               "file": {"driver": "file", "filename": c, "locking": "off"}}),
    );
    // Read-only: a writer would change what Spindle reads.
    assert!(qemu_io(&["-f", "qcow2", "-c", "write 0 4k"], &a).1.contains(WRITE_LOCK));
    qemu_img(&["check", "-q", a.to_str().unwrap()]);
    // force-share: Spindle accepts that others write.
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "write -P 0x44 0 4k"], &b);
    assert!(ok, "{text}");
    // locking=off: nothing is announced to others.
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "read 0 4k"], &c);
    assert!(ok, "{text}");
    let e = err_msg(
        &d,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "bad", "force-share": true,
               "file": {"driver": "file", "filename": dir.join("x.qcow2")}}),
    );
    assert_eq!(e, "force-share=on can only be used with read-only images");
}

/// qemu-storage-daemon holding `img` read-write (and read-only `ro`, if
/// given) under `dir`; killed by PID when dropped.
struct Qsd(Child);

impl Qsd {
    fn start(dir: &Path, img: &Path, ro: Option<&Path>) -> Qsd {
        let sock = dir.join("qsd.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!("driver=file,node-name=f0,filename={}", img.display()));
        cmd.args(["--blockdev", "driver=qcow2,node-name=q0,file=f0"]);
        if let Some(ro) = ro {
            cmd.arg("--blockdev").arg(format!("driver=file,node-name=f1,read-only=on,filename={}", ro.display()));
            cmd.args(["--blockdev", "driver=qcow2,node-name=q1,read-only=on,file=f1"]);
        }
        cmd.arg("--chardev").arg(format!("socket,path={},server=on,wait=off,id=c0", sock.display()));
        cmd.args(["--monitor", "chardev=c0"]);
        let mut child = cmd.stdout(std::process::Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("qemu-storage-daemon exited: {st}");
            }
            assert!(Instant::now() < deadline, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd(child)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn spindle_refuses_images_qemu_storage_daemon_has_open() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let img = image(dir, "busy.qcow2", None, 0x5a);
    let ro = image(dir, "shared.qcow2", None, 0x6b);
    let qsd = Qsd::start(dir, &img, Some(&ro));
    let file = |p: &Path| json!({"driver": "file", "filename": p});
    // QEMU writes it: Spindle may neither write nor read it consistently.
    let e = err_msg(&d, "blockdev-add", json!({"driver": "qcow2", "node-name": "w", "file": file(&img)}));
    assert_eq!(e, WRITE_LOCK);
    let e = err_msg(
        &d,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "r", "read-only": true, "file": file(&img)}),
    );
    assert_eq!(e, SHARED_WRITE_LOCK);
    // Unless it shares, as qemu-img -U does.
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "r", "read-only": true, "force-share": true, "file": file(&img)}),
    );
    d.debug_io("r", "read -P 0x5a 0 1M").unwrap();
    // QEMU reads it: Spindle may read it too, not write it.
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "r2", "read-only": true, "file": file(&ro)}));
    d.debug_io("r2", "read -P 0x6b 0 1M").unwrap();
    let e = err_msg(&d, "blockdev-add", json!({"driver": "qcow2", "node-name": "w2", "file": file(&ro)}));
    assert_eq!(e, WRITE_LOCK);
    // Nor may a drive-mirror recreate either file.
    for target in [&img, &ro] {
        let e = err_msg(&d, "drive-mirror", json!({"job-id": "j", "device": "r2", "target": target, "sync": "full"}));
        assert_eq!(e, WRITE_LOCK);
    }
    drop(qsd);
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "w", "file": file(&img)}));
}

#[test]
fn qemu_storage_daemon_refuses_images_spindle_has_open() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let img = image(dir, "mine.qcow2", None, 0x5a);
    add_qcow2(&d, "mine", &img);
    let sock = dir.join("qsd.sock");
    let out = output(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={}", img.display()))
            .args(["--blockdev", "driver=qcow2,node-name=q0,file=f0"])
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=c0", sock.display()))
            .args(["--monitor", "chardev=c0"]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(WRITE_LOCK), "{stderr}");
    // After kill -9 the kernel drops Spindle's locks with the process.
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let mut d = d;
    d.wait_exit();
    support::wait_unlocked_dir(d.dir.path());
    let (ok, text) = qemu_io(&["-f", "qcow2", "-c", "write -P 0x5b 0 4k"], &img);
    assert!(ok, "{text}");
}

#[test]
fn one_image_is_not_opened_twice_for_writing() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let img = image(dir, "a.qcow2", None, 0x11);
    let link = dir.join("alias.qcow2");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    add_qcow2(&d, "a", &img);
    let file = |p: &Path| json!({"driver": "file", "filename": p});
    for p in [&img, &link] {
        assert_eq!(
            err_msg(&d, "blockdev-add", json!({"driver": "qcow2", "node-name": "b", "file": file(p)})),
            WRITE_LOCK
        );
        assert_eq!(
            err_msg(
                &d,
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "b", "read-only": true, "file": file(p)})
            ),
            SHARED_WRITE_LOCK
        );
        assert_eq!(
            err_msg(&d, "blockdev-add", json!({"driver": "raw", "node-name": "b", "file": file(p)})),
            WRITE_LOCK
        );
    }
    // Two readers are fine.
    let b = image(dir, "b.qcow2", None, 0x22);
    for n in ["b1", "b2"] {
        d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": n, "read-only": true, "file": file(&b)}));
    }
    // A file node under one qcow2 node: not a second format on it, not written around it.
    let c = image(dir, "c.qcow2", None, 0x33);
    d.ok("blockdev-add", json!({"driver": "file", "node-name": "cf", "filename": c}));
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "c1", "file": "cf"}));
    let e = err_msg(&d, "blockdev-add", json!({"driver": "qcow2", "node-name": "c2", "file": "cf"}));
    assert!(e.starts_with("Permission conflict on node 'cf': permissions 'write"), "{e}");
    let e = err_msg(&d, "x-debug-io", json!({"node-name": "cf", "command": "write -P 0 0 64k"}));
    assert!(e.starts_with("Permission conflict on node 'cf'"), "{e}");
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    let e = err_msg(&d, "block-export-add", json!({"type": "nbd", "id": "e", "node-name": "cf", "writable": true}));
    assert!(e.starts_with("Permission conflict on node 'cf'"), "{e}");
    verify(&c, 0x33, 0, MIB);
    qemu_img(&["check", "-q", "-U", c.to_str().unwrap()]);
}

#[test]
fn mirror_targets_have_no_second_writer_and_sources_no_new_users() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let base = image(dir, "base.qcow2", None, 0xaa);
    let top = image(dir, "top.qcow2", Some(&base), 0xbb);
    let tgt = image(dir, "tgt.qcow2", None, 0x00);
    // The backing node opened writable by itself, then given to the overlay.
    add_qcow2(&d, "base", &base);
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "base",
               "file": {"driver": "file", "filename": top}}),
    );
    add_qcow2(&d, "tgt", &tgt);
    let backing = "base";
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    // As in QEMU, a backing node may be written by others (fleecing needs
    // it): an export, a parent of its own.
    d.ok("block-export-add", json!({"type": "nbd", "id": "w", "node-name": backing, "writable": true}));
    d.ok("block-export-del", json!({"id": "w"}));
    let e = err_msg(&d, "blockdev-mirror", json!({"job-id": "m", "device": "top", "target": backing, "sync": "full"}));
    assert!(e.contains("backing chain"), "{e}");
    // Reading it is fine.
    d.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": backing}));
    d.ok("block-export-del", json!({"id": "e"}));

    // A mirror's target is the job's alone until the job ends; its source
    // takes no new users, who would stay behind at the pivot.
    d.ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "speed": 1,
               "auto-finalize": false}),
    );
    for writable in [true, false] {
        let e = err_msg(
            &d,
            "block-export-add",
            json!({"type": "nbd", "id": "t", "node-name": "tgt", "writable": writable}),
        );
        assert!(e.starts_with("Permission conflict on node 'tgt'") && e.contains("unshared by job 'm'"), "{e}");
    }
    let e = err_msg(&d, "x-debug-io", json!({"node-name": "tgt", "command": "write 0 4k"}));
    assert!(e.contains("unshared by job 'm'"), "{e}");
    let e = err_msg(&d, "block-export-add", json!({"type": "nbd", "id": "s", "node-name": "top", "writable": true}));
    assert!(e.contains("Node 'top' is about to be replaced by job 'm'"), "{e}");
    let e = err_msg(&d, "blockdev-add", json!({"driver": "raw", "node-name": "over", "file": "top"}));
    assert!(e.contains("about to be replaced"), "{e}");
    d.ok("block-job-cancel", json!({"device": "m", "force": true}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.ok("query-jobs", json!({})) != json!([]) {
        assert!(Instant::now() < deadline, "the job did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Free again.
    d.ok("block-export-add", json!({"type": "nbd", "id": "s", "node-name": "top", "writable": true}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "t", "node-name": "tgt", "writable": true}));
    verify(&base, 0xaa, 0, MIB);
}
