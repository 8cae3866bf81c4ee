"""Leave-one-out coefficients of the training-step time model at the small geometries.

Mirrors `sim/src/time_model.rs` (`features`) and `time_model/fit.rs` (non-negative least
squares on relative error) so that the coefficients of each leave-one-out fit can be read,
which `sim calibrate --from` does not print. Usage (numpy and scipy):

    python3 sim/benchmarks/time-model/loo_coefficients.py \
        sim/benchmarks/calibration-intel207-s40-median6.json

Prints the fit to every training point, then for each 1 x 64 point the fit without it, its
prediction and each term's share; then the largest leave-one-out error with the weight term
dropped, for comparison.
"""

import json
import sys

import numpy as np
from scipy.optimize import nnls

NAMES = ["overhead", "block", "head", "attn", "lora", "act", "weights", "headseq"]


def features(w):
    s = w["shape"]
    t = w["batch"] * w["seq"]
    d, hd, h, kv, ch = s["d_model"], s["head_dim"], s["heads"], s["kv_heads"], s["channels"]
    r, n, layers, vocab = w["rank"], w["seq"], s["layers"], s["vocab"]
    block = 2 * t * d * (2 * h * hd + 2 * kv * hd) + 2 * t * 3 * d * ch
    head = 2 * t * d * vocab
    attn = 2 * 2 * t * h * hd * (n + 1) / 2
    io = layers * 7 * d + 2 * h * hd + 2 * kv * hd + 3 * ch
    lora = 2 * t * r * io
    act = t * (4 * d * layers + 2 * h * hd + 2 * kv * hd + 4 * ch)
    weights = d * (2 * h * hd + 2 * kv * hd) + 3 * d * ch + d * vocab
    return np.array([1, block * 1e-9, head * 1e-9, attn * 1e-9, lora * 1e-9, act * 1e-6,
                     weights * 1e-6, h * w["batch"] * 1e-3])


def fit(points, cols):
    a = np.array([features(m["workload"])[cols] / m["ms"] for m in points])
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1
    x, _ = nnls(a / norms, np.ones(len(points)))
    return x / norms


def label(m):
    w = m["workload"]
    return f"{m['label']} {m['sparsity']:.2f} r{w['rank']} {w['batch']}x{w['seq']}"


def main(path):
    train = [m for m in json.load(open(path))["measurements"] if m["kind"] == "train"]
    every = list(range(len(NAMES)))
    c = fit(train, every)
    print("all points:", ", ".join(f"{k} {v:.3f}" for k, v in zip(NAMES, c)))
    for i, m in enumerate(train):
        w = m["workload"]
        if w["batch"] * w["seq"] != 64:
            continue
        c = fit(train[:i] + train[i + 1:], every)
        terms = features(w) * c
        print(f"without {label(m)}: measured {m['ms']:.0f} ms, predicted {terms.sum():.0f} ms;",
              ", ".join(f"{k} {v:.1f}" for k, v in zip(NAMES, terms) if v > 0))
    no_weights = [0, 1, 2, 3, 4, 5, 7]
    worst = (0.0, "")
    for i, m in enumerate(train):
        c = fit(train[:i] + train[i + 1:], no_weights)
        e = features(m["workload"])[no_weights] @ c / m["ms"] - 1
        worst = max(worst, (abs(e), f"{label(m)} {100 * e:+.1f}%"))
    print("without the weight term, largest leave-one-out error:", worst[1])


if __name__ == "__main__":
    main(sys.argv[1])
