//! The node graph: blockdev-add/-del semantics, claims, implicit children,
//! save_config and query output, with QEMU's error wording.

mod common;

use bdev::{Access, BdevError};
use common::Env;
use serde_json::json;

fn img(dir: &tempfile::TempDir, name: &str, size: u64) -> String {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p.to_str().unwrap().to_string()
}

fn err(env: &mut Env, opts: serde_json::Value) -> String {
    env.graph.add(opts).unwrap_err().to_string()
}

#[test]
fn add_errors_use_qemu_wording() {
    let dir = tempfile::tempdir().unwrap();
    let f = img(&dir, "a.img", 1 << 20);
    let mut env = Env::new();
    env.add(json!({"driver": "file", "node-name": "f0", "filename": f}));
    assert_eq!(
        err(&mut env, json!({"driver": "file", "node-name": "f0", "filename": f})),
        "Duplicate nodes with node-name='f0'"
    );
    assert_eq!(err(&mut env, json!({"driver": "file", "node-name": "f1"})), "Parameter 'filename' is missing");
    assert_eq!(
        err(&mut env, json!({"driver": "file", "node-name": "f1", "filename": f, "bogus": 1})),
        "Parameter 'bogus' is unexpected"
    );
    assert_eq!(
        err(&mut env, json!({"driver": "file", "node-name": "1bad", "filename": f})),
        "Invalid node-name: '1bad'"
    );
    assert_eq!(
        err(&mut env, json!({"driver": "nosuch", "node-name": "x"})),
        "Parameter 'driver' does not accept value 'nosuch'"
    );
    assert_eq!(err(&mut env, json!({"node-name": "x"})), "Parameter 'driver' is missing");
    assert_eq!(
        err(&mut env, json!({"driver": "null-co", "node-name": "n1", "size": "big"})),
        "Invalid parameter type for 'size', expected: integer"
    );
    assert_eq!(err(&mut env, json!({"driver": "null-co"})), "'node-name' must be specified for the root node");
    let missing = dir.path().join("nope.img");
    assert_eq!(
        err(&mut env, json!({"driver": "file", "node-name": "f2", "filename": missing})),
        format!("Could not open '{}': No such file or directory (os error 2)", missing.display())
    );
    assert_eq!(
        err(&mut env, json!({"driver": "malloc", "node-name": "m", "size": 1000})),
        "size 1000 must be a non-zero multiple of the block size 512"
    );
    assert_eq!(
        err(&mut env, json!({"driver": "file", "node-name": "f3", "filename": f, "locking": "maybe"})),
        "Parameter 'locking' does not accept value 'maybe'"
    );
    assert_eq!(
        err(&mut env, json!({"driver": "file", "node-name": "f3", "filename": f, "force-share": true})),
        "force-share=on can only be used with read-only images"
    );
    // Nothing half-made survives a failed add.
    assert_eq!(env.graph.len(), 1);
}

#[test]
fn inline_children_are_implicit_and_go_with_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let f = img(&dir, "a.img", 1 << 20);
    let mut env = Env::new();
    let raw = env.add(json!({"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": f}}));
    let child = raw.children()[0].1.clone();
    assert!(child.is_implicit());
    assert!(child.name().starts_with("#block"));
    assert_eq!(env.graph.len(), 2);
    let e = env.graph.remove(child.name()).unwrap_err().to_string();
    assert!(e.contains("created implicitly"), "{e}");
    drop(child);
    env.graph.remove("r0").unwrap();
    assert!(env.graph.is_empty(), "implicit child must be deleted with its parent");
}

#[test]
fn a_failed_parent_rolls_back_its_inline_children() {
    let dir = tempfile::tempdir().unwrap();
    let f = img(&dir, "a.img", 1 << 20);
    let mut env = Env::new();
    let e = err(
        &mut env,
        json!({"driver": "raw", "node-name": "r0", "size": 2 << 20, "file": {"driver": "file", "filename": f}}),
    );
    assert!(e.contains("has to be smaller or equal"), "{e}");
    assert!(env.graph.is_empty());
}

#[test]
fn nodes_in_use_cannot_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let f = img(&dir, "a.img", 1 << 20);
    let mut env = Env::new();
    env.add(json!({"driver": "file", "node-name": "f0", "filename": f}));
    env.add(json!({"driver": "raw", "node-name": "r0", "file": "f0"}));
    match env.graph.remove("f0").unwrap_err() {
        BdevError::InUse { name, holders } => {
            assert_eq!(name, "f0");
            assert_eq!(holders, "node 'r0' (file child)");
        }
        other => panic!("unexpected {other}"),
    }
    let r0 = env.graph.get("r0").unwrap();
    let claim = r0.claim("export 'e0'", Access::Write).unwrap();
    assert_eq!(env.graph.remove("r0").unwrap_err().to_string(), "Node 'r0' is in use by export 'e0'");
    drop(claim);
    drop(r0);
    env.graph.remove("r0").unwrap();
    // The explicit child stays, now free.
    env.graph.remove("f0").unwrap();
    assert_eq!(env.graph.remove("f0").unwrap_err().to_string(), "Failed to find node with node-name='f0'");
}

#[test]
fn claims_enforce_exclusive_writers_and_read_only() {
    let mut env = Env::new();
    let m = env.add(json!({"driver": "malloc", "node-name": "m", "size": 1 << 20}));
    let r1 = m.claim("export 'a'", Access::Read).unwrap();
    let w1 = m.claim("export 'b'", Access::Write).unwrap();
    let w2 = m.claim("export 'c'", Access::Write).unwrap();
    let e = m.claim("job 'j'", Access::ExclusiveWrite).unwrap_err().to_string();
    assert_eq!(
        e,
        "Permission conflict on node 'm': permissions 'consistent read' are both required by export 'a' \
         and unshared by job 'j'."
    );
    drop((w1, w2, r1));
    // An exclusive writer lets nobody else read or write.
    let x = m.claim("job 'j'", Access::ExclusiveWrite).unwrap();
    assert_eq!(
        m.claim("export 'd'", Access::Write).unwrap_err().to_string(),
        "Permission conflict on node 'm': permissions 'consistent read, write' are both required by export 'd' \
         and unshared by job 'j'."
    );
    assert!(m.claim("export 'e'", Access::Read).is_err());
    drop(x);
    assert!(m.holders().is_empty());

    let dir = tempfile::tempdir().unwrap();
    let f = img(&dir, "ro.img", 1 << 20);
    let ro = env.add(json!({"driver": "file", "node-name": "ro", "filename": f, "read-only": true}));
    assert_eq!(
        ro.claim("export 'w'", Access::Write).unwrap_err().to_string(),
        "Node 'ro' is read-only; export 'w' needs write access"
    );
    // A writable raw cannot sit on a read-only file node.
    let e = err(&mut env, json!({"driver": "raw", "node-name": "r", "file": "ro"}));
    assert!(e.contains("read-only"), "{e}");
    env.add(json!({"driver": "raw", "node-name": "r", "file": "ro", "read-only": true}));
}

#[test]
fn describe_and_save_config() {
    let dir = tempfile::tempdir().unwrap();
    let f = img(&dir, "a.img", 1 << 20);
    let mut env = Env::new();
    env.add(json!({"driver": "file", "node-name": "f0", "filename": f, "cache": {"direct": false}}));
    env.add(json!({"driver": "null-co", "node-name": "n0", "size": 1048576}));
    env.add(json!({"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": f}}));
    let d = env.graph.describe();
    let names: Vec<_> = d.iter().map(|n| n["node-name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names[0], "r0", "newest first");
    assert_eq!(names.len(), 4);
    let f0 = d.iter().find(|n| n["node-name"] == "f0").unwrap();
    assert_eq!(f0["drv"], "file");
    assert_eq!(f0["ro"], false);
    assert_eq!(f0["file"], json!(f));
    assert_eq!(f0["image"]["virtual-size"], 1 << 20);
    assert_eq!(f0["image"]["format"], "file");
    assert_eq!(f0["cache"]["direct"], false);
    let n0 = d.iter().find(|n| n["node-name"] == "n0").unwrap();
    assert_eq!(n0["file"], r#"json:{"driver":"null-co","size":1048576}"#);
    let cfg = env.graph.save_config();
    assert_eq!(cfg.len(), 3, "implicit nodes are part of their parent's options");
    assert_eq!(cfg[0]["method"], "blockdev-add");
    assert_eq!(cfg[2]["params"]["node-name"], "r0");

    // Replaying the config rebuilds the same graph.
    let mut env2 = Env::new();
    for entry in cfg {
        env2.graph.add(entry["params"].clone()).unwrap();
    }
    let names2: Vec<_> = env2.graph.describe().iter().map(|n| n["node-name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names2.len(), names.len());
}

#[test]
fn deleting_flushes_data_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = img(&dir, "a.img", 1 << 20);
    let mut env = Env::new();
    let node = env.add(json!({"driver": "file", "node-name": "f0", "filename": f}));
    env.on(0, &node, |ch| async move {
        let (_, res) = ch.write(4096, reactor::IoBuf::from_slice(&[0xabu8; 4096]), bdev::IoFlags::NONE).await;
        res.unwrap();
    });
    drop(node);
    env.graph.remove("f0").unwrap();
    let data = std::fs::read(&f).unwrap();
    assert!(data[4096..8192].iter().all(|&b| b == 0xab));
}
