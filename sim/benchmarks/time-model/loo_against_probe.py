"""The time model's leave-one-out predictions at the small geometries against paired_steps.rs.

For each 1-4 x 64 training point of a measurement file that `paired_steps.rs` also times: the
file's own time over its reference step (dense, rank 8, 2 x 128), the model's leave-one-out
prediction over its prediction of the reference (the fit without the point), and the probe's
median ratio (`paired_steps-intel207-s43.txt`). Usage (numpy and scipy):

    python3 sim/benchmarks/time-model/loo_against_probe.py FILE.json [FILE.json ...]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loo_coefficients import features, fit  # noqa: E402

# (label, rank, batch, seq) -> median over 8 rounds of time / reference time, session 43.
PROBE = {
    ("dense", 16, 1, 64): 0.370,
    ("channels", 16, 1, 64): 0.290,
    ("heads+channels", 16, 1, 64): 0.227,
    ("dense", 16, 2, 64): 0.627,
    ("channels", 16, 2, 64): 0.513,
    ("dense", 16, 4, 64): 1.022,
}
EVERY = list(range(8))


def main(paths):
    for path in paths:
        train = [m for m in json.load(open(path))["measurements"] if m["kind"] == "train"]
        ref = next(m for m in train if m["label"] == "dense" and
                   (m["workload"]["rank"], m["workload"]["batch"], m["workload"]["seq"]) == (8, 2, 128))
        print(path)
        for i, m in enumerate(train):
            w = m["workload"]
            key = (m["label"], w["rank"], w["batch"], w["seq"])
            if key not in PROBE:
                continue
            c = fit(train[:i] + train[i + 1:], EVERY)
            predicted = features(w) @ c / (features(ref["workload"]) @ c)
            probe = PROBE[key]
            print(f"  {key[0]} {key[2]}x{key[3]}: file {m['ms'] / ref['ms']:.3f}, leave-one-out "
                  f"{predicted:.3f}, probe {probe:.3f} (model {100 * (predicted / probe - 1):+.1f}%, "
                  f"file {100 * (m['ms'] / ref['ms'] / probe - 1):+.1f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
