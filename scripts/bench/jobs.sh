#!/usr/bin/env bash
# Block jobs in Spindle and in qemu-storage-daemon on identical images, in
# one run: mirror (qcow2 and raw, 2 GiB), active and intermediate commit
# (1 GiB), stream (2 GiB), a sparse mirror (20 GiB virtual, 200 MiB data),
# the file system's copy limit (fio), and a live mirror under a fio guest.
# Usage: scripts/bench/jobs.sh [disk|tmpfs|both] [extra jobs.py options, e.g. --runs 3]
#   disk:  images under target/ with O_DIRECT;  tmpfs: images in /dev/shm
set -euo pipefail
cd "$(dirname "$0")/../.."
where="${1:-both}"
shift || true
cargo build --release -q
run() { python3 scripts/bench/jobs.py --spindle target/release/spindle "$@"; }
case "$where" in
  disk) run --dir target --direct "$@" ;;
  tmpfs) run --dir /dev/shm "$@" ;;
  both)
    echo "== disk, O_DIRECT =="; run --dir target --direct "$@"
    echo; echo "== tmpfs =="; run --dir /dev/shm "$@" ;;
  *) echo "usage: $0 [disk|tmpfs|both] [jobs.py options]" >&2; exit 2 ;;
esac
