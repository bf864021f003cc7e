//! Reactor microbenchmarks: a message round trip between two reactors, and
//! io_uring NOPs submitted in batches through the in-flight table.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use reactor::{Op, current, spawn_local};

fn cross_reactor_round_trip(c: &mut Criterion) {
    let reactors = spindle_benches::polling_reactors(2);
    let (a, b) = (reactors.handles()[0].clone(), reactors.handles()[1].clone());
    c.bench_function("reactor/cross_reactor_call_round_trip", |bench| {
        bench.iter_custom(|iters| {
            let b = b.clone();
            a.run(move || async move {
                let t0 = Instant::now();
                for _ in 0..iters {
                    b.call(|| ()).await.unwrap();
                }
                t0.elapsed()
            })
            .wait()
            .unwrap()
        })
    });
}

fn uring_nop_batches(c: &mut Criterion) {
    let reactors = spindle_benches::polling_reactors(1);
    let a = reactors.handles()[0].clone();
    for batch in [1u64, 32, 128] {
        c.bench_function(&format!("reactor/uring_nop_batch_{batch}"), |bench| {
            bench.iter_custom(|iters| {
                a.run(move || async move {
                    let ring = Rc::clone(current().ring());
                    let t0 = Instant::now();
                    let mut done = 0;
                    while done < iters {
                        let n = batch.min(iters - done);
                        let futs: Vec<_> = (0..n).map(|_| ring.submit(Op::Nop)).collect();
                        let tasks: Vec<_> = futs.into_iter().map(spawn_local).collect();
                        for t in tasks {
                            t.await;
                        }
                        done += n;
                    }
                    t0.elapsed()
                })
                .wait()
                .unwrap()
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = cross_reactor_round_trip, uring_nop_batches
}
criterion_main!(benches);
