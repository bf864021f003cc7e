#!/usr/bin/env python3
"""Backup in Spindle and in qemu-storage-daemon, side by side on identical
images in one run: a full backup (MiB/s, against the machine's copy limit
measured by fio in the same run), an incremental backup of a sparse disk
with 1% dirty (its cost against the full backup's), a fio guest's random
writes before and during a full backup (IOPS, p99), and what one enabled
dirty bitmap costs 4 KiB random writes (`spindle perf`, with and without).

Usage: backup.py --dir DIR [--direct] [--scale N] [--runs N] [--only full,incremental,live,bitmap]
Both daemons get the same options (file nodes on io_uring, the same cache
mode, the same job arguments); jobs.py holds the shared machinery.
"""
import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jobs as jb  # noqa: E402

MIB, GIB = jb.MIB, jb.GIB


async def full_backup(d, dirp):
    await d.add("src", f"{dirp}/src.qcow2")
    await d.add("tgt", f"{dirp}/tgt.qcow2")
    return await jb.run_job(d, "blockdev-backup",
                            {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}, False)


def dirty_writes(virtual, fraction, chunk=64 * 1024):
    """Offsets of `fraction` of `virtual` bytes in `chunk`s, spread evenly."""
    n = int(virtual * fraction) // chunk
    step = virtual // n
    return [i * step for i in range(n)], chunk


async def incremental(d, dirp, virtual):
    await d.add("src", f"{dirp}/src.qcow2")
    await d.add("tgt", f"{dirp}/tgt.qcow2", backing=None)
    await d.qmp.execute("block-dirty-bitmap-add", {"node": "src", "name": "b"})
    await d.export("src")
    offsets, chunk = dirty_writes(virtual, 0.01)
    uri = f"nbd+unix:///disk?socket={d.nbd_path}"
    cmd = ["qemu-io", "-f", "raw"]
    for o in offsets:
        cmd += ["-c", f"write -P 0x6b {o} {chunk}"]
    jb.sh(*cmd, uri)
    await d.qmp.execute("block-export-del", {"id": "disk"})
    await asyncio.sleep(0.2)
    return await jb.run_job(d, "blockdev-backup",
                            {"job-id": "j", "device": "src", "target": "tgt", "sync": "incremental", "bitmap": "b"},
                            False)


async def fio_randwrite(d, seconds):
    uri = f"nbd+unix:///disk?socket={d.nbd_path}"
    proc = await asyncio.create_subprocess_exec(
        "fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
        "--time_based", f"--runtime={seconds}", "--size=100%", "--output-format=json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    text = out.decode()
    if proc.returncode != 0 or "{" not in text:
        raise RuntimeError(f"fio failed: {err.decode()} {text}")
    j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    pct = j["clat_ns"].get("percentile", {})
    return {"iops": j["iops"], "p50": pct.get("50.000000", 0) / 1000, "p99": pct.get("99.000000", 0) / 1000}


async def live(kind, args, dirp, seconds):
    """The guest alone, then the guest during a full backup (speed-limited
    so the backup lasts the whole measurement)."""
    d = jb.Daemon(kind, dirp, args.spindle, args.direct)
    await d.connect()
    try:
        await d.add("src", f"{dirp}/src.qcow2")
        await d.add("tgt", f"{dirp}/tgt.qcow2")
        await d.export("src")
        before = await fio_randwrite(d, seconds)
        size = os.path.getsize(f"{dirp}/src.qcow2")
        speed = max(int(size / (seconds * 1.5)), 16 * MIB)
        await d.qmp.execute("blockdev-backup",
                            {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": speed})
        during = await fio_randwrite(d, seconds)
        jobs = await d.qmp.execute("query-jobs")
        still = any(j["id"] == "j" for j in jobs)
        if still:
            await d.qmp.execute("job-cancel", {"id": "j"})
        return before, during, still
    finally:
        await d.stop()


def perf(args, sock, node, seconds):
    out = subprocess.run([args.spindle, "perf", "-s", sock, "--node", node, "-q", "32", "-o", "4k", "-w", "randwrite",
                          "-t", str(seconds), "--warmup", "1", "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


async def bitmap_cost(args, dirp, size, seconds, runs):
    """4 KiB random writes on a raw file node in Spindle, without and with
    one enabled bitmap, alternating, median IOPS of each."""
    jb.qemu_img_create(f"{dirp}/p.raw", size, fmt="raw")
    jb.fill(f"{dirp}/p.raw", "raw", [(0, size)])
    d = jb.Daemon("spindle", dirp, args.spindle, args.direct)
    await d.connect()
    rpc = os.path.join(dirp, "spindle.rpc")
    try:
        await d.add("p", f"{dirp}/p.raw", fmt="raw")
        samples = {"without": [], "with": []}
        for _ in range(runs):
            for mode in ("without", "with"):
                if mode == "with":
                    await d.qmp.execute("block-dirty-bitmap-add", {"node": "p", "name": "b"})
                r = perf(args, rpc, "p", seconds)
                samples[mode].append(r["total"]["iops"] if "total" in r else r["iops"])
                if mode == "with":
                    await d.qmp.execute("block-dirty-bitmap-remove", {"node": "p", "name": "b"})
        return {m: sorted(v)[len(v) // 2] for m, v in samples.items()}, samples
    finally:
        await d.stop()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--live-seconds", type=int, default=10)
    ap.add_argument("--spindle", default="target/release/spindle")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    args.spindle = os.path.abspath(args.spindle)
    only = [o for o in args.only.split(",") if o]
    want = lambda name: not only or name in only  # noqa: E731
    root = os.path.join(os.path.abspath(args.dir), "spindle-backup-bench")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    results = {"dir": args.dir, "direct": args.direct, "scale": args.scale}
    g2, virtual = 2 * GIB // args.scale, 20 * GIB // args.scale
    try:
        async def side_by_side(name, setup, run):
            golden = os.path.join(root, "golden")
            os.makedirs(golden)
            setup(golden)
            samples = {"spindle": [], "qsd": []}
            for _ in range(args.runs):
                for kind in ("spindle", "qsd"):
                    work = os.path.join(root, kind)
                    shutil.copytree(golden, work)
                    os.sync()
                    d = jb.Daemon(kind, work, args.spindle, args.direct)
                    await d.connect()
                    try:
                        samples[kind].append(await run(d, work))
                    finally:
                        await d.stop()
                    shutil.rmtree(work)
            shutil.rmtree(golden)
            med = {k: sorted(v, key=lambda r: r[0])[len(v) // 2] for k, v in samples.items()}
            (ws, bs, _), (wq, bq, _) = med["spindle"], med["qsd"]
            print(f"{name:<28} spindle {jb.fmt_rate(ws, bs)}   qsd {jb.fmt_rate(wq, bq)}   ratio {wq / ws:5.2f}x",
                  flush=True)
            return {"spindle": med["spindle"], "qsd": med["qsd"], "walls": {k: [r[0] for r in v] for k, v in samples.items()}}

        if want("full") or want("incremental"):
            limit, rd, wr = jb.copy_limit(root, max(GIB // args.scale, 64 * MIB), args.direct)
            results["copy_limit"] = {"min": limit, "read": rd, "write": wr}
            print(f"copy limit (fio, 1M reads and writes in step, QD16 each): {limit:.0f} MiB/s")

        if want("full"):
            def setup(g):
                jb.qemu_img_create(f"{g}/src.qcow2", g2)
                jb.fill(f"{g}/src.qcow2", "qcow2", [(0, g2)])
                jb.qemu_img_create(f"{g}/tgt.qcow2", g2)
            r = await side_by_side(f"full backup {g2 // MIB} MiB", setup, full_backup)
            ws, bs, _ = r["spindle"]
            print(f"  spindle at {bs / MIB / ws / results['copy_limit']['min']:.2f}x of the copy limit")
            results["full"] = r

        if want("incremental"):
            def setup(g):
                jb.qemu_img_create(f"{g}/src.qcow2", virtual)
                step = virtual // 64
                jb.fill(f"{g}/src.qcow2", "qcow2", [(i * step, 16 * MIB) for i in range(64)])
                jb.qemu_img_create(f"{g}/tgt.qcow2", virtual)
            r = await side_by_side(f"incremental 1% of {virtual // GIB} GiB", setup,
                                   lambda d, w: incremental(d, w, virtual))
            results["incremental"] = r

        if want("live"):
            golden = os.path.join(root, "golden")
            os.makedirs(golden)
            jb.qemu_img_create(f"{golden}/src.qcow2", g2)
            jb.fill(f"{golden}/src.qcow2", "qcow2", [(0, g2)])
            jb.qemu_img_create(f"{golden}/tgt.qcow2", g2)
            print(f"\nfio guest (nbd, 4k randwrite QD16, {args.live_seconds} s) before and during a full backup")
            results["live"] = {}
            for kind in ("spindle", "qsd"):
                work = os.path.join(root, kind)
                shutil.copytree(golden, work)
                os.sync()
                before, during, lasted = await live(kind, args, work, args.live_seconds)
                shutil.rmtree(work)
                print(f"  {kind:<8} before {before['iops']:8.0f} IOPS p99 {before['p99']:7.0f} us   "
                      f"during {during['iops']:8.0f} IOPS p99 {during['p99']:7.0f} us"
                      f"{'' if lasted else '  (the backup ended early)'}", flush=True)
                results["live"][kind] = {"before": before, "during": during, "lasted": lasted}
            shutil.rmtree(golden)
            s, q = results["live"]["spindle"]["during"], results["live"]["qsd"]["during"]
            print(f"  p99 during: spindle/qsd {s['p99'] / q['p99']:.2f}; IOPS during spindle/qsd {s['iops'] / q['iops']:.2f}")

        if want("bitmap"):
            work = os.path.join(root, "bitmap")
            os.makedirs(work)
            med, samples = await bitmap_cost(args, work, 1 * GIB // args.scale, 5, args.runs)
            cost = 1 - med["with"] / med["without"]
            print(f"\nspindle perf 4k randwrite QD32, raw file node: {med['without']:.0f} IOPS without a bitmap, "
                  f"{med['with']:.0f} with one ({cost * 100:+.1f}% cost)")
            results["bitmap"] = {"median": med, "samples": samples, "cost": cost}
            shutil.rmtree(work)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    t0 = time.monotonic()
    asyncio.run(main())
    print(f"({time.monotonic() - t0:.0f} s)")
