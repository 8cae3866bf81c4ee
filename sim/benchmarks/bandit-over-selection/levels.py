# Paired gaps by over-selection level, from two `sim compare` outputs of the same seeds: the
# six entries of pairs.py's run (levels 0 and 0.25) and the six of the level sweep (0.125, 0.5).
# Usage: python3 levels.py FIRST_DIR SWEEP_DIR  (each holding compare.json)
import json, sys
from pairs import boot, times

U = "fedspine@uniform-random"
L = "fedspine@ucb1+scope=class+explore=1+w4=3"
F = "fedspine@fixed:prune_ratio=0.6:rank=4"

t = {**times(sys.argv[1])[1], **times(sys.argv[2])[1]}
for level in ["", "+over=0.125", "+over=0.25", "+over=0.5"]:
    name = level or "none"
    for (a, b, what) in [(L, F, "UCB1 minus fixed"), (U, L, "random minus UCB1")]:
        xs = [x - y for x, y in zip(t[a + level], t[b + level]) if x is not None and y is not None]
        m, lo, hi = boot(xs)
        print(f"  over {name:12s} {what:18s}: {m:+6.1f} [{lo:+6.1f}, {hi:+6.1f}] n {len(xs)}")
