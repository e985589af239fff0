"""Fit the step-time model's factors (one per kind of work) on the fitted runs; writes
src/memfit/plan/steptime_fit.json. Start: relative least squares with factors >= 0 (projected coordinate
descent); then minimise the squared log error (over- and under-estimates by the same ratio cost the
same) by a multiplicative coordinate search. Usage: PYTHONPATH=src python validation/fit_steptime.py"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steptime_data import timed_runs  # noqa: E402

from memfit.gpus import get_gpu  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.models import load_model  # noqa: E402
from memfit.plan.steptime import KINDS, _DEFAULT, features  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "src/memfit/plan/steptime_fit.json"


def rows(runs):
    X, y = [], []
    for r in runs:
        job = Job.from_dict(r["job"]) if hasattr(Job, "from_dict") else Job(**r["job"])
        f = features(job, load_model(job.model), get_gpu(r["gpu"]))
        X.append([f[k] / r["seconds"] for k in KINDS])
        y.append(1.0)
    return X, y


def nnls(X, y, iters=20000):
    """min sum (X w - y)^2 over w >= 0 by cyclic coordinate descent."""
    n = len(X[0])
    w = [0.0] * n
    r = [-yi for yi in y]  # residual X w - y
    for _ in range(iters):
        moved = 0.0
        for j in range(n):
            col = [row[j] for row in X]
            d = sum(c * c for c in col)
            if d == 0:
                continue
            g = sum(c * ri for c, ri in zip(col, r))
            new = max(0.0, w[j] - g / d)
            delta = new - w[j]
            if delta:
                w[j] = new
                r = [ri + c * delta for ri, c in zip(r, col)]
                moved = max(moved, abs(delta) / (abs(new) + 1e-12))
        if moved < 1e-9:
            break
    return w


def log_refine(X, w, rounds=80):
    """Coordinate search on sum(log(X w)^2) (X rows are features / measured seconds), factors kept > 0."""
    import math

    def loss(v):
        return sum(math.log(max(sum(a * b for a, b in zip(row, v)), 1e-12)) ** 2 for row in X)

    w = [max(x, 1e-12) for x in w]
    for _ in range(rounds):
        for j in range(len(w)):
            best, bv = loss(w), w[j]
            for m in (0.5, 0.7, 0.85, 0.95, 1.05, 1.2, 1.5, 2.0):
                trial = list(w)
                trial[j] = bv * m
                lv = loss(trial)
                if lv < best:
                    best, w[j] = lv, bv * m
    return w


def main() -> int:
    runs = [r for r in timed_runs() if not r["held_out"]]
    X, y = rows(runs)
    w = nnls(X, y)
    w = log_refine(X, [x if x > 0 else 1e-6 for x in w])
    factors = {k: (w[i] if w[i] > 1e-9 else 0.0) for i, k in enumerate(KINDS)}
    # a kind no fitted run exercises keeps its default factor
    for i, k in enumerate(KINDS):
        if all(row[i] == 0 for row in X):
            factors[k] = _DEFAULT[k]
    OUT.write_text(json.dumps({"note": "fitted by validation/fit_steptime.py on the non-held-out H100 records",
                               "fitted_on": sorted(r["name"] for r in runs), "factors": factors}, indent=1) + "\n")
    for k, v in factors.items():
        print(f"{k:12s} {v:.4g}")
    print(f"fitted on {len(runs)} runs -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
