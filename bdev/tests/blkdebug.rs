//! The `blkdebug` filter: requests pass through to its image unless a rule
//! matches them; then they fail with the rule's errno and never reach the
//! image.

mod common;

use std::sync::Arc;

use bdev::drivers::blkdebug;
use bdev::{IoError, IoFlags, Node};
use common::{Env, pattern};
use reactor::IoBuf;
use serde_json::{Value, json};

const SIZE: u64 = 4 << 20;

/// A malloc node `m0` and a blkdebug node `d0` over it with `rules`.
fn setup(rules: Value) -> (Env, Arc<Node>, Arc<Node>) {
    let mut env = Env::new();
    let image = env.add(json!({"driver": "malloc", "node-name": "m0", "size": SIZE, "discard": "unmap"}));
    let dbg = env.add(
        json!({"driver": "blkdebug", "node-name": "d0", "image": "m0", "discard": "unmap", "inject-error": rules}),
    );
    (env, image, dbg)
}

async fn write(ch: &bdev::BlockChannel, offset: u64, len: usize, seed: u8) -> Result<(), IoError> {
    ch.write(offset, IoBuf::from_slice(&pattern(offset, len, seed)), IoFlags::NONE).await.1
}

#[test]
fn passes_reads_and_writes_through() {
    let (env, image, dbg) = setup(json!([]));
    assert_eq!(dbg.driver(), "blkdebug");
    assert_eq!(dbg.size(), SIZE);
    assert_eq!(dbg.bdev().block_size(), image.bdev().block_size());
    assert!(!dbg.read_only());
    assert_eq!(dbg.children().len(), 1);
    assert_eq!(dbg.children()[0].0, "image");
    assert!(dbg.describe()["file"].as_str().unwrap().starts_with("json:{\"driver\":\"blkdebug\""));
    env.on(0, &dbg, |ch| async move {
        write(&ch, 4096, 65536, 1).await.unwrap();
        assert!(ch.read(4096, 65536).await.unwrap()[..] == pattern(4096, 65536, 1)[..]);
        ch.write_zeroes(8192, 4096, IoFlags::NONE).await.unwrap();
        ch.flush().await.unwrap();
        assert!(ch.block_status(0, SIZE).await.unwrap().data);
    });
    // The data is in the image.
    env.on(1, &image, |ch| async move {
        let got = ch.read(4096, 65536).await.unwrap();
        assert!(got[..4096] == pattern(4096, 4096, 1)[..]);
        assert!(got[4096..8192].iter().all(|&b| b == 0));
        assert!(got[8192..] == pattern(12288, 65536 - 8192, 1)[..]);
    });
}

#[test]
fn a_read_rule_with_a_sector_fires_only_on_reads_covering_it() {
    let (env, _image, dbg) = setup(json!([{"event": "read_aio", "sector": 8}]));
    env.on(0, &dbg, |ch| async move {
        // Sector 8 is byte 4096.
        assert_eq!(ch.read(4096, 512).await.unwrap_err(), IoError::Io);
        assert_eq!(ch.read(0, 8192).await.unwrap_err(), IoError::Io);
        assert_eq!(ch.read(3584, 1024).await.unwrap_err(), IoError::Io);
        ch.read(0, 4096).await.unwrap();
        ch.read(4608, 4096).await.unwrap();
        // Writes covering it are not reads.
        write(&ch, 4096, 512, 2).await.unwrap();
        // Not once: it keeps firing.
        assert_eq!(ch.read(4096, 512).await.unwrap_err(), IoError::Io);
    });
    // The rules are the node's, on every reactor.
    env.on(1, &dbg, |ch| async move { assert_eq!(ch.read(4096, 512).await.unwrap_err(), IoError::Io) });
}

#[test]
fn a_once_rule_fires_exactly_once_across_reactors() {
    let (env, _image, dbg) = setup(json!([{"event": "write_aio", "once": true}]));
    env.on(1, &dbg, |ch| async move {
        ch.read(0, 4096).await.unwrap();
        assert_eq!(write(&ch, 0, 4096, 3).await.unwrap_err(), IoError::Io);
    });
    env.on(0, &dbg, |ch| async move {
        write(&ch, 0, 4096, 3).await.unwrap();
        write(&ch, 0, 4096, 4).await.unwrap();
    });
}

#[test]
fn errno_28_surfaces_as_enospc_and_the_image_is_untouched() {
    let (env, image, dbg) = setup(json!([{"event": "write_aio", "errno": 28, "sector": 16}]));
    env.on(0, &dbg, |ch| async move {
        let err = write(&ch, 8192, 4096, 5).await.unwrap_err();
        assert_eq!(err, IoError::NoSpace);
        assert_eq!(err.errno(), libc::ENOSPC);
        write(&ch, 0, 4096, 5).await.unwrap();
    });
    env.on(0, &image, |ch| async move {
        assert!(ch.read(8192, 4096).await.unwrap().iter().all(|&b| b == 0), "failed write reached the image");
        assert!(ch.read(0, 4096).await.unwrap()[..] == pattern(0, 4096, 5)[..]);
    });
}

#[test]
fn iotype_selects_discard_flush_and_block_status() {
    let (env, image, dbg) = setup(json!([
        {"event": "none", "iotype": "discard", "errno": 95},
        {"event": "flush_to_disk"},
    ]));
    env.on(0, &image, |ch| async move { write(&ch, 0, 65536, 6).await.unwrap() });
    env.on(0, &dbg, |ch| async move {
        assert_eq!(ch.discard(0, 65536).await.unwrap_err(), IoError::NotSupported);
        assert_eq!(ch.flush().await.unwrap_err(), IoError::Io);
        // Other request types and block status pass.
        write(&ch, 65536, 4096, 7).await.unwrap();
        ch.write_zeroes(69632, 4096, IoFlags::NONE).await.unwrap();
        assert!(ch.block_status(0, 65536).await.unwrap().data);
        assert!(ch.read(0, 65536).await.unwrap()[..] == pattern(0, 65536, 6)[..], "failed discard reached the image");
    });
    blkdebug::set_rules(&dbg, json!([{"event": "none", "iotype": "block-status", "errno": 5}])).unwrap();
    env.on(1, &dbg, |ch| async move {
        assert_eq!(ch.block_status(0, 4096).await.unwrap_err(), IoError::Io);
        ch.flush().await.unwrap();
        ch.discard(0, 4096).await.unwrap();
        ch.read(0, 4096).await.unwrap();
    });
}

#[test]
fn events_without_a_request_type_fail_every_request_but_block_status() {
    let (env, _image, dbg) = setup(json!([{"event": "l2_load"}]));
    env.on(0, &dbg, |ch| async move {
        assert_eq!(ch.read(0, 512).await.unwrap_err(), IoError::Io);
        assert_eq!(write(&ch, 0, 512, 8).await.unwrap_err(), IoError::Io);
        assert_eq!(ch.write_zeroes(0, 512, IoFlags::NONE).await.unwrap_err(), IoError::Io);
        assert_eq!(ch.discard(0, 512).await.unwrap_err(), IoError::Io);
        assert_eq!(ch.flush().await.unwrap_err(), IoError::Io);
        ch.block_status(0, 512).await.unwrap();
    });
}

#[test]
fn rules_for_other_states_never_fire() {
    let (env, _image, dbg) = setup(json!([{"event": "read_aio", "state": 2}, {"event": "write_aio", "state": 1}]));
    env.on(0, &dbg, |ch| async move {
        ch.read(0, 512).await.unwrap();
        assert_eq!(write(&ch, 0, 512, 9).await.unwrap_err(), IoError::Io);
    });
}

#[test]
fn set_rules_replaces_and_clears_the_rules() {
    let (env, image, dbg) = setup(json!([{"event": "read_aio"}]));
    env.on(0, &dbg, |ch| async move { assert_eq!(ch.read(0, 512).await.unwrap_err(), IoError::Io) });
    blkdebug::set_rules(&dbg, json!([{"event": "write_aio", "errno": 28}])).unwrap();
    env.on(0, &dbg, |ch| async move {
        ch.read(0, 512).await.unwrap();
        assert_eq!(write(&ch, 0, 512, 10).await.unwrap_err(), IoError::NoSpace);
    });
    blkdebug::set_rules(&dbg, json!([])).unwrap();
    env.on(1, &dbg, |ch| async move { write(&ch, 0, 512, 10).await.unwrap() });
    // Bad rules leave the old ones in place.
    let err = blkdebug::set_rules(&dbg, json!([{"event": "bogus"}])).unwrap_err();
    assert_eq!(err.to_string(), "Parameter 'event' does not accept value 'bogus'");
    let err = blkdebug::set_rules(&image, json!([])).unwrap_err();
    assert_eq!(err.to_string(), "Node 'm0' is not a blkdebug node (driver 'malloc')");
}

#[test]
fn an_unknown_event_is_a_clear_error() {
    let mut env = Env::new();
    let err = env
        .graph
        .add(json!({"driver": "blkdebug", "node-name": "d0", "image": {"driver": "malloc", "size": SIZE},
            "inject-error": [{"event": "read_aoi"}]}))
        .unwrap_err();
    assert_eq!(err.to_string(), "Parameter 'event' does not accept value 'read_aoi'");
    // Nothing was left behind.
    assert!(env.graph.is_empty());
}

#[test]
fn options_qemu_accepts_open_and_config_files_are_refused() {
    let mut env = Env::new();
    env.add(json!({"driver": "blkdebug", "node-name": "d0", "image": {"driver": "null-co"},
        "align": 4096, "max-transfer": 65536, "opt-write-zero": 0, "max-write-zero": 0, "opt-discard": 0,
        "max-discard": 0, "set-state": [{"event": "l2_load", "new_state": 2}],
        "inject-error": [{"event": "read_aio", "state": 1, "errno": 5, "sector": -1, "once": false, "immediately": true}]}));
    let err = env
        .graph
        .add(json!({"driver": "blkdebug", "node-name": "d1", "image": "d0", "config": "/etc/blkdebug.conf"}))
        .unwrap_err();
    assert!(matches!(err, bdev::BdevError::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("'config'"), "{err}");
    let err = env.graph.add(json!({"driver": "blkdebug", "node-name": "d2"})).unwrap_err();
    assert_eq!(err.to_string(), "Parameter 'image' is missing");
    let err = env.graph.add(json!({"driver": "blkdebug", "node-name": "d3", "image": "d0", "x": 1})).unwrap_err();
    assert_eq!(err.to_string(), "Parameter 'x' is unexpected");
}

#[test]
fn read_only_nodes_refuse_writes() {
    let mut env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![0u8; 65536]).unwrap();
    env.add(json!({"driver": "file", "node-name": "f0", "filename": path.to_str().unwrap(), "read-only": true}));
    // Writing needs a writable image, as in QEMU.
    let err = env.graph.add(json!({"driver": "blkdebug", "node-name": "d0", "image": "f0"})).unwrap_err();
    assert_eq!(err.to_string(), "Node 'f0' is read-only; node 'd0' (image child) needs write access");
    let over_ro = env.add(json!({"driver": "blkdebug", "node-name": "d0", "image": "f0", "read-only": true}));
    assert!(over_ro.read_only());
    assert!(over_ro.describe()["file"].as_str().unwrap().starts_with("blkdebug::"));
    env.add(json!({"driver": "malloc", "node-name": "m0", "size": 65536}));
    let ro = env.add(json!({"driver": "blkdebug", "node-name": "d1", "image": "m0", "read-only": true}));
    env.on(0, &ro, |ch| async move {
        assert_eq!(write(&ch, 0, 512, 11).await.unwrap_err(), IoError::ReadOnly);
        ch.read(0, 512).await.unwrap();
    });
}
