//! The `delay` filter: data passes through unchanged, and every completion
//! arrives no sooner than its request type's latency after the child's.
//! Only lower bounds are checked: a loaded machine can make a request
//! slower, never faster.

mod common;

use std::time::{Duration, Instant};

use bdev::IoFlags;
use common::{Env, pattern};
use reactor::IoBuf;
use serde_json::json;

const SIZE: u64 = 4 << 20;
const READ_LATENCY: Duration = Duration::from_millis(30);
const FLUSH_LATENCY: Duration = Duration::from_millis(50);

#[test]
fn data_passes_through_and_each_type_waits_its_latency() {
    let mut env = Env::new();
    env.add(json!({"driver": "malloc", "node-name": "m0", "size": SIZE}));
    let slow = env.add(json!({"driver": "delay", "node-name": "d0", "file": "m0",
                              "read-latency-ns": READ_LATENCY.as_nanos() as u64,
                              "flush-latency-ns": FLUSH_LATENCY.as_nanos() as u64}));
    assert_eq!(slow.driver(), "delay");
    assert_eq!(slow.size(), SIZE);
    let desc = slow.describe()["file"].as_str().unwrap().to_string();
    assert!(desc.contains("\"read-latency-ns\":30000000") && desc.contains("\"write-latency-ns\":0"), "{desc}");
    let (read_took, flush_took, data) = env.on(1, &slow, |ch| async move {
        ch.write(8192, IoBuf::from_slice(&pattern(8192, 65536, 7)), IoFlags::FUA).await.1.unwrap();
        let t = Instant::now();
        let data = ch.read(8192, 65536).await.unwrap();
        let read_took = t.elapsed();
        let t = Instant::now();
        ch.flush().await.unwrap();
        (read_took, t.elapsed(), data.to_vec())
    });
    assert_eq!(data, pattern(8192, 65536, 7));
    assert!(read_took >= READ_LATENCY, "a read took {read_took:?}");
    assert!(flush_took >= FLUSH_LATENCY, "a flush took {flush_took:?}");
}

#[test]
fn many_requests_in_flight_all_complete_after_the_latency() {
    let mut env = Env::new();
    env.add(json!({"driver": "malloc", "node-name": "m0", "size": SIZE}));
    let slow = env.add(json!({"driver": "delay", "node-name": "d0", "file": "m0", "latency-ns": 20_000_000}));
    let (took, ok) = env.on(0, &slow, |ch| async move {
        let t = Instant::now();
        let writes: Vec<_> = (0..64u64)
            .map(|i| {
                let buf = IoBuf::from_slice(&pattern(i * 4096, 4096, 3));
                ch.submit_io(bdev::Io::write(i * 4096, buf, IoFlags::NONE))
            })
            .collect();
        let mut ok = 0;
        for w in writes {
            if w.await.1.is_ok() {
                ok += 1;
            }
        }
        (t.elapsed(), ok)
    });
    assert_eq!(ok, 64);
    assert!(took >= Duration::from_millis(20), "64 writes took {took:?}");
    let data = env.on(0, &slow, |ch| async move { ch.read(0, 64 * 4096).await.unwrap().to_vec() });
    assert_eq!(data, pattern(0, 64 * 4096, 3));
}

#[test]
fn bad_options_are_refused() {
    let mut env = Env::new();
    env.add(json!({"driver": "malloc", "node-name": "m0", "size": SIZE}));
    let mut err = |opts| env.graph.add(opts).map(|_| ()).unwrap_err().to_string();
    let e = err(json!({"driver": "delay", "node-name": "d0"}));
    assert!(e.contains("'file'"), "{e}");
    let e = err(json!({"driver": "delay", "node-name": "d0", "file": "m0", "latency-ns": -1}));
    assert!(e.contains("latency-ns"), "{e}");
    let e = err(json!({"driver": "delay", "node-name": "d0", "file": "m0", "read-latency-ns": 7_200_000_000_000u64}));
    assert!(e.contains("at most"), "{e}");
    let e = err(json!({"driver": "delay", "node-name": "d0", "file": "m0", "bogus": 1}));
    assert!(e.contains("bogus"), "{e}");
}
