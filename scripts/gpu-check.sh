#!/usr/bin/env bash
# GPU check for the device agent, sized for a briefly lent GPU machine. Builds the agent with a
# GPU backend in release, fetches the model, then on the GPU: checks the reference logits, runs
# the backend tests (reference logits, a LoRA step that matches flex), a greedy chat answer
# through the CLI, and times a prompt forward, one LoRA training step (rank 16, batch 4 x 256)
# and the forward of a 30%-pruned model next to the same runs on flex (the CPU default).
#
# Usage: scripts/gpu-check.sh
# Environment:
#   GPU_CHECK_FEATURES  cargo features to build with (default: wgpu; `wgpu,vulkan` adds burn's
#                       native SPIR-V kernels on Vulkan machines, `wgpu,metal` MSL on Macs)
#   GPU_CHECK_BACKEND   backend to check (default: wgpu; or vulkan, metal)
#   GPU_CHECK_REPS      timed repetitions after one warm-up (default: 3)
#   GPU_CHECK_SEQ, GPU_CHECK_BATCH, GPU_CHECK_RANK   training shape (default 256, 4, 16)
#   GPU_CHECK_TARGET_DIR  cargo target dir (default: target/gpu-check, kept apart from the
#                       default build so features do not invalidate it)
#   FEDSPINE_CACHE      asset cache (the model is fetched there unless it is already present)
# Exits non-zero if the GPU backend cannot start, or any check fails; the output names which.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

features="${GPU_CHECK_FEATURES:-wgpu}"
backend="${GPU_CHECK_BACKEND:-wgpu}"
reps="${GPU_CHECK_REPS:-3}"
seq="${GPU_CHECK_SEQ:-256}"
batch="${GPU_CHECK_BATCH:-4}"
rank="${GPU_CHECK_RANK:-16}"
export CARGO_TARGET_DIR="${GPU_CHECK_TARGET_DIR:-$PWD/target/gpu-check}"
# Line tables are not needed here and cost link time.
export CARGO_PROFILE_RELEASE_DEBUG=false
cargo_flags=(--release -p device-agent --features "$features")

section() { printf '\n== %s\n' "$*"; }
now() { date +%s; }
failures=()

section "machine"
uname -srm
echo "CPU threads: $(nproc)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
if command -v vulkaninfo >/dev/null 2>&1; then
    vulkaninfo --summary 2>/dev/null | grep -E 'deviceName|deviceType|driverName|apiVersion' || true
else
    echo "vulkaninfo not installed (not needed; the agent reports the adapter it opens)"
fi

section "build (features: $features)"
t=$(now)
cargo build "${cargo_flags[@]}" --bin device-agent
cargo test "${cargo_flags[@]}" --test backends --no-run
cargo bench -p device-agent --features "$features" --bench backends --no-run
echo "build: $(( $(now) - t )) s"

section "model"
t=$(now)
cargo run -q "${cargo_flags[@]}" --bin device-agent -- fetch smollm2-135m-instruct
echo "fetch: $(( $(now) - t )) s"

section "backend tests on $backend: reference logits within 0.05, LoRA step matches flex"
t=$(now)
# The test asks for `wgpu`; FEDSPINE_REQUIRE_GPU makes "no usable adapter" a failure here.
if FEDSPINE_REQUIRE_GPU=1 cargo test -q "${cargo_flags[@]}" --test backends -- --nocapture --test-threads 1; then
    echo "backend tests: ok ($(( $(now) - t )) s)"
else
    failures+=("backend tests")
fi

section "greedy chat on $backend (expects Paris)"
t=$(now)
answer=$(RUST_LOG=device_agent=info cargo run -q "${cargo_flags[@]}" --bin device-agent -- \
    generate --backend "$backend" --prompt "What is the capital of France?" --max-new-tokens 16) || answer="(failed)"
echo "$answer"
echo "chat: $(( $(now) - t )) s (includes loading the model)"
case "$answer" in *Paris*) ;; *) failures+=("chat on $backend") ;; esac

section "timings: $backend next to flex"
# Reference check on both, prompt forward, one LoRA step, 30%-pruned forward; medians.
if ! cargo bench -q -p device-agent --features "$features" --bench backends -- \
    --backends "$backend,flex" --reference --reps "$reps" --seq "$seq" --batch "$batch" --rank "$rank" --prune 0.3; then
    failures+=("timings / reference logits")
fi

section "result"
if [ ${#failures[@]} -eq 0 ]; then
    echo "GPU check passed on backend $backend"
else
    printf 'GPU check FAILED: %s\n' "${failures[*]}"
    exit 1
fi
