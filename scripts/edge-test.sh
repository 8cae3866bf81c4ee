#!/usr/bin/env bash
# Checks the aarch64 `device-agent` (built by scripts/build-edge.sh) under qemu user-mode
# emulation on this x86-64 host. Under emulation speed means nothing; correctness does:
#   1. `generate` answers the reference chat prompt with exactly the host build's greedy text
#      (device-agent/tests/real_model.rs ties the host build to the reference's greedy ids);
#   2. a 2-step `tune` on a local text file writes its adapter;
#   3. `tune --precision int8` (the frozen base's products in int8) on an emulated Cortex-A76
#      (the `sdot` tile) gives exactly the losses and adapter it gives on an emulated Cortex-A72
#      (the portable tile): the int32 sums are exact, so the paths must agree bit for bit;
#   4. `generate --base-precision q8_0 | q4_0 | q4_1` on an emulated Cortex-A76 (the `sdot`
#      kernels, the 4-bit ones reading nibbles straight) prints exactly what it prints on an
#      emulated Cortex-A72 (no dot-product extension: the portable kernel on unpacked rows),
#      and each run names the kernel it used;
#   5. the aarch64 agent completes a federated round (QUIC, mutual TLS) against the x86-64
#      aggregator on loopback (tiny model, synthetic data: the round protocol is the point).
# Needs the model in the asset cache (`device-agent fetch`). Prints PASS/FAIL per check.
set -euo pipefail
cd "$(dirname "$0")/.."
triple=aarch64-unknown-linux-gnu
edge="${EDGE_TARGET_DIR:-target}/$triple/release/device-agent"
[ -x "$edge" ] || { echo "no $edge: run scripts/build-edge.sh first" >&2; exit 1; }
command -v qemu-aarch64-static >/dev/null || { echo "qemu-aarch64-static missing: run scripts/build-edge.sh" >&2; exit 1; }
arm() { qemu-aarch64-static -L /usr/aarch64-linux-gnu "$edge" "$@"; }
cargo build -q --workspace --bins
host_dir="${CARGO_TARGET_DIR:-target}/debug"
work=$(mktemp -d)
cleanup() { [ -n "${agg_pid:-}" ] && kill "$agg_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
failed=0
check() { if "$@"; then echo "PASS: $name"; else echo "FAIL: $name"; failed=1; fi; }

name="generate: greedy answer equals the host build's"
prompt="What is the capital of France?"
"$host_dir/device-agent" generate --prompt "$prompt" --max-new-tokens 12 > "$work/host.txt"
arm generate --prompt "$prompt" --max-new-tokens 12 > "$work/arm.txt"
same_answer() { cmp -s "$work/host.txt" "$work/arm.txt" && grep -q Paris "$work/arm.txt"; }
check same_answer
echo "  host:    $(tr '\n' ' ' < "$work/host.txt")"
echo "  aarch64: $(tr '\n' ' ' < "$work/arm.txt")"

name="tune: 2 steps on a local file write the adapter"
for i in $(seq 1 40); do echo "Line $i of the device's own notes: the pump in shed $i needs oil every spring."; done > "$work/notes.txt"
arm tune --data "$work/notes.txt" --steps 2 --batch 1 --seq-len 32 --rank 4 --out "$work/tune" > "$work/tune.log" 2>&1
wrote_adapter() { [ -s "$work/tune/adapter.json" ] && ls "$work/tune" | grep -q safetensors; }
check wrote_adapter
ls "$work/tune" | sed 's/^/  /'

arm_on() { local cpu=$1; shift; qemu-aarch64-static -cpu "$cpu" -L /usr/aarch64-linux-gnu "$edge" "$@"; }

name="tune --precision int8: the sdot tile (Cortex-A76) trains exactly as the portable one (Cortex-A72)"
for cpu in cortex-a76 cortex-a72; do
    arm_on "$cpu" tune --data "$work/notes.txt" --steps 2 --batch 1 --seq-len 32 --rank 4 \
        --precision int8 --out "$work/int8-$cpu" > "$work/int8-$cpu.log" 2>&1
done
losses() { grep -o '"loss":[^,}]*' "$work/int8-$1/metrics.jsonl"; }
same_int8() {
    grep -q "int8 products on NEON sdot" "$work/int8-cortex-a76.log" \
        && grep -q "int8 products on portable" "$work/int8-cortex-a72.log" \
        && [ "$(losses cortex-a76 | wc -l)" = 2 ] \
        && [ "$(losses cortex-a76)" = "$(losses cortex-a72)" ] \
        && cmp -s "$work/int8-cortex-a76/adapter.safetensors" "$work/int8-cortex-a72/adapter.safetensors"
}
check same_int8
echo "  Cortex-A76: $(losses cortex-a76 | tr '\n' ' ')"
echo "  Cortex-A72: $(losses cortex-a72 | tr '\n' ' ')"

name="quantized generate (Q8_0, Q4_0, Q4_1): the sdot kernels (Cortex-A76) print the portable kernel's text (Cortex-A72)"
formats="q8_0 q4_0 q4_1"
for fmt in $formats; do
    for cpu in cortex-a76 cortex-a72; do
        arm_on "$cpu" generate --base-precision "$fmt" --stats --prompt "$prompt" --max-new-tokens 12 \
            > "$work/$fmt-$cpu.txt" 2> "$work/$fmt-$cpu.err"
    done
done
same_quant() {
    for fmt in $formats; do
        grep -q "int8 dot (Q8_0, --precision int8): NEON sdot" "$work/$fmt-cortex-a76.err" \
            && grep -q "int8 dot (Q8_0, --precision int8): portable" "$work/$fmt-cortex-a72.err" \
            && [ -s "$work/$fmt-cortex-a76.txt" ] \
            && cmp -s "$work/$fmt-cortex-a76.txt" "$work/$fmt-cortex-a72.txt" || return 1
    done
}
check same_quant
for fmt in $formats; do
    echo "  $fmt Cortex-A76: $(tr '\n' ' ' < "$work/$fmt-cortex-a76.txt")"
    echo "  $fmt Cortex-A72: $(tr '\n' ' ' < "$work/$fmt-cortex-a72.txt")"
done

name="federated round: aarch64 agent against the x86-64 aggregator"
pki="$work/pki"
"$host_dir/aggregator" ca init --dir "$pki" > /dev/null
"$host_dir/aggregator" ca issue-server --dir "$pki" --name localhost --name 127.0.0.1 > /dev/null
"$host_dir/aggregator" ca issue-device --dir "$pki" --id 1 > /dev/null
cat > "$work/run.toml" <<TOML
rounds = 1
devices_per_round = 1
over_selection = 0.0
min_devices = 1
quorum_fraction = 1.0
round_deadline_ms = 900000
local_steps = 4
prune_interval_steps = 2
learning_rate = 0.01
batch_size = 2
lora_alpha = 16.0
max_rank = 8
heartbeat_interval_ms = 5000
seed = 11

[arms]
ratio_min = 0.0
ratio_max = 0.2
ranks = [4, 8]

[aggregation]
method = "exact"

[model]
n_blocks = 4
d_model = 64
n_heads = 4
n_kv_heads = 2
head_dim = 16
ffn = 128
TOML
"$host_dir/aggregator" serve --config "$work/run.toml" --pki "$pki" --listen 127.0.0.1:0 \
    --state "$work/state" --metrics "$work/rounds.jsonl" --finish-grace-s 3 > "$work/agg.log" 2>&1 &
agg_pid=$!
for _ in $(seq 1 100); do grep -q "^listening on " "$work/agg.log" && break; sleep 0.2; done
addr=$(sed -n 's/^listening on //p' "$work/agg.log" | head -1)
arm join --aggregator "$addr" --server-name localhost --pki "$pki" --id 1 --model tiny \
    --dataset synthetic --seq-len 32 --max-attempts 20 > "$work/agent.log" 2>&1 || true
wait "$agg_pid" || true
agg_pid=
round_done() { grep -q "finished: 1 of 1 rounds" "$work/agg.log" && grep -q "finished: 1 rounds acknowledged" "$work/agent.log"; }
check round_done
tail -2 "$work/agg.log" | sed 's/^/  aggregator: /'
tail -2 "$work/agent.log" | sed 's/^/  agent: /'
exit $failed
