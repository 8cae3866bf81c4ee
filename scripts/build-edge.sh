#!/usr/bin/env bash
# Build the release `device-agent` for 64-bit ARM Linux boards (Raspberry Pi 4/5, Jetson,
# phones running Linux): installs the Rust target, Debian's cross compiler and (for
# scripts/edge-test.sh) qemu-user-static when missing, then cross-compiles.
# The kernels' AVX paths are x86-64 only; on aarch64 the portable versions are compiled, and
# NEON is part of the aarch64 baseline, so the compiler vectorises them with it.
# Output: target/aarch64-unknown-linux-gnu/release/device-agent (EDGE_TARGET_DIR moves target/).
set -euo pipefail
cd "$(dirname "$0")/.."
triple=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q "${need[@]}"; else sudo apt-get install -y -q "${need[@]}"; fi
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_DIR="${EDGE_TARGET_DIR:-target}"
cargo build --release --target "$triple" -p device-agent --bin device-agent
bin="$CARGO_TARGET_DIR/$triple/release/device-agent"
file "$bin" 2>/dev/null || true
ls -l "$bin"
