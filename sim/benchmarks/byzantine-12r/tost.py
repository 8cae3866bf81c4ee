# Equivalence of a poisoned entry and its clean twin: two one-sided t-tests (TOST) on the
# per-seed paired differences of a comparison's Byzantine table, in accuracy points.
# Usage: python3 tost.py COMPARE_DIR_OR_JSON [MARGIN_POINTS=2]
# Prints n, mean, median, SD, the 90% t interval and each side's p (equivalence at 5% when
# both are under 0.05). It is one test of one set of seeds: run it once on a set fixed in
# advance, or say how many looks came before.
import json, os, statistics, sys

from scipy import stats


def main(path, margin):
    if os.path.isdir(path):
        path = os.path.join(path, "compare.json")
    rows = json.load(open(path))["byzantine"]
    for row in rows:
        d = [100.0 * x for x in row["difference_per_seed"] if x is not None]
        n = len(d)
        mean, sd = statistics.mean(d), statistics.stdev(d)
        se = sd / n**0.5
        t90 = stats.t.ppf(0.95, n - 1)
        p_lower = 1.0 - stats.t.cdf((mean + margin) / se, n - 1)
        p_upper = stats.t.cdf((mean - margin) / se, n - 1)
        print(
            f"{row['entry']} - {row['clean_entry']}: n {n} mean {mean:+.2f} median "
            f"{statistics.median(d):+.2f} sd {sd:.2f} 90% t [{mean - t90 * se:+.2f}, "
            f"{mean + t90 * se:+.2f}] margin {margin:g}: lower p {p_lower:.3f} upper p {p_upper:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 2.0)
