# Paired differences in time to target between entries of `sim compare` outputs (95% percentile
# bootstrap over the seeds where both entries reached the target, 10,000 resamples, seeded).
# Usage: python3 pairs.py DIR...  (each holding the compare.json of the six-entry run)
import json, random, sys


def boot(xs, B=10000, seed=1):
    rng = random.Random(seed)
    n = len(xs)
    ms = sorted(sum(rng.choice(xs) for _ in range(n)) / n for _ in range(B))
    return sum(xs) / n, ms[int(0.025 * B)], ms[int(0.975 * B) - 1]


def times(d):
    c = json.load(open(d + "/compare.json"))
    t = {m["entry"]: m["per_seed"] for m in c["metrics"] if m["metric"] == "time_to_target_s"}
    return c, t


PAIRS = [(0, 1), (2, 3), (4, 5), (0, 2), (1, 3), (3, 5), (2, 4)]


def main(dirs):
    for d in dirs:
        c, t = times(d)
        ent = c["entries"]
        print(d, c["seeds"])
        for i, j in PAIRS:
            xs = [x - y for x, y in zip(t[ent[i]], t[ent[j]]) if x is not None and y is not None]
            m, lo, hi = boot(xs)
            print(f"  {ent[i]:55s} - {ent[j]:55s}: {m:+6.1f} [{lo:+6.1f}, {hi:+6.1f}] n {len(xs)}")
    print("difference in differences: (ucb1 - fixed) without over-selection minus the same with it")
    for d in dirs:
        c, t = times(d)
        ent = c["entries"]
        u, uo, f, fo = (t[ent[k]] for k in (2, 3, 4, 5))
        xs = [(a - b) - (x - y) for a, b, x, y in zip(u, f, uo, fo) if None not in (a, b, x, y)]
        m, lo, hi = boot(xs)
        print(f"  {d}: {m:+6.1f} [{lo:+6.1f}, {hi:+6.1f}] n {len(xs)}")


if __name__ == "__main__":
    main(sys.argv[1:])
