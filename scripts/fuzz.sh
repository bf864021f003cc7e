#!/usr/bin/env bash
# Runs Spindle's fuzz targets with cargo-fuzz (libFuzzer) for a while each.
# Needs a nightly toolchain; installs cargo-fuzz when missing. Seed corpora
# are made fresh from real qcow2 images (qemu-img) and captured requests.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   targets: qcow2_metadata nbd_messages rpc_messages (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(qcow2_metadata nbd_messages rpc_messages)

if ! rustup toolchain list | grep -q nightly; then
  echo "fuzz.sh: cargo-fuzz needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

corpus=fuzz/corpus
mkdir -p "$corpus"/{qcow2_metadata,nbd_messages,rpc_messages}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# qcow2: the first cluster of images in assorted layouts.
i=0
for opts in "" "compat=0.10" "cluster_size=512" "cluster_size=2M" "refcount_bits=1" "refcount_bits=64" \
            "lazy_refcounts=on" "compression_type=zstd" "extended_l2=on" "backing_file=base.qcow2,backing_fmt=qcow2"; do
  qemu-img create -q -f qcow2 "$tmp/base.qcow2" 1M
  (cd "$tmp" && qemu-img create -q -f qcow2 ${opts:+-o "$opts"} img.qcow2 64M)
  qemu-io -c "write -P 0x5a 0 128k" "$tmp/img.qcow2" >/dev/null 2>&1 || true
  head -c 65536 "$tmp/img.qcow2" > "$corpus/qcow2_metadata/seed$i"
  i=$((i + 1))
done

# NBD: an option request, a compact and an extended request header (first byte: control).
printf '\x00IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0a\x00\x00\x00\x04disk\x00\x00' > "$corpus/nbd_messages/opt-go"
printf '\x10\x25\x60\x95\x13\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00' > "$corpus/nbd_messages/read"
printf '\x21\x21\xe4\x1c\x71\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x04abcd' > "$corpus/nbd_messages/write-ext"

# RPC: JSON-RPC and QMP requests (first byte: piece size).
printf '\x07{"jsonrpc":"2.0","id":1,"method":"blockdev-add","params":{"driver":"null-co","node-name":"n"}}' > "$corpus/rpc_messages/jsonrpc"
printf '\x03[{"id":1,"method":"a"},{"method":"b"}]' > "$corpus/rpc_messages/batch"
printf '\x40{"execute":"qmp_capabilities"}\n{"execute":"fail","arguments":{},"id":"x"}\n' > "$corpus/rpc_messages/qmp"

for t in "${targets[@]}"; do
  echo "== $t for ${secs}s"
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$corpus/$t" -- -max_total_time="$secs" -max_len=131072
done
