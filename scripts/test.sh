#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then
# runs every unit, integration and interop test, and each criterion
# benchmark once in test mode (so benches keep compiling and running).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export RUST_BACKTRACE=1
# Formatting and lints first: the workspace's unsafe-documentation lints
# are only promises until something enforces them.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast --lib --bins --tests -- --test-threads="${TEST_THREADS:-2}"
# Criterion benches in test mode: each benchmark runs once.
cargo test --workspace --no-fail-fast --benches
# The fuzz targets build on stable too; running them needs scripts/fuzz.sh.
cargo build --manifest-path fuzz/Cargo.toml --bins
