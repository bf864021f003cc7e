#!/usr/bin/env python3
"""Block jobs in Spindle and in qemu-storage-daemon, side by side, on
identical images in one run: MiB/s and wall time per job, the machine's
copy limit (fio), and a live mirror under a fio guest (IOPS and latency
percentiles before and during the job, time to READY).

Usage: jobs.py --dir DIR [--direct] [--scale N] [--only NAME,...] [--live-seconds S]
  --dir      where the images go (a disk file system, or /dev/shm for tmpfs)
  --direct   O_DIRECT for both daemons (cache.direct=true) and for fio
  --scale    divide every image size by N (quick runs)
Both daemons get the same options: file nodes with io_uring (QSD's
aio=io_uring), the same cache mode, the same job arguments.
"""
import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

from qemu.qmp import QMPClient

MIB = 1 << 20
GIB = 1 << 30


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def qemu_img_create(path, size, backing=None, fmt="qcow2"):
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    sh(*cmd, path, str(size))


def fill(path, fmt, ranges):
    """Writes pattern data with qemu-io: ranges of (offset, length)."""
    cmd = ["qemu-io", "-f", fmt]
    for off, length in ranges:
        step = 256 * MIB
        for o in range(off, off + length, step):
            cmd += ["-c", f"write -P 0x5a {o} {min(step, off + length - o)}"]
    sh(*cmd, path)


class Daemon:
    """One daemon (spindle or qsd) driven over QMP."""

    def __init__(self, kind, workdir, spindle_bin, direct):
        self.kind, self.dir, self.direct = kind, workdir, direct
        self.qmp_path = os.path.join(workdir, f"{kind}.qmp")
        self.nbd_path = os.path.join(workdir, f"{kind}.nbd")
        if kind == "spindle":
            rpc = os.path.join(workdir, "spindle.rpc")
            cmd = [spindle_bin, "serve", "--rpc-socket", rpc, "--qmp-socket", self.qmp_path, "--log-level", "warn"]
        else:
            cmd = ["qemu-storage-daemon", "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=m0",
                   "--monitor", "chardev=m0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.qmp = QMPClient(kind)

    async def connect(self):
        for _ in range(200):
            if os.path.exists(self.qmp_path):
                try:
                    await self.qmp.connect(self.qmp_path)
                    return
                except (ConnectionError, OSError):
                    pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not open its QMP socket")

    async def add(self, name, path, fmt="qcow2", backing=None, read_only=False):
        f = {"driver": "file", "filename": path, "aio": "io_uring", "cache": {"direct": self.direct}}
        if self.kind == "spindle":
            del f["aio"]  # Spindle's file driver always uses io_uring
        opts = {"driver": fmt, "node-name": name, "file": f, "read-only": read_only}
        if fmt == "qcow2":
            opts["backing"] = backing
        await self.qmp.execute("blockdev-add", opts)

    async def export(self, node):
        await self.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.nbd_path}}})
        await self.qmp.execute("block-export-add",
                               {"type": "nbd", "id": "disk", "node-name": node, "name": "disk", "writable": True})

    async def stop(self):
        try:
            await self.qmp.execute("quit")
        except Exception:  # the daemon may close the socket first
            pass
        try:
            await self.qmp.disconnect()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def run_job(d, cmd, args, complete):
    """Starts a job and waits for its end (completing it once READY if
    asked); returns (wall seconds, bytes, seconds to READY or None)."""
    job = args["job-id"]
    t_ready = None
    with d.qmp.listener() as events:
        t0 = time.monotonic()
        await d.qmp.execute(cmd, args)
        async for ev in events:
            data = ev.get("data", {})
            if data.get("device") != job:
                continue
            if ev["event"] == "BLOCK_JOB_READY" and complete:
                t_ready = time.monotonic() - t0
                await d.qmp.execute("job-complete", {"id": job})
            elif ev["event"] == "BLOCK_JOB_COMPLETED":
                if "error" in data:
                    raise RuntimeError(f"{d.kind} {cmd}: {data['error']}")
                return time.monotonic() - t0, data["len"], t_ready
            elif ev["event"] == "BLOCK_JOB_CANCELLED":
                raise RuntimeError(f"{d.kind} {cmd}: cancelled")


def scenarios(scale):
    """Each scenario: (name, setup(dir) -> golden files, run(daemon, dir) coroutine factory)."""
    g2, g1 = 2 * GIB // scale, 1 * GIB // scale
    sparse_virtual, sparse_data = 20 * GIB // scale, 200 * MIB // scale

    def mirror(fmt, size, data):
        def setup(dirp):
            src, tgt = f"{dirp}/src.{fmt}", f"{dirp}/tgt.{fmt}"
            qemu_img_create(src, size, fmt=fmt)
            fill(src, fmt, data)
            qemu_img_create(tgt, size, fmt=fmt)

        async def run(d, dirp):
            await d.add("src", f"{dirp}/src.{fmt}", fmt)
            await d.add("tgt", f"{dirp}/tgt.{fmt}", fmt)
            return await run_job(d, "blockdev-mirror",
                                 {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}, True)
        return setup, run

    def commit_active():
        def setup(dirp):
            qemu_img_create(f"{dirp}/base.qcow2", g1)
            qemu_img_create(f"{dirp}/top.qcow2", g1, backing=f"{dirp}/base.qcow2")
            fill(f"{dirp}/top.qcow2", "qcow2", [(0, g1)])

        async def run(d, dirp):
            await d.add("base", f"{dirp}/base.qcow2", backing=None)
            await d.add("top", f"{dirp}/top.qcow2", backing="base")
            return await run_job(d, "block-commit", {"job-id": "j", "device": "top"}, True)
        return setup, run

    def commit_intermediate():
        def setup(dirp):
            qemu_img_create(f"{dirp}/base.qcow2", g1)
            qemu_img_create(f"{dirp}/mid.qcow2", g1, backing=f"{dirp}/base.qcow2")
            fill(f"{dirp}/mid.qcow2", "qcow2", [(0, g1)])
            qemu_img_create(f"{dirp}/top.qcow2", g1, backing=f"{dirp}/mid.qcow2")

        async def run(d, dirp):
            await d.add("base", f"{dirp}/base.qcow2", backing=None)
            await d.add("mid", f"{dirp}/mid.qcow2", backing="base", read_only=True)
            await d.add("top", f"{dirp}/top.qcow2", backing="mid")
            return await run_job(d, "block-commit",
                                 {"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base"}, False)
        return setup, run

    def stream():
        def setup(dirp):
            qemu_img_create(f"{dirp}/base.qcow2", g2)
            fill(f"{dirp}/base.qcow2", "qcow2", [(0, g2)])
            qemu_img_create(f"{dirp}/top.qcow2", g2, backing=f"{dirp}/base.qcow2")

        async def run(d, dirp):
            await d.add("base", f"{dirp}/base.qcow2", backing=None, read_only=True)
            await d.add("top", f"{dirp}/top.qcow2", backing="base")
            return await run_job(d, "block-stream", {"job-id": "j", "device": "top"}, False)
        return setup, run

    step = sparse_virtual // 200
    sparse_ranges = [(i * step, sparse_data // 200) for i in range(200)]
    return [
        ("mirror qcow2->qcow2", *mirror("qcow2", g2, [(0, g2)])),
        ("mirror raw->raw", *mirror("raw", g2, [(0, g2)])),
        ("commit active", *commit_active()),
        ("commit intermediate", *commit_intermediate()),
        ("stream", *stream()),
        ("mirror sparse qcow2", *mirror("qcow2", sparse_virtual, sparse_ranges)),
    ]


def copy_limit(dirp, size, direct):
    """What fio copies on this file system: 1 MiB reads of one file and 1 MiB
    writes of another at once, QD16 each, kept in step by fio's flow control
    (a copy writes what it reads, so neither side may run ahead). Returns
    (copy rate, read rate, write rate) in MiB/s."""
    a, b = f"{dirp}/fio-a", f"{dirp}/fio-b"
    with open(a, "wb") as f:
        f.truncate(size)
    common = ["--ioengine=io_uring", "--bs=1M", "--iodepth=16", f"--direct={int(direct)}", f"--size={size}",
              "--output-format=json"]
    sh("fio", "--name=prep", f"--filename={a}", "--rw=write", *common)
    os.sync()
    flow = ["--flow_id=1", "--flow=1"]
    out = subprocess.run(["fio", "--name=r", f"--filename={a}", "--rw=read", *common, *flow,
                          "--name=w", f"--filename={b}", "--rw=write", *common, *flow],
                         check=True, capture_output=True, text=True).stdout
    jobs = json.loads(out[out.index("{"):])["jobs"]
    os.unlink(a)
    os.unlink(b)
    rd = jobs[0]["read"]["bw_bytes"] / MIB
    wr = jobs[1]["write"]["bw_bytes"] / MIB
    return min(rd, wr), rd, wr


async def fio_guest(d, seconds):
    uri = f"nbd+unix:///disk?socket={d.nbd_path}"
    proc = await asyncio.create_subprocess_exec(
        "fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--rwmixread=70", "--bs=4k",
        "--iodepth=16", "--time_based", f"--runtime={seconds}", "--size=100%", "--output-format=json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    text = out.decode()
    if proc.returncode != 0 or "{" not in text:
        raise RuntimeError(f"fio failed: {err.decode()} {text}")
    # fio may print notes before its JSON.
    j = json.loads(text[text.index("{"):])["jobs"][0]

    def pct(side, p):
        return j[side]["clat_ns"].get("percentile", {}).get(p, 0) / 1000.0

    return {
        "iops": j["read"]["iops"] + j["write"]["iops"],
        "read": [pct("read", "50.000000"), pct("read", "99.000000"), pct("read", "99.900000")],
        "write": [pct("write", "50.000000"), pct("write", "99.000000"), pct("write", "99.900000")],
    }


async def live(kind, args, dirp, speed, mode, seconds):
    """A fio guest on the exported source, then the same guest during a mirror."""
    d = Daemon(kind, dirp, args.spindle, args.direct)
    await d.connect()
    try:
        await d.add("src", f"{dirp}/src.qcow2")
        await d.add("tgt", f"{dirp}/tgt.qcow2")
        await d.export("src")
        before = await fio_guest(d, args.live_seconds)
        t_ready = None
        with d.qmp.listener() as events:
            guest = asyncio.ensure_future(fio_guest(d, seconds))
            t0 = time.monotonic()
            job = {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "copy-mode": mode}
            if speed:
                job["speed"] = speed
            await d.qmp.execute("blockdev-mirror", job)

            async def ready():
                async for ev in events:
                    if ev["event"] == "BLOCK_JOB_READY":
                        return time.monotonic() - t0
            try:
                t_ready = await asyncio.wait_for(ready(), timeout=seconds)
            except asyncio.TimeoutError:
                t_ready = None
            during = await guest
        await d.qmp.execute("job-cancel", {"id": "j"})
        return before, during, t_ready
    finally:
        await d.stop()


def fmt_rate(wall, nbytes):
    return f"{nbytes / MIB / wall:8.1f} MiB/s {wall:7.2f} s"


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--only", default="")
    ap.add_argument("--live-seconds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1, help="runs per job and daemon; the median is shown")
    ap.add_argument("--spindle", default="target/release/spindle")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    args.spindle = os.path.abspath(args.spindle)
    only = [o for o in args.only.split(",") if o]
    root = os.path.join(os.path.abspath(args.dir), "spindle-jobs-bench")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    results = {"dir": args.dir, "direct": args.direct, "scale": args.scale, "jobs": [], "live": []}
    try:
        limit, rd, wr = copy_limit(root, max(GIB // args.scale, 64 * MIB), args.direct)
        results["copy_limit"] = {"min": limit, "read": rd, "write": wr}
        print(f"copy limit (fio, 1M reads and writes in step, QD16 each): {limit:.0f} MiB/s "
              f"(read {rd:.0f}, write {wr:.0f})")
        print(f"{'job':<22} {'spindle':>24} {'qemu-storage-daemon':>24} {'ratio':>7}")
        for name, setup, run in scenarios(args.scale):
            if only and not any(o in name for o in only):
                continue
            golden = os.path.join(root, "golden")
            os.makedirs(golden)
            setup(golden)
            row = {"job": name}
            samples = {"spindle": [], "qsd": []}
            # Alternate the daemons so drifts of the machine hit both alike.
            for _ in range(args.runs):
                for kind in ("spindle", "qsd"):
                    work = os.path.join(root, kind)
                    shutil.copytree(golden, work)
                    # The copies are dirty in the page cache: write them back
                    # now, not while the job reads the files.
                    os.sync()
                    d = Daemon(kind, work, args.spindle, args.direct)
                    await d.connect()
                    try:
                        samples[kind].append(await run(d, work))
                    finally:
                        await d.stop()
                    shutil.rmtree(work)
            for kind, runs in samples.items():
                runs.sort(key=lambda r: r[0])
                row[kind] = runs[len(runs) // 2]
                row[kind + "_walls"] = [r[0] for r in runs]
            shutil.rmtree(golden)
            (ws, bs, _), (wq, _, _) = row["spindle"], row["qsd"]
            # Same images, same work: the ratio is of wall times (the
            # daemons count progress differently, e.g. for sparse disks).
            ratio = wq / ws
            bq = row["qsd"][1]
            print(f"{name:<22} {fmt_rate(ws, bs):>24} {fmt_rate(wq, bs):>24} {ratio:6.2f}x", flush=True)
            del bq
            results["jobs"].append(row)

        if not only or any("live" in o for o in only):
            size = 2 * GIB // args.scale
            for speed, mode in ((0, "background"), (100 * MIB, "background"), (100 * MIB, "write-blocking")):
                # Long enough for a limited job to copy the disk once and then some.
                seconds = args.live_seconds if not speed else max(args.live_seconds, int(size / speed * 1.5) + 5)
                golden = os.path.join(root, "golden")
                os.makedirs(golden)
                qemu_img_create(f"{golden}/src.qcow2", size)
                fill(f"{golden}/src.qcow2", "qcow2", [(0, size)])
                qemu_img_create(f"{golden}/tgt.qcow2", size)
                label = f"live mirror, {mode}, speed {'unlimited' if not speed else f'{speed // MIB} MiB/s'}"
                print(f"\n{label} (fio nbd 4k randrw 70/30 QD16, {args.live_seconds} s before, {seconds} s during)")
                for kind in ("spindle", "qsd"):
                    work = os.path.join(root, kind)
                    shutil.copytree(golden, work)
                    # The copies are dirty in the page cache: write them back
                    # now, not while the job reads the files.
                    os.sync()
                    before, during, t_ready = await live(kind, args, work, speed, mode, seconds)
                    shutil.rmtree(work)
                    ready = f"{t_ready:.2f} s" if t_ready is not None else f"not within {seconds} s"
                    print(f"  {kind:<8} before: {before['iops']:8.0f} IOPS  read p50/p99/p99.9 "
                          f"{'/'.join(f'{x:.0f}' for x in before['read'])} us  write p99 {before['write'][1]:.0f} us")
                    print(f"  {'':<8} during: {during['iops']:8.0f} IOPS  read p50/p99/p99.9 "
                          f"{'/'.join(f'{x:.0f}' for x in during['read'])} us  write p99 {during['write'][1]:.0f} us"
                          f"  READY after {ready}", flush=True)
                    results["live"].append({"kind": kind, "speed": speed, "mode": mode, "before": before, "during": during,
                                            "ready_s": t_ready})
                shutil.rmtree(golden)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
