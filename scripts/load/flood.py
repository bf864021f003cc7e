#!/usr/bin/env python3
"""Bounded, self-stopping load against a running Spindle daemon, for
measuring by hand what hostile and overloaded clients cost it.

Opens CONNECTIONS connections to the daemon's NBD socket (a Unix socket, or
a TCP port on loopback) or to its JSON-RPC socket, drives them in one of the
modes below for DURATION seconds, then closes every connection and stops.
Meanwhile, every INTERVAL seconds, it prints the daemon's resident memory
(VmRSS of --pid, from /proc) and how long a fresh JSON-RPC client waited
for `query-version` (with --rpc-socket). At the end: RSS before, at peak
and after (SETTLE seconds after the last connection closed).

NBD modes (--nbd-socket PATH or --nbd-port PORT, and --export NAME):
  write     each connection writes its own slice of the export, DEPTH
            requests in flight, REQUEST_SIZE bytes each
  read      the same with reads
  mixed     writes and reads alternating
  idle      connect, finish the handshake, send nothing
  half      connect and send nothing at all (not even the handshake)
With --no-read, write/read/mixed never read a reply (slow readers): they
send until the daemon stops taking requests, then wait. With replies
read, every read of a slot the connection has written (and seen
acknowledged) must hold that connection's data; --verify (write mode)
reads all of them back at the end.

RPC modes (--rpc-socket PATH):
  rpc-idle     connect, send nothing
  rpc-huge     send just under the 1 MiB request limit of an unfinished
               request, then wait (the daemon has to hold it)
  rpc-trickle  send `query-version` a byte every 50 ms, over and over
  rpc-noread   pipeline `query-named-block-nodes`, never read an answer

Everything is capped: at most 1024 connections, 600 s, 32 MiB requests,
256 requests in flight; TCP goes to 127.0.0.1 only. Python standard
library only.

Examples:
  flood.py --nbd-socket /tmp/n.sock --export e --mode read --no-read \\
           --connections 8 --request-size 32M --duration 10 --pid $(pidof spindle)
  flood.py --rpc-socket spindle.sock --mode rpc-huge --connections 200 --duration 10 --pid ...
"""
import argparse
import json
import socket
import struct
import sys
import threading
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2

MAX_CONNECTIONS = 1024
MAX_DURATION = 600.0
MAX_REQUEST = 32 << 20
MAX_DEPTH = 256
RPC_LIMIT = 1 << 20

NBD_MODES = ("write", "read", "mixed", "idle", "half")
RPC_MODES = ("rpc-idle", "rpc-huge", "rpc-trickle", "rpc-noread")


def size_arg(text):
    """1048576, 64k, 32M, 1G."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.errors = 0
        self.refused = 0
        self.alive = 0
        self.mismatches = []

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("closed by the daemon")
        buf += chunk
    return bytes(buf)


def nbd_connect(args):
    if args.nbd_socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(args.nbd_socket)
    else:
        s = socket.create_connection(("127.0.0.1", args.nbd_port), timeout=30)
    return s


def nbd_handshake(s, export):
    """Fixed newstyle, NBD_OPT_GO asking for block sizes: (size, flags, max payload)."""
    g = recv_exact(s, 18)
    magic, opt, hflags = struct.unpack(">QQH", g)
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise ConnectionError("not an NBD newstyle server")
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    size, flags, max_payload = None, 0, MAX_REQUEST
    while True:
        magic, _opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        body = recv_exact(s, length)
        if magic != REPLY_MAGIC:
            raise ConnectionError("bad option reply magic")
        if kind == REP_ACK:
            return size, flags, max_payload
        if kind == REP_INFO:
            info = struct.unpack(">H", body[:2])[0]
            if info == INFO_EXPORT:
                size, flags = struct.unpack(">QH", body[2:12])
            elif info == INFO_BLOCK_SIZE:
                max_payload = struct.unpack(">III", body[2:14])[2]
        elif kind & 0x80000000:
            raise ConnectionError(f"NBD_OPT_GO refused: {kind:#x} {body[4:]!r}")


def request(kind, handle, offset, length):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, kind, handle, offset, length)


def tag_word(conn, seq):
    # A client's data names its connection: 0xC0DE, connection, request.
    return struct.pack(">HHI", 0xC0DE, conn, seq & 0xFFFFFFFF)


def nbd_worker(i, args, stats, stop, sockets):
    try:
        s = nbd_connect(args)
    except OSError:
        stats.add(refused=1)
        return
    sockets.append(s)
    stats.add(alive=1)
    try:
        if args.mode == "half":
            stop.wait()
            return
        size, _flags, max_payload = nbd_handshake(s, args.export)
        if args.mode == "idle":
            stop.wait()
            return
        req = min(args.request_size, max_payload, MAX_REQUEST)
        req -= req % 4096
        slice_len = (size // args.connections) // 4096 * 4096
        if req <= 0 or slice_len < req:
            raise ValueError(f"export of {size} bytes too small for {args.connections} slices of {req} bytes")
        base = i * slice_len
        slots = slice_len // req
        inflight = {}
        # Slots whose write this connection has seen acknowledged: only
        # those are checked when read back (the export may hold anything
        # from earlier runs elsewhere).
        acked = set()
        seq = 0
        # A slow reader notices within a second that the daemon stopped
        # taking its requests; a normal client waits for replies.
        s.settimeout(1.0 if args.no_read else 30.0)
        while not stop.is_set():
            if len(inflight) < args.depth:
                off = base + (seq % slots) * req
                kind = CMD_WRITE
                if args.mode == "read" or (args.mode == "mixed" and seq % 2):
                    kind = CMD_READ
                msg = request(kind, seq, off, req)
                if kind == CMD_WRITE:
                    msg += tag_word(i, seq) * (req // 8)
                try:
                    s.sendall(msg)
                except socket.timeout:
                    # The daemon stopped taking our requests: its budget
                    # for this connection is used up. Wait.
                    # (A partial send leaves the stream mid-request; fine for
                    # a hostile client that never reads anyway.)
                    if args.no_read:
                        stop.wait()
                        return
                    raise
                stats.add(requests=1, bytes=req)
                if not args.no_read:
                    inflight[seq] = (kind, req, seq % slots)
                seq += 1
                continue
            magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
            if magic != SIMPLE_REPLY_MAGIC:
                raise ConnectionError("bad reply magic")
            kind, length, slot = inflight.pop(handle)
            if err:
                stats.add(errors=1)
            elif kind == CMD_WRITE:
                acked.add(slot)
            else:
                data = recv_exact(s, length)
                if slot in acked:
                    check_slice(i, data, stats)
        # Drain what is in flight, then leave politely.
        while inflight and not args.no_read:
            magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
            kind, length, slot = inflight.pop(handle)
            if kind == CMD_WRITE and not err:
                acked.add(slot)
            elif kind == CMD_READ and not err:
                recv_exact(s, length)
        if args.verify and not args.no_read and args.mode == "write":
            s.settimeout(30)
            for k in sorted(acked):
                s.sendall(request(CMD_READ, 1 << 40, base + k * req, req))
                magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
                if err:
                    stats.add(errors=1)
                    continue
                check_slice(i, recv_exact(s, req), stats)
        if not args.no_read:
            s.sendall(request(CMD_DISC, 0, 0, 0))
    except (OSError, ConnectionError, ValueError) as e:
        stats.add(errors=1)
        if args.verbose:
            print(f"connection {i}: {e}", file=sys.stderr)
    finally:
        stats.add(alive=-1)


def check_slice(i, data, stats):
    """A slot this connection wrote holds its own tag in every 4 KiB block."""
    for w in {data[k:k + 8] for k in range(0, len(data), 4096)}:
        if w[:2] != b"\xc0\xde" or struct.unpack(">H", w[2:4])[0] != i:
            with stats.lock:
                stats.mismatches.append((i, w.hex()))
            return


def rpc_worker(i, args, stats, stop, sockets):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(args.rpc_socket)
    except OSError:
        stats.add(refused=1)
        return
    sockets.append(s)
    stats.add(alive=1)
    s.settimeout(1.0)
    try:
        if args.mode == "rpc-idle":
            stop.wait()
        elif args.mode == "rpc-huge":
            head = b'{"jsonrpc":"2.0","id":1,"method":"query-version","params":{"x":"'
            s.sendall(head + b"a" * (RPC_LIMIT - len(head) - 64))
            stats.add(requests=1, bytes=RPC_LIMIT)
            stop.wait()
        elif args.mode == "rpc-trickle":
            msg = json.dumps({"jsonrpc": "2.0", "id": i, "method": "query-version"}).encode()
            while not stop.is_set():
                for b in msg:
                    if stop.wait(0.05):
                        return
                    s.sendall(bytes([b]))
                stats.add(requests=1, bytes=len(msg))
                line = b""
                while not line.endswith(b"\n") and not stop.is_set():
                    try:
                        chunk = s.recv(4096)
                    except socket.timeout:
                        continue
                    if not chunk:
                        raise ConnectionError("closed by the daemon")
                    line += chunk
        elif args.mode == "rpc-noread":
            msg = json.dumps({"jsonrpc": "2.0", "id": i, "method": "query-named-block-nodes"}).encode()
            while not stop.is_set():
                try:
                    s.sendall(msg * 64)
                except socket.timeout:
                    stop.wait()
                    return
                stats.add(requests=64, bytes=64 * len(msg))
    except (OSError, ConnectionError) as e:
        stats.add(errors=1)
        if args.verbose:
            print(f"connection {i}: {e}", file=sys.stderr)
    finally:
        stats.add(alive=-1)


def rpc_probe(path, timeout=30.0):
    """Seconds a fresh client waits for query-version, or an error string."""
    t0 = time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"query-version"}')
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    return "refused (closed)"
                buf += chunk
            if b'"result"' not in buf:
                return f"error {buf[:80]!r}"
            return time.monotonic() - t0
    except OSError as e:
        return f"failed ({e})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nbd-socket")
    p.add_argument("--nbd-port", type=int, help="NBD over TCP to 127.0.0.1:PORT")
    p.add_argument("--export", default="")
    p.add_argument("--rpc-socket", help="JSON-RPC socket: target of rpc-* modes, and probed every interval")
    p.add_argument("--mode", choices=NBD_MODES + RPC_MODES, default="write")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("--request-size", type=size_arg, default=64 << 10, help="bytes per NBD request (default 64k)")
    p.add_argument("--depth", type=int, default=4, help="NBD requests in flight per connection (default 4)")
    p.add_argument("--no-read", action="store_true", help="never read NBD replies")
    p.add_argument("--verify", action="store_true", help="write mode: read every slice back at the end")
    p.add_argument("--pid", type=int, help="daemon PID whose VmRSS is printed")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait after closing before 'after'")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()

    nbd = args.mode in NBD_MODES
    if nbd and not (args.nbd_socket or args.nbd_port):
        p.error(f"mode {args.mode} needs --nbd-socket or --nbd-port")
    if not nbd and not args.rpc_socket:
        p.error(f"mode {args.mode} needs --rpc-socket")
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        p.error(f"--connections must be 1..{MAX_CONNECTIONS}")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:.0f}]")
    if not 4096 <= args.request_size <= MAX_REQUEST:
        p.error(f"--request-size must be 4k..{MAX_REQUEST >> 20}M")
    if not 1 <= args.depth <= MAX_DEPTH:
        p.error(f"--depth must be 1..{MAX_DEPTH}")
    args.interval = max(args.interval, 0.1)
    args.settle = min(max(args.settle, 0.0), 60.0)

    stats = Stats()
    stop = threading.Event()
    sockets = []
    before = rss_kib(args.pid) if args.pid else None
    peak = before
    print(f"{args.mode}: {args.connections} connections, {args.duration:g} s"
          + (f", {args.request_size} B requests, depth {args.depth}" if nbd and args.mode not in ("idle", "half") else "")
          + (", replies never read" if args.no_read else "")
          + (f"; RSS before {mib(before)}" if args.pid else ""), flush=True)
    worker = nbd_worker if nbd else rpc_worker
    threads = [threading.Thread(target=worker, args=(i, args, stats, stop, sockets), daemon=True)
               for i in range(args.connections)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    deadline = t0 + args.duration
    last = (0, 0)
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(args.interval, deadline - now))
        rss = rss_kib(args.pid) if args.pid else None
        if rss is not None:
            peak = max(peak or 0, rss)
        with stats.lock:
            cur = (stats.requests, stats.bytes)
            line = (f"t={time.monotonic() - t0:6.1f}s alive={stats.alive} refused={stats.refused} "
                    f"errors={stats.errors} requests={cur[0]} (+{cur[0] - last[0]}) "
                    f"MiB={cur[1] >> 20} (+{(cur[1] - last[1]) >> 20})")
        last = cur
        if args.pid:
            line += f" rss={mib(rss)}"
        if args.rpc_socket:
            r = rpc_probe(args.rpc_socket)
            line += f" query-version={r * 1000:.1f}ms" if isinstance(r, float) else f" query-version={r}"
        print(line, flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=max(5.0, args.duration))
    for s in list(sockets):
        try:
            s.close()
        except OSError:
            pass
    time.sleep(args.settle)
    after = rss_kib(args.pid) if args.pid else None
    probe = rpc_probe(args.rpc_socket) if args.rpc_socket else None
    print(f"done: {stats.requests} requests, {stats.bytes >> 20} MiB, {stats.errors} errors, "
          f"{stats.refused} refused at connect")
    if args.pid:
        print(f"RSS before {mib(before)}, peak {mib(peak)}, after {mib(after)}")
    if probe is not None:
        print("fresh query-version after: " + (f"{probe * 1000:.1f} ms" if isinstance(probe, float) else probe))
    if stats.mismatches:
        print(f"DATA MISMATCH: {len(stats.mismatches)} reads held another client's data, e.g. {stats.mismatches[:3]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
