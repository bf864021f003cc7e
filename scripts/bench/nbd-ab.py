#!/usr/bin/env python3
"""Round-robin A/B of NBD servers: every round runs each variant once (a
fresh server, one fio run), so the disk's drift over minutes falls on all
variants alike; prints each round, then per variant the mean IOPS and the
mean of the per-round ratios to the first variant.

A variant is LABEL=BINARY (a spindle build), LABEL=qsd, LABEL=qemu-nbd or
LABEL=limit: fio's io_uring engine with O_DIRECT on a fully written raw file
of the same size beside the image (no server, no socket: what the disk gives
at the same queue depth right then). Same images, node options and fio
settings as nbd.py.

Usage: nbd-ab.py --dir DIR [--rounds N] [--seconds S] [--format raw|qcow2|null]
                 [--workload "4k randread QD32"] VARIANT VARIANT...
e.g.   nbd-ab.py --dir target/ab new=target/release/spindle old=/tmp/spindle-old qsd=qsd
       nbd-ab.py --dir target/ab --format qcow2 qsd=qsd spindle=target/release/spindle disk=limit
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402  (nbd.py beside this script)

PEERS = ("qsd", "qemu-nbd", "limit")


def fio_direct(path, args, seconds):
    """fio's io_uring engine on a file with O_DIRECT: the disk's own rate."""
    out = subprocess.run(["fio", "--name=limit", f"--filename={path}", "--ioengine=io_uring", "--direct=1",
                          "--time_based", f"--runtime={seconds}", "--output-format=json", *args],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    return (j["read"] if j["read"]["io_bytes"] else j["write"])["iops"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--format", default="raw", choices=["raw", "qcow2", "null"])
    ap.add_argument("--workload", default=nbd.WORKLOADS[0][0], choices=[w for w, _ in nbd.WORKLOADS])
    ap.add_argument("variants", nargs="+", help="LABEL=BINARY, LABEL=qsd, LABEL=qemu-nbd or LABEL=limit")
    args = ap.parse_args()
    variants = []
    for v in args.variants:
        label, _, what = v.partition("=")
        if not what:
            ap.error(f"variant {v!r}: want LABEL=BINARY, LABEL=qsd, LABEL=qemu-nbd or LABEL=limit")
        variants.append((label, what if what in PEERS else os.path.abspath(what)))
    wl = dict(nbd.WORKLOADS)[args.workload]
    work = os.path.join(os.path.abspath(args.dir), "spindle-nbd-ab")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    iops = {label: [] for label, _ in variants}
    try:
        if args.format == "null":
            image = args.size
        else:
            image = os.path.join(work, f"disk.{args.format}")
            subprocess.run(["qemu-img", "create", "-q", "-f", args.format, image, str(args.size)], check=True)
            subprocess.run(["qemu-io", "-f", args.format, "-c", f"write -P 0x5a 0 {args.size}", image],
                           check=True, capture_output=True)
        limit = os.path.join(work, "limit.raw")
        if any(what == "limit" for _, what in variants):
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", limit, str(args.size)], check=True)
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {args.size}", limit],
                           check=True, capture_output=True)
        print(f"{args.format}, {args.workload}, {args.seconds} s per run, {args.rounds} rounds")
        for r in range(args.rounds):
            for label, what in variants:
                if what == "limit":
                    iops[label].append(fio_direct(limit, wl, args.seconds))
                    continue
                kind = what if what in PEERS else "spindle"
                proc, sock = nbd.start(kind, image, args.format, work, what)
                try:
                    iops[label].append(nbd.fio(sock, wl, args.seconds)["iops"])
                finally:
                    proc.terminate()
                    proc.wait()
                    if os.path.exists(sock):
                        os.unlink(sock)
            print(f"round {r + 1}: " + "  ".join(f"{label} {iops[label][-1] / 1000:.1f}k" for label, _ in variants),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = variants[0][0]
    for label, _ in variants:
        ratios = [a / b for a, b in zip(iops[label], iops[base])]
        print(f"{label:<12} mean {statistics.mean(iops[label]) / 1000:.1f}k IOPS"
              f"  ratio to {base}: mean {statistics.mean(ratios):.3f}, rounds {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
