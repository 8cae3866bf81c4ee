# Paired contrasts in time to target for the loss-lie experiment (issue 14): for each base entry
# B of one `sim compare` output, over the seeds where both entries reached the target, 95%
# percentile bootstrap of the mean difference (10,000 resamples, seeded):
#   the lie's cost            B - (B+clean)
#   the trim's honest cost    (B+loss-trim=T+clean) - (B+clean)
#   the lie's cost, trimmed   (B+loss-trim=T) - (B+loss-trim=T+clean)
#   trimmed under the lie against the untrimmed clean run   (B+loss-trim=T) - (B+clean)
# A positive difference is a later arrival (seconds of virtual time).
# Usage: python3 pairs.py TRIM BASE... -- FILE...  (compare.json files, or folders holding one)
import json, random, sys


def boot(xs, B=10000, seed=1):
    if not xs:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(xs)
    ms = sorted(sum(rng.choice(xs) for _ in range(n)) / n for _ in range(B))
    return sum(xs) / n, ms[int(0.025 * B)], ms[int(0.975 * B) - 1]


def load(path):
    return json.load(open(path if path.endswith(".json") else path + "/compare.json"))


def main(args):
    cut = args.index("--")
    trim, bases, files = args[0], args[1:cut], args[cut + 1:]
    for f in files:
        c = load(f)
        t = {m["entry"]: m["per_seed"] for m in c["metrics"] if m["metric"] == "time_to_target_s"}
        print(f, "seeds", c["seeds"][0], "-", c["seeds"][-1], f"({len(c['seeds'])})")
        for b in bases:
            clean, lie = b + "+clean", b
            tc, tl = f"{b}+loss-trim={trim}+clean", f"{b}+loss-trim={trim}"
            print(" ", b, " reached:", ", ".join(
                f"{n} {sum(x is not None for x in t[e])}"
                for n, e in [("clean", clean), ("lie", lie), ("trim clean", tc), ("trim lie", tl)]))
            for label, x, y in [
                ("lie's cost", lie, clean),
                ("trim's honest cost", tc, clean),
                ("lie's cost, trimmed", tl, tc),
                ("trimmed lie - clean", tl, clean),
            ]:
                d = [p - q for p, q in zip(t[x], t[y]) if p is not None and q is not None]
                m, lo, hi = boot(d)
                print(f"    {label:22s} {m:+7.1f} s [{lo:+7.1f}, {hi:+7.1f}] (n {len(d)})")


if __name__ == "__main__":
    main(sys.argv[1:])
