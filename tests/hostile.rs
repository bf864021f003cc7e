//! Hostile and overloaded clients, many at once: hundreds of NBD and
//! JSON-RPC connections, slow readers flooding maximal requests, half-open
//! and abandoned connections.
//!
//! Each case samples the daemon's resident memory (VmRSS in
//! /proc/PID/status) before, throughout (the peak) and after, and checks
//! the peak against a bound computed from the per-connection caps below;
//! checks that a fresh client is served meanwhile; and, for NBD, that no
//! client ever reads data that is not what its own request asked for.
//! Every load loop is bounded in count and in time; everything runs over
//! Unix sockets. Figures are printed (`-- --nocapture`) and recorded in
//! docs/reliability.md, "Hostile and overloaded clients".

mod support;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Daemon;
use support::nbd_client::NbdClient;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// The caps these bounds come from:
// nbd/src/server/transmit.rs (INFLIGHT_BYTES_MAX), negotiate.rs
// (PAYLOAD_BYTES_MAX), nbd/src/sock.rs (RECV_CHUNK_BYTES),
// reactor/src/buf.rs (POOL_CLASS_CACHE_BYTES), rpc/src/framing.rs
// (REQUEST_BYTES_MAX), rpc/src/server.rs and spindle/src/serve.rs
// (64 connections per socket).

/// Payload bytes in flight on one NBD connection before the server stops
/// reading its requests.
const NBD_INFLIGHT_BYTES_MAX: u64 = 64 * MIB;
/// The largest NBD request payload, advertised as the maximum block size.
const NBD_PAYLOAD_MAX: u64 = 32 * MIB;
/// The most one NBD connection can make the server hold: its budget is
/// checked before each request is read, so the last request admitted
/// overshoots it by at most one maximal payload.
const NBD_CONN_BYTES_MAX: u64 = NBD_INFLIGHT_BYTES_MAX + NBD_PAYLOAD_MAX;
/// A connection's own buffers (64 KiB receive buffer, request decoder,
/// task state, reply headers): 1 MiB is generous.
const NBD_CONN_OVERHEAD: u64 = MIB;
/// Freed I/O buffers each reactor thread keeps per size class.
const POOL_CLASS_CACHE_BYTES: u64 = 32 * MIB;
/// Connections the JSON-RPC socket serves at once; later ones are closed.
const RPC_CONNECTIONS_MAX: usize = 64;
/// The largest JSON-RPC request.
const RPC_REQUEST_BYTES_MAX: u64 = MIB;
/// The most one JSON-RPC connection costs: a framer buffer that may have
/// doubled past the request limit, the 64 KiB read chunk, two threads'
/// stacks as touched, 64 queued answers.
const RPC_CONN_BYTES_MAX: u64 = 2 * RPC_REQUEST_BYTES_MAX + 64 * KIB + MIB;
/// Allocator and runtime noise allowed on top of any bound.
const SLACK: u64 = 32 * MIB;
/// What the allocator may keep after a load is gone: freeing a buffer of
/// nearly 32 MiB raises glibc's mmap threshold to it, and glibc then keeps
/// up to twice that free at the top of an arena.
const RETAINED: u64 = 2 * NBD_PAYLOAD_MAX;

// ---------------------------------------------------------------------------
// Memory

/// The daemon's resident set, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * KIB
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Samples the daemon's RSS every 5 ms on a thread, keeping the peak.
struct RssWatch {
    before: u64,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    pid: i32,
}

impl RssWatch {
    fn start(pid: i32) -> RssWatch {
        let before = rss(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(before));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssWatch { before, stop, peak, thread: Some(thread), pid }
    }

    /// Stops sampling; returns the peak (including a last sample).
    fn peak(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.peak.fetch_max(rss(self.pid), Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits up to `within` for the RSS to fall to `target`, then 200 ms
/// more; the lowest sample.
fn settle(pid: i32, target: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    let mut low = rss(pid);
    let mut reached: Option<Instant> = None;
    loop {
        let now = rss(pid);
        low = low.min(now);
        if now <= target && reached.is_none() {
            reached = Some(Instant::now());
        }
        if reached.is_some_and(|t| t.elapsed() >= Duration::from_millis(200)) || Instant::now() > deadline {
            return low;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Socket inodes the process holds.
fn socket_inodes(pid: i32) -> std::collections::HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// Connections the daemon still holds on its Unix socket `path`: the
/// connected sockets of /proc/net/unix named after it that it has open.
fn connections_on(pid: i32, path: &Path) -> usize {
    let ours = socket_inodes(pid);
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = path.to_str().unwrap();
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 8 && f[5] == "03" && f[7] == path && f[6].parse().is_ok_and(|i: u64| ours.contains(&i)))
        .count()
}

/// Waits up to 10 s for the daemon to have closed every connection on
/// `path`; fails with the number left.
fn all_connections_closed(pid: i32, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = connections_on(pid, path);
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{n} connections still open in the daemon 10 s after their clients left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn report(case: &str, before: u64, peak: u64, after: u64, bound: u64) {
    println!(
        "hostile: {case}: RSS before {}, peak {} (+{}), after {}; bound on the peak {}",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
        mib(after),
        mib(bound)
    );
}

// ---------------------------------------------------------------------------
// NBD

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;

/// A daemon exporting a malloc node `m` of `size` bytes, writable, as `e`
/// on `nbd.sock`.
fn nbd_daemon(size: u64, max_connections: Option<u64>) -> Daemon {
    let d = Daemon::start();
    let mut start = json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}});
    if let Some(n) = max_connections {
        start["max-connections"] = json!(n);
    }
    d.ok("nbd-server-start", start);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": size}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "m", "name": "e", "writable": true}));
    d
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// A raw NBD connection for doing what well-behaved clients do not: stop
/// mid-handshake, mid-request, never read. Writes time out after 2 s (the
/// server stops reading a client whose budget is used up).
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).expect("connecting to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        Raw { s }
    }

    fn greeting(&mut self) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    }

    /// Greeting, client flags (fixed newstyle, no zeroes), then `NBD_OPT_GO`
    /// asking for block sizes. Returns (export size, maximum payload).
    fn go(sock: &Path, name: &str) -> (Raw, u64, u32) {
        let mut r = Raw::connect(sock);
        r.greeting();
        r.s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        r.s.write_all(&opt).unwrap();
        let (mut size, mut max) = (0, 0);
        loop {
            let mut h = [0u8; 20];
            r.s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            r.s.read_exact(&mut d).unwrap();
            match (kind, u16::from_be_bytes([d.first().copied().unwrap_or(0), d.get(1).copied().unwrap_or(0)])) {
                (1, _) => return (r, size, max),
                (3, 0) => size = u64::from_be_bytes(d[2..10].try_into().unwrap()),
                (3, 3) => max = u32::from_be_bytes(d[10..14].try_into().unwrap()),
                (3, _) => {}
                (k, _) => panic!("NBD_OPT_GO refused: {k:#x} {}", String::from_utf8_lossy(&d)),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }
}

/// Connects through `NbdClient`, retrying while the server refuses
/// (closes at once) until `within` has passed.
fn connect_retrying(sock: &Path, within: Duration) -> NbdClient {
    let deadline = Instant::now() + within;
    loop {
        match NbdClient::connect(sock, "e") {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "no NBD connection within {within:?}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh client writes, reads back and checks a small pattern.
fn fresh_nbd_client_is_served(sock: &Path, offset: u64, byte: u8) {
    let mut c = connect_retrying(sock, Duration::from_secs(10));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let data = vec![byte; 256 * KIB as usize];
    c.send_write(1, offset, &data, true).unwrap();
    let r = c.recv_reply().unwrap();
    assert_eq!((r.handle, r.error), (1, 0), "a fresh client's write");
    assert_eq!(c.read(offset, data.len() as u32).unwrap(), data, "a fresh client reads back what it wrote");
    c.disconnect().unwrap();
}

// Data tags for the many-clients case: every 8-byte word written names its
// owner, the round and its own offset, so any word read in the wrong place
// (another client's data, another request's reply) shows.
const CLIENTS: usize = 160;
const RANGE: u64 = 256 * KIB;
const CHUNK: u64 = 64 * KIB;
const ROUNDS: u64 = 4;

fn word(owner: usize, round: u64, offset: u64) -> u64 {
    (0xC0DE << 48) | ((owner as u64) << 32) | (round << 24) | ((offset / 8) & 0xff_ffff)
}

fn pattern(owner: usize, round: u64, offset: u64, len: u64) -> Vec<u8> {
    (0..len / 8).flat_map(|k| word(owner, round, offset + k * 8).to_be_bytes()).collect()
}

/// Every word of a read at `offset` is zero (never written) or was written
/// for exactly that place by the owner of that range.
fn check_tags(data: &[u8], offset: u64) -> Result<(), String> {
    for (k, w) in data.chunks_exact(8).enumerate() {
        let w = u64::from_be_bytes(w.try_into().unwrap());
        let at = offset + k as u64 * 8;
        let owner = (at / RANGE) as usize;
        let round = (w >> 24) & 0xff;
        let fits = w >> 48 == 0xC0DE
            && ((w >> 32) & 0xffff) as usize == owner
            && (1..=ROUNDS).contains(&round)
            && w & 0xff_ffff == (at / 8) & 0xff_ffff;
        if w != 0 && !fits {
            return Err(format!("word at {at:#x} reads {w:#018x}; only owner {owner}'s data belongs there"));
        }
    }
    Ok(())
}

/// One of the many clients: `ROUNDS` times, write its own range (four
/// pipelined 64 KiB writes) with two reads of other clients' ranges in
/// flight alongside, then read its own range back.
fn many_clients_worker(mut c: NbdClient, me: usize) -> Result<(), String> {
    let base = me as u64 * RANGE;
    let mut seed = (me as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let io = |e: std::io::Error| format!("client {me}: {e}");
    for round in 1..=ROUNDS {
        let mut reads = std::collections::HashMap::new();
        for k in 0..RANGE / CHUNK {
            let off = base + k * CHUNK;
            c.send_write(k, off, &pattern(me, round, off, CHUNK), false).map_err(io)?;
        }
        for j in 0..2 {
            let other = (next() % CLIENTS as u64) * RANGE + (next() % (RANGE / CHUNK)) * CHUNK;
            c.send_read(100 + j, other, CHUNK as u32).map_err(io)?;
            reads.insert(100 + j, other);
        }
        for _ in 0..RANGE / CHUNK + 2 {
            let r = c.recv_reply().map_err(io)?;
            if r.error != 0 {
                return Err(format!("client {me}: request {} failed with NBD error {}", r.handle, r.error));
            }
            if let Some(off) = reads.remove(&r.handle) {
                check_tags(&r.data.unwrap(), off).map_err(|e| format!("client {me} reading another's range: {e}"))?;
            }
        }
        let back = c.read(base, RANGE as u32).map_err(io)?;
        if back != pattern(me, round, base, RANGE) {
            let why = check_tags(&back, base).err().unwrap_or_else(|| "an older round's data".into());
            return Err(format!("client {me}, round {round}: its own range does not read back: {why}"));
        }
    }
    c.disconnect().map_err(io)
}

#[test]
fn many_nbd_clients_at_once_each_see_only_their_own_data() {
    let size = CLIENTS as u64 * RANGE;
    // Below the cap on purpose: every client must get in.
    let d = nbd_daemon(size, Some(CLIENTS as u64 + 8));
    let sock = d.path("nbd.sock");
    let mut watch = RssWatch::start(d.pid());
    // Everyone is connected (and counted) before anyone starts.
    let (connected, go) = (Arc::new(Barrier::new(CLIENTS + 1)), Arc::new(Barrier::new(CLIENTS + 1)));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|me| {
            let (sock, failures) = (sock.clone(), Arc::clone(&failures));
            let (connected, go) = (Arc::clone(&connected), Arc::clone(&go));
            std::thread::spawn(move || {
                let client = NbdClient::connect(&sock, "e").map_err(|e| format!("client {me} connecting: {e}"));
                connected.wait();
                go.wait();
                let res = client.and_then(|c| {
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    many_clients_worker(c, me)
                });
                if let Err(e) = res {
                    failures.lock().unwrap().push(e);
                }
            })
        })
        .collect();
    connected.wait();
    let at_once = connections_on(d.pid(), &sock);
    go.wait();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = t0.elapsed();
    assert_eq!(at_once, CLIENTS, "every client connected at once");
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} of {CLIENTS} clients failed:\n{}", failures.len(), failures.join("\n"));
    // Afterwards every range holds exactly its owner's last round.
    let mut c = NbdClient::connect(&sock, "e").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    for owner in 0..CLIENTS {
        let off = owner as u64 * RANGE;
        let got = c.read(off, RANGE as u32).unwrap();
        assert!(got == pattern(owner, ROUNDS, off, RANGE), "range {owner}: {:?}", check_tags(&got, off).err());
    }
    c.disconnect().unwrap();
    let peak = watch.peak();
    let before = watch.before;
    all_connections_closed(d.pid(), &sock);
    let after = settle(d.pid(), before + size + SLACK, Duration::from_secs(2));
    // The device itself, each connection's requests (at most six 64 KiB
    // ones and a 256 KiB read) and own buffers, the pools of two reactors
    // for the two sizes used.
    let bound = before
        + size
        + CLIENTS as u64 * (6 * CHUNK + RANGE + NBD_CONN_OVERHEAD)
        + 2 * 2 * POOL_CLASS_CACHE_BYTES
        + SLACK;
    report(&format!("{CLIENTS} NBD clients at once, {ROUNDS} rounds in {elapsed:.1?}"), before, peak, after, bound);
    assert!(peak <= bound, "peak RSS {} above the bound {}", mib(peak), mib(bound));
    d.ok("query-version", Value::Null);
}

#[test]
fn nbd_max_connections_is_a_hard_cap() {
    let d = nbd_daemon(MIB, Some(8));
    let sock = d.path("nbd.sock");
    let mut held: Vec<NbdClient> = (0..8).map(|_| NbdClient::connect(&sock, "e").unwrap()).collect();
    for _ in 0..3 {
        assert!(NbdClient::connect(&sock, "e").is_err(), "a 9th connection is closed at once");
    }
    // One leaves: its place is free again (once the server has seen it go).
    held.pop().unwrap().disconnect().unwrap();
    held.push(connect_retrying(&sock, Duration::from_secs(10)));
    for (i, c) in held.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(c.read(i as u64 * 4096, 4096).unwrap(), vec![0u8; 4096], "held connection {i} still served");
    }
    d.ok("query-version", Value::Null);
}

#[test]
fn slow_readers_flooding_maximal_requests_hold_at_most_their_budget() {
    const READERS: usize = 4;
    const WRITERS: usize = 2;
    let size = 64 * MIB;
    let d = nbd_daemon(size, None);
    let sock = d.path("nbd.sock");
    // The device's pages count in "before".
    d.debug_io("m", "write -P 0x5a 0 64M").unwrap();
    let mut watch = RssWatch::start(d.pid());
    let before = watch.before;
    let mut hogs: Vec<Raw> = Vec::new();
    // Readers: one read just under the budget, then maximal ones; none of
    // the replies is ever read.
    let mut reads_sent = 0;
    for i in 0..READERS {
        let (mut r, export_size, max) = Raw::go(&sock, "e");
        assert_eq!((export_size, u64::from(max)), (size, NBD_PAYLOAD_MAX), "export size and advertised maximum");
        for k in 0..16u64 {
            let len = if k == 0 { max - 4096 } else { max };
            let off = if (k + i as u64).is_multiple_of(2) { 0 } else { size - u64::from(len) };
            if r.send(&request(CMD_READ, k, off, len)).is_err() {
                break;
            }
            reads_sent += 1;
        }
        hogs.push(r);
    }
    // Writers: maximal writes into the upper half for up to 1.5 s (at most
    // 24 each), never reading a reply.
    let flood_until = Instant::now() + Duration::from_millis(1500);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let (mut r, _, max) = Raw::go(&sock, "e");
                let mut msg = request(CMD_WRITE, 0, 32 * MIB, max);
                msg.resize(msg.len() + max as usize, 0xa0 + w as u8);
                let mut sent = 0;
                while sent < 24 && Instant::now() < flood_until {
                    msg[8..16].copy_from_slice(&(sent as u64).to_be_bytes());
                    if r.send(&msg).is_err() {
                        break;
                    }
                    sent += 1;
                }
                (r, sent)
            })
        })
        .collect();
    let mut writes_sent = 0;
    for w in writers {
        let (r, sent) = w.join().unwrap();
        writes_sent += sent;
        hogs.push(r);
    }
    // Let the readers' budgets fill.
    std::thread::sleep(Duration::from_millis(300));
    // With every hog still connected: a fresh client and the control plane
    // are served.
    fresh_nbd_client_is_served(&sock, MIB, 0x3c);
    d.ok("query-version", Value::Null);
    let peak = watch.peak();
    drop(hogs);
    all_connections_closed(d.pid(), &sock);
    let after = settle(d.pid(), before + SLACK, Duration::from_secs(5));
    let bound = before + (READERS + WRITERS) as u64 * (NBD_CONN_BYTES_MAX + NBD_CONN_OVERHEAD) + SLACK;
    report(
        &format!(
            "{READERS} slow readers ({reads_sent} maximal reads sent) + {WRITERS} slow writers ({writes_sent} maximal writes)"
        ),
        before,
        peak,
        after,
        bound,
    );
    assert!(peak <= bound, "peak RSS {} above the bound {}", mib(peak), mib(bound));
    assert!(
        after <= before + RETAINED,
        "memory comes back once the hogs are gone: {} after {}",
        mib(after),
        mib(before)
    );
    // Another client after them all.
    fresh_nbd_client_is_served(&sock, 2 * MIB, 0x3d);
}

#[test]
fn half_open_and_abandoned_nbd_connections_leave_the_server_serving() {
    const EACH: usize = 30;
    const STALLED_WRITES: usize = 8;
    const ABANDONED_READERS: usize = 4;
    let size = 64 * MIB;
    let d = nbd_daemon(size, None);
    let sock = d.path("nbd.sock");
    d.debug_io("m", "write -P 0x11 0 64M").unwrap();
    let mut watch = RssWatch::start(d.pid());
    let before = watch.before;
    let mut held: Vec<UnixStream> = Vec::new();
    // Held open: connected, and nothing sent at all.
    for _ in 0..EACH {
        held.push(UnixStream::connect(&sock).unwrap());
    }
    // Held open: half of the client flags.
    for _ in 0..EACH {
        let mut r = Raw::connect(&sock);
        r.greeting();
        r.send(&[0, 0]).unwrap();
        held.push(r.s);
    }
    // Held open: client flags and half an option header.
    for _ in 0..EACH {
        let mut r = Raw::connect(&sock);
        r.greeting();
        r.send(&3u32.to_be_bytes()).unwrap();
        r.send(b"IHAVEOPT\0\0").unwrap();
        held.push(r.s);
    }
    // Held open: export selected, then half a request header.
    for _ in 0..EACH {
        let (mut r, _, _) = Raw::go(&sock, "e");
        r.send(&request(CMD_READ, 1, 0, 4096)[..14]).unwrap();
        held.push(r.s);
    }
    // Held open: a maximal write announced and 4 KiB of it sent. The
    // server takes a buffer for the whole payload and waits for the rest.
    for _ in 0..STALLED_WRITES {
        let (mut r, _, max) = Raw::go(&sock, "e");
        let mut msg = request(CMD_WRITE, 1, 0, max);
        msg.extend_from_slice(&[0xee; 4096]);
        r.send(&msg).unwrap();
        held.push(r.s);
    }
    let held_count = held.len();
    // Abandoned: gone after the greeting, after half a request header,
    // halfway through a 1 MiB write's payload.
    for _ in 0..EACH {
        let mut r = Raw::connect(&sock);
        r.greeting();
        drop(r);
        let (mut r, _, _) = Raw::go(&sock, "e");
        r.send(&request(CMD_WRITE, 1, MIB, MIB as u32)[..20]).unwrap();
        drop(r);
        let (mut r, _, _) = Raw::go(&sock, "e");
        let mut msg = request(CMD_WRITE, 1, MIB, MIB as u32);
        msg.extend_from_slice(&[0xee; 512 << 10]);
        r.send(&msg).unwrap();
        drop(r);
    }
    // Abandoned with replies in flight: four maximal reads, then gone.
    for _ in 0..ABANDONED_READERS {
        let (mut r, _, max) = Raw::go(&sock, "e");
        for k in 0..4 {
            r.send(&request(CMD_READ, k, 0, max)).unwrap();
        }
        drop(r);
    }
    // While the half-open ones are still there: a fresh client, the
    // control plane, and nothing of the unfinished writes reached the disk.
    fresh_nbd_client_is_served(&sock, 8 * MIB, 0x33);
    d.ok("query-version", Value::Null);
    d.debug_io("m", "read -P 0x11 0 2M").expect("unfinished writes must not be applied");
    let peak = watch.peak();
    drop(held);
    // Every connection is gone: a safe delete, refused while any client
    // still uses the export, goes through.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = d.call("block-export-del", json!({"id": "e"})) {
        assert!(Instant::now() < deadline, "the export is still in use 10 s after every client left: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.debug_io("m", "read -P 0x11 0 2M").expect("unfinished writes must not be applied");
    all_connections_closed(d.pid(), &sock);
    let after = settle(d.pid(), before + SLACK, Duration::from_secs(5));
    let connections = held_count + 3 * EACH + ABANDONED_READERS;
    let bound = before
        + STALLED_WRITES as u64 * NBD_PAYLOAD_MAX
        + ABANDONED_READERS as u64 * NBD_CONN_BYTES_MAX
        + connections as u64 * (MIB + NBD_CONN_OVERHEAD)
        + SLACK;
    report(
        &format!("{held_count} half-open connections held, {} abandoned", 3 * EACH + ABANDONED_READERS),
        before,
        peak,
        after,
        bound,
    );
    assert!(peak <= bound, "peak RSS {} above the bound {}", mib(peak), mib(bound));
    assert!(after <= before + RETAINED, "memory comes back: {} after {}", mib(after), mib(before));
}

// ---------------------------------------------------------------------------
// JSON-RPC

/// Calls `query-version` on fresh connections until one is answered or
/// `within` has passed (a connection past the cap is closed at once).
/// Returns (time to the answer, attempts refused).
fn fresh_rpc_answer(d: &Daemon, within: Duration) -> Result<(Duration, usize), String> {
    let t0 = Instant::now();
    let mut refused = 0;
    loop {
        let res = rpc::client::Client::connect(&d.rpc, Duration::from_secs(30))
            .and_then(|mut c| c.call("query-version", None));
        match res {
            Ok(v) if v["qemu"].is_object() => return Ok((t0.elapsed(), refused)),
            Ok(v) => return Err(format!("unexpected answer {v}")),
            Err(e) if t0.elapsed() >= within => {
                return Err(format!("no answer within {within:?} ({refused} attempts refused; last: {e})"));
            }
            Err(_) => refused += 1,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True while the daemon keeps the connection open (nothing to read yet,
/// or answers waiting); false once it closed it.
fn still_open(mut s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n > 0,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    }
}

/// Everything the daemon sends until it closes (or the read times out).
fn read_all(mut s: &UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = s.read(&mut chunk) {
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Idle,
    Huge,
    Oversized,
    Trickle,
    NeverReads,
}

/// One hostile JSON-RPC client; returns whether the daemon took it (served
/// it or kept it) rather than closing it at once for being past the cap.
fn rpc_hostile(rpc: &Path, i: usize, kind: Kind, hold: Duration) -> Result<bool, String> {
    let Ok(mut s) = UnixStream::connect(rpc) else {
        return Ok(false);
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A client that never reads notices within a second that the daemon
    // stopped taking its requests.
    let write_timeout = if kind == Kind::NeverReads { 1 } else { 10 };
    s.set_write_timeout(Some(Duration::from_secs(write_timeout))).unwrap();
    match kind {
        Kind::Idle => {
            std::thread::sleep(hold);
            Ok(still_open(&s))
        }
        Kind::Huge => {
            // Just under the limit, unfinished: the daemon has to hold it.
            let head = br#"{"jsonrpc":"2.0","id":1,"method":"query-version","params":{"x":""#;
            let mut msg = head.to_vec();
            msg.resize(RPC_REQUEST_BYTES_MAX as usize - 64, b'a');
            if s.write_all(&msg).is_err() {
                return Ok(false);
            }
            std::thread::sleep(hold);
            Ok(still_open(&s))
        }
        Kind::Oversized => {
            let mut msg = br#"{"jsonrpc":"2.0","id":1,"method":"query-version","params":{"x":""#.to_vec();
            msg.resize(RPC_REQUEST_BYTES_MAX as usize + 4096, b'a');
            let _ = s.write_all(&msg);
            let answer = String::from_utf8_lossy(&read_all(&s)).into_owned();
            if answer.is_empty() {
                return Ok(false);
            }
            if !answer.contains("exceeds") {
                return Err(format!("client {i}: oversized request answered {answer:?}"));
            }
            Ok(true)
        }
        Kind::Trickle => {
            let req = json!({"jsonrpc": "2.0", "id": i, "method": "query-version"}).to_string();
            for b in req.as_bytes() {
                if s.write_all(std::slice::from_ref(b)).is_err() {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\n") {
                match s.read(&mut byte) {
                    Ok(1) => line.push(byte[0]),
                    _ if line.is_empty() => return Ok(false),
                    _ => return Err(format!("client {i}: answer cut short: {}", String::from_utf8_lossy(&line))),
                }
            }
            let v: Value = serde_json::from_slice(&line).map_err(|e| format!("client {i}: {e}"))?;
            // Its own answer, nobody else's.
            if v["id"] != i || !v["result"].is_object() {
                return Err(format!("client {i} got {v}"));
            }
            Ok(true)
        }
        Kind::NeverReads => {
            let req = json!({"jsonrpc": "2.0", "id": i, "method": "query-named-block-nodes"}).to_string().repeat(100);
            let mut sent = 0;
            while sent < 5000 && s.write_all(req.as_bytes()).is_ok() {
                sent += 100;
            }
            std::thread::sleep(hold);
            Ok(still_open(&s))
        }
    }
}

/// What one storm of hostile JSON-RPC clients came to.
struct Storm {
    /// Clients the daemon took (served, or kept open), by kind.
    taken: Vec<(String, usize)>,
    /// Clients closed at once, past the cap.
    refused: usize,
    /// How long the fresh client waited, and how many of its tries were
    /// closed at once meanwhile.
    fresh: (Duration, usize),
}

/// `clients` hostile JSON-RPC clients connect at once, one kind in five
/// each, and leave after `hold`; 50 ms in, while they fill the cap, a
/// fresh client starts calling `query-version` (30 s at most).
fn rpc_storm(d: &Daemon, clients: usize, hold: Duration) -> Storm {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let kinds = [Kind::Idle, Kind::Huge, Kind::Oversized, Kind::Trickle, Kind::NeverReads];
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (rpc, barrier) = (d.rpc.clone(), Arc::clone(&barrier));
            let kind = kinds[i % kinds.len()];
            std::thread::spawn(move || {
                barrier.wait();
                (kind, rpc_hostile(&rpc, i, kind, hold))
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(Duration::from_millis(50));
    let fresh = fresh_rpc_answer(d, Duration::from_secs(30));
    let mut taken = std::collections::BTreeMap::new();
    let mut refused = 0;
    let mut errors = Vec::new();
    for t in threads {
        match t.join().unwrap() {
            (kind, Ok(true)) => *taken.entry(format!("{kind:?}")).or_insert(0) += 1,
            (_, Ok(false)) => refused += 1,
            (_, Err(e)) => errors.push(e),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let fresh = fresh.unwrap_or_else(|e| panic!("a fresh client during the storm: {e}"));
    let storm = Storm { taken: taken.into_iter().collect(), refused, fresh };
    let n: usize = storm.taken.iter().map(|(_, n)| n).sum();
    assert!(n >= RPC_CONNECTIONS_MAX, "the daemon takes clients up to its cap: {:?}", storm.taken);
    storm
}

#[test]
fn two_hundred_rpc_clients_at_once() {
    const CLIENTS: usize = 200;
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": MIB}));
    let before = rss(d.pid());
    let bound = before + RPC_CONNECTIONS_MAX as u64 * RPC_CONN_BYTES_MAX + SLACK;
    // Twice: the second storm must not cost more than the first (nothing
    // left behind grows from one to the next).
    let mut afters = Vec::new();
    for round in 1..=2 {
        let mut watch = RssWatch::start(d.pid());
        let storm = rpc_storm(&d, CLIENTS, Duration::from_millis(1500));
        let peak = watch.peak();
        let (answer, _) = fresh_rpc_answer(&d, Duration::from_secs(30)).unwrap();
        let after = settle(d.pid(), before + SLACK, Duration::from_secs(2));
        let (waited, tries) = storm.fresh;
        report(
            &format!(
                "{CLIENTS} JSON-RPC clients at once (storm {round}): taken {:?}, {} closed at once; a fresh \
                 client {tries} times closed at once, answered after {waited:.1?}; afterwards in {answer:.1?}",
                storm.taken, storm.refused
            ),
            watch.before,
            peak,
            after,
            bound,
        );
        assert!(peak <= bound, "peak RSS {} above the bound {}", mib(peak), mib(bound));
        afters.push(after);
    }
    assert!(afters[1] <= afters[0] + SLACK, "RSS after each storm: {}, {}", mib(afters[0]), mib(afters[1]));
}

#[test]
fn rpc_clients_holding_maximal_unfinished_requests() {
    // More than the cap, each sending just under the request limit and
    // waiting: the daemon holds at most the cap's worth.
    const CLIENTS: usize = RPC_CONNECTIONS_MAX + 16;
    let d = Daemon::start();
    let mut watch = RssWatch::start(d.pid());
    let before = watch.before;
    // All connect at once; all hold until every one has written and been
    // checked, so that every connection overlaps every other.
    let (start, written, checked) =
        (Arc::new(Barrier::new(CLIENTS)), Arc::new(Barrier::new(CLIENTS)), Arc::new(Barrier::new(CLIENTS)));
    let head = br#"{"jsonrpc":"2.0","id":1,"method":"query-version","params":{"x":""#;
    let mut msg = head.to_vec();
    msg.resize(RPC_REQUEST_BYTES_MAX as usize - 64, b'a');
    let msg = Arc::new(msg);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (rpc, msg) = (d.rpc.clone(), Arc::clone(&msg));
            let (start, written, checked) = (Arc::clone(&start), Arc::clone(&written), Arc::clone(&checked));
            std::thread::spawn(move || {
                start.wait();
                let s = UnixStream::connect(&rpc).ok();
                let sent = s.as_ref().is_some_and(|mut s| {
                    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                    s.write_all(&msg).is_ok()
                });
                written.wait();
                std::thread::sleep(Duration::from_millis(200));
                // Taken: its request read in full and the connection kept.
                let kept = sent && s.as_ref().is_some_and(still_open);
                checked.wait();
                kept
            })
        })
        .collect();
    let held = threads.into_iter().map(|t| t.join().unwrap()).filter(|&kept| kept).count();
    let peak = watch.peak();
    assert!(held <= RPC_CONNECTIONS_MAX, "{held} connections held, cap {RPC_CONNECTIONS_MAX}");
    let (waited, _) = fresh_rpc_answer(&d, Duration::from_secs(30)).unwrap();
    let after = settle(d.pid(), before + SLACK, Duration::from_secs(3));
    let bound = before + RPC_CONNECTIONS_MAX as u64 * RPC_CONN_BYTES_MAX + SLACK;
    report(
        &format!(
            "{CLIENTS} JSON-RPC clients with unfinished 1 MiB requests, {held} held; then answered in {waited:.1?}"
        ),
        before,
        peak,
        after,
        bound,
    );
    assert!(peak <= bound, "peak RSS {} above the bound {}", mib(peak), mib(bound));
    assert!(after <= before + SLACK, "memory comes back: {} after {}", mib(after), mib(before));
}

/// The JSON-RPC socket serves 64 connections at once. When idle local
/// clients (a leaky client library is enough) hold every slot, a new
/// client takes the slot of the oldest one that has sent nothing for 10 s:
/// silent clients cannot lock the control plane.
#[test]
fn silent_rpc_clients_holding_every_slot_give_way_to_a_fresh_client() {
    let d = Daemon::start();
    let idle: Vec<UnixStream> = (0..RPC_CONNECTIONS_MAX).map(|_| UnixStream::connect(&d.rpc).unwrap()).collect();
    // Let the daemon take all of them before the fresh client comes.
    std::thread::sleep(Duration::from_millis(200));
    let res = fresh_rpc_answer(&d, Duration::from_secs(30));
    drop(idle);
    if let Err(e) = res {
        panic!("{} idle connections lock a fresh JSON-RPC client out: {e}", RPC_CONNECTIONS_MAX);
    }
}

/// Open file descriptors of a process.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Every JSON-RPC or QMP connection subscribes to the event bus with a
/// hook that owns a clone of its socket. A closed connection's entry must
/// go without waiting for an event: otherwise every connection ever made
/// keeps a socket (and an event queue), and with a 1024-file limit about a
/// thousand `spindle rpc` calls end in accept(2) failing with EMFILE.
#[test]
fn closed_rpc_connections_leave_no_socket_behind() {
    let d = Daemon::start();
    let before = open_fds(d.pid());
    for _ in 0..200 {
        // One connection per call, closed by the client afterwards.
        d.ok("query-version", Value::Null);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = open_fds(d.pid());
    while now > before + 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = open_fds(d.pid());
    }
    assert!(
        now <= before + 8,
        "{now} files open in the daemon after 200 closed JSON-RPC connections ({before} before)"
    );
}
