#!/usr/bin/env bash
# The confirmation set for issue 14 item 9, fixed in advance (session 44, before any of it ran):
# seeds 29-44 of the byzantine-12r screen pair, each its own part (a seed whose compare.json is
# there is not run again, so the script can be stopped and started over sessions), then one
# pooled comparison of those sixteen seeds alone and one TOST at 5% with a 2-point margin.
# Run from the workspace root after `cargo build --release -p sim`; about 10-15 min per seed on
# a 2-core host. Every part must come from one CPU class (`sim pool` refuses a mix).
set -euo pipefail
sim=${SIM:-target/release/sim}
dir=sim/benchmarks/byzantine-12r
parts=()
for s in $(seq 29 44); do
  out="$dir/fedlora-$s"
  if [ ! -f "$out/compare.json" ]; then
    "$sim" compare --config sim/configs/examples/byzantine-12r.toml --seed "$s" --seeds 1 \
      --strategies fedlora+screen=3+clean,fedlora+screen=3 --out "$out"
  fi
  parts+=("$out")
done
"$sim" pool "${parts[@]}" --out "$dir/fedlora-confirm-29-44"
python3 "$dir/tost.py" "$dir/fedlora-confirm-29-44" 2
