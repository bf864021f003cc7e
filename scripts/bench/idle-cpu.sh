#!/usr/bin/env bash
# Measures the CPU an idle daemon uses, per poll mode: starts `spindle serve`,
# lets it settle, then reads its user+system time from /proc over a window.
# Usage: scripts/bench/idle-cpu.sh [seconds]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
window="${1:-10}"
cargo build --release -q
bin=target/release/spindle
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ticks=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

printf '%-10s %8s  %s\n' mode "cpu%" "(of one core, idle for ${window}s after a burst of commands)"
for mode in adaptive interrupt poll; do
  sock="$tmp/$mode.sock"
  "$bin" serve --rpc-socket "$sock" --poll-mode "$mode" --log-level warn &
  pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  "$bin" rpc -s "$sock" blockdev-add driver=malloc node-name=m0 size=67108864 >/dev/null
  "$bin" rpc -s "$sock" x-debug-io node-name=m0 command="write -P 1 0 16M" >/dev/null
  sleep 1
  t0=$(cpu_ticks "$pid")
  sleep "$window"
  t1=$(cpu_ticks "$pid")
  "$bin" rpc -s "$sock" quit >/dev/null
  wait "$pid"
  awk -v d=$((t1 - t0)) -v hz="$ticks" -v w="$window" -v m="$mode" 'BEGIN { printf "%-10s %7.2f%%\n", m, 100 * d / hz / w }'
done
