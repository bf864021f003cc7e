#!/usr/bin/env python3
"""The whole benchmark suite in one run, written up as one markdown report.

Usage: suite.py --mode short|full [--write-docs] [--report FILE] [--sections LIST]
                [--work DIR] [--shm DIR] [--spindle BIN]
Normally started by scripts/bench/all.sh, which installs the tools and builds.

Sections, in order (--sections takes a comma-separated subset):
  memcpy  the machine's single-core 4 KiB copy rate (criterion, full mode only)
  limits  what fio gets from the file system under target/ (io_uring, O_DIRECT)
  perf    `spindle perf` on null-co, malloc, a raw file and a qcow2, next to
          `qemu-img bench` on the same inputs and to the fio limits
  idle    CPU of an idle daemon (scripts/bench/idle-cpu.sh)
  nbd     NBD export against qemu-storage-daemon and qemu-nbd (nbd.py)
  jobs    block jobs against qemu-storage-daemon (jobs.py), disk and tmpfs

The report goes between the marker lines of docs/benchmarks.md in full mode
and into target/bench-short.md in short mode (unless --write-docs), so quick
checks never replace the real report. Raw results go next to it as JSON.
Every process started here runs in its own process group and is stopped by
that id on the way out; the scratch directories are removed at the end.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

MIB = 1 << 20
GIB = 1 << 30
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
# fio's flow control keeps jobs of one flow id in step: the two sides of a
# copy move the same number of bytes.
IN_STEP = ["--flow_id=1", "--flow=1"]
SECTIONS = ["memcpy", "limits", "perf", "idle", "nbd", "jobs"]

MODES = {
    # seconds: measured time of each fio / spindle perf run; size: the read
    # file and qcow2; write_size: the fresh images written sequentially (big
    # enough that a run at a few GB/s never wraps around and overwrites what
    # it wrote; sparse, and only what a run writes takes space, for the run).
    "short": {"seconds": 2, "size": 256 * MIB, "write_size": 8 * GIB, "runs": 1, "idle_window": 3,
              "nbd": ["--runs", "1", "--seconds", "2", "--size", str(256 * MIB)],
              "jobs": ["--scale", "16", "--only", "mirror qcow2,stream"]},
    "full": {"seconds": 8, "size": 1 * GIB, "write_size": 32 * GIB, "runs": 3, "idle_window": 10,
             "nbd": ["--runs", "3", "--seconds", "8"],
             "jobs": ["--runs", "3"]},
}


# ---------------------------------------------------------------- processes

class Interrupted(BaseException):
    """A signal: stops the suite (unlike a failed section, which is noted
    in the report while the other sections go on)."""


def on_signal(signum, _frame):
    # Raise once; a second signal while cleaning up is ignored so the
    # cleanup itself is not cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(f"signal {signum}")


def stop_group(proc):
    """Stops a child and everything it started (its process group, which is
    its own pid): SIGINT first so scripts clean up, then SIGTERM, SIGKILL."""
    pgid = proc.pid

    def group_alive():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    for sig, grace in ((signal.SIGINT, 60), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None and not group_alive():
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or group_alive()):
            time.sleep(0.1)
    proc.wait()


def run(cmd, capture=True, check=True, cwd=ROOT):
    """Runs a command to its end in a new process group; returns
    (exit status, stdout, stderr). With capture=False the output goes to
    the terminal. Any exception (a signal included) stops the group."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, text=True, start_new_session=True,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    try:
        out, err = proc.communicate()
    except BaseException:
        stop_group(proc)
        raise
    try:
        os.killpg(proc.pid, 0)
        stop_group(proc)  # something it started outlived it
    except (ProcessLookupError, PermissionError):
        pass
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n{err or ''}{out or ''}")
    return proc.returncode, out or "", err or ""


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------- formatting

def si(x):
    """8412345 -> '8.41 M', 45210 -> '45.2 k'."""
    if x is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{x:.3g}"


def mibs(x):
    return "—" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.3g}")


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def fx(r):
    return "—" if r is None else f"{r:.2f}×"


def us(v):
    """A latency in µs: 0.221, 9.95, 31.3, 726, 8510."""
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.3g}")


def lat(values):
    if not values:
        return "—"
    return " / ".join(us(v) for v in values)


def median_by(runs, key):
    runs = sorted(runs, key=lambda r: r[key])
    return runs[len(runs) // 2]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- machine

def machine_facts(work):
    def out(cmd):
        try:
            return run(cmd, check=False)[1].strip()
        except OSError:
            return ""

    facts = {}
    cpu = out(["lscpu"])
    m = re.search(r"^Model name:\s*(.+)$", cpu, re.M)
    facts["cpu"] = m.group(1).strip() if m else "unknown"
    m = re.search(r"^Hypervisor vendor:\s*(.+)$", cpu, re.M)
    if m:
        facts["cpu"] += f" ({m.group(1).strip()} guest)"
    facts["cores"] = os.cpu_count()
    with open("/proc/meminfo") as f:
        kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    facts["memory"] = f"{kb / (1 << 20):.1f} GiB"
    facts["kernel"] = os.uname().release
    fs = out(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", work]) or out(["df", "-T", work]).splitlines()[-1]
    facts["filesystem"] = " ".join(fs.split())
    facts["fio"] = out(["fio", "--version"])
    facts["qemu"] = out(["qemu-img", "--version"]).splitlines()[0] if out(["qemu-img", "--version"]) else ""
    rev = out(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    facts["commit"] = (rev + (" with local changes" if dirty else "")) if rev else "unknown"
    facts["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return facts


# ---------------------------------------------------------------- fio

def fio(jobs, seconds=None):
    """Runs fio with one or more jobs (lists of options, each starting with
    --name=...) at once; returns one summary per job."""
    cmd = ["fio", "--output-format=json"]
    if seconds:
        cmd += ["--time_based", f"--runtime={seconds}"]
    for job in jobs:
        cmd += job
    text = run(cmd)[1]
    data = json.loads(text[text.index("{"):])  # fio may print notes first
    results = []
    for j in data["jobs"]:
        side = j["read"] if j["read"]["io_bytes"] else j["write"]
        pct = side["clat_ns"].get("percentile", {})
        results.append({"iops": side["iops"], "mibs": side["bw_bytes"] / MIB,
                        "lat_us": [pct.get(p, 0) / 1000 for p in ("50.000000", "99.000000", "99.900000")]})
    return results


def fresh_file(path, size):
    """A sparse file of `size` bytes, as `qemu-img create -f raw` makes."""
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def measure_limits(cfg, work, disk):
    """The file system's limits, each the median of cfg['runs'] fio runs."""
    t = cfg["seconds"]
    common = ["--ioengine=io_uring", "--direct=1"]
    fresh = os.path.join(work, "fio-fresh")

    def on_disk(rw, bs, qd):
        return [f"--filename={disk}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={cfg['size']}",
                *common]

    def fresh_write():
        return [f"--filename={fresh}", "--rw=write", "--bs=1M", "--iodepth=8", f"--size={cfg['write_size']}",
                "--fallocate=none", *common]

    tests = [
        ("seq_read_1m", "1 MiB sequential read QD8", lambda: [["--name=r", *on_disk("read", "1M", 8)]]),
        ("seq_write_1m", "1 MiB sequential write QD8, fresh sparse file", lambda: [["--name=w", *fresh_write()]]),
        ("copy_1m", "copy: 1 MiB reads QD8 of one file and 1 MiB writes QD8 of a fresh one, kept in step",
         lambda: [["--name=r", *on_disk("read", "1M", 8), *IN_STEP], ["--name=w", *fresh_write(), *IN_STEP]]),
        ("randread_4k", "4 KiB random read QD32", lambda: [["--name=r", *on_disk("randread", "4k", 32)]]),
        ("read_4k", "4 KiB sequential read QD32", lambda: [["--name=r", *on_disk("read", "4k", 32)]]),
        ("randwrite_4k", "4 KiB random write QD32 (allocated file)",
         lambda: [["--name=w", *on_disk("randwrite", "4k", 32)]]),
        ("read_64k", "64 KiB sequential read QD8", lambda: [["--name=r", *on_disk("read", "64k", 8)]]),
        ("null_4k", "null engine, 4 KiB QD128 (fio's own overhead)",
         lambda: [["--name=n", "--ioengine=null", "--rw=randread", "--bs=4k", "--iodepth=128", "--size=1G"]]),
    ]
    limits = {}
    for key, label, jobs in tests:
        runs = []
        for _ in range(cfg["runs"]):
            if key in ("seq_write_1m", "copy_1m"):
                fresh_file(fresh, cfg["write_size"])
            res = fio(jobs(), t)
            if os.path.exists(fresh):
                os.unlink(fresh)
            r = dict(res[0])
            if key == "copy_1m":
                # Both sides move in step; the write side is kept too.
                r["write_mibs"] = res[1]["mibs"]
            runs.append(r)
        limits[key] = dict(median_by(runs, "iops"), label=label)
        extra = f" (write side {limits[key]['write_mibs']:.0f} MiB/s)" if key == "copy_1m" else ""
        log(f"  limit {label}: {si(limits[key]['iops'])} IOPS, {limits[key]['mibs']:.0f} MiB/s{extra}")
    return limits


# ---------------------------------------------------------------- perf

def spindle_perf(spindle, device, workload, qd, bs, seconds, hist, prefill=False):
    cmd = [spindle, "perf", "-q", qd, "-o", bs, "-w", workload, "-t", seconds, "--device", json.dumps(device),
           "--json", "--histogram", hist]
    if prefill:
        cmd.append("--prefill")
    out = run(cmd)[1]
    total = json.loads(out)["total"]
    if total["failures"]:
        raise RuntimeError(f"spindle perf: {total['failures']} failed requests on {json.dumps(device)}")
    lu = total["latency_us"]
    return {"iops": total["iops"], "mibs": total["mib_s"], "ios": total["ios"], "bytes": total["bytes"],
            "lat_us": [lu["p50"], lu["p99"], lu["p99_9"]], "hist": hist}


def qemu_img_bench(spec, count, qd, bs, write=False):
    """qemu-img bench; `spec` is its image arguments (format, cache, aio,
    image). It runs a fixed count of requests; IOPS = count / elapsed."""
    cmd = ["qemu-img", "bench", *spec[:-1], "-c", count, "-d", qd, "-s", bs]
    if write:
        cmd += ["-w", "--pattern", "90"]
    out = run(cmd + [spec[-1]])[1]
    secs = float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))
    secs = max(secs, 1e-3)
    return {"iops": count / secs, "mibs": count * bs / MIB / secs, "count": count, "seconds": secs}


def qemu_img_bench_for(spec, qd, bs, seconds, guess):
    """A read run of about `seconds`: a short calibration run first (reads
    change nothing, so it does not disturb the measured one)."""
    count = max(1000, int(guess))
    while True:
        r = qemu_img_bench(spec, count, qd, bs)
        if r["seconds"] >= 0.25 or count > 1e9:
            break
        count *= 8
    return qemu_img_bench(spec, max(1000, int(r["iops"] * seconds)), qd, bs)


def perf_rows(shm, disk, qcow2):
    """What `spindle perf` runs, and the qemu-img bench peer of each row.
    qemu-img bench only reads or writes sequentially (offsets step by the
    request size), so its peers are Spindle's sequential rows; the random
    rows are held against fio (and qcow2 against raw) instead."""
    null = {"driver": "null-co", "size": GIB, "read-zeroes": False}
    malloc = {"driver": "malloc", "size": 256 * MIB}
    ram = os.path.join(shm, "ram.raw")

    def fdev(path, fmt):
        f = {"driver": "file", "filename": path, "cache": {"direct": True}}
        return f if fmt == "raw" else {"driver": "qcow2", "file": f}

    def direct(fmt, path):
        return ["-f", fmt, "-t", "none", "-i", "io_uring", path]

    return [
        # sp: (device, workload, queue depth, request size, prefill); for the
        # write rows the device is an image format, created fresh for each run.
        # peer: qemu-img bench's image arguments (None: no peer; write rows
        # build theirs). limit: a key of the fio limits, or "memcpy".
        # raw: the raw row a qcow2 row is held against.
        dict(key="null_randread", dev="null-co", wl="4k randread QD128", sp=(null, "randread", 128, 4096, False),
             peer=["--image-opts", f"driver=null-co,size={GIB},read-zeroes=off"], limit="null_4k"),
        dict(key="malloc_randread", dev="malloc 256 MiB", wl="4k randread QD32",
             sp=(malloc, "randread", 32, 4096, True), peer=None, limit="memcpy"),
        dict(key="malloc_read", dev="malloc 256 MiB", wl="4k read QD32 (sequential)",
             sp=(malloc, "read", 32, 4096, True), peer=["-f", "raw", "-t", "writeback", "-i", "io_uring", ram],
             limit="memcpy"),
        dict(key="raw_randread", dev="file (raw), O_DIRECT", wl="4k randread QD32",
             sp=(fdev(disk, "raw"), "randread", 32, 4096, False), peer=None, limit="randread_4k"),
        dict(key="raw_read", dev="file (raw), O_DIRECT", wl="4k read QD32 (sequential)",
             sp=(fdev(disk, "raw"), "read", 32, 4096, False), peer=direct("raw", disk), limit="read_4k"),
        dict(key="raw_write", dev="file (raw), O_DIRECT", wl="1M write QD8, fresh image",
             sp=("raw", "write", 8, MIB, False), peer=None, limit="seq_write_1m"),
        dict(key="qcow2_randread", dev="qcow2 (allocated), O_DIRECT", wl="4k randread QD32",
             sp=(fdev(qcow2, "qcow2"), "randread", 32, 4096, False), peer=None, limit="randread_4k",
             raw="raw_randread"),
        dict(key="qcow2_read", dev="qcow2 (allocated), O_DIRECT", wl="4k read QD32 (sequential)",
             sp=(fdev(qcow2, "qcow2"), "read", 32, 4096, False), peer=direct("qcow2", qcow2), limit="read_4k",
             raw="raw_read"),
        dict(key="qcow2_write", dev="qcow2, O_DIRECT", wl="1M write QD8, fresh image",
             sp=("qcow2", "write", 8, MIB, False), peer=None, limit="seq_write_1m", raw="raw_write"),
    ]


def measure_perf(cfg, args, work, shm, disk, qcow2):
    t = cfg["seconds"]
    os.makedirs(shm, exist_ok=True)
    with open(os.path.join(shm, "ram.raw"), "wb") as f:
        block = b"\x5a" * MIB
        for _ in range(256):
            f.write(block)
    rows = perf_rows(shm, disk, qcow2)
    samples = {r["key"]: {"spindle": [], "qemu": []} for r in rows}
    fresh = os.path.join(work, "fresh")
    # Run after run, every row; Spindle and qemu-img bench back to back, so
    # drifts of a shared machine hit both alike.
    for n in range(cfg["runs"]):
        for row in rows:
            dev, wl, qd, bs, prefill = row["sp"]
            hist = os.path.join(work, f"{row['key']}.{n}.hgrm")
            if isinstance(dev, str):
                # A write row: a new empty image for each run of either program.
                fmt = dev
                run(["qemu-img", "create", "-q", "-f", fmt, fresh, cfg["write_size"]])
                f = {"driver": "file", "filename": fresh, "cache": {"direct": True}}
                sp = spindle_perf(args.spindle, f if fmt == "raw" else {"driver": "qcow2", "file": f},
                                  wl, qd, bs, t, hist)
                sp["wrapped"] = sp["bytes"] > cfg["write_size"]
                if sp["wrapped"]:
                    log(f"  note: {row['key']} wrote past the end of its fresh image and wrapped")
                os.unlink(fresh)
                run(["qemu-img", "create", "-q", "-f", fmt, fresh, cfg["write_size"]])
                # The same number of requests on an equally fresh image.
                q = qemu_img_bench(["-f", fmt, "-t", "none", "-i", "io_uring", fresh], sp["ios"], qd, bs, write=True)
                os.unlink(fresh)
            else:
                sp = spindle_perf(args.spindle, dev, wl, qd, bs, t, hist, prefill)
                q = None
                if row["peer"]:
                    q = qemu_img_bench_for(row["peer"], qd, bs, t, sp["ios"] / 16)
            samples[row["key"]]["spindle"].append(sp)
            if q:
                samples[row["key"]]["qemu"].append(q)
            peer = f", qemu-img bench {si(q['iops'])} IOPS ({q['seconds']:.1f} s)" if q else ""
            log(f"  perf {row['dev']}, {row['wl']}: Spindle {si(sp['iops'])} IOPS, {sp['mibs']:.0f} MiB/s, "
                f"p50/p99/p99.9 {lat(sp['lat_us'])} us{peer}")
    os.unlink(os.path.join(shm, "ram.raw"))
    results = {}
    for row in rows:
        s = samples[row["key"]]
        results[row["key"]] = {
            "device": row["dev"], "workload": row["wl"], "limit": row["limit"], "raw": row.get("raw"),
            "spindle": median_by(s["spindle"], "iops"),
            "qemu": median_by(s["qemu"], "iops") if s["qemu"] else None,
        }
    return results


def memcpy_rate():
    """The single-core 4 KiB memcpy rate from the criterion benchmark, as
    copies per second, or None."""
    code, out, err = run(["cargo", "bench", "-p", "spindle-benches", "--bench", "bdev", "--",
                          "limits/memcpy_4k", "--noplot"], check=False)
    m = re.search(r"limits/memcpy_4k\S*\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", out)
    if code != 0 or not m:
        log(f"  memcpy benchmark failed or printed no time (exit {code}); the malloc goal is n/a")
        return None
    scale = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3}[m.group(2)]
    secs = float(m.group(1)) * scale
    log(f"  memcpy 4 KiB: {float(m.group(1))} {m.group(2)} per copy, {si(1 / secs)} copies/s")
    return {"ns": secs * 1e9, "per_s": 1 / secs, "gib_s": 4096 / secs / GIB}


def plot(out_png, series, title):
    """series: [(hgrm path, label)]."""
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    code, _, err = run([sys.executable, os.path.join(ROOT, "scripts/bench/plot.py"), out_png,
                        *[f"{p}={label}" for p, label in series], "--title", title], check=False)
    if code != 0:
        log(f"  plot {out_png} failed: {err.strip()}")
        return False
    return True


def fio_hgrm(path, result):
    """Writes fio's percentiles of one NBD result in the percentile
    distribution layout plot.py reads."""
    with open(path, "w") as f:
        f.write("       Value     Percentile TotalCount 1/(1-Percentile)\n\n")
        for p, us in result["percentiles_us"]:
            q = p / 100
            if q < 1:
                f.write(f"{us:12.3f} {q:.12f} {0:10d} {1 / (1 - q):14.2f}\n")
        f.write(f"{result['max_us']:12.3f} {1.0:.12f} {0:10d}\n")


# ---------------------------------------------------------------- idle, nbd, jobs

def measure_idle(cfg):
    out = run(["bash", os.path.join(ROOT, "scripts/bench/idle-cpu.sh"), cfg["idle_window"]])[1]
    modes = {}
    for line in out.splitlines():
        m = re.match(r"(adaptive|interrupt|poll)\s+([0-9.]+)%", line)
        if m:
            modes[m.group(1)] = float(m.group(2))
    log("  idle CPU: " + ", ".join(f"{k} {v:.2f}%" for k, v in modes.items()))
    return modes


def measure_nbd(cfg, args, work):
    out = os.path.join(work, "nbd.json")
    run([sys.executable, os.path.join(ROOT, "scripts/bench/nbd.py"), "--spindle", args.spindle, "--dir", work,
         "--json", out, *cfg["nbd"]], capture=False)
    with open(out) as f:
        return json.load(f)


def measure_jobs(cfg, args, work, shm):
    results = {}
    for where, opts in (("disk", ["--dir", work, "--direct"]), ("tmpfs", ["--dir", shm])):
        os.makedirs(opts[1], exist_ok=True)
        out = os.path.join(work, f"jobs-{where}.json")
        log(f"  jobs on {where}")
        run([sys.executable, os.path.join(ROOT, "scripts/bench/jobs.py"), "--spindle", args.spindle, *opts,
             "--json", out, *cfg["jobs"]], capture=False)
        with open(out) as f:
            results[where] = json.load(f)
    return results


# ---------------------------------------------------------------- report

def report(res, cfg, png_rel, nbd_png_rel):
    f = res["facts"]
    lines = [f"## Suite: `{res['command']}` ({f['date']})", "",
             "Generated by the command above; the next run replaces everything between the suite markers. "
             "Each figure is the median of "
             f"{cfg['runs']} run{'s' if cfg['runs'] > 1 else ''} of {cfg['seconds']} s; ratios are against a "
             "peer or a limit measured in the same run.", ""]
    lines.append(table(["machine", ""], [
        ["CPU", f"{f['cpu']}, {f['cores']} cores"], ["memory", f["memory"]], ["kernel", f["kernel"]],
        ["file system under target/", f"`{f['filesystem']}`"], ["fio", f["fio"]], ["QEMU", f["qemu"]],
        ["Spindle", f["commit"]]]))
    lines.append("")
    limits = res.get("limits")
    if limits:
        lines += ["### Limits (fio)", "",
                  f"fio with io_uring and O_DIRECT on a {cfg['size'] // MIB} MiB file under target/, written "
                  f"in full first; writes go to a fresh sparse {cfg['write_size'] // GIB} GiB file. "
                  "Latency is fio's completion latency.", ""]
        rows = []
        for key, l in limits.items():
            mb = mibs(l["mibs"])
            if key == "copy_1m":
                mb += f" (write side {mibs(l['write_mibs'])})"
            rows.append([l["label"], si(l["iops"]), mb, lat(l["lat_us"])])
        lines += [table(["test", "IOPS", "MiB/s", "p50 / p99 / p99.9 µs"], rows), ""]
        lines += [f"Copy limit (the copy row): **{limits['copy_1m']['mibs']:.0f} MiB/s**.", ""]
    mem = res.get("memcpy")
    perf = res.get("perf")
    if perf:
        lines += ["### spindle perf vs qemu-img bench", "",
                  "`spindle perf` on one core (`--json --histogram`); the peer is `qemu-img bench` (QEMU's "
                  "block layer in one process, as in qemu-storage-daemon) with the same driver, cache mode "
                  "(`-t none` = O_DIRECT), `-i io_uring`, queue depth and request size. qemu-img bench has no "
                  "random mode — its offsets step by the request size and wrap at the end — so it is the peer "
                  "of Spindle's sequential rows only (and of null-co, which ignores offsets); random rows are "
                  "held against fio and, for qcow2, against the raw file. Its IOPS = requests / elapsed time; "
                  "it ran for about as long as Spindle on reads and the same number of requests on an equally "
                  "fresh image on writes. malloc's peer is a raw file in /dev/shm read through the page cache "
                  "(`-t writeback`): QEMU has no RAM-disk driver. Limits: the fio rows above; for malloc, one "
                  "core's 4 KiB memcpy rate.", ""]
        rows = []
        for key, p in perf.items():
            s, q = p["spindle"], p["qemu"]
            if p["limit"] == "memcpy":
                lim = mem["per_s"] if mem else None
            else:
                lim = limits[p["limit"]]["iops"] if limits else None
            vs_raw = "—"
            if p.get("raw"):
                r = perf[p["raw"]]
                vs_raw = fx(ratio(s["iops"], r["spindle"]["iops"]))
                if q and r["qemu"]:
                    vs_raw += f" (QEMU {fx(ratio(q['iops'], r['qemu']['iops']))})"
            wl = p["workload"] + (" (wrapped: overwrote part of what it wrote)" if s.get("wrapped") else "")
            rows.append([p["device"], wl, si(s["iops"]), mibs(s["mibs"]), lat(s["lat_us"]),
                         si(q["iops"]) if q else "—", fx(ratio(s["iops"], q["iops"])) if q else "—",
                         si(lim), fx(ratio(s["iops"], lim)), vs_raw])
        lines += [table(["device", "workload", "Spindle IOPS", "MiB/s", "p50 / p99 / p99.9 µs",
                         "qemu-img bench IOPS", "Spindle / qemu-img", "limit IOPS", "Spindle / limit",
                         "qcow2 / raw"], rows), ""]
        if png_rel:
            lines += [f"Latency by percentile, Spindle's random-read rows: [{png_rel}]({png_rel})", "",
                      f"![spindle perf latency]({png_rel})", ""]

    # Goals.
    goals = []
    if perf:
        n = perf["null_randread"]["spindle"]
        ok = n["iops"] >= 10e6 and n["lat_us"][2] < 5
        goals.append(["null-co, 4k randread QD128, one core", "≥ 10 M IOPS and p99.9 < 5 µs",
                      f"{si(n['iops'])} IOPS, p99.9 {n['lat_us'][2]:.3g} µs", "yes" if ok else "no"])
        m = perf["malloc_randread"]["spindle"]
        if mem:
            r = m["iops"] / mem["per_s"]
            goals.append(["malloc, 4k randread QD32 vs one core's 4 KiB memcpy", "≥ 0.80×",
                          f"{si(m['iops'])} IOPS / {si(mem['per_s'])} copies/s = {r:.2f}×",
                          "yes" if r >= 0.8 else "no"])
        else:
            goals.append(["malloc, 4k randread QD32 vs one core's 4 KiB memcpy", "≥ 0.80×",
                          f"{si(m['iops'])} IOPS; memcpy not measured (short mode)", "n/a"])
        if limits:
            r = ratio(perf["raw_randread"]["spindle"]["iops"], limits["randread_4k"]["iops"])
            goals.append(["file, O_DIRECT, 4k randread QD32 vs fio io_uring on the same file", "≥ 0.95×",
                          f"{si(perf['raw_randread']['spindle']['iops'])} / {si(limits['randread_4k']['iops'])}"
                          f" = {r:.2f}×", "yes" if r >= 0.95 else "no"])
        r = ratio(perf["qcow2_randread"]["spindle"]["iops"], perf["raw_randread"]["spindle"]["iops"])
        goals.append(["qcow2 (allocated), 4k randread QD32 vs the raw file", "≥ 0.90×", f"{r:.2f}×",
                      "yes" if r >= 0.9 else "no"])
        r = ratio(perf["qcow2_write"]["spindle"]["mibs"], perf["raw_write"]["spindle"]["mibs"])
        goals.append(["qcow2, 1 MiB sequential write QD8 on a fresh image vs raw", "≥ 0.85×",
                      f"{perf['qcow2_write']['spindle']['mibs']:.0f} / {perf['raw_write']['spindle']['mibs']:.0f}"
                      f" MiB/s = {r:.2f}×", "yes" if r >= 0.85 else "no"])
    idle = res.get("idle")
    if idle and "adaptive" in idle:
        goals.append(["idle daemon, default (adaptive) polling", "< 1% of a core", f"{idle['adaptive']:.2f}%",
                      "yes" if idle["adaptive"] < 1 else "no"])
    if goals:
        lines += ["### Goals", "", table(["goal", "target", "measured", "met?"], goals), ""]
        if perf:
            lines += ["spindle perf's latency runs from submission to completion, so at a fixed queue depth "
                      "it is at least depth / IOPS (Little's law): a p99.9 under 5 µs at QD128 needs more "
                      "than 25.6 M IOPS.", ""]
        if idle:
            lines += ["Idle CPU (`scripts/bench/idle-cpu.sh " + str(cfg["idle_window"]) + "`), % of one core: "
                      + ", ".join(f"{k} {v:.2f}%" for k, v in idle.items())
                      + " (poll mode spins every reactor by design).", ""]

    nbd = res.get("nbd")
    if nbd:
        seconds = cfg["nbd"][cfg["nbd"].index("--seconds") + 1]
        lines += ["### NBD export vs qemu-storage-daemon and qemu-nbd", "",
                  f"`scripts/bench/nbd.py {shlex.join(cfg['nbd'])}`: fio's nbd engine over a Unix socket against "
                  "each server exporting the same fully written image with O_DIRECT and io_uring; "
                  f"{seconds} s per row, median of the runs. The null rows serve null-co (no disk: the "
                  "servers' NBD paths alone). Server CPU: the server's user + system time per request. "
                  "Limit: fio on a file of the same file system (the limits above), for the disk rows.", ""]
        lim_of = {"4k randread QD32": "randread_4k", "4k randwrite QD32": "randwrite_4k", "64k seqread QD8": "read_64k"}
        rows = []
        for r in nbd:
            s, q, n = r["spindle"], r["qsd"], r["qemu-nbd"]
            lim = None
            if limits and r["format"] != "null" and r["workload"] in lim_of:
                lim = limits[lim_of[r["workload"]]]["iops"]
            cpu = " / ".join(us(x["server_cpu_us"]) for x in (s, q, n)) if "server_cpu_us" in s else "—"
            rows.append([r["format"], r["workload"], si(s["iops"]), si(q["iops"]), si(n["iops"]),
                         fx(ratio(s["iops"], q["iops"])), fx(ratio(s["iops"], n["iops"])),
                         " / ".join(us(x["lat_us"][1]) for x in (s, q, n)), cpu, si(lim), fx(ratio(s["iops"], lim))])
        lines += [table(["image", "workload", "Spindle IOPS", "QSD IOPS", "qemu-nbd IOPS", "Spindle / QSD",
                         "Spindle / qemu-nbd", "p99 µs Spindle / QSD / qemu-nbd",
                         "server CPU µs/request Spindle / QSD / qemu-nbd", "limit IOPS", "Spindle / limit"], rows), ""]
        if nbd_png_rel:
            lines += [f"Latency by percentile over NBD, qcow2 4k randread QD32 (fio's percentiles): "
                      f"[{nbd_png_rel}]({nbd_png_rel})", "", f"![NBD latency]({nbd_png_rel})", ""]

    jobs = res.get("jobs")
    if jobs:
        lines += ["### Block jobs vs qemu-storage-daemon", "",
                  f"`scripts/bench/jobs.py {shlex.join(cfg['jobs'])}`, on the disk (`--dir target/spindle-suite --direct`) "
                  "and on tmpfs (`--dir /dev/shm/spindle-suite`): the same images, node options and job arguments for both daemons; "
                  "wall time from the command to BLOCK_JOB_COMPLETED (through READY and job-complete where the "
                  "job has one), median of the runs. Ratio = QSD's wall time / Spindle's. Copy limit: jobs.py's "
                  "own fio copy on the same file system (1 MiB reads of one file and writes of another, QD16 "
                  "each, kept in step by fio's flow control).", ""]
        for where, j in jobs.items():
            cl = j["copy_limit"]["min"]
            lines += [f"{'Disk, O_DIRECT' if where == 'disk' else 'tmpfs'} — copy limit {cl:.0f} MiB/s"
                      + (f" (1/{j['scale']} of the usual image sizes)" if j.get("scale", 1) > 1 else "") + ".", ""]
            rows = []
            for row in j["jobs"]:
                (ws, nbytes, _), (wq, _, _) = row["spindle"], row["qsd"]
                sparse = "sparse" in row["job"]
                rate = lambda w: f"{w:.2f} s" if sparse else f"{nbytes / MIB / w:.0f} MiB/s, {w:.2f} s"
                rows.append([row["job"], rate(ws), rate(wq), fx(wq / ws),
                             "—" if sparse else fx(nbytes / MIB / ws / cl)])
            lines += [table(["job", "Spindle", "qemu-storage-daemon", "ratio (QSD / Spindle time)",
                             "Spindle / copy limit"], rows), ""]
            if j.get("live"):
                rows = []
                by = {}
                for lv in j["live"]:
                    by.setdefault((lv["speed"], lv["mode"]), {})[lv["kind"]] = lv
                for (speed, mode), pair in by.items():
                    label = f"{'unlimited' if not speed else f'{speed // MIB} MiB/s'}, {mode}"
                    for kind in ("spindle", "qsd"):
                        lv = pair.get(kind)
                        if not lv:
                            continue
                        other = pair.get("qsd")
                        rd = lv["ready_s"]
                        rows.append([label, "Spindle" if kind == "spindle" else "QSD",
                                     f"{si(lv['before']['iops'])} → {si(lv['during']['iops'])}",
                                     fx(ratio(lv["during"]["iops"], other["during"]["iops"])) if other else "—",
                                     f"{lv['before']['read'][1] / 1000:.2f} → {lv['during']['read'][1] / 1000:.2f}",
                                     f"{lv['during']['read'][2] / 1000:.2f}",
                                     f"{rd:.1f} s" if rd is not None else "not within the run"])
                lines += ["Live mirror under a fio guest (nbd engine, 4k randrw 70/30 QD16) on the exported "
                          "source:", "",
                          table(["run", "daemon", "guest IOPS alone → during", "during vs QSD",
                                 "read p99 ms alone → during", "read p99.9 ms during", "READY after"], rows), ""]
    for name, err in res["failed"].items():
        first = err.splitlines()[0] if err else ""
        lines += [f"**{name} failed**: `{first[:300]}`", ""]
    skipped = [s for s in SECTIONS if s not in res["ran"] and s not in res["failed"]]
    if skipped:
        lines += [f"Not run: {', '.join(skipped)}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(path, body):
    """Puts `body` between the markers of `path`, keeping everything
    outside them byte for byte; without markers, they go after the title
    and its introduction (before the first second-level heading)."""
    block = f"{BEGIN}\n{body}{END}"
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        if BEGIN in text and END in text[text.index(BEGIN):]:
            i = text.index(BEGIN)
            j = text.index(END, i) + len(END)
            text = text[:i] + block + text[j:]
        else:
            m = re.search(r"^## ", text, re.M)
            pos = m.start() if m else len(text)
            sep = "" if pos == 0 or text[:pos].endswith("\n\n") else ("\n" if text[:pos].endswith("\n") else "\n\n")
            text = text[:pos] + sep + block + "\n\n" + text[pos:]
    else:
        text = block + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description="Spindle's benchmark suite")
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument("--write-docs", action="store_true", help="short mode: write docs/benchmarks.md all the same")
    ap.add_argument("--report", default="", help="markdown file to write (default: by mode)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ", ".join(SECTIONS))
    ap.add_argument("--work", default=os.path.join(ROOT, "target/spindle-suite"))
    ap.add_argument("--shm", default="/dev/shm/spindle-suite")
    ap.add_argument("--spindle", default=os.path.join(ROOT, "target/release/spindle"))
    args = ap.parse_args()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    cfg = MODES[args.mode]
    args.spindle = os.path.abspath(args.spindle)
    work, shm = os.path.abspath(args.work), os.path.abspath(args.shm)
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}")
    if "memcpy" in sections and args.mode == "short":
        sections.remove("memcpy")  # criterion needs a bench build and minutes
    docs = args.mode == "full" or args.write_docs
    if args.report:
        report_path = os.path.abspath(args.report)
    else:
        report_path = os.path.join(ROOT, "docs/benchmarks.md" if docs else "target/bench-short.md")
    if docs:
        png = os.path.join(ROOT, "docs/img/perf-latency.png")
        nbd_png = os.path.join(ROOT, "docs/img/nbd-latency.png")
    else:
        png = os.path.join(ROOT, "target/bench-short-latency.png")
        nbd_png = os.path.join(ROOT, "target/bench-short-nbd-latency.png")
    command = f"scripts/bench/all.sh {args.mode}" + (" --write-docs" if args.write_docs else "")
    if set(sections) != set(SECTIONS) - ({"memcpy"} if args.mode == "short" else set()):
        command += f" --sections {','.join(sections)}"

    for d in (work, shm):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    # Only what a write run writes takes space (the images are sparse); keep
    # the fresh images smaller than the free space, and say so.
    st = os.statvfs(work)
    room = st.f_bavail * st.f_frsize - 4 * GIB
    if room < cfg["write_size"]:
        cfg = dict(cfg, write_size=max(GIB, room // GIB * GIB))
        log(f"fresh images cut to {cfg['write_size'] // GIB} GiB to fit the free space; fast runs may wrap")
    res = {"command": command, "mode": args.mode, "ran": [], "failed": {}}
    plots = {}
    started = time.monotonic()
    disk = os.path.join(work, "disk.raw")
    qcow2 = os.path.join(work, "disk.qcow2")

    def prepare():
        log(f"preparing a {cfg['size'] // MIB} MiB file and qcow2")
        fresh_file(disk, cfg["size"])
        run(["fio", "--name=prep", f"--filename={disk}", "--rw=write", "--bs=1M", "--iodepth=8",
             "--ioengine=io_uring", "--direct=1", f"--size={cfg['size']}", "--output-format=json"])
        run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, cfg["size"]])
        io = ["qemu-io", "-f", "qcow2"]
        for off in range(0, cfg["size"], 256 * MIB):
            io += ["-c", f"write -P 0x5a {off} {min(256 * MIB, cfg['size'] - off)}"]
        run(io + [qcow2])

    def perf():
        log("spindle perf and qemu-img bench")
        r = measure_perf(cfg, args, work, shm, disk, qcow2)
        series = [(r[k]["spindle"]["hist"], label) for k, label in (
            ("null_randread", "null-co 4k randread QD128"), ("malloc_randread", "malloc 4k randread QD32"),
            ("raw_randread", "file (raw) 4k randread QD32"), ("qcow2_randread", "qcow2 4k randread QD32"))]
        if plot(png, series, "spindle perf: latency by percentile (one core, O_DIRECT files)"):
            plots["perf"] = os.path.relpath(png, os.path.dirname(report_path))
        return r

    def nbd():
        log("NBD")
        r = measure_nbd(cfg, args, work)
        row = next((x for x in r if x["format"] == "qcow2" and x["workload"] == "4k randread QD32"), None)
        if row and "percentiles_us" in row["spindle"]:
            series = []
            for kind, label in (("spindle", "Spindle"), ("qsd", "qemu-storage-daemon"), ("qemu-nbd", "qemu-nbd")):
                p = os.path.join(work, f"nbd-{kind}.hgrm")
                fio_hgrm(p, row[kind])
                series.append((p, label))
            if plot(nbd_png, series, "NBD export, qcow2 4k randread QD32 (fio nbd engine)"):
                plots["nbd"] = os.path.relpath(nbd_png, os.path.dirname(report_path))
        return r

    steps = [
        ("memcpy", lambda: (log("memcpy (criterion)"), memcpy_rate())[1]),
        ("limits", lambda: (log("limits (fio)"), measure_limits(cfg, work, disk))[1]),
        ("perf", perf),
        ("idle", lambda: (log("idle CPU"), measure_idle(cfg))[1]),
        ("nbd", nbd),
        ("jobs", lambda: (log("block jobs"), measure_jobs(cfg, args, work, shm))[1]),
    ]
    try:
        res["facts"] = machine_facts(work)
        log(f"suite ({args.mode}): {res['facts']['cpu']}, {res['facts']['cores']} cores, "
            f"{res['facts']['filesystem']}")
        prepared = True
        if "limits" in sections or "perf" in sections:
            try:
                prepare()
            except Exception as e:  # noqa: BLE001 - reported, the other sections go on
                prepared = False
                res["failed"]["limits"] = res["failed"]["perf"] = f"preparing the images: {e}"
                log(f"  failed: {e}")
        for name, step in steps:
            if name not in sections or name in res["failed"]:
                continue
            try:
                res[name] = step()
                res["ran"].append(name)
            except Exception as e:  # noqa: BLE001 - reported, the other sections go on
                res["failed"][name] = str(e).strip()
                log(f"  {name} failed: {e}")
            if name == "perf" and prepared:
                for path in (disk, qcow2):
                    if os.path.exists(path):
                        os.unlink(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    body = report(res, cfg, plots.get("perf"), plots.get("nbd"))
    write_report(report_path, body)
    if args.report:
        raw = os.path.splitext(report_path)[0] + ".json"
    else:
        raw = os.path.join(ROOT, "target/bench-suite.json" if docs else "target/bench-short.json")
    with open(raw, "w") as f:
        json.dump(res, f, indent=1, default=str)
    log(f"\nreport: {os.path.relpath(report_path, ROOT)}, raw results: {os.path.relpath(raw, ROOT)}, "
        f"{(time.monotonic() - started) / 60:.1f} min")
    if not docs:
        print()
        print(body)
    if res["failed"]:
        sys.exit(f"suite: failed sections: {', '.join(res['failed'])}")


if __name__ == "__main__":
    try:
        main()
    except Interrupted as e:
        sys.exit(f"suite: stopped by {e}")
