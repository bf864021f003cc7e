//! Device-layer microbenchmarks: the submit → complete path of the null and
//! malloc devices through the common front door, closed loop at a fixed
//! queue depth (bdevperf's model), callbacks only — no task per request.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::drivers::qcow2::create::CreateOptions;
use bdev::{BlockChannel, Done, Graph, Io, IoDone, IoError, Node};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use reactor::{IoBuf, reply};
use serde_json::json;

/// Resubmits every completed read until `left` reaches zero.
struct Loop {
    ch: BlockChannel,
    left: Cell<u64>,
    inflight: Cell<u64>,
    span: u64,
    next: Cell<u64>,
    me: std::rc::Weak<Loop>,
    finished: Cell<Option<reactor::ReplyTx<()>>>,
}

impl Loop {
    fn submit(&self, buf: IoBuf) {
        let off = self.next.get();
        self.next.set((off + buf.len() as u64) % self.span);
        self.left.set(self.left.get() - 1);
        self.inflight.set(self.inflight.get() + 1);
        let me: Rc<dyn IoDone> = self.me.upgrade().unwrap();
        self.ch.submit(Io::read(off, buf), Done::new(me, 0));
    }
}

impl IoDone for Loop {
    fn io_done(&self, _tag: u64, io: Io, res: Result<(), IoError>) {
        res.unwrap();
        self.inflight.set(self.inflight.get() - 1);
        if self.left.get() > 0 {
            self.submit(io.buf.unwrap());
        } else if self.inflight.get() == 0
            && let Some(tx) = self.finished.take()
        {
            tx.send(());
        }
    }
}

fn closed_loop(node: &Arc<Node>, reactors: &reactor::Reactors, iters: u64, qd: u64, io_size: usize) -> Duration {
    let node = Arc::clone(node);
    reactors.handles()[0]
        .run(move || async move {
            let ch = node.channel().unwrap();
            let (tx, rx) = reply();
            let span = ch.size() / io_size as u64 * io_size as u64;
            let lp = Rc::new_cyclic(|me| Loop {
                ch,
                left: Cell::new(iters.max(qd)),
                inflight: Cell::new(0),
                span,
                next: Cell::new(0),
                me: me.clone(),
                finished: Cell::new(Some(tx)),
            });
            let t0 = Instant::now();
            for _ in 0..qd {
                lp.submit(IoBuf::new(io_size));
            }
            rx.await.unwrap();
            t0.elapsed()
        })
        .wait()
        .unwrap()
}

fn null_and_malloc(c: &mut Criterion) {
    let reactors = spindle_benches::polling_reactors(1);
    let mut graph = Graph::new(reactors.handles().to_vec());
    let null = graph.add(json!({"driver": "null-co", "node-name": "n0"})).unwrap();
    let malloc = graph.add(json!({"driver": "malloc", "node-name": "m0", "size": 256 << 20})).unwrap();
    // Touch every page of the RAM disk first, so reads copy real memory
    // (untouched pages would all map the kernel's one zero page).
    fill(&malloc, &reactors, 0x5a);
    let mut g = c.benchmark_group("bdev");
    g.throughput(Throughput::Elements(1));
    for qd in [1u64, 32, 128] {
        g.bench_function(format!("null_read_4k_qd{qd}"), |b| {
            b.iter_custom(|iters| closed_loop(&null, &reactors, iters, qd, 4096))
        });
    }
    g.bench_function("malloc_read_4k_qd32", |b| {
        b.iter_custom(|iters| closed_loop(&malloc, &reactors, iters, 32, 4096))
    });
    g.finish();
    drop((null, malloc));
    graph.close_all();
}

/// Writes `fill` over the whole node in 4 MiB requests.
fn fill(node: &Arc<Node>, reactors: &reactor::Reactors, byte: u8) {
    let node = Arc::clone(node);
    reactors.handles()[0]
        .run(move || async move {
            let ch = node.channel().unwrap();
            let chunk = (4u64 << 20).min(ch.size());
            for off in (0..ch.size()).step_by(chunk as usize) {
                let mut buf = IoBuf::new(chunk.min(ch.size() - off) as usize);
                buf.fill(byte);
                ch.write(off, buf, bdev::IoFlags::NONE).await.1.unwrap();
            }
        })
        .wait()
        .unwrap()
}

/// The qcow2 read path with the metadata cached: a fully allocated image
/// on a RAM disk, read 4 KiB at a time. Against `malloc_read_4k_qd32`, the
/// difference is the cost of the qcow2 layer (L2 lookup, request split,
/// one more completion hop) — no disk in the way.
fn qcow2_l2_lookup(c: &mut Criterion) {
    const VIRTUAL: u64 = 64 << 20;
    let reactors = spindle_benches::polling_reactors(1);
    let mut graph = Graph::new(reactors.handles().to_vec());
    // Format an image in a file, then copy its bytes onto the RAM disk.
    let path = std::env::temp_dir().join(format!("spindle-bench-{}.qcow2", std::process::id()));
    bdev::drivers::qcow2::create::create(&path, &CreateOptions { size: VIRTUAL, ..Default::default() }).unwrap();
    let image = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let ram = graph.add(json!({"driver": "malloc", "node-name": "ram", "size": 2 * VIRTUAL})).unwrap();
    let ch_node = Arc::clone(&ram);
    reactors.handles()[0]
        .run(move || async move {
            let ch = ch_node.channel().unwrap();
            let mut buf = IoBuf::new(image.len().next_multiple_of(4096));
            buf[..image.len()].copy_from_slice(&image);
            ch.write(0, buf, bdev::IoFlags::NONE).await.1.unwrap();
        })
        .wait()
        .unwrap();
    drop(ram);
    let qcow2 = graph.add(json!({"driver": "qcow2", "node-name": "q0", "file": "ram"})).unwrap();
    // Allocate every cluster, so each read maps through an L2 entry.
    fill(&qcow2, &reactors, 0x5a);
    let mut g = c.benchmark_group("qcow2");
    g.throughput(Throughput::Elements(1));
    g.bench_function("l2_lookup_read_4k_qd32_on_malloc", |b| {
        b.iter_custom(|iters| closed_loop(&qcow2, &reactors, iters, 32, 4096))
    });
    g.finish();
    drop(qcow2);
    graph.close_all();
}

fn memcpy_4k(c: &mut Criterion) {
    // The machine's single-core copy rate: the limit a RAM disk read
    // approaches. Same memory as the RAM disk (a `MemRegion`, huge pages
    // where offered), same walk (4 KiB steps through 256 MiB), no device.
    const SPAN: usize = 256 << 20;
    let src = reactor::MemRegion::new(SPAN).unwrap();
    let page = vec![0x5au8; 4 << 20];
    for off in (0..SPAN).step_by(page.len()) {
        src.write(off, &page);
    }
    let mut dst = IoBuf::new(4096);
    let mut off = 0usize;
    let mut g = c.benchmark_group("limits");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("memcpy_4k_from_256m", |b| {
        b.iter(|| {
            src.read(off, &mut dst);
            off = (off + 4096) % SPAN;
            std::hint::black_box(&dst);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = null_and_malloc, qcow2_l2_lookup, memcpy_4k
}
criterion_main!(benches);
