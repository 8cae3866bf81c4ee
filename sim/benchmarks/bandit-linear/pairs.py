# Paired differences in time to target between the entries of one `sim compare` output: the
# first entry (uniform-random arms) minus each, the second (the learner to beat) minus each, and
# each minus the last (the fixed arm); 95%
# percentile bootstrap over the seeds where both reached the target (10,000 resamples, seeded),
# and the mean megabytes moved and final accuracy (trained devices) per entry.
# Usage: python3 pairs.py FILE...  (compare.json files, or folders holding one)
import json, random, sys


def boot(xs, B=10000, seed=1):
    if not xs:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(xs)
    ms = sorted(sum(rng.choice(xs) for _ in range(n)) / n for _ in range(B))
    return sum(xs) / n, ms[int(0.025 * B)], ms[int(0.975 * B) - 1]


def load(path):
    """A compare.json, or a folder holding one."""
    return json.load(open(path if path.endswith(".json") else path + "/compare.json"))


def per_seed(c, metric):
    return {m["entry"]: m["per_seed"] for m in c["metrics"] if m["metric"] == metric}


def main(dirs):
    for d in dirs:
        c = load(d)
        ent = c["entries"]
        t = per_seed(c, "time_to_target_s")
        b = per_seed(c, "megabytes")
        acc = per_seed(c, "final_accuracy_trained")
        print(d, "seeds", c["seeds"])
        ref, fixed = ent[0], ent[-1]
        for e in ent:
            ts = [x for x in t[e] if x is not None]
            mean_t = sum(ts) / len(ts) if ts else float("nan")
            line = f"  {e:60s} time {mean_t:6.1f} (n {len(ts)})"
            if e in b:
                bs = [x for x in b[e] if x is not None]
                line += f" {sum(bs) / len(bs):7.0f} MB"
            a = [x for x in acc[e] if x is not None]
            line += f" acc {sum(a) / len(a):.4f}"
            pairs = (("random-entry", (ref, e)), ("second-entry", (ent[1], e)), ("entry-fixed", (e, fixed)))
            for name, (x0, y0) in pairs:
                if x0 == y0:
                    continue
                xs = [x - y for x, y in zip(t[x0], t[y0]) if x is not None and y is not None]
                m, lo, hi = boot(xs)
                line += f" | {name} {m:+6.1f} [{lo:+6.1f}, {hi:+6.1f}] n {len(xs)}"
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
