//! The JSON-RPC control path: a request's bytes parsed, checked, sent to
//! the control thread, run by the command registry there, and the answer
//! serialized — what each request on the socket costs besides the socket.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rpc::control::{Control, ShutdownReason, control_channel, run_control_loop};
use rpc::{EventBus, ServerInfo, jsonrpc};
use serde_json::json;

fn parse_dispatch(c: &mut Criterion) {
    let reactors = spindle_benches::polling_reactors(1);
    let handles = reactors.handles().to_vec();
    let (sender, rx) = control_channel();
    let control = std::thread::spawn(move || {
        let info = ServerInfo { major: 0, minor: 0, micro: 0, package: "bench".into() };
        let mut ctl = Control::new(handles, Arc::new(EventBus::new()), info);
        let registry = rpc::methods::registry();
        for i in 0..8 {
            registry
                .call(&mut ctl, "blockdev-add", Some(json!({"driver": "null-co", "node-name": format!("n{i}")})))
                .unwrap();
        }
        run_control_loop(&mut ctl, &registry, rx);
        ctl.graph.close_all();
    });
    let mut g = c.benchmark_group("rpc");
    g.throughput(Throughput::Elements(1));
    for (name, request) in [
        ("query_version", br#"{"jsonrpc":"2.0","id":1,"method":"query-version"}"#.to_vec()),
        ("query_named_block_nodes_8", br#"{"jsonrpc":"2.0","id":2,"method":"query-named-block-nodes"}"#.to_vec()),
    ] {
        g.bench_function(format!("parse_dispatch_reply_{name}"), |b| {
            b.iter(|| {
                let value: serde_json::Value = serde_json::from_slice(&request).unwrap();
                let reply = jsonrpc::handle_value(&sender, value).unwrap();
                let bytes = serde_json::to_vec(&reply).unwrap();
                assert!(reply.get("error").is_none(), "{reply}");
                std::hint::black_box(bytes)
            })
        });
    }
    g.finish();
    sender.shutdown(ShutdownReason::Quit);
    control.join().unwrap();
    drop(reactors);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = parse_dispatch
}
criterion_main!(benches);
