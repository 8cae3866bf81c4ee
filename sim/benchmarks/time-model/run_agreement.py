"""How well two measurement files of the calibration grid agree point by point.

Divides out the pair's overall speed ratio (the median of the per-point ratios), then prints
the median and largest remaining difference and how many points differ by more than 10%.
Usage: python3 sim/benchmarks/time-model/run_agreement.py A.json B.json
"""

import json
import statistics
import sys


def load(path):
    out = {}
    for m in json.load(open(path))["measurements"]:
        w = m["workload"]
        key = (m["kind"], m["label"], round(m["sparsity"], 4), w["rank"], w["batch"], w["seq"])
        out[key] = m["ms"]
    return out


def main(pa, pb):
    a, b = load(pa), load(pb)
    keys = [k for k in a if k in b]
    ratios = [a[k] / b[k] for k in keys]
    scale = statistics.median(ratios)
    diffs = sorted(abs(r / scale - 1) for r in ratios)
    print(f"{pa} vs {pb}: scale {scale:.3f}, {len(keys)} points, median difference "
          f"{100 * statistics.median(diffs):.1f}%, largest {100 * diffs[-1]:.1f}%, "
          f"over 10%: {sum(d > 0.1 for d in diffs)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
