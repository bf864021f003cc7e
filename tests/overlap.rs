//! Metadata overlap checks: images whose metadata was damaged on purpose
//! (the ways a bad disk or a bug damages them) must never have a write
//! placed over their header or tables. Each case used to destroy the
//! image; now the write fails with EIO, the header's corrupt bit is set,
//! the node turns read-only and BLOCK_IMAGE_CORRUPTED says why, as QEMU
//! does. `qemu-img` is the oracle for what is left on disk.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::{Daemon, Qmp, run};

const CS: u64 = 64 << 10;

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// A 64 MiB qcow2 image (64 KiB clusters) with 0x11 in its first MiB.
fn image(d: &Daemon, name: &str) -> PathBuf {
    let p = d.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 1M"]).arg(&p));
    p
}

fn be64_at(p: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(p).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn put64_at(p: &Path, at: u64, v: u64) {
    std::fs::OpenOptions::new().write(true).open(p).unwrap().write_all_at(&v.to_be_bytes(), at).unwrap();
}

/// (L1 table offset, refcount table offset, first L2 table offset).
fn layout(p: &Path) -> (u64, u64, u64) {
    let l1 = be64_at(p, 40);
    let rt = be64_at(p, 48);
    (l1, rt, be64_at(p, l1) & 0x00ff_ffff_ffff_fe00)
}

fn info(p: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", p.to_str().unwrap()])).unwrap()
}

fn add(d: &Daemon, node: &str, p: &Path, extra: Value) {
    let mut opts = json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": p}});
    if let (Value::Object(o), Value::Object(e)) = (&mut opts, extra) {
        o.extend(e);
    }
    d.ok("blockdev-add", opts);
}

fn node_info(d: &Daemon, node: &str) -> Value {
    d.ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .cloned()
        .unwrap()
}

/// Runs `cmds` on the node; the first that fails returns its message.
fn io_until_error(d: &Daemon, node: &str, cmds: &[&str]) -> Option<String> {
    for c in cmds {
        if let Err(e) = d.debug_io(node, c) {
            return Some(e.to_string());
        }
    }
    None
}

/// The kind of metadata the corruption event names (the event stays
/// queued for [`assert_fenced`]).
fn refused_kind(q: &mut Qmp) -> String {
    let ev = q.event("BLOCK_IMAGE_CORRUPTED");
    let msg = ev["data"]["msg"].as_str().unwrap().to_string();
    q.events.push(ev);
    let what =
        msg.strip_prefix("Preventing invalid write on metadata (overlaps with ").and_then(|m| m.strip_suffix(')'));
    what.unwrap_or_else(|| panic!("unexpected message: {msg}")).to_string()
}

/// Everything that must hold once a write was refused for overlapping `what`.
fn assert_fenced(d: &Daemon, q: &mut Qmp, node: &str, img: &Path, what: &str, err: Option<String>) {
    let err = err.expect("a write through corrupt metadata must fail");
    assert!(err.contains("Input/output error"), "{err}");
    let ev = q.event("BLOCK_IMAGE_CORRUPTED");
    let data = &ev["data"];
    assert_eq!(data["device"], "");
    assert_eq!(data["node-name"], node);
    assert_eq!(data["fatal"], true);
    assert_eq!(data["msg"], format!("Preventing invalid write on metadata (overlaps with {what})"), "{ev}");
    assert!(data["offset"].is_u64() && data["size"].is_u64(), "{ev}");
    // The node is fenced: read-only, writes refused, reads served.
    let n = node_info(d, node);
    assert_eq!(n["ro"], true, "{n}");
    assert_eq!(n["image"]["format-specific"]["data"]["corrupt"], true, "{n}");
    assert!(d.debug_io(node, "write -P 0x33 8M 64k").is_err());
    d.debug_io(node, "read 0 64k").unwrap();
    // On disk: still a qcow2 image, marked corrupt, so QEMU refuses to
    // write it too.
    let i = info(img);
    assert_eq!(i["format"], "qcow2", "{i}");
    assert_eq!(i["format-specific"]["data"]["corrupt"], true, "{i}");
    d.ok("blockdev-del", json!({"node-name": node}));
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write 0 4k"]).arg(img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Image is corrupt; cannot be opened read/write"), "{text}");
    let e = d.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": img}}),
    );
    assert!(e.1.contains("marked corrupt"), "{e:?}");
}

#[test]
fn a_zeroed_refcount_block_cannot_put_data_on_the_header() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let img = image(&d, "a.qcow2");
    let (_, rt, _) = layout(&img);
    let block = be64_at(&img, rt);
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().write_all_at(&vec![0u8; CS as usize], block).unwrap();
    add(&d, "a", &img, json!({}));
    // Every cluster now looks free: the first allocation picks cluster 0.
    let err = io_until_error(&d, "a", &["write -P 0x22 32M 64k", "flush"]);
    assert_fenced(&d, &mut q, "a", &img, "qcow2_header", err);
    // The header and tables survived: repairing gives a working image.
    run(Command::new("qemu-img").args(["check", "-q", "-r", "all"]).arg(&img));
    run(Command::new("qemu-io").args(["-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M"]).arg(&img));
}

#[test]
fn an_l1_entry_pointing_at_the_refcount_table_cannot_overwrite_it() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let img = image(&d, "b.qcow2");
    let (l1, rt, _) = layout(&img);
    let table_before = be64_at(&img, rt);
    // The second L1 entry (guest 512 MiB on) — here the only one past 0 —
    // is unused; point the first at the refcount table instead.
    put64_at(&img, l1, rt | 1 << 63);
    add(&d, "b", &img, json!({}));
    let err = io_until_error(&d, "b", &["write -P 0x22 0 64k", "flush"]);
    // The first write refused is whichever metadata write the damage
    // reaches first: the refcount table is never written.
    let what = refused_kind(&mut q);
    assert!(["refcount table", "active L2 table"].contains(&what.as_str()), "{what}");
    assert_fenced(&d, &mut q, "b", &img, &what, err);
    assert_eq!(be64_at(&img, rt), table_before, "the refcount table is untouched");
}

#[test]
fn a_refcount_block_aliasing_an_l2_table_cannot_be_written_over_it() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let img = image(&d, "c.qcow2");
    let (_, rt, l2) = layout(&img);
    let l2_before = be64_at(&img, l2);
    put64_at(&img, rt, l2);
    add(&d, "c", &img, json!({}));
    let err = io_until_error(&d, "c", &["write -P 0x22 32M 64k", "flush"]);
    // Read as refcounts, the L2 table says some metadata clusters are free:
    // whichever the allocator or the write-back reaches first is defended.
    let what = refused_kind(&mut q);
    assert!(["refcount table", "active L2 table", "refcount block"].contains(&what.as_str()), "{what}");
    assert_fenced(&d, &mut q, "c", &img, &what, err);
    assert_eq!(be64_at(&img, l2), l2_before, "the L2 table is untouched");
}

#[test]
fn a_fast_path_overwrite_cannot_land_on_the_l1_table() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let img = image(&d, "d.qcow2");
    let (l1, _, l2) = layout(&img);
    let l1_before = be64_at(&img, l1);
    // Guest cluster 1 maps, as a cluster of its own (COPIED), onto the L1 table.
    put64_at(&img, l2 + 8, l1 | 1 << 63);
    add(&d, "d", &img, json!({}));
    // Load the L2 table, so the write qualifies for the fast path.
    d.debug_io("d", "read 0 4k").unwrap();
    let err = io_until_error(&d, "d", &["write -P 0x22 64k 4k"]);
    assert_fenced(&d, &mut q, "d", &img, "active L1 table", err);
    assert_eq!(be64_at(&img, l1), l1_before, "the L1 table is untouched");
}

#[test]
fn overlap_check_modes_are_honoured() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let img = image(&d, "e.qcow2");
    let (_, _, l2) = layout(&img);
    put64_at(&img, l2 + 8, be64_at(&img, 40) | 1 << 63);
    add(&d, "e", &img, json!({"overlap-check": "none"}));
    d.debug_io("e", "read 0 4k").unwrap();
    // With checks off, the write goes where the mapping says: the image's
    // L1 table is destroyed, as QEMU with overlap-check=none would do.
    d.debug_io("e", "write -P 0x22 64k 64k").unwrap();
    d.ok("blockdev-del", json!({"node-name": "e"}));
    assert_eq!(be64_at(&img, be64_at(&img, 40)), 0x2222_2222_2222_2222);
    // The same damage with {"template": "none", "active-l1": true} is caught.
    let img = image(&d, "f.qcow2");
    let (_, _, l2) = layout(&img);
    put64_at(&img, l2 + 8, be64_at(&img, 40) | 1 << 63);
    add(&d, "f", &img, json!({"overlap-check": {"template": "none", "active-l1": true}}));
    d.debug_io("f", "read 0 4k").unwrap();
    let err = io_until_error(&d, "f", &["write -P 0x22 64k 4k"]);
    assert_fenced(&d, &mut q, "f", &img, "active L1 table", err);
    let e = d.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "g", "overlap-check": "sometimes",
               "file": {"driver": "file", "filename": d.path("g.qcow2")}}),
    );
    assert_eq!(e.1, "Parameter 'overlap-check' does not accept value 'sometimes'");
}

#[test]
fn a_read_only_image_reports_corruption_without_fencing() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let img = image(&d, "h.qcow2");
    let (_, _, l2) = layout(&img);
    // A data cluster far beyond the end of the file.
    put64_at(&img, l2 + 16, (1u64 << 40) | 1 << 63);
    add(&d, "h", &img, json!({"read-only": true}));
    assert!(d.debug_io("h", "read 128k 4k").is_err());
    let ev = q.event("BLOCK_IMAGE_CORRUPTED");
    assert_eq!(ev["data"]["fatal"], false, "{ev}");
    assert!(ev["data"].get("offset").is_none(), "{ev}");
    d.debug_io("h", "read -P 0x11 0 64k").unwrap();
    assert_eq!(info(&img)["format-specific"]["data"]["corrupt"], false);
}
