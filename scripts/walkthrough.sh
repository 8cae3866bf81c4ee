#!/usr/bin/env bash
# README's deployment walkthrough, run end to end with README's own commands: a private CA and
# an aggregator, two agents training on their own JSONL files (deploy/examples/), three
# FedSpine rounds on SmolLM2-135M-Instruct, agent 1 killed with SIGKILL after round 1 and
# restarted with the same command (it must come back with the pruned kept maps it saved), then
# a chat with agent 1's tuned model from its state directory.
#
# Agent 2 is the aarch64 build under qemu when `target/aarch64-unknown-linux-gnu/release/
# device-agent` exists (scripts/build-edge.sh; EDGE_TARGET_DIR moves target/), else the x86-64
# build, said so at the start.
#
# Environment: FEDSPINE_BIN_DIR (where `aggregator` and `device-agent` are; default
# target/release, which `cargo build --release -p aggregator -p device-agent` makes),
# WALKTHROUGH_DIR (the working directory; default a new temporary one, kept and named at the
# end), WALKTHROUGH_TIMEOUT_S (longest wait for the rounds, default 5400). Needs the model in
# the asset cache (`device-agent fetch`) and the ports 7443/udp and 9464/tcp of 127.0.0.1 free.
# Prints each step's command, wall time and outcome, and a summary; exits 1 if a step failed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${FEDSPINE_BIN_DIR:-$root/target/release}"
for b in aggregator device-agent; do
    [ -x "$bin/$b" ] || {
        echo "no $bin/$b: build with \`cargo build --release -p aggregator -p device-agent\` or set FEDSPINE_BIN_DIR" >&2
        exit 1
    }
done
bin="$(cd "$bin" && pwd)" # the steps run in the working directory, so a relative path would break
export PATH="$bin:$PATH"
export FEDSPINE_OFFLINE="${FEDSPINE_OFFLINE:-1}"
edge_triple=aarch64-unknown-linux-gnu
edge="$root/${EDGE_TARGET_DIR:-target}/$edge_triple/release/device-agent"
case "${EDGE_TARGET_DIR:-}" in /*) edge="$EDGE_TARGET_DIR/$edge_triple/release/device-agent" ;; esac
timeout_s="${WALKTHROUGH_TIMEOUT_S:-5400}"
work="${WALKTHROUGH_DIR:-$(mktemp -d -t fedspine-walkthrough.XXXXXX)}"
mkdir -p "$work"
cd "$work"
# README's paths are relative to the repository root: the example files under deploy/, the
# aarch64 binary under target/.
ln -sfn "$root/deploy" deploy
if [ -x "$edge" ] && command -v qemu-aarch64-static >/dev/null; then
    mkdir -p "target/$edge_triple/release"
    ln -sfn "$edge" "target/$edge_triple/release/device-agent"
    arm=1
    echo "agent 2: the aarch64 build under qemu ($edge)"
else
    arm=0
    echo "agent 2: x86-64 ($bin/device-agent): no aarch64 build at $edge (run scripts/build-edge.sh) or no qemu-aarch64-static"
fi
echo "working in $work"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

summary=()
failed=0
t0=$(date +%s)
# step NAME OUTCOME SECONDS
record() {
    summary+=("$(printf '%-58s %6ss  %s' "$1" "$3" "$2")")
    echo "   -> $2 (${3}s)"
    [ "$2" = PASS ] || failed=1
}
# run NAME COMMAND...: one README command in the foreground, its output in logs/.
mkdir -p logs
n=0
run() {
    local name="$1"
    shift
    n=$((n + 1))
    echo "== $n. $name: $*"
    local start=$(date +%s) log="logs/$n.log"
    if "$@" > "$log" 2>&1; then
        record "$name" PASS $(($(date +%s) - start))
    else
        record "$name" "FAIL (see $work/$log)" $(($(date +%s) - start))
        tail -5 "$log" | sed 's/^/   | /'
    fi
}
# spawn NAME LOG COMMAND...: a long-running README command (its own terminal in README).
spawn() {
    local name="$1" log="$2"
    shift 2
    n=$((n + 1))
    echo "== $n. $name (background): $*"
    "$@" > "$log" 2>&1 &
    spawned=$!
    pids+=("$spawned")
}
# wait_for SECONDS WHAT COMMAND...: poll until the command succeeds.
wait_for() {
    local limit="$1" what="$2"
    shift 2
    local start=$(date +%s)
    echo "== waiting for $what"
    until "$@" 2>/dev/null; do
        if [ $(($(date +%s) - start)) -ge "$limit" ]; then
            echo "   timed out after ${limit}s waiting for $what"
            return 1
        fi
        sleep 2
    done
}
rounds_closed() {
    local c
    c=$(grep -c '"event":"round"' rounds.jsonl 2>/dev/null) || true
    echo "${c:-0}"
}
# rounds_at_least N: whether N rounds have closed (a command wait_for re-runs).
rounds_at_least() { [ "$(rounds_closed)" -ge "$1" ]; }
# json_field FILE KEY: a top-level field of `device-agent state`'s JSON.
json_field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2" 2>/dev/null || true; }

# 1-4: the CA, the server bundle and two device bundles.
run "CA and server certificate" bash -c 'aggregator ca init --dir ca && aggregator ca issue-server --dir ca --name localhost'
run "device 1 certificate and bundle" bash -c 'aggregator ca issue-device --dir ca --id 1 && aggregator ca export-device --dir ca --id 1 --out dev-1'
run "device 2 certificate and bundle" bash -c 'aggregator ca issue-device --dir ca --id 2 && aggregator ca export-device --dir ca --id 2 --out dev-2'
run "server bundle (no CA key)" aggregator ca export-server --dir ca --out pki

# 5: the aggregator.
start=$(date +%s)
spawn "aggregator" logs/aggregator.log \
    aggregator serve --config deploy/run.toml --pki pki --listen 127.0.0.1:7443 --state state --metrics rounds.jsonl --prometheus-listen 127.0.0.1:9464
agg=$spawned
if wait_for 60 "the aggregator to listen" grep -q "^listening on " logs/aggregator.log; then
    record "aggregator listening" PASS $(($(date +%s) - start))
else
    record "aggregator listening" FAIL $(($(date +%s) - start))
    tail -5 logs/aggregator.log
    exit 1
fi

# 6-7: the two agents, each on its own JSONL file.
join1=(device-agent join --aggregator 127.0.0.1:7443 --server-name localhost --pki dev-1 --id 1 --device-class x86-64 --data deploy/examples/dev-1-chats.jsonl --state dev-1-state)
if [ "$arm" = 1 ]; then
    join2=(qemu-aarch64-static -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/release/device-agent
        join --aggregator 127.0.0.1:7443 --server-name localhost --pki dev-2 --id 2 --device-class rpi5 --data deploy/examples/dev-2-notes.jsonl --seq-len 32 --state dev-2-state)
else
    join2=(device-agent join --aggregator 127.0.0.1:7443 --server-name localhost --pki dev-2 --id 2 --device-class x86-64 --data deploy/examples/dev-2-notes.jsonl --state dev-2-state)
fi
rounds_start=$(date +%s)
spawn "agent 1 (chat records)" logs/agent-1.log "${join1[@]}"
agent1=$spawned
spawn "agent 2 (text records)" logs/agent-2.log "${join2[@]}"
agent2=$spawned

# 8: round 1 closes; the aggregator's scrape shows each class's arms.
start=$(date +%s)
if wait_for "$timeout_s" "round 1" rounds_at_least 1; then
    record "round 1 closed" PASS $(($(date +%s) - start))
else
    record "round 1 closed" FAIL $(($(date +%s) - start))
    exit 1
fi
run "Prometheus scrape (per-class arms)" bash -c 'curl -s 127.0.0.1:9464/metrics | grep -E "^fedspine_(arm_assignments_total|class_arm_share_ratio|rounds_aggregated_total)"'
cat "logs/$n.log" | sed 's/^/   | /'

# 9-12: kill -9 agent 1, read its state, restart it with the same command: same kept maps.
n=$((n + 1))
echo "== $n. kill -9 agent 1 (pid $agent1)"
kill -9 "$agent1"
wait "$agent1" 2>/dev/null || true
record "agent 1 killed (SIGKILL)" PASS 0
run "agent 1's state after the kill" device-agent state --state dev-1-state
before="logs/$n.log"
cat "$before" | sed 's/^/   | /'
kept_before=$(json_field "$before" kept_digest)
sparsity_before=$(json_field "$before" sparsity)
start=$(date +%s)
spawn "agent 1 restarted, same command" logs/agent-1-restart.log "${join1[@]}"
agent1=$spawned
if wait_for 600 "agent 1 to load its state" grep -q "^state: loaded" logs/agent-1-restart.log; then
    loaded=$(grep -m1 "^state: loaded" logs/agent-1-restart.log)
    echo "   $loaded"
    if [ -n "$kept_before" ] && [ "${loaded##* kept }" = "$kept_before" ] \
        && awk "BEGIN { exit !(${sparsity_before:-0} > 0) }"; then
        record "restart keeps the pruned kept maps (sparsity $sparsity_before)" PASS $(($(date +%s) - start))
    else
        record "restart keeps the pruned kept maps (before: $kept_before, sparsity $sparsity_before)" FAIL $(($(date +%s) - start))
    fi
else
    record "agent 1 reloaded its state" FAIL $(($(date +%s) - start))
fi

# 13: rounds 2 and 3; both agents are told the run is over and exit.
start=$(date +%s)
if wait_for "$timeout_s" "the third round" rounds_at_least 3; then
    record "rounds 2 and 3 closed" PASS $(($(date +%s) - start))
else
    record "rounds 2 and 3 closed" FAIL $(($(date +%s) - start))
fi
start=$(date +%s)
finished() { grep -q "^finished:" logs/agent-1-restart.log && grep -q "^finished:" logs/agent-2.log; }
if wait_for 300 "both agents to finish" finished && wait "$agent1" && wait "$agent2"; then
    record "both agents finished ($(grep -h '^finished:' logs/agent-1-restart.log logs/agent-2.log | tr '\n' ';'))" PASS $(($(date +%s) - start))
else
    record "both agents finished" FAIL $(($(date +%s) - start))
fi
wait "$agg" || true
rounds_wall=$(($(date +%s) - rounds_start))
grep -h "^round " logs/aggregator.log | sed 's/^/   | /' || true

# 14-15: the tuned, pruned model on device 1.
run "agent 1's final state" device-agent state --state dev-1-state
cat "logs/$n.log" | sed 's/^/   | /'
run "chat with the tuned model" device-agent generate --state dev-1-state --prompt "What is the code word for 3?"
cat "logs/$n.log" | sed 's/^/   | /'

echo
echo "walkthrough: $(($(date +%s) - t0)) s in all, ${rounds_wall} s from the agents' start to the run's end; agent 2 $([ "$arm" = 1 ] && echo "aarch64 under qemu" || echo "x86-64")"
printf '%s\n' "${summary[@]}"
echo "files and logs: $work"
exit $failed
