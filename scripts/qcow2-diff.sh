#!/usr/bin/env bash
# The seeded qcow2 differential test (the same random writes, zero writes
# and discards applied through Spindle and through qemu-io, then compared
# with qemu-img compare and checked with qemu-img check), with any number
# of operations and any seed.
# Usage: scripts/qcow2-diff.sh [OPS] [SEED]     (default 2000, random seed)
set -euo pipefail
cd "$(dirname "$0")/.."
ops="${1:-2000}"
seed="${2:-$RANDOM$RANDOM}"
echo "qcow2 differential test: $ops operations per layout, seed $seed"
SPINDLE_QCOW2_DIFF_OPS="$ops" SPINDLE_QCOW2_DIFF_SEED="$seed" \
  cargo test --release -p spindle --test qcow2 -- --exact random_operations_match_qemu_io --nocapture
