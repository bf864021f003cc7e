//! The message ring between cores: pushes on one core, pops on another,
//! through the bounded lock-free queue every reactor's inbox is made of
//! (same type, same capacity). One message is a boxed closure, as a
//! reactor message is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use reactor::reactor::INBOX_CAPACITY;

type Msg = Box<dyn FnOnce() + Send>;

/// Moves `iters` messages from a producer pinned to the first core to a
/// consumer pinned to the second, which runs each; returns the time from
/// the first push to the last pop.
fn transfer(iters: u64, cores: (usize, usize)) -> Duration {
    let ring: Arc<ArrayQueue<Msg>> = Arc::new(ArrayQueue::new(INBOX_CAPACITY));
    let ready = Arc::new(AtomicBool::new(false));
    let consumer = {
        let ring = Arc::clone(&ring);
        let ready = Arc::clone(&ready);
        thread::spawn(move || {
            let _ = reactor::cpuset::pin_current_thread(cores.1);
            ready.store(true, Ordering::Release);
            let mut seen = 0;
            while seen < iters {
                match ring.pop() {
                    Some(msg) => {
                        msg();
                        seen += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            }
        })
    };
    let _ = reactor::cpuset::pin_current_thread(cores.0);
    while !ready.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
    let t0 = Instant::now();
    for i in 0..iters {
        let mut msg: Msg = Box::new(move || {
            std::hint::black_box(i);
        });
        loop {
            match ring.push(msg) {
                Ok(()) => break,
                Err(back) => {
                    msg = back;
                    std::hint::spin_loop();
                }
            }
        }
    }
    consumer.join().unwrap();
    t0.elapsed()
}

fn push_pop_across_cores(c: &mut Criterion) {
    let allowed = reactor::cpuset::allowed_cores().expect("reading CPU affinity");
    let cores = (allowed[0], *allowed.get(1).unwrap_or(&allowed[0]));
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_pop_across_cores", |b| b.iter_custom(|iters| transfer(iters, cores)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = push_pop_across_cores
}
criterion_main!(benches);
