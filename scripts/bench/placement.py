#!/usr/bin/env python3
"""Placement: what spreading node graphs over the reactors buys.

1. N qcow2 images on tmpfs (the CPU is the limit there), each exported over
   NBD and read by its own fio client (4 KiB random read QD32, nbd engine),
   all at once: aggregate IOPS with the images placed on N reactors (the
   default) against all on one reactor (iothread objects pinning them), and
   against one image alone. Goal: N images on N reactors >= 0.9 x N x one.
2. A guest on one disk (fio, 4 KiB random write QD16 over NBD) while a 2 GiB
   mirror of another disk runs: the guest's p99 before and during, with the
   two disks on different reactors (the default) and on one.
   Goal: with different reactors the guest's p99 moves by 10% at most.

The clients run on the same cores as the daemon: on a machine with few cores
they compete with it, which bounds what any placement can show (the figures
record the clients' CPU use).

Usage: placement.py [--dir DIR] [--mirror-dir DIR] [--seconds S] [--images N] [--spindle BIN] [--runs R]
                    [--json FILE]
"""
import argparse
import json
import os
import shutil
import subprocess
import threading
import time

MIB = 1 << 20


def wait_for(path, proc):
    for _ in range(400):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.args}")
        time.sleep(0.025)
    raise RuntimeError(f"{path} never appeared")


class Spindle:
    def __init__(self, binary, work):
        self.rpc = os.path.join(work, "spindle.rpc")
        self.bin = binary
        self.proc = subprocess.Popen([binary, "serve", "--rpc-socket", self.rpc, "--log-level", "warn"])
        wait_for(self.rpc, self.proc)

    def call(self, method, params=None):
        args = [self.bin, "rpc", "-s", self.rpc, method]
        if params is not None:
            args.append(json.dumps(params))
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        return json.loads(out) if out.strip() else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def fio(uri, args, seconds):
    out = subprocess.run(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--time_based",
                          f"--runtime={seconds}", "--size=100%", "--output-format=json", *args],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "p50_us": pct.get("50.000000", 0) / 1000,
            "p99_us": pct.get("99.000000", 0) / 1000, "fio_cpu": (j["usr_cpu"] + j["sys_cpu"]) / 100}


def image(work, name, size, fill):
    path = os.path.join(work, name)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    if fill:
        chunk = 512 * MIB
        cmds = [a for at in range(0, size, chunk) for a in ("-c", f"write -P 0x5a {at} {min(chunk, size - at)}")]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, capture_output=True)
    return path


def serve_images(s, paths, pin_one):
    """Adds and exports each image; with pin_one, all on reactor 0."""
    sock = os.path.join(os.path.dirname(s.rpc), "nbd.sock")
    s.call("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    if pin_one:
        s.call("object-add", {"qom-type": "iothread", "id": "one", "x-reactor": 0})
    for i, p in enumerate(paths):
        s.call("blockdev-add", {"driver": "qcow2", "node-name": f"d{i}", "file": {"driver": "file", "filename": p}})
        export = {"type": "nbd", "id": f"d{i}", "node-name": f"d{i}", "name": f"d{i}", "writable": True}
        if pin_one:
            export["iothread"] = "one"
        s.call("block-export-add", export)
    homes = {n: i for i, r in enumerate(s.call("framework_get_reactors")["reactors"]) for n in r["nodes"]}
    return sock, [homes.get(f"d{i}") for i in range(len(paths))]


def scaling(args, work):
    n = args.images
    paths = [image(work, f"s{i}.qcow2", 256 * MIB, True) for i in range(n)]
    wl = ["--rw=randread", "--bs=4k", "--iodepth=32"]
    rows = {}
    for label, count, pin in (("one image", 1, False), (f"{n} images, one reactor", n, True),
                              (f"{n} images, spread", n, False)):
        runs = []
        for _ in range(args.runs):
            s = Spindle(args.spindle, work)
            try:
                sock, homes = serve_images(s, paths[:count], pin)
                results = [None] * count
                threads = []
                for i in range(count):
                    uri = f"nbd+unix:///d{i}?socket={sock}"

                    def go(i=i, uri=uri):
                        results[i] = fio(uri, wl, args.seconds)
                    threads.append(threading.Thread(target=go))
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                runs.append({"iops": sum(r["iops"] for r in results), "homes": homes,
                             "fio_cpu": sum(r["fio_cpu"] for r in results)})
            finally:
                s.stop()
        runs.sort(key=lambda r: r["iops"])
        rows[label] = runs[len(runs) // 2]
        r = rows[label]
        print(f"{label:<28} {r['iops']:10.0f} IOPS  reactors {r['homes']}  clients' CPU {r['fio_cpu']:.0%}",
              flush=True)
    one = rows["one image"]["iops"]
    spread = rows[f"{n} images, spread"]["iops"]
    print(f"spread / (N x one) = {spread / (n * one):.2f}")
    return rows


def noisy_neighbour(args, work, mirror_work):
    guest = image(work, "guest.qcow2", 1 << 30, True)
    src = image(mirror_work, "src.qcow2", 2 << 30, True)
    tgt = image(mirror_work, "tgt.qcow2", 2 << 30, False)
    wl = ["--rw=randwrite", "--bs=4k", "--iodepth=16"]
    rows = {}
    for label, pin in (("different reactors", False), ("one reactor", True)):
        s = Spindle(args.spindle, work)
        try:
            sock, homes = serve_images(s, [guest], pin)
            src_opts = {"driver": "qcow2", "node-name": "src", "file": {"driver": "file", "filename": src}}
            tgt_opts = {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": tgt}}
            for f in (src, tgt):
                # The target starts empty each time.
                if f == tgt:
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f, str(2 << 30)], check=True)
            s.call("blockdev-add", src_opts)
            s.call("blockdev-add", tgt_opts)
            if pin:
                for n in ("src", "tgt"):
                    s.call("x-blockdev-set-iothread", {"node-name": n, "iothread": "one"})
            uri = f"nbd+unix:///d0?socket={sock}"
            before = fio(uri, wl, args.seconds)
            # Paced so the copy lasts the whole measurement.
            speed = (2 << 30) * 2 // (3 * args.seconds)
            s.call("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                                       "auto-finalize": False, "speed": speed})
            during = fio(uri, wl, args.seconds)
            jobs = s.call("query-jobs")
            s.call("job-cancel", {"id": "m"})
            rows[label] = {"before": before, "during": during, "job": jobs[0]["status"] if jobs else "done"}
            ratio = during["p99_us"] / max(before["p99_us"], 1e-9)
            print(f"{label:<20} p99 {before['p99_us']:.0f} -> {during['p99_us']:.0f} us ({ratio:.2f}x), "
                  f"IOPS {before['iops']:.0f} -> {during['iops']:.0f}, mirror {rows[label]['job']}", flush=True)
        finally:
            s.stop()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--mirror-dir", default="", help="where the mirrored disk lives (default: --dir); a real disk "
                    "keeps the mirror I/O-bound, so what the guest sees is the reactors' sharing, not the CPU's")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--spindle", default="target/release/spindle")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    args.spindle = os.path.abspath(args.spindle)
    work = os.path.join(os.path.abspath(args.dir), "spindle-placement-bench")
    mirror_work = os.path.join(os.path.abspath(args.mirror_dir or args.dir), "spindle-placement-mirror")
    for w in (work, mirror_work):
        shutil.rmtree(w, ignore_errors=True)
        os.makedirs(w)
    try:
        print(f"N qcow2 images on {args.dir}, 4 KiB random reads QD32 over NBD, {args.seconds} s, "
              f"median of {args.runs}")
        result = {"scaling": scaling(args, work)}
        print(f"\nA guest's 4 KiB random writes QD16 during a 2 GiB mirror of another disk, {args.seconds} s each")
        result["neighbour"] = noisy_neighbour(args, work, mirror_work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mirror_work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
