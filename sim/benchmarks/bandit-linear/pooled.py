# Paired differences in time to target pooled over several `sim compare` outputs run with the
# same entries on different seed sets (95% percentile bootstrap over every seed where both
# entries reached the target, 10,000 resamples, seeded).
# Usage: python3 pooled.py "ENTRY A" "ENTRY B" FILE...   (prints A minus B; compare.json files
# or folders holding one)
import json, sys

from pairs import boot, load


def main(a, b, dirs):
    xs = []
    for d in dirs:
        c = load(d)
        t = {m["entry"]: m["per_seed"] for m in c["metrics"] if m["metric"] == "time_to_target_s"}
        xs += [x - y for x, y in zip(t[a], t[b]) if x is not None and y is not None]
    m, lo, hi = boot(xs)
    print(f"{a} - {b}: {m:+.1f} [{lo:+.1f}, {hi:+.1f}] n {len(xs)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
