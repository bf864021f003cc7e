#!/usr/bin/env bash
# Installs what Spindle's tests and benchmarks need, and checks what must
# already be there. Safe to run repeatedly: it only installs what is missing.
#
# QEMU's tools (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon) come with
# the machine as version 10.0 backports. Never install Debian's own qemu or
# qemu-system packages: they would replace them with an older release.
set -euo pipefail

need_apt=()
command -v fio >/dev/null 2>&1 || need_apt+=(fio)
command -v nbdinfo >/dev/null 2>&1 || need_apt+=(libnbd-bin)
command -v nbdkit >/dev/null 2>&1 || need_apt+=(nbdkit)

if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install-deps: apt-get install ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import qemu.qmp' >/dev/null 2>&1; then
  echo "install-deps: pip install qemu.qmp"
  python3 -m pip install --quiet --disable-pip-version-check 'qemu.qmp>=0.0.3' 2>&1 | grep -v 'Running pip as the' || true
fi

# Only scripts/bench/plot.py uses matplotlib; no test does.
if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
  echo "install-deps: pip install matplotlib"
  python3 -m pip install --quiet --disable-pip-version-check matplotlib 2>&1 | grep -v 'Running pip as the' || true
fi

missing=()
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: missing QEMU 10 tools: ${missing[*]} (expected on every machine; do not apt-get Debian's qemu packages)" >&2
  exit 1
fi
