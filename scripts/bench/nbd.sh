#!/usr/bin/env bash
# NBD export speed: fio's nbd engine against Spindle, qemu-storage-daemon
# and qemu-nbd serving the same raw and qcow2 images (O_DIRECT), one run.
# Usage: scripts/bench/nbd.sh [nbd.py options, e.g. --runs 3 --seconds 10]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
python3 scripts/bench/nbd.py --spindle target/release/spindle --dir target "$@"
