#!/usr/bin/env python3
"""NBD export speed: fio's nbd engine against Spindle, qemu-storage-daemon
and qemu-nbd exporting the same image, in one run: 4 KiB random read QD32,
4 KiB random write QD32, 64 KiB sequential read QD8, on a raw file and on
a qcow2, all with O_DIRECT (cache.direct / --cache=none) and io_uring,
and on a null device (null-co: no disk, so the rows measure the servers'
NBD paths alone). The null device runs without read-zeroes: a device that
reports zeroes lets QEMU's server answer reads with hole chunks instead of
data, which measures that shortcut rather than the read path.

Usage: nbd.py --dir DIR [--seconds S] [--size BYTES] [--spindle BIN] [--runs N]
"""
import argparse
import json
import os
import shutil
import subprocess
import time

MIB = 1 << 20

WORKLOADS = [
    ("4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("64k seqread QD8", ["--rw=read", "--bs=64k", "--iodepth=8"]),
]


def wait_for(path, proc):
    for _ in range(400):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.args}")
        time.sleep(0.025)
    raise RuntimeError(f"{path} never appeared")


def start(kind, image, fmt, work, spindle):
    sock = os.path.join(work, f"{kind}.nbd")
    if kind == "spindle":
        rpc = os.path.join(work, "spindle.rpc")
        proc = subprocess.Popen([spindle, "serve", "--rpc-socket", rpc, "--log-level", "warn"])
        wait_for(rpc, proc)

        def call(method, params):
            subprocess.run([spindle, "rpc", "-s", rpc, method, json.dumps(params)], check=True, capture_output=True)
        if fmt == "null":
            call("blockdev-add", {"driver": "null-co", "node-name": "disk", "size": image, "read-zeroes": False})
        else:
            call("blockdev-add", {"driver": fmt, "node-name": "disk",
                                  "file": {"driver": "file", "filename": image, "cache": {"direct": True}}})
        call("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        call("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk", "name": "disk", "writable": True})
    elif kind == "qsd":
        if fmt == "null":
            node = {"node-name": "disk", "driver": "null-co", "size": image, "read-zeroes": False}
        else:
            node = {"node-name": "disk", "driver": fmt,
                    "file": {"driver": "file", "filename": image, "cache": {"direct": True}, "aio": "io_uring"}}
        proc = subprocess.Popen(["qemu-storage-daemon", "--blockdev", json.dumps(node),
                                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                 "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"])
    elif fmt == "null":
        proc = subprocess.Popen(["qemu-nbd", "--image-opts", f"driver=null-co,size={image},read-zeroes=off",
                                 "--persistent", "-x", "disk", "-k", sock, "--shared=4"])
    else:
        proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "--cache=none", "--aio=io_uring", "--persistent", "-x", "disk",
                                 "-k", sock, "--shared=4", image])
    wait_for(sock, proc)
    return proc, sock


def cpu_seconds(pid):
    """User plus system CPU time of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(sock, args, seconds):
    out = subprocess.run(["fio", "--name=nbd", "--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}",
                          "--time_based", f"--runtime={seconds}", "--size=100%", "--output-format=json", *args],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / MIB, "ios": side["total_ios"],
            "lat_us": [pct.get(p, 0) / 1000 for p in ("50.000000", "99.000000", "99.900000")],
            # The client's CPU use (1.0 = one core busy all the time).
            "fio_cpu": (j["usr_cpu"] + j["sys_cpu"]) / 100,
            # Every percentile fio reports, as [percent, us] (for plots), and the maximum.
            "percentiles_us": sorted([float(p), v / 1000] for p, v in pct.items()),
            "max_us": side["clat_ns"].get("max", 0) / 1000}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--spindle", default="target/release/spindle")
    ap.add_argument("--json", default="")
    ap.add_argument("--formats", default="raw,qcow2,null", help="comma-separated: raw, qcow2, null")
    args = ap.parse_args()
    spindle = os.path.abspath(args.spindle)
    work = os.path.join(os.path.abspath(args.dir), "spindle-nbd-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    results = []
    try:
        for fmt in args.formats.split(","):
            if fmt == "null":
                # No image: the "image" passed on is the device's size.
                image = args.size
                print(f"\nnull device, {args.size // MIB} MiB, {args.seconds} s per row")
            else:
                image = os.path.join(work, f"disk.{fmt}")
                subprocess.run(["qemu-img", "create", "-q", "-f", fmt, image, str(args.size)], check=True)
                # Fully allocated, so reads hit data (not holes) on every server.
                subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 0x5a 0 {args.size}", image],
                               check=True, capture_output=True)
                print(f"\n{fmt} image, {args.size // MIB} MiB, {args.seconds} s per row")
            print(f"{'workload':<20} {'server':<9} {'IOPS':>9} {'MiB/s':>8} {'p50/p99/p99.9 us':>20} {'vs QSD':>7}"
                  f" {'srv CPU us/IO':>13} {'fio CPU':>8}")
            for name, wl in WORKLOADS:
                row = {}
                for _ in range(args.runs):
                    for kind in ("spindle", "qsd", "qemu-nbd"):
                        proc, sock = start(kind, image, fmt, work, spindle)
                        try:
                            cpu0 = cpu_seconds(proc.pid)
                            r = fio(sock, wl, args.seconds)
                            # Server CPU per request: what each server spends
                            # when the client, not the server, sets the pace.
                            r["server_cpu_us"] = (cpu_seconds(proc.pid) - cpu0) * 1e6 / max(r["ios"], 1)
                        finally:
                            proc.terminate()
                            proc.wait()
                            if os.path.exists(sock):
                                os.unlink(sock)
                        row.setdefault(kind, []).append(r)
                for kind in ("spindle", "qsd", "qemu-nbd"):
                    runs = sorted(row[kind], key=lambda r: r["iops"])
                    row[kind] = runs[len(runs) // 2]
                for kind in ("spindle", "qsd", "qemu-nbd"):
                    r = row[kind]
                    ratio = r["iops"] / row["qsd"]["iops"]
                    lat = "/".join(f"{x:.0f}" for x in r["lat_us"])
                    print(f"{name:<20} {kind:<9} {r['iops']:9.0f} {r['mibs']:8.1f} {lat:>20} {ratio:6.2f}x"
                          f" {r['server_cpu_us']:13.2f} {r['fio_cpu']:7.0%}", flush=True)
                results.append({"format": fmt, "workload": name, **row})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
