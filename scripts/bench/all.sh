#!/usr/bin/env bash
# The benchmark suite in one command: machine facts, the file system's
# limits (fio), `spindle perf` next to `qemu-img bench`, the goals, idle CPU,
# NBD against qemu-storage-daemon and qemu-nbd, block jobs against
# qemu-storage-daemon; written up as markdown (scripts/bench/suite.py).
#
# Usage: scripts/bench/all.sh [short|full] [suite.py options]
#   full (default): about 45 minutes; replaces the generated part of
#                   docs/benchmarks.md (between its suite markers) and
#                   docs/img/*-latency.png
#   short:          a few minutes; writes target/bench-short.md instead,
#                   unless --write-docs is given
#   e.g. scripts/bench/all.sh short --sections limits,perf
set -euo pipefail
cd "$(dirname "$0")/../.."

mode="${1:-full}"
case "$mode" in
  short | full) shift || true ;;
  -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [short|full] [suite.py options]" >&2; exit 2 ;;
esac

# Tools: fio from apt, Python modules from pip (as scripts/install-deps.sh
# does). QEMU's tools must already be there: never apt-get Debian's qemu
# packages, they would replace the machine's newer QEMU.
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v fio >/dev/null 2>&1; then
  echo "all.sh: apt-get install fio"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends fio >/dev/null
fi
pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v 'Running pip as the' || true
}
if ! python3 -c 'import qemu.qmp' >/dev/null 2>&1; then
  echo "all.sh: pip install qemu.qmp"
  pip_install 'qemu.qmp>=0.0.3'
fi
if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
  echo "all.sh: pip install matplotlib"
  pip_install matplotlib
  if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-matplotlib >/dev/null
  fi
fi
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon fio; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "all.sh: $tool is missing" >&2
    exit 1
  fi
done

cargo build --release -q

# Scratch space for images; removed at the end, on failure and on ^C too.
work=target/spindle-suite
shm=/dev/shm/spindle-suite
suite=""
cleanup() { rm -rf "$work" "$shm"; }
stop() {
  # Let the suite stop what it started (it forwards the signal to its
  # children's process groups) before removing the scratch space.
  if [ -n "$suite" ]; then
    kill -INT "$suite" 2>/dev/null || true
    wait "$suite" || true
  fi
  exit 130
}
trap cleanup EXIT
trap stop INT TERM

# In the background so a signal reaches the trap at once, not after the suite.
python3 scripts/bench/suite.py --mode "$mode" --work "$work" --shm "$shm" \
  --spindle target/release/spindle "$@" &
suite=$!
wait "$suite"
