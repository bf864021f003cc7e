#!/usr/bin/env bash
# Crash soak: the crash tests of tests/crash.rs (a guest writing over NBD,
# a block job, a SIGKILL at a seeded random moment, the files checked with
# qemu-img) for as many kills as wanted, in a release build.
# Usage: scripts/soak.sh [ITERATIONS] [SEED] [TEST...]
#   ITERATIONS  kills per job type (default 100)
#   SEED        first seed (default: from the clock); a failing case prints
#               its own seed and the command that runs it again
#   TEST        commit_intermediate commit_active stream mirror drive_mirror
#               (default: all five)
# Prints one summary line per job type. Set SPINDLE_CRASH_VERBOSE=1 for a
# line per kill.
set -euo pipefail
cd "$(dirname "$0")/.."
iterations="${1:-100}"
seed="${2:-}"
shift 2 || shift $# || true

export SPINDLE_CRASH_ITERATIONS="$iterations"
if [ -n "$seed" ]; then
  export SPINDLE_CRASH_SEED="$seed"
fi
export RUST_BACKTRACE=1
filters=("$@")
if [ ${#filters[@]} -gt 0 ]; then
  set -- --exact "${filters[@]}"
else
  set -- --skip the_checker
fi
start=$(date +%s)
cargo test --release -p spindle --test crash -- --nocapture --test-threads="${TEST_THREADS:-2}" "$@"
echo "soak: $iterations kills per job type${seed:+, seed $seed}, $(( $(date +%s) - start )) s"
