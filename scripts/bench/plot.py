#!/usr/bin/env python3
"""Plots HdrHistogram percentile distributions (`spindle perf --histogram`).

Usage: scripts/bench/plot.py OUT.png FILE.hgrm[=LABEL] ... [--title TEXT]

Draws latency against percentile the usual HdrHistogram way: the x axis
is 1/(1-percentile) on a log scale, so each decade of "nines" gets the same
width (50%, 90%, 99%, 99.9%, ...); latency (microseconds) on a log y axis.
Needs matplotlib (scripts/install-deps.sh installs it).
"""

import argparse
import os
import sys

# Percentile ticks at x = 1/(1-p); only those the data reaches are drawn.
TICKS = [
    (2, "50%"),
    (10, "90%"),
    (100, "99%"),
    (1_000, "99.9%"),
    (10_000, "99.99%"),
    (100_000, "99.999%"),
    (1_000_000, "99.9999%"),
    (10_000_000, "99.99999%"),
]


def read_distribution(path):
    """(latency_us, 1/(1-p)) points of one percentile distribution file.

    The last row (percentile 1.0) has no 1/(1-p) column; it is drawn at
    the next decade past the last finite point so the maximum shows.
    """
    points = []
    last_value = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if not fields or line.startswith("#"):
                continue
            try:
                numbers = [float(x) for x in fields]
            except ValueError:
                continue  # the column header
            if len(numbers) == 4:
                points.append((numbers[0], numbers[3]))
            elif len(numbers) == 3 and numbers[1] >= 1.0:
                last_value = numbers[0]
    if not points and last_value is None:
        raise ValueError(f"{path}: no percentile rows (is it a percentile distribution?)")
    if last_value is not None:
        top = max((x for _, x in points), default=1.0)
        points.append((last_value, top * 10))
    return points


def parse_input(arg):
    """FILE or FILE=LABEL; a FILE that itself holds '=' wins if it exists."""
    if "=" in arg and not os.path.exists(arg):
        path, _, label = arg.rpartition("=")
        return path, label
    return arg, os.path.splitext(os.path.basename(arg))[0]


def main(argv):
    parser = argparse.ArgumentParser(description="Plot HdrHistogram percentile distributions.")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("inputs", nargs="+", metavar="FILE.hgrm[=LABEL]")
    parser.add_argument("--title", default="Latency by percentile")
    args = parser.parse_args(argv)

    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py: matplotlib is missing; run scripts/install-deps.sh or pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    top = 10
    for arg in args.inputs:
        path, label = parse_input(arg)
        try:
            points = read_distribution(path)
        except (OSError, ValueError) as e:
            sys.exit(f"plot.py: {e}")
        xs = [x for _, x in points]
        ys = [v for v, _ in points]
        ax.plot(xs, ys, label=label, linewidth=1.5)
        top = max(top, max(xs))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [(x, name) for x, name in TICKS if x <= top * 1.01] or TICKS[:2]
    ax.set_xticks([x for x, _ in ticks])
    ax.set_xticklabels([name for _, name in ticks])
    ax.minorticks_off()
    ax.set_xlim(1, top * 1.5)
    ax.set_xlabel("Percentile")
    ax.set_ylabel("Latency (µs)")
    ax.set_title(args.title)
    ax.grid(True, which="major", linestyle=":", linewidth=0.8)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
