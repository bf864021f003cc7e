//! qcow2 interoperability with QEMU: images QEMU wrote read back through
//! Spindle, images Spindle wrote pass `qemu-img check` and read back in
//! qemu-io, backing chains, block status against `qemu-img map`,
//! compressed clusters, a seeded differential test against qemu-io, bad
//! images, dirty and corrupt images, snapshots, and a crash after a flush.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::rng::Rng;
use support::{Daemon, run};

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

fn create(path: &Path, size: &str, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let p = path.to_str().unwrap();
    args.extend([p, size]);
    qemu_img(&args);
}

/// qemu-io on a qcow2 image with several commands in one run.
fn qio(path: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    if cmds.iter().all(|c| c.starts_with("read")) {
        c.args(["-r", "-U"]);
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(path));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

/// `qemu-img check`: no corruption, no leak.
fn check_clean(path: &Path) {
    let out = Command::new("qemu-img").args(["check", "--output=json"]).arg(path).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check failed on {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| report.get(k).and_then(Value::as_u64).unwrap_or(0);
    assert_eq!(
        (n("corruptions"), n("leaks"), n("check-errors")),
        (0, 0, 0),
        "qemu-img check {}: {report}",
        path.display()
    );
    assert_eq!(out.status.code(), Some(0), "{report}");
}

fn add(d: &Daemon, name: &str, path: &Path, extra: Value) {
    let mut opts = json!({"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            opts[k] = v;
        }
    }
    d.ok("blockdev-add", opts);
}

fn io(d: &Daemon, node: &str, cmd: &str) {
    d.debug_io(node, cmd).unwrap_or_else(|e| panic!("x-debug-io {node} '{cmd}': {e}\n{}", d.log_text()));
}

/// Every image layout the matrix tests cover.
fn layouts() -> Vec<(u64, &'static str, u32)> {
    let mut v = Vec::new();
    for cluster in [512u64, 4096, 65536, 2 << 20] {
        v.push((cluster, "0.10", 16));
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            // 1-bit refcounts only with small clusters keep the test fast.
            if cluster <= 65536 || bits == 16 {
                v.push((cluster, "1.1", bits));
            }
        }
    }
    v
}

fn layout_opts(cluster: u64, compat: &str, bits: u32) -> String {
    format!("cluster_size={cluster},compat={compat},refcount_bits={bits}")
}

#[test]
fn images_written_by_qemu_read_back_exactly() {
    let d = Daemon::start();
    for (i, (cluster, compat, bits)) in layouts().into_iter().enumerate() {
        let img = d.path(&format!("q{i}.qcow2"));
        create(&img, "8M", &layout_opts(cluster, compat, bits));
        let mut cmds = vec!["write -P 0x11 0 1M", "write -P 0x22 3000001 5000", "write -P 0x33 6M 2M"];
        if compat == "1.1" {
            cmds.push("write -z 6M 64k");
        }
        qio(&img, &cmds);
        let node = format!("n{i}");
        add(&d, &node, &img, json!({"read-only": true}));
        io(&d, &node, "read -P 0x11 0 1M");
        io(&d, &node, "read -P 0 1M 1951425");
        io(&d, &node, "read -P 0x22 3000001 5000");
        io(&d, &node, "read -P 0 3005001 1000");
        if compat == "1.1" {
            io(&d, &node, "read -P 0 6M 64k");
            io(&d, &node, "read -P 0x33 6208k 1984k");
        } else {
            io(&d, &node, "read -P 0x33 6M 2M");
        }
        d.ok("blockdev-del", json!({"node-name": node}));
    }
}

#[test]
fn images_written_by_spindle_pass_qemu_img_check() {
    let d = Daemon::start();
    for (i, (cluster, compat, bits)) in layouts().into_iter().enumerate() {
        let img = d.path(&format!("s{i}.qcow2"));
        create(&img, "16M", &layout_opts(cluster, compat, bits));
        let node = format!("n{i}");
        add(&d, &node, &img, json!({"discard": "unmap"}));
        for cmd in [
            "write -P 0x41 0 2M",
            "write -P 0x42 1000 3000",
            "write -P 0x43 2097000 200000",
            "write -P 0x44 5M 64k",
            "write -z 5M 4k",
            "write -P 0x45 8M 4M",
            "write -z -u 9M 1M",
            "discard 10M 2M",
            "write -P 0x46 15M 1M",
        ] {
            io(&d, &node, cmd);
        }
        io(&d, &node, "read -P 0x42 1000 3000");
        d.ok("blockdev-del", json!({"node-name": node}));
        check_clean(&img);
        qio(
            &img,
            &[
                "read -P 0x41 0 1000",
                "read -P 0x42 1000 3000",
                "read -P 0x41 4000 2093000",
                "read -P 0x43 2097000 200000",
                "read -P 0 5M 4k",
                "read -P 0x44 5124k 60k",
                "read -P 0x45 8M 1M",
                "read -P 0 9M 1M",
                "read -P 0 10M 2M",
                "read -P 0x46 15M 1M",
            ],
        );
    }
}

/// A chain `depth` images deep: layer k (0 = base) writes pattern 0x10+k
/// over [k MiB, k MiB + 768 KiB), overlapping the layer below by 256 KiB.
fn build_chain(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for k in 0..depth {
        let p = dir.join(format!("chain{depth}_{k}.qcow2"));
        let opts = if k == 0 {
            String::new()
        } else {
            format!("backing_file={},backing_fmt=qcow2", paths[k - 1].file_name().unwrap().to_str().unwrap())
        };
        // Relative backing names resolve against the image's directory.
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", &opts]);
        }
        let ps = p.to_str().unwrap().to_string();
        args.extend([ps.as_str(), "8M"]);
        qemu_img(&args);
        let start = (k as u64) << 20;
        let start_s = start.to_string();
        qio(&p, &[&format!("write -P {} {start_s} 768k", 0x10 + k)]);
        paths.push(p);
    }
    paths
}

#[test]
fn backing_chains_one_to_five_deep() {
    let d = Daemon::start();
    for depth in 1..=5 {
        let chain = build_chain(d.dir.path(), depth);
        let top = chain.last().unwrap();
        let node = format!("top{depth}");
        add(&d, &node, top, json!({}));
        for k in 0..depth {
            io(&d, &node, &format!("read -P {} {} 768k", 0x10 + k, (k as u64) << 20));
            io(&d, &node, &format!("read -P 0 {} 256k", ((k as u64) << 20) + (768 << 10)));
        }
        io(&d, &node, &format!("read -P 0 {} 1M", (depth as u64) << 20));
        // A partial write into a cluster held only by a lower layer copies the rest up.
        let base_off = 100_000u64;
        io(&d, &node, &format!("write -P 0x77 {base_off} 1000"));
        let nodes = d.ok("query-named-block-nodes", Value::Null);
        let qcow2_nodes: Vec<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["drv"] == "qcow2")
            .map(|n| n["node-name"].as_str().unwrap())
            .collect();
        assert_eq!(qcow2_nodes.len(), depth, "the whole chain is open: {qcow2_nodes:?}");
        d.ok("blockdev-del", json!({"node-name": node}));
        assert_eq!(d.ok("query-named-block-nodes", Value::Null), json!([]), "the chain closes with its top");
        check_clean(top);
        qio(top, &["read -P 0x10 0 100000", "read -P 0x77 100000 1000", "read -P 0x10 101000 10000"]);
        let info = qemu_img(&["info", "--backing-chain", top.to_str().unwrap()]);
        assert_eq!(info.lines().filter(|l| l.starts_with("file format: qcow2")).count(), depth);
    }
}

#[test]
fn a_backing_loop_is_refused() {
    let d = Daemon::start();
    let a = d.path("loop_a.qcow2");
    let b = d.path("loop_b.qcow2");
    create(&a, "1M", "");
    create(&b, "1M", "backing_file=loop_a.qcow2,backing_fmt=qcow2");
    // Point a at b: a loop qemu-img refuses to make, so patch it with rebase -u.
    qemu_img(&["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "loop_b.qcow2", a.to_str().unwrap()]);
    let (_, msg, _) =
        d.err("blockdev-add", json!({"driver": "qcow2", "node-name": "l", "file": {"driver": "file", "filename": b}}));
    assert!(msg.contains("loop"), "{msg}");
    assert_eq!(d.ok("query-named-block-nodes", Value::Null), json!([]), "nothing of the chain is left open");
}

fn map(d: &Daemon, node: &str) -> Value {
    d.ok("x-block-status", json!({"node-name": node}))
}

fn qemu_map(path: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["map", "--output=json", "-U", path.to_str().unwrap()])).unwrap()
}

#[test]
fn block_status_matches_qemu_img_map() {
    let d = Daemon::start();
    // A chain with holes, zero clusters and overlaps.
    let chain = build_chain(d.dir.path(), 3);
    let top = chain.last().unwrap();
    qio(top, &["write -z 5M 128k", "write -P 1 6M 64k", "write -z 6M 64k"]);
    // Compressed clusters and a raw backing file.
    let raw = d.path("base.raw");
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let comp = d.path("comp.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), comp.to_str().unwrap()]);
    let over_raw = d.path("over_raw.qcow2");
    create(&over_raw, "2M", "backing_file=base.raw,backing_fmt=raw");
    qio(&over_raw, &["write -P 3 64k 64k"]);
    // 4 KiB clusters: one L2 table covers 2 MiB, so runs cross tables
    // (data and zero clusters over a boundary, tables never allocated —
    // one right after data that ends at a boundary —, the last cluster).
    let small = d.path("small_clusters.qcow2");
    create(&small, "16M", "cluster_size=4096");
    qio(
        &small,
        &[
            "write -P 1 1984k 64k",
            "write -P 1 6136k 16k",
            "write -z 8184k 16k",
            "write -P 2 10M 2M",
            "write -P 2 12M 4k",
            "discard 11M 8k",
            "write -P 3 16380k 4k",
        ],
    );
    for (i, img) in [top.clone(), comp, over_raw, small].iter().enumerate() {
        let node = format!("m{i}");
        add(&d, &node, img, json!({"read-only": true}));
        assert_eq!(map(&d, &node), qemu_map(img), "map of {}", img.display());
    }
}

#[test]
fn compressed_clusters_read_and_rewrite() {
    let d = Daemon::start();
    for ctype in ["zlib", "zstd"] {
        let raw = d.path(&format!("{ctype}.raw"));
        let mut data = vec![0u8; 2 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = if i < (1 << 20) { 0x5a } else { (i / 4096) as u8 };
        }
        std::fs::write(&raw, &data).unwrap();
        let img = d.path(&format!("{ctype}.qcow2"));
        let opt = format!("compression_type={ctype}");
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opt,
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let node = format!("c{ctype}");
        add(&d, &node, &img, json!({}));
        io(&d, &node, "read -P 0x5a 0 1M");
        for k in [0u64, 5, 100, 255] {
            io(&d, &node, &format!("read -P {} {} 4k", k as u8, (1 << 20) + k * 4096));
        }
        // Overwriting part of a compressed cluster decompresses the rest into a new one.
        io(&d, &node, "write -P 0x99 70000 100");
        d.ok("blockdev-del", json!({"node-name": node}));
        check_clean(&img);
        qio(&img, &["read -P 0x5a 65536 4464", "read -P 0x99 70000 100", "read -P 0x5a 70100 60972"]);
    }
}

/// qemu-io's `write -c` through `x-debug-io` and through qemu-io itself
/// leave images that read the same and that `qemu-img map` maps the same
/// (compressed where QEMU compressed); both check clean. A device that
/// cannot compress refuses as qemu-io's does.
#[test]
fn compressed_writes_match_qemu_io() {
    let d = Daemon::start();
    let cmds = [
        "write -c -P 0x11 0 256k",
        "write -c 512k 64k",
        "write -P 0x22 70000 100",
        "write -c -P 0x33 1M 128k",
        "discard 1088k 64k",
        "write -c -z 2M 64k",
        "write -c -P 0x44 4032k 64k",
    ];
    let strip = |m: Value| -> Vec<Value> {
        m.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("offset");
                e
            })
            .collect()
    };
    for ctype in ["zlib", "zstd"] {
        let (theirs, ours) = (d.path(&format!("qio-{ctype}.qcow2")), d.path(&format!("ours-{ctype}.qcow2")));
        let opt = format!("compression_type={ctype}");
        create(&theirs, "4M", &opt);
        create(&ours, "4M", &opt);
        qio(&theirs, &cmds);
        let node = format!("w{ctype}");
        // qemu-io passes discards on; a node ignores them by default.
        add(&d, &node, &ours, json!({"discard": "unmap"}));
        for cmd in cmds {
            io(&d, &node, cmd);
        }
        let (_, msg, _) = d.err("x-debug-io", json!({"node-name": node, "command": "write -c 512 64k"}));
        assert!(msg.starts_with("write failed"), "an unaligned compressed write: {msg}");
        d.ok("blockdev-del", json!({"node-name": node}));
        check_clean(&ours);
        qemu_img(&["compare", "-q", "-U", theirs.to_str().unwrap(), ours.to_str().unwrap()]);
        let (want, got) = (strip(qemu_map(&theirs)), strip(qemu_map(&ours)));
        assert_eq!(got, want, "{ctype}: qemu-img map");
        assert!(want.iter().any(|e| e["compressed"] == true), "{want:?}");
    }
    let raw = d.path("plain.raw");
    support::sparse_file(&raw, 4 << 20);
    let qemu = Command::new("qemu-io").args(["-f", "raw", "-c", "write -c 0 64k"]).arg(&raw).output().unwrap();
    let qemu = String::from_utf8_lossy(&qemu.stdout).into_owned() + &String::from_utf8_lossy(&qemu.stderr);
    d.ok("blockdev-add", json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": raw}}));
    let (_, msg, _) = d.err("x-debug-io", json!({"node-name": "r", "command": "write -c 0 64k"}));
    assert_eq!(format!("{msg}\n"), qemu, "a raw node refuses as qemu-io does");
}

#[test]
fn random_operations_match_qemu_io() {
    let ops: usize = std::env::var("SPINDLE_QCOW2_DIFF_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let seed: u64 = std::env::var("SPINDLE_QCOW2_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    eprintln!("differential test: {ops} operations, seed {seed} (SPINDLE_QCOW2_DIFF_OPS / SPINDLE_QCOW2_DIFF_SEED)");
    let d = Daemon::start();
    let size: u64 = 32 << 20;
    for (layout, opts) in
        [("64k", "cluster_size=65536"), ("4k-backing", "cluster_size=4096"), ("v2", "compat=0.10,cluster_size=8192")]
    {
        let mut rng = Rng(seed ^ layout.len() as u64);
        let ours = d.path(&format!("diff-{layout}-spindle.qcow2"));
        let theirs = d.path(&format!("diff-{layout}-qemu.qcow2"));
        let base = d.path(&format!("diff-{layout}-base.qcow2"));
        let opts = if layout == "4k-backing" {
            create(&base, "32M", "");
            qio(&base, &["write -P 0xb0 0 32M"]);
            format!("{opts},backing_file={},backing_fmt=qcow2", base.file_name().unwrap().to_str().unwrap())
        } else {
            opts.to_string()
        };
        create(&ours, "32M", &opts);
        create(&theirs, "32M", &opts);
        let mut cmds = Vec::new();
        for _ in 0..ops {
            let len = match rng.below(4) {
                0 => 1 + rng.below(600),
                1 => 1 + rng.below(70_000),
                2 => 1 + rng.below(300_000),
                _ => 65536 * (1 + rng.below(8)),
            };
            let off = rng.below(size - len);
            let off = if rng.below(2) == 0 { off / 512 * 512 } else { off };
            let cmd = match rng.below(10) {
                0..=5 => format!("write -P {} {off} {len}", 1 + rng.below(250)),
                6 => format!("write -z {off} {len}"),
                7 => format!("write -z -u {off} {len}"),
                _ => format!("discard {} {}", off / 65536 * 65536, (len / 65536 + 1) * 65536),
            };
            cmds.push(cmd);
        }
        let node = format!("diff{}", layout.len());
        add(&d, &node, &ours, json!({"discard": "unmap"}));
        for cmd in &cmds {
            let cmd = match cmd.strip_prefix("discard ") {
                Some(rest) => {
                    // Keep discards inside the disk.
                    let mut it = rest.split(' ').map(|v| v.parse::<u64>().unwrap());
                    let (o, l) = (it.next().unwrap(), it.next().unwrap());
                    format!("discard {o} {}", l.min(size - o))
                }
                None => cmd.clone(),
            };
            io(&d, &node, &cmd);
        }
        d.ok("blockdev-del", json!({"node-name": node}));
        let fixed: Vec<String> = cmds
            .iter()
            .map(|c| match c.strip_prefix("discard ") {
                Some(rest) => {
                    let mut it = rest.split(' ').map(|v| v.parse::<u64>().unwrap());
                    let (o, l) = (it.next().unwrap(), it.next().unwrap());
                    format!("discard {o} {}", l.min(size - o))
                }
                None => c.clone(),
            })
            .collect();
        let refs: Vec<&str> = fixed.iter().map(String::as_str).collect();
        for chunk in refs.chunks(100) {
            qio(&theirs, chunk);
        }
        check_clean(&ours);
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&ours)
            .arg(&theirs)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "layout {layout}, seed {seed}: images differ: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
}

/// Patches bytes of a file.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, at).unwrap();
}

fn add_err(d: &Daemon, path: &Path, extra: Value) -> String {
    let mut opts = json!({"driver": "qcow2", "node-name": "bad", "file": {"driver": "file", "filename": path}});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            opts[k] = v;
        }
    }
    d.err("blockdev-add", opts).1
}

#[test]
fn bad_images_are_refused_with_a_reason() {
    let d = Daemon::start();
    let good = d.path("good.qcow2");
    create(&good, "4M", "");
    let variant = |name: &str, f: &dyn Fn(&Path)| {
        let p = d.path(name);
        std::fs::copy(&good, &p).unwrap();
        f(&p);
        p
    };
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            variant("trunc.qcow2", &|p| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(50).unwrap()),
            "not in qcow2 format",
        ),
        (variant("magic.qcow2", &|p| patch(p, 0, b"QFJ")), "not in qcow2 format"),
        (variant("version.qcow2", &|p| patch(p, 4, &9u32.to_be_bytes())), "version 9"),
        (variant("cbits.qcow2", &|p| patch(p, 20, &40u32.to_be_bytes())), "cluster size"),
        (variant("l1off.qcow2", &|p| patch(p, 40, &(1u64 << 40).to_be_bytes())), "L1 table"),
        (variant("l1size.qcow2", &|p| patch(p, 36, &u32::MAX.to_be_bytes())), "L1 table"),
        (variant("rtoff.qcow2", &|p| patch(p, 48, &0x10001u64.to_be_bytes())), "Reference count table"),
        (variant("hlen.qcow2", &|p| patch(p, 100, &5u32.to_be_bytes())), "header length"),
        (variant("feature.qcow2", &|p| patch(p, 72, &(1u64 << 40).to_be_bytes())), "bit 40"),
    ];
    for (path, want) in cases {
        let msg = add_err(&d, &path, json!({}));
        assert!(msg.contains(want), "{}: expected '{want}' in '{msg}'", path.display());
    }
    // Features Spindle does not implement are named.
    let ext = d.path("ext.qcow2");
    create(&ext, "4M", &format!("data_file={}", d.path("ext.data").display()));
    assert!(add_err(&d, &ext, json!({})).contains("external data file"));
    let el2 = d.path("el2.qcow2");
    create(&el2, "4M", "extended_l2=on");
    assert!(add_err(&d, &el2, json!({})).contains("extended L2"));
    let enc = d.path("enc.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
        ])
        .arg(&enc)
        .arg("4M"));
    assert!(add_err(&d, &enc, json!({})).contains("encrypt"));
    assert_eq!(d.ok("query-named-block-nodes", Value::Null), json!([]));
}

/// Offset of the first L2 table and of the data cluster its entry 0 maps.
fn first_l2_entry(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    let l1_off = u64::from_be_bytes(data[40..48].try_into().unwrap()) as usize;
    let l1e = u64::from_be_bytes(data[l1_off..l1_off + 8].try_into().unwrap());
    l1e & 0x00ff_ffff_ffff_fe00
}

#[test]
fn corrupt_mappings_fail_requests_not_the_daemon() {
    let d = Daemon::start();
    let cases: [(&str, u64); 4] = [
        ("misaligned", 0x8000_0000_0005_0200),
        ("copied-without-cluster", 0x8000_0000_0000_0000),
        ("reserved-bits", 0x8100_0000_0005_0000),
        ("past-eof", 0x8000_00ff_ffff_0000),
    ];
    for (i, (name, entry)) in cases.iter().enumerate() {
        let img = d.path(&format!("cm-{name}.qcow2"));
        create(&img, "4M", "");
        qio(&img, &["write -P 0x11 0 64k"]);
        let l2 = first_l2_entry(&img);
        patch(&img, l2, &entry.to_be_bytes());
        let before = std::fs::read(&img).unwrap();
        let node = format!("cm{i}");
        add(&d, &node, &img, json!({}));
        assert!(d.debug_io(&node, "read 0 4k").is_err(), "{name}: reading a corrupt mapping must fail");
        assert!(
            d.debug_io(&node, "write -P 0x22 0 4k").is_err(),
            "{name}: writing through a corrupt mapping must fail"
        );
        d.ok("blockdev-del", json!({"node-name": node}));
        let mut after = std::fs::read(&img).unwrap();
        assert_eq!(after.len(), before.len(), "{name}: the file did not grow");
        // The one change: the header's corrupt bit, as QEMU sets it.
        assert_eq!(after[79] & 2, 2, "{name}: the image is marked corrupt");
        after[79] &= !2;
        assert!(after == before, "{name}: nothing else was written anywhere");
    }
    d.ok("query-version", Value::Null);
}

#[test]
fn a_dirty_image_gets_its_refcounts_rebuilt() {
    let d = Daemon::start();
    let img = d.path("dirty.qcow2");
    create(&img, "16M", "lazy_refcounts=on");
    // qemu-io's abort leaves the image as a crash would, dirty bit set.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5c 0 4M", "-c", "write -P 0x5d 8M 64k", "-c", "abort"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let header = std::fs::read(&img).unwrap();
    assert_eq!(header[79] & 1, 1, "the dirty bit is set");
    add(&d, "dirty", &img, json!({}));
    io(&d, "dirty", "read -P 0x5c 0 4M");
    io(&d, "dirty", "write -P 0x5e 12M 1M");
    d.ok("blockdev-del", json!({"node-name": "dirty"}));
    let header = std::fs::read(&img).unwrap();
    assert_eq!(header[79] & 1, 0, "the dirty bit is cleared");
    check_clean(&img);
    qio(&img, &["read -P 0x5c 0 4M", "read -P 0x5d 8M 64k", "read -P 0x5e 12M 1M"]);
}

#[test]
fn a_corrupt_image_opens_read_only_only() {
    let d = Daemon::start();
    let img = d.path("corrupt.qcow2");
    create(&img, "4M", "");
    qio(&img, &["write -P 0x31 0 64k"]);
    patch(&img, 72, &2u64.to_be_bytes());
    let msg = add_err(&d, &img, json!({}));
    assert!(msg.contains("corrupt"), "{msg}");
    add(&d, "ro", &img, json!({"read-only": true}));
    io(&d, "ro", "read -P 0x31 0 64k");
}

#[test]
fn clusters_shared_with_a_snapshot_are_copied_on_write() {
    let d = Daemon::start();
    let img = d.path("snap.qcow2");
    create(&img, "8M", "");
    qio(&img, &["write -P 0x11 0 2M"]);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    add(&d, "snap", &img, json!({}));
    io(&d, "snap", "write -P 0x22 1000 70000");
    io(&d, "snap", "write -P 0x23 1M 64k");
    d.ok("blockdev-del", json!({"node-name": "snap"}));
    check_clean(&img);
    qio(&img, &["read -P 0x11 0 1000", "read -P 0x22 1000 70000", "read -P 0x11 71000 977576", "read -P 0x23 1M 64k"]);
    let old = d.path("snap-s1.raw");
    qemu_img(&["convert", "-l", "snapshot.name=s1", "-O", "raw", img.to_str().unwrap(), old.to_str().unwrap()]);
    support::qemu_io(&old, "read -P 0x11 0 2M");
}

#[test]
fn growing_refcount_structures_keep_the_header_intact() {
    // 512-byte clusters: a refcount block covers 128 KiB and the first
    // table 8 MiB, so 24 MiB of writes grow the table several times.
    let d = Daemon::start();
    let base = d.path("grow-base.qcow2");
    create(&base, "32M", "cluster_size=512");
    let img = d.path("grow.qcow2");
    create(&img, "32M", "cluster_size=512,backing_file=grow-base.qcow2,backing_fmt=qcow2");
    add(&d, "grow", &img, json!({}));
    io(&d, "grow", "write -P 0x61 0 24M");
    d.ok("blockdev-del", json!({"node-name": "grow"}));
    check_clean(&img);
    qio(&img, &["read -P 0x61 0 24M"]);
    let info = qemu_img(&["info", img.to_str().unwrap()]);
    assert!(info.contains("backing file: grow-base.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
}

#[test]
fn flushed_writes_survive_a_kill() {
    let d = Daemon::start();
    let img = d.path("crash.qcow2");
    create(&img, "64M", "");
    add(&d, "c", &img, json!({}));
    io(&d, "c", "write -P 0x71 0 8M");
    io(&d, "c", "write -P 0x72 20M 3000");
    io(&d, "c", "flush");
    // Unflushed writes after the flush may or may not survive.
    io(&d, "c", "write -P 0x73 40M 4M");
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let mut d = d;
    let _ = d.wait_exit();
    support::wait_unlocked_dir(d.dir.path());
    // Leaks are allowed after a crash, corruption is not.
    let out = Command::new("qemu-img").args(["check", "--output=json"]).arg(&img).output().unwrap();
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check after a kill: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    qio(&img, &["read -P 0x71 0 8M", "read -P 0x72 20M 3000"]);
}

#[test]
fn backing_can_be_cut_or_given_by_name() {
    let d = Daemon::start();
    let chain = build_chain(d.dir.path(), 2);
    let (base, top) = (&chain[0], &chain[1]);
    // backing: null — the top alone; what the base held reads as zeroes.
    add(&d, "alone", top, json!({"read-only": true, "backing": null}));
    io(&d, "alone", "read -P 0 0 768k");
    io(&d, "alone", "read -P 0x11 1M 768k");
    let m = map(&d, "alone");
    assert_eq!(m[0]["depth"], 0, "no layer below: {m}");
    assert_eq!(
        d.ok("query-named-block-nodes", Value::Null).as_array().unwrap().iter().filter(|n| n["drv"] == "qcow2").count(),
        1
    );
    d.ok("blockdev-del", json!({"node-name": "alone"}));
    // backing: an existing node, which stays after the top goes.
    add(&d, "base", base, json!({"read-only": true}));
    add(&d, "top", top, json!({"read-only": true, "backing": "base"}));
    io(&d, "top", "read -P 0x10 0 768k");
    let (code, msg, _) = d.err("blockdev-del", json!({"node-name": "base"}));
    assert_eq!(code, -16, "{msg}");
    d.ok("blockdev-del", json!({"node-name": "top"}));
    d.ok("blockdev-del", json!({"node-name": "base"}));
}
