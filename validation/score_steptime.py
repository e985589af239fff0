"""Score the step-time model: estimated vs measured seconds per step on each timing run, with the
held-out runs (never fitted on; see steptime_data.py for the rule) reported on their own.
Bars (issue 11) on held-out runs: median |error| <= 15% and >= 80% within 30%.
Usage: PYTHONPATH=src python validation/score_steptime.py [--all] [RECORDS.json ...]
(record files named on the command line, e.g. new runs kept outside records/, are scored as held out)"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steptime_data import timed_runs  # noqa: E402

from memfit.gpus import get_gpu  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.models import load_model  # noqa: E402
from memfit.plan.steptime import step_time  # noqa: E402


def scored(runs=None) -> list[dict]:
    """Each timing run with ``estimate`` seconds and signed relative ``error``."""
    out = []
    for r in runs if runs is not None else timed_runs():
        job = Job.from_dict(r["job"])
        est = step_time(job, load_model(job.model), get_gpu(r["gpu"])).seconds
        out.append({**r, "estimate": est, "error": est / r["seconds"] - 1.0})
    return out


def summary(rows: list[dict]) -> dict:
    errs = [abs(r["error"]) for r in rows]
    if not errs:
        return {"n": 0, "median": None, "within30": None}
    return {"n": len(errs), "median": statistics.median(errs), "within30": sum(e <= 0.30 for e in errs) / len(errs)}


def extra_runs(paths: list[str]) -> list[dict]:
    """Timing runs from record files named on the command line (paths or globs), outside the fitted set:
    all held out. Files already among ``records/*.json`` are scored once, by the rule of steptime_data."""
    have = {str(Path(f).resolve()) for f in (Path(__file__).resolve().parent / "records").glob("*.json")}
    out = []
    for p in paths:
        for r in timed_runs(str(Path(p).resolve())):
            if str((Path(p).resolve().parent / r["file"]).resolve()) not in have:
                out.append({**r, "held_out": True})
    return out


def main(argv: list[str]) -> int:
    rows = scored() + scored(extra_runs([a for a in argv if not a.startswith("--")]))
    print(f"{'run':48s} {'gpu':10s} {'set':8s} {'measured s':>11s} {'estimate s':>11s} {'error':>7s}")
    for r in sorted(rows, key=lambda r: (r["held_out"], r["gpu"], r["name"])):
        if r["held_out"] or "--all" in argv:
            print(f"{r['name'][:48]:48s} {r['gpu']:10s} {'held-out' if r['held_out'] else 'fitted':8s} "
                  f"{r['seconds']:11.4f} {r['estimate']:11.4f} {100 * r['error']:+6.0f}%")
    for label, sel in (("fitted", [r for r in rows if not r["held_out"]]),
                       ("held-out", [r for r in rows if r["held_out"]]),
                       ("held-out H100", [r for r in rows if r["held_out"] and r["gpu"] == "h100-80gb"]),
                       ("held-out H200", [r for r in rows if r["held_out"] and r["gpu"] == "h200"])):
        s = summary(sel)
        if s["n"]:
            print(f"{label:14s} n={s['n']:3d}  median |error| {100 * s['median']:5.1f}%  within 30%: {100 * s['within30']:5.1f}%")
    s = summary([r for r in rows if r["held_out"]])
    ok = s["n"] > 0 and s["median"] <= 0.15 and s["within30"] >= 0.80
    print("bars (held-out: median <= 15%, >= 80% within 30%):", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
