#!/usr/bin/env python3
"""Compressed backup in Spindle and in qemu-storage-daemon, side by side,
on identical images in one run: `blockdev-backup` with `sync: full` and
`compress: true` of a qcow2 disk holding data that compresses (lines of
text, with a stretch of noise every few MiB) into an empty qcow2 target,
zlib and zstd. Per daemon: wall time from the command to
BLOCK_JOB_COMPLETED (median of the runs, daemons alternated), the
target's size (`qemu-img check`'s image-end-offset: the file may be grown
ahead of what the image uses), its compressed clusters (`qemu-img map`),
and `qemu-img compare` with the source. The same backup without
compression gives the rate of the copy itself.

Usage: backup-compress.py --dir DIR [--direct] [--size-mib N] [--runs N]
"""
import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import MIB, Daemon, run_job, sh  # noqa: E402


def source_raw(path, size):
    """Text lines naming their place; every 4th MiB is 256 KiB of noise
    then text again (about 5:1 with zlib as a whole)."""
    noise = os.urandom(256 * 1024)
    with open(path, "wb") as f:
        line = 0
        for mib in range(size // MIB):
            chunk = bytearray()
            if mib % 4 == 3:
                chunk += noise
            while len(chunk) < MIB:
                chunk += f"{line:>12} a line of a log file that compresses, more or less\n".encode()
                line += 1
            f.write(chunk[:MIB])


def qemu_img_json(*args):
    out = subprocess.run(["qemu-img", *args, "--output=json"], capture_output=True, text=True)
    if out.returncode not in (0, 3):
        raise RuntimeError(f"qemu-img {args}: {out.stderr}")
    return json.loads(out.stdout)


def judge(src, tgt):
    """The target as QEMU's tools see it: (image-end-offset, compressed bytes)."""
    sh("qemu-img", "compare", "-q", "-U", src, tgt)
    check = qemu_img_json("check", tgt)
    if check.get("corruptions") or check.get("leaks"):
        raise RuntimeError(f"qemu-img check {tgt}: {check}")
    compressed = sum(e["length"] for e in qemu_img_json("map", "-U", tgt) if e.get("compressed"))
    return check["image-end-offset"], compressed


async def backup(kind, args, work, compression, compress):
    d = Daemon(kind, work, args.spindle, args.direct)
    await d.connect()
    try:
        await d.add("src", f"{work}/src.qcow2")
        await d.add("tgt", f"{work}/tgt.qcow2")
        job = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "compress": compress}
        wall, nbytes, _ = await run_job(d, "blockdev-backup", job, False)
    finally:
        await d.stop()
    end, compressed = judge(f"{work}/src.qcow2", f"{work}/tgt.qcow2")
    return wall, nbytes, end, compressed


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3, help="runs per row and daemon; the median is shown")
    ap.add_argument("--spindle", default="target/release/spindle")
    args = ap.parse_args()
    args.spindle = os.path.abspath(args.spindle)
    size = args.size_mib * MIB
    root = os.path.join(os.path.abspath(args.dir), "spindle-backup-compress-bench")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    try:
        golden = os.path.join(root, "golden")
        os.makedirs(golden)
        source_raw(f"{golden}/src.raw", size)
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", f"{golden}/src.raw", f"{golden}/src.qcow2")
        os.unlink(f"{golden}/src.raw")
        print(f"source: {size // MIB} MiB of data, {'O_DIRECT' if args.direct else 'page cache'}, "
              f"median of {args.runs} runs")
        print(f"{'backup':<26} {'spindle':>30} {'qemu-storage-daemon':>30} {'ratio':>6}")
        for compression, compress in (("zlib", False), ("zlib", True), ("zstd", True)):
            label = f"compress, {compression}" if compress else "no compression"
            samples = {"spindle": [], "qsd": []}
            for _ in range(args.runs):
                for kind in ("spindle", "qsd"):
                    work = os.path.join(root, kind)
                    shutil.copytree(golden, work)
                    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compression_type={compression}",
                       f"{work}/tgt.qcow2", str(size))
                    os.sync()
                    samples[kind].append(await backup(kind, args, work, compression, compress))
                    shutil.rmtree(work)
            cells = {}
            for kind, runs in samples.items():
                runs.sort(key=lambda r: r[0])
                wall, nbytes, end, compressed = runs[len(runs) // 2]
                cells[kind] = (wall, end)
                cells[kind + "_text"] = (f"{nbytes / MIB / wall:6.1f} MiB/s {wall:6.2f} s "
                                         f"{end / MIB:6.1f} MiB ({compressed * 100 // size}% c.)")
            ratio = cells["qsd"][0] / cells["spindle"][0]
            print(f"{label:<26} {cells['spindle_text']:>30} {cells['qsd_text']:>30} {ratio:5.2f}x", flush=True)
            print(f"{'':<26} walls spindle {[round(r[0], 2) for r in samples['spindle']]}, "
                  f"qsd {[round(r[0], 2) for r in samples['qsd']]}; target size spindle / qsd "
                  f"{cells['spindle'][1] / cells['qsd'][1]:.3f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
