//! Changing the graph under running I/O: backends moving to another root,
//! qcow2 images re-pointed to another backing node, and copy-on-read fills.

mod common;

use std::process::Command;
use std::sync::Arc;

use bdev::{Access, Backend, IoFlags};
use common::{Env, pattern};
use reactor::IoBuf;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn qemu_io(img: &str, cmd: &str) {
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, img]).output().expect("qemu-io runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail") && !text.contains("error"), "qemu-io {cmd}: {text}");
}

#[test]
fn a_backend_moves_to_a_new_root_and_drains_the_old_one() {
    let mut env = Env::new();
    let a = env.add(json!({"driver": "malloc", "node-name": "a", "size": 4 * MIB}));
    let b = env.add(json!({"driver": "malloc", "node-name": "b", "size": 4 * MIB}));
    let backend = Backend::new(&a, "export 'e'", Access::Write).unwrap();
    assert_eq!(a.users().len(), 1);
    assert!(a.holders().contains(&"export 'e'".to_string()));

    // Write through the backend, on a reactor other than the main one.
    let be = Arc::clone(&backend);
    let write = |be: Arc<Backend>, seed: u8| async move {
        let ch = be.channel().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        struct Cb(std::sync::mpsc::Sender<Result<(), bdev::IoError>>);
        impl bdev::IoDone for Cb {
            fn io_done(&self, _tag: u64, _io: bdev::Io, res: Result<(), bdev::IoError>) {
                self.0.send(res).unwrap();
            }
        }
        let done = bdev::Done::new(std::rc::Rc::new(Cb(tx)), 0);
        ch.submit(bdev::Io::write(0, IoBuf::from_slice(&pattern(0, 4096, seed)), IoFlags::NONE), done);
        reactor::sleep(std::time::Duration::from_millis(5)).await;
        rx.try_recv().unwrap()
    };
    env.reactors.handles()[1].run(move || write(be, 1)).wait().unwrap().unwrap();
    let old = backend.replace_root(&b).unwrap();
    backend.wait_drained(old, std::time::Instant::now() + bdev::DRAIN_WAIT_MAX).unwrap();
    assert_eq!(backend.root().name(), "b");
    assert!(a.users().is_empty() && a.holders().is_empty(), "the old root is released");
    assert_eq!(b.users().len(), 1);
    let be = Arc::clone(&backend);
    env.reactors.handles()[1].run(move || write(be, 2)).wait().unwrap().unwrap();
    let got_a = env.on(0, &a, |ch| async move { ch.read(0, 4096).await.unwrap() });
    let got_b = env.on(0, &b, |ch| async move { ch.read(0, 4096).await.unwrap() });
    assert_eq!(&got_a[..], &pattern(0, 4096, 1)[..]);
    assert_eq!(&got_b[..], &pattern(0, 4096, 2)[..]);

    // A conflicting claim leaves the backend where it was.
    let _job = a.claim("job 'j'", Access::ExclusiveWrite).unwrap();
    assert!(backend.replace_root(&a).is_err());
    assert_eq!(backend.root().name(), "b");
    drop(backend);
    assert!(b.holders().is_empty());
}

#[test]
fn waiting_for_a_request_that_never_completes_gives_up() {
    let mut env = Env::new();
    env.add(json!({"driver": "malloc", "node-name": "m", "size": 4 * MIB}));
    // Writes take an hour: one in flight will not finish during the test.
    let slow =
        env.add(json!({"driver": "delay", "node-name": "slow", "file": "m", "write-latency-ns": 3_600_000_000_000u64}));
    let other = env.add(json!({"driver": "malloc", "node-name": "o", "size": 4 * MIB}));
    let backend = Backend::new(&slow, "export 'e'", Access::Write).unwrap();
    let be = Arc::clone(&backend);
    env.reactors.handles()[1]
        .run(move || async move {
            let ch = be.channel().unwrap();
            struct Never;
            impl bdev::IoDone for Never {
                fn io_done(&self, _tag: u64, _io: bdev::Io, _res: Result<(), bdev::IoError>) {}
            }
            let done = bdev::Done::new(std::rc::Rc::new(Never), 0);
            ch.submit(bdev::Io::write(0, IoBuf::zeroed(4096), IoFlags::NONE), done);
        })
        .wait()
        .unwrap();
    let old = backend.replace_root(&other).unwrap();
    let t0 = std::time::Instant::now();
    let e = backend.wait_drained(old, t0 + std::time::Duration::from_millis(200)).unwrap_err();
    assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the wait ends at its deadline");
    assert_eq!(e.to_string(), "requests of export 'e' did not finish within 30 s");
    // New requests go to the new root meanwhile.
    assert_eq!(backend.root().name(), "o");
}

#[test]
fn a_qcow2_image_is_repointed_to_another_backing_node() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "4M"]);
    qemu_io(&base, "write -P 0x11 0 4M");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid]);
    qemu_io(&mid, "write -P 0x22 1M 1M");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top]);
    {
        let mut env = Env::new();
        let top_node = env.add(json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top}}));
        let mid_node = top_node.children().into_iter().find(|(r, _)| *r == "backing").unwrap().1;
        let base_node = mid_node.children().into_iter().find(|(r, _)| *r == "backing").unwrap().1;
        // Make base hold what mid holds (what a commit does), then skip mid.
        let data = env.on(0, &mid_node, |ch| async move { ch.read(MIB, MIB as usize).await.unwrap() });
        assert!(data.iter().all(|&b| b == 0x22));
        // A second read-write open of the image in use is refused, a twin is not.
        let rw = json!({"driver": "qcow2", "node-name": "base-rw", "file": {"driver": "file", "filename": base}});
        let e = env.graph.add(rw.clone()).unwrap_err().to_string();
        assert_eq!(e, "Failed to get \"write\" lock");
        let base_rw = env.graph.add_twin(&base_node, rw).unwrap();
        env.on(0, &base_rw, move |ch| async move { ch.write(MIB, data, IoFlags::NONE).await.1.unwrap() });
        env.graph.change_backing(&top_node, Some(&base_rw), Some(&base), Some("qcow2")).unwrap();
        let names: Vec<String> = env.graph.nodes().map(|n| n.name().to_string()).collect();
        assert!(!names.contains(&mid_node.name().to_string()), "mid left the graph: {names:?}");
        assert!(!names.contains(&base_node.name().to_string()), "so did the read-only base: {names:?}");
        let got = env.on(1, &top_node, |ch| async move { ch.read(MIB, MIB as usize).await.unwrap() });
        assert!(got.iter().all(|&b| b == 0x22));
        // And to no backing at all: the image reads zeroes where it holds nothing.
        env.graph.change_backing(&top_node, None, None, None).unwrap();
        let got = env.on(0, &top_node, |ch| async move { ch.read(0, 4096).await.unwrap() });
        assert!(got.iter().all(|&b| b == 0));
    }
    let info = Command::new("qemu-img").args(["info", "--output=json", &top]).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_img(&["check", "-q", &top]);
}

#[test]
fn fill_writes_only_where_the_top_holds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (base, top) = (p("base.qcow2"), p("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "4M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", &base, "-F", "qcow2", &top]);
    qemu_io(&top, "write -P 0x33 64k 64k");
    qemu_io(&top, "write -z 192k 64k");
    {
        let mut env = Env::new();
        let node = env.add(json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top}}));
        env.on(0, &node, |ch| async move {
            let buf = IoBuf::from_slice(&[0x44u8; 256 << 10]);
            ch.write(0, buf, IoFlags::FILL_UNALLOCATED).await.1.unwrap();
        });
    }
    // Clusters 0 and 2 were filled; 1 (data) and 3 (zero) kept theirs.
    qemu_io(&top, "read -P 0x44 0 64k");
    qemu_io(&top, "read -P 0x33 64k 64k");
    qemu_io(&top, "read -P 0x44 128k 64k");
    qemu_io(&top, "read -P 0 192k 64k");
    qemu_img(&["check", "-q", &top]);
}

#[test]
fn created_images_pass_qemu_img_check_and_take_writes() {
    use bdev::drivers::qcow2::create::{CreateOptions, create};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let img = dir.path().join("new.qcow2");
    for (size, cluster) in [(64 * MIB, None), (3 * MIB + 512, Some(4096)), (1 << 40, Some(2 << 20)), (0, None)] {
        create(&img, &CreateOptions { size, cluster_size: cluster, ..Default::default() }).unwrap();
        qemu_img(&["check", "-q", img.to_str().unwrap()]);
        let info = Command::new("qemu-img").args(["info", "--output=json", img.to_str().unwrap()]).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], size);
        assert_eq!(info["cluster-size"], cluster.unwrap_or(65536));
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    }
    create(&base, &CreateOptions { size: 4 * MIB, ..Default::default() }).unwrap();
    qemu_io(base.to_str().unwrap(), "write -P 0x5 0 4M");
    let opts = CreateOptions {
        size: 4 * MIB,
        backing_file: Some(base.to_str().unwrap().into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    create(&img, &opts).unwrap();
    qemu_io(img.to_str().unwrap(), "read -P 0x5 0 4M");
    qemu_io(img.to_str().unwrap(), "write -P 0x6 1M 1M");
    qemu_img(&["check", "-q", img.to_str().unwrap()]);
    assert!(create(&img, &CreateOptions { size: 1000, ..Default::default() }).is_err());
    assert!(create(&img, &CreateOptions { size: 4096, cluster_size: Some(3000), ..Default::default() }).is_err());
}

#[test]
fn direct_io_on_a_file_whose_size_is_not_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    let data = pattern(0, 100_000, 7);
    std::fs::write(&path, &data).unwrap();
    let mut env = Env::new();
    let node = env.add(json!({"driver": "file", "node-name": "odd", "filename": path.to_str().unwrap(),
        "cache": {"direct": true}}));
    if node.describe()["cache"]["direct"] != json!(true) {
        return; // the file system has no O_DIRECT
    }
    assert_eq!(node.size(), 100_000);
    let tail = env.on(1, &node, |ch| async move { ch.read(99_000, 1000).await.unwrap() });
    assert_eq!(&tail[..], &data[99_000..]);
    env.on(0, &node, |ch| async move {
        ch.write(98_500, IoBuf::from_slice(&[0xee; 1500]), IoFlags::NONE).await.1.unwrap();
    });
    let got = env.on(1, &node, |ch| async move { ch.read(98_000, 2000).await.unwrap() });
    assert_eq!(&got[..500], &data[98_000..98_500]);
    assert!(got[500..].iter().all(|&b| b == 0xee));
}

/// A scratch directory on tmpfs, where the machine has one.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    let on_tmpfs = nix::sys::statfs::statfs(shm).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    on_tmpfs.then(|| tempfile::tempdir_in(shm).unwrap())
}

/// Reads `count` pieces of `len` bytes from offset 0 on, all in flight at
/// once, and returns them in order.
async fn read_at_once(ch: bdev::BlockChannel, count: u64, len: usize) -> Vec<u8> {
    let reads: Vec<_> = (0..count).map(|i| ch.submit_io(bdev::Io::read(i * len as u64, IoBuf::new(len)))).collect();
    let mut out = Vec::new();
    for r in reads {
        let (io, res) = r.await;
        res.unwrap();
        out.extend_from_slice(&io.buf.unwrap());
    }
    out
}

/// A file on tmpfs: buffered unless O_DIRECT is asked for (its data is in
/// memory either way), and reads — sent straight to the kernel's workers
/// there — return the right data with many in flight at once.
#[test]
fn files_on_tmpfs_are_buffered_by_default_and_read_back_under_load() {
    let Some(dir) = tmpfs_dir() else {
        return; // no tmpfs on this machine
    };
    let path = dir.path().join("mem.img");
    let data = pattern(0, 4 << 20, 9);
    std::fs::write(&path, &data).unwrap();
    let mut env = Env::new();
    let auto = env.add(json!({"driver": "file", "node-name": "auto", "filename": path.to_str().unwrap()}));
    assert_eq!(auto.describe()["cache"]["direct"], json!(false), "auto mode on tmpfs stays buffered");
    let forced = env.add(json!({"driver": "file", "node-name": "forced", "filename": path.to_str().unwrap(),
        "read-only": true, "cache": {"direct": true}}));
    // Newer kernels accept O_DIRECT on tmpfs; where one does, asking for it gets it.
    let direct = forced.describe()["cache"]["direct"].as_bool().unwrap();
    for node in [auto, forced] {
        let got = env.on(1, &node, |ch| read_at_once(ch, 64, 65536));
        assert_eq!(got, data, "direct={direct}");
    }
}

/// Large reads and writes of files on tmpfs are memory copies; they run on
/// the offload threads, which may use every core (kernel workers would be
/// pinned to the submitting reactor's core). Data and FUA writes behave as
/// on the ring, with many requests to one file in flight.
#[test]
fn large_tmpfs_copies_run_on_unpinned_threads_and_keep_their_data() {
    let Some(dir) = tmpfs_dir() else {
        return; // no tmpfs on this machine
    };
    let mut env = Env::new();
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let path = dir.path().join(format!("{name}.img"));
        std::fs::File::create(&path).unwrap().set_len(8 * MIB).unwrap();
        nodes.push(env.add(json!({"driver": "file", "node-name": name, "filename": path.to_str().unwrap()})));
    }
    for (seed, node) in nodes.iter().enumerate() {
        let data = pattern(0, 8 * MIB as usize, seed as u8 + 20);
        let written = data.clone();
        let got = env.on(1, node, |ch| async move {
            // Many 1 MiB writes in flight to one file, every other one FUA.
            let writes: Vec<_> = (0..8u64)
                .map(|i| {
                    let mut buf = IoBuf::new(MIB as usize);
                    buf.copy_from_slice(&written[(i * MIB) as usize..((i + 1) * MIB) as usize]);
                    let flags = if i % 2 == 0 { IoFlags::FUA } else { IoFlags::NONE };
                    ch.submit_io(bdev::Io::write(i * MIB, buf, flags))
                })
                .collect();
            for w in writes {
                w.await.1.unwrap();
            }
            read_at_once(ch, 8, MIB as usize).await
        });
        assert_eq!(got, data, "file {seed}");
    }
    let process = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = |status: &str| status.lines().find(|l| l.starts_with("Cpus_allowed_list")).map(str::to_owned);
    let mut offload = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.starts_with("offload-") {
            offload += 1;
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            assert_eq!(allowed(&status), allowed(&process), "offload threads may run on every core of the process");
        }
    }
    assert!(offload > 0, "large tmpfs copies went to the offload threads");
}

/// Allocating writes to a qcow2 on a plain O_DIRECT file grow the file
/// ahead of the allocator, preallocated, so data writes land inside the
/// file instead of each extending it; a buffered file is not grown ahead.
/// Either way the image stays clean for qemu-img and reads back.
#[test]
fn qcow2_grows_its_file_ahead_of_allocating_writes() {
    use bdev::drivers::qcow2::create::{CreateOptions, create};
    // On the build's disk, where O_DIRECT works (not a tmpfs /tmp).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for direct in [true, false] {
        let img = dir.path().join(format!("grow-{direct}.qcow2"));
        create(&img, &CreateOptions { size: 256 * MIB, ..Default::default() }).unwrap();
        let before = std::fs::metadata(&img).unwrap().len();
        let mut env = Env::new();
        let node = env.add(json!({"driver": "qcow2", "node-name": "g",
            "file": {"driver": "file", "filename": img.to_str().unwrap(), "cache": {"direct": direct}}}));
        env.on(0, &node, |ch| async move {
            ch.write(0, IoBuf::from_slice(&pattern(0, MIB as usize, 4)), IoFlags::NONE).await.1.unwrap();
            ch.flush().await.unwrap();
        });
        let len = std::fs::metadata(&img).unwrap().len();
        if direct {
            assert!(len >= 32 * MIB && before < MIB, "file {before} -> {len} bytes: not grown ahead");
        } else {
            // Buffered writes extending the file cost nothing extra: no zeroing ahead.
            assert!(len < 4 * MIB, "buffered file {before} -> {len} bytes: grown ahead");
        }
        let got = env.on(1, &node, |ch| async move { ch.read(0, MIB as usize).await.unwrap() });
        assert_eq!(&got[..], &pattern(0, MIB as usize, 4)[..]);
        drop(node);
        env.graph.close_all();
        qemu_img(&["check", "-q", img.to_str().unwrap()]);
    }
}
