#!/usr/bin/env bash
# Fuzzes the protocol, aggregator and device-agent crates with cargo fuzz (libFuzzer, nightly
# toolchain): installs cargo-fuzz
# if it is missing, runs every target in fuzz/ for N executions in one process (no -jobs, which
# would fork workers that log to files), then minimises each corpus back into
# fuzz/corpus/<target>/ (the replay test, tests/tests/fuzz_corpus.rs, re-runs those files on
# stable; the agent_session corpus replays as a device-agent unit test). Crashes land in
# fuzz/artifacts/<target>/; keep a minimised crash as fuzz/regressions/<target>/<name> next to
# its fix.
#
# agent_session links the device agent and so burn: it builds with the `agent` feature of the
# fuzz crate, without a sanitizer (`-s none`: burn under the address sanitizer does not build in
# reasonable time on a small machine; libFuzzer's coverage and overflow checks remain) and in
# its own target directory (fuzz/target-agent), so it does not rebuild the other targets.
#
# Usage: scripts/fuzz.sh [N] [TARGET...]
#   N       executions per target (default 10000000)
#   TARGET  targets to run (default: every target `cargo fuzz list` shows)
# Environment:
#   FUZZ_TOOLCHAIN  rustup toolchain for cargo fuzz (default: nightly)
#   FUZZ_MAX_LEN    largest input libFuzzer generates, in bytes (default 8192)
#   FUZZ_ARGS       extra libFuzzer flags (e.g. "-max_total_time=600")
#   FUZZ_BUILD_ARGS extra `cargo fuzz` build flags, e.g. "--no-trace-compares --target-dir
#                   fuzz/target-notc" (the aggregate target spends most of its time in the
#                   comparison tracing of faer's SVD loops; see BENCHMARKS.md, "Fuzzing")
#   FUZZ_NO_CMIN    set to 1 to keep the grown corpus instead of minimising it
# Exits non-zero as soon as a target finds a crash; the log above names the input.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${1:-10000000}"
shift || true
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
max_len="${FUZZ_MAX_LEN:-8192}"

if ! cargo +"$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +"$toolchain" fuzz list)
fi

for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus")" ]; then
        echo "seeding $corpus"
        case "$target" in
            aggregate)
                cargo run -q -p aggregator --features fuzzing --example aggregate_fuzz_seeds -- fuzz/corpus ;;
            agent_session)
                FEDSPINE_WRITE_FUZZ_SEEDS=1 cargo test -q --workspace --lib agent_session_seeds ;;
            *)
                cargo run -q -p protocol --features fuzzing --example fuzz_seeds -- fuzz/corpus ;;
        esac
    fi
    # shellcheck disable=SC2206
    build_args=(${FUZZ_BUILD_ARGS:-})
    if [ "$target" = agent_session ]; then
        build_args+=(--features agent -s none --target-dir fuzz/target-agent)
    fi
    echo "== $target: $runs executions"
    # shellcheck disable=SC2086
    cargo +"$toolchain" fuzz run "${build_args[@]}" "$target" -- \
        -runs="$runs" -max_len="$max_len" -print_final_stats=1 \
        ${FUZZ_ARGS:-}
    if [ "${FUZZ_NO_CMIN:-0}" != 1 ]; then
        cargo +"$toolchain" fuzz cmin "${build_args[@]}" "$target" -- -max_len="$max_len"
        if [ "$target" = agent_session ]; then
            # cmin renames every input to its hash; the replay test wants the named seeds.
            FEDSPINE_WRITE_FUZZ_SEEDS=1 cargo test -q --workspace --lib agent_session_seeds
        fi
    fi
done
echo "fuzzed ${targets[*]} for $runs executions each; replay with: cargo test -p tests --test fuzz_corpus"
echo "(agent_session: cargo test --workspace --lib agent_session)"
