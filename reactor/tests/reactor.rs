//! Reactor behaviour through its public API: tasks, timers, pollers,
//! cross-reactor messages with replies, sleeping and waking, shutdown.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reactor::{
    IoBuf, Op, PollMode, PollStatus, Reactor, ReactorOptions, Reactors, current, reply, sleep, spawn_local, timeout,
    yield_now,
};

fn local() -> Rc<Reactor> {
    Reactor::new(None, ReactorOptions::default()).unwrap()
}

fn two_reactors(mode: PollMode) -> Reactors {
    let cores = reactor::cpuset::allowed_cores().unwrap();
    let cores: Vec<usize> = cores.iter().copied().cycle().take(2).collect();
    let opts = ReactorOptions { poll_mode: mode, ..ReactorOptions::default() };
    // Pinning two reactors to the same core is fine for tests on 1-core machines.
    Reactors::start(&cores, true, opts).unwrap()
}

#[test]
fn block_on_runs_spawned_tasks() {
    let r = local();
    let out = r.block_on(async {
        let a = spawn_local(async { 20 });
        let b = spawn_local(async {
            yield_now().await;
            22
        });
        a.await + b.await
    });
    assert_eq!(out, 42);
}

#[test]
fn sleep_and_timeout() {
    let r = local();
    r.block_on(async {
        let t0 = Instant::now();
        sleep(Duration::from_millis(20)).await;
        assert!(t0.elapsed() >= Duration::from_millis(20));
        let slow = timeout(Duration::from_millis(10), sleep(Duration::from_secs(10))).await;
        assert!(slow.is_err());
        let fast = timeout(Duration::from_secs(10), async { 7 }).await;
        assert_eq!(fast, Ok(7));
    });
}

#[test]
fn aborted_task_never_finishes() {
    let r = local();
    let hit = Rc::new(Cell::new(false));
    let h2 = Rc::clone(&hit);
    r.block_on(async move {
        let t = spawn_local(async move {
            sleep(Duration::from_millis(20)).await;
            h2.set(true);
        });
        yield_now().await;
        t.abort();
        sleep(Duration::from_millis(40)).await;
    });
    assert!(!hit.get());
}

#[test]
fn pollers_run_until_unregistered_and_timed_pollers_fire() {
    let r = local();
    let active_runs = Rc::new(Cell::new(0u32));
    let timed_runs = Rc::new(Cell::new(0u32));
    let (a, t) = (Rc::clone(&active_runs), Rc::clone(&timed_runs));
    r.block_on(async move {
        let me = current();
        let id_cell = Rc::new(Cell::new(None));
        let idc = Rc::clone(&id_cell);
        let id = me.register_poller("counter", move || {
            a.set(a.get() + 1);
            if a.get() == 10 {
                // Unregistering from inside the poller is allowed.
                current().unregister_poller(idc.get().unwrap());
            }
            PollStatus::Busy
        });
        id_cell.set(Some(id));
        me.register_timed_poller("ticker", Duration::from_millis(5), move || {
            t.set(t.get() + 1);
            PollStatus::Idle
        });
        sleep(Duration::from_millis(60)).await;
    });
    assert_eq!(active_runs.get(), 10);
    assert!(timed_runs.get() >= 3, "timed poller ran {} times", timed_runs.get());
}

#[test]
fn cross_reactor_call_and_run() {
    let reactors = two_reactors(PollMode::Adaptive);
    let [a, b] = [reactors.handles()[0].clone(), reactors.handles()[1].clone()];
    assert_ne!(a.id(), b.id());
    // A plain call from a non-reactor thread.
    let id_on_b = b.call(|| current().id()).wait().unwrap();
    assert_eq!(id_on_b, b.id());
    // A task on A awaits work run as a task on B: send-and-await between reactors.
    let b2 = b.clone();
    let got = a
        .run(move || async move {
            let from_b = b2
                .run(|| async {
                    sleep(Duration::from_millis(5)).await;
                    current().id()
                })
                .await
                .unwrap();
            (current().id(), from_b)
        })
        .wait()
        .unwrap();
    assert_eq!(got, (a.id(), b.id()));
}

#[test]
fn many_messages_all_delivered_in_order_per_sender() {
    let reactors = two_reactors(PollMode::Interrupt);
    let b = reactors.handles()[1].clone();
    let seen = Arc::new(AtomicUsize::new(0));
    let n = 200_000; // above the inbox capacity: senders must block, not drop
    for i in 0..n {
        let seen = Arc::clone(&seen);
        b.send(move || {
            assert_eq!(seen.fetch_add(1, Ordering::SeqCst), i, "messages out of order");
        });
    }
    b.call(|| ()).wait().unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), n);
}

#[test]
fn idle_reactor_sleeps_and_wakes_for_messages() {
    let reactors = two_reactors(PollMode::Adaptive);
    let b = reactors.handles()[1].clone();
    std::thread::sleep(Duration::from_millis(50));
    let s1 = b.stats();
    std::thread::sleep(Duration::from_millis(100));
    let s2 = b.stats();
    // Asleep: almost no ticks while idle (a spinning reactor makes millions).
    assert!(s2.ticks - s1.ticks < 1000, "idle reactor ticked {} times in 100 ms", s2.ticks - s1.ticks);
    assert!(s2.sleeps >= 1);
    // A message still gets through to the sleeping reactor.
    for _ in 0..100 {
        assert_eq!(b.call(|| 5).wait_timeout(Duration::from_secs(5)), Ok(5));
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn poll_mode_spins() {
    let reactors = two_reactors(PollMode::Poll);
    let b = reactors.handles()[1].clone();
    std::thread::sleep(Duration::from_millis(50));
    let s = b.stats();
    assert_eq!(s.sleeps, 0);
    assert!(s.ticks > 1000, "a polling reactor must spin (ticks {})", s.ticks);
}

#[test]
fn timers_wake_a_sleeping_reactor() {
    let reactors = two_reactors(PollMode::Interrupt);
    let b = reactors.handles()[1].clone();
    let t0 = Instant::now();
    b.run(|| async {
        for _ in 0..5 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .wait_timeout(Duration::from_secs(5))
    .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(50));
}

#[test]
fn reply_is_canceled_when_the_reactor_stops() {
    let mut reactors = two_reactors(PollMode::Adaptive);
    let b = reactors.handles()[1].clone();
    let pending = b.run(|| async {
        sleep(Duration::from_secs(3600)).await;
    });
    std::thread::sleep(Duration::from_millis(20));
    reactors.stop();
    assert!(pending.wait_timeout(Duration::from_secs(5)).is_err());
}

#[test]
fn uring_io_from_a_task() {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&[7u8; 4096]).unwrap();
    let fd: std::os::fd::OwnedFd = f.reopen().unwrap().into();
    let fd = Arc::new(fd);
    let r = local();
    let (res, op) = r.block_on(async move {
        let ring = Rc::clone(current().ring());
        ring.submit(Op::Read { fd, offset: 0, buf: IoBuf::new(4096), at: 0, len: 4096 }).await
    });
    assert_eq!(res, 4096);
    assert!(op.into_buf().unwrap().iter().all(|&b| b == 7));
}

#[test]
fn reply_channel_between_tasks_on_one_reactor() {
    let r = local();
    let v = r.block_on(async {
        let (tx, rx) = reply();
        spawn_local(async move {
            sleep(Duration::from_millis(5)).await;
            tx.send("done");
        });
        rx.await.unwrap()
    });
    assert_eq!(v, "done");
}

/// A thread sending to a reactor whose inbox is full waits for room — but
/// not for ever once the reactor stops: the message is dropped (its reply
/// cancelled) and the sender goes on (an offload thread answering a reactor
/// that shut down).
#[test]
fn a_sender_blocked_on_a_full_inbox_returns_when_the_reactor_stops() {
    let r = local();
    let h = r.handle();
    // Nothing runs the reactor: fill its inbox.
    for _ in 0..reactor::reactor::INBOX_CAPACITY {
        h.send(|| {});
    }
    let sender = {
        let h = h.clone();
        std::thread::spawn(move || h.call(|| 1).wait())
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!sender.is_finished(), "the sender waits for room");
    h.stop();
    assert_eq!(sender.join().unwrap(), Err(reactor::Canceled), "dropped, not delivered");
}

/// A reactor that only polls never waits in the kernel, yet completions
/// that need the kernel's deferred work (a socket receive that found no
/// data when submitted) still arrive: the reactor enters the ring whenever
/// the kernel flags pending work.
#[test]
fn a_polling_reactor_gets_completions_that_arrive_later() {
    use std::io::Write;
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd: std::os::fd::OwnedFd = a.into();
    let fd = Arc::new(fd);
    let r = Reactor::new(None, ReactorOptions { poll_mode: PollMode::Poll, ..ReactorOptions::default() }).unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        b.write_all(b"late").unwrap();
        b
    });
    let got = r.block_on(async move {
        let ring = Rc::clone(current().ring());
        let recv = ring.submit(Op::Recv { fd, buf: IoBuf::new(16), at: 0, len: 16 });
        timeout(Duration::from_secs(5), recv).await
    });
    let _b = writer.join().unwrap();
    let (res, op) = got.expect("the receive completes while the reactor polls");
    assert_eq!(res, 4);
    assert_eq!(&op.into_buf().unwrap()[..4], b"late");
}
