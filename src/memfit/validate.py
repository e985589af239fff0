"""Score an engine (estimate or trace) against measured records in ``validation/records``.

A record is a JSON object (or a list of them) written by the measure engine: ``job``, ``breakdown``
(measured), ``env``; batch runs add ``name`` and may mark ``holdout: true`` (runs never used to
calibrate any constant). The score is the relative error of ``peak_allocated_bytes`` (and of
``device_total_bytes``), per run, then median / 90th percentile / worst, per group of records with a bar.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .breakdown import Breakdown
from .job import Job

#: The accuracy bars of the issues: (median |error| of peak allocated, worst |error|, median device total)
BARS = {
    "estimate": {"single": (0.03, 0.10, 0.08), "quant": (0.04, 0.12, 0.08), "multi": (0.05, 0.12, 0.10)},
    "trace": {"single": (0.02, 0.06, 0.08), "quant": (0.04, 0.12, 0.08), "multi": (0.05, 0.12, 0.10)},
}


@dataclass
class Scored:
    name: str
    group: str
    holdout: bool
    job: Job
    measured: Breakdown
    predicted: Breakdown | None
    error: str = ""
    concurrent: bool = False
    """The run shared its GPU with another process: NVML's device total is not its own (not scored)."""

    @property
    def err_alloc(self) -> float:
        return (self.predicted.peak_allocated_bytes - self.measured.peak_allocated_bytes) / self.measured.peak_allocated_bytes

    @property
    def err_total(self) -> float:
        return (self.predicted.device_total_bytes - self.measured.device_total_bytes) / self.measured.device_total_bytes

    @property
    def err_reserved(self) -> float:
        return (self.predicted.peak_reserved_bytes - self.measured.peak_reserved_bytes) / self.measured.peak_reserved_bytes


def load_records(root: str | Path) -> list[dict[str, Any]]:
    """Every successful record under ``root`` (files holding one record or a list)."""
    out = []
    for path in sorted(Path(root).glob("**/*.json")):
        data = json.loads(path.read_text())
        for rec in data if isinstance(data, list) else [data]:
            if isinstance(rec, dict) and rec.get("breakdown") and rec.get("job"):
                if rec["breakdown"].get("extras", {}).get("fits", True) is False:
                    continue
                if rec["breakdown"].get("measurement") not in (None, "", "cuda-allocator"):
                    continue
                if rec.get("kind") == "boundary":
                    continue  # a largest-batch search under a capped allocator: validation/score_fit.py scores it
                rec.setdefault("_file", str(path))
                out.append(rec)
    return out


def _group(job: Job) -> str:
    if job.gpus > 1:
        return "multi"
    if job.quantization != "none" or job.optimizer in ("adamw-8bit", "paged-adamw-8bit", "paged-adamw"):
        return "quant"
    return "single"


def score(records: list[dict[str, Any]], engine: str = "estimate",
          predict: Callable[[Job], Breakdown] | None = None) -> list[Scored]:
    if predict is None:
        if engine == "estimate":
            from .estimator import estimate as predict
        else:
            from .tracer import trace as predict
    rows = []
    for rec in records:
        job = Job.from_dict(rec["job"])
        measured = Breakdown.from_dict(rec["breakdown"])
        name = rec.get("name") or Path(rec.get("_file", "?")).stem
        row = Scored(name=name, group=_group(job), holdout=bool(rec.get("holdout")), job=job, measured=measured,
                     predicted=None, concurrent=bool(rec.get("concurrent_runs", 1) > 1))
        try:
            row.predicted = predict(job)
        except Exception as exc:  # noqa: BLE001 - a failing prediction is a row, not a crash
            row.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        rows.append(row)
    return rows


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, round(q * (len(xs) - 1))))
    return xs[k]


def summarize(rows: list[Scored]) -> dict[str, dict[str, float]]:
    out = {}
    for group in sorted({r.group for r in rows}):
        for subset, label in ((lambda r: True, group), (lambda r: r.holdout, group + " (held out)")):
            sel = [r for r in rows if r.group == group and subset(r) and r.predicted]
            if not sel:
                continue
            a = [abs(r.err_alloc) for r in sel]
            t = [abs(r.err_total) for r in sel if not r.concurrent] or [0.0]
            rs = [abs(r.err_reserved) for r in sel if r.measured.peak_reserved_bytes]
            out[label] = {"runs": len(sel), "failed": sum(1 for r in rows if r.group == group and subset(r) and not r.predicted),
                          "median": statistics.median(a), "p90": _pct(a, 0.9), "worst": max(a),
                          "total_median": statistics.median(t), "total_worst": max(t),
                          "reserved_median": statistics.median(rs) if rs else float("nan"),
                          "reserved_worst": max(rs) if rs else float("nan")}
    return out


def check_bars(summary: dict[str, dict[str, float]], engine: str) -> list[str]:
    """Failures of the accuracy bars, one line each (empty: all bars met)."""
    failures = []
    for label, s in summary.items():
        if "held out" in label:
            continue
        med, worst, total_med = BARS[engine][label]
        if s["failed"]:
            failures.append(f"{label}: {s['failed']} run(s) could not be predicted")
        if s["median"] > med:
            failures.append(f"{label}: median |error| {s['median']:.1%} > {med:.0%}")
        if s["worst"] > worst:
            failures.append(f"{label}: worst |error| {s['worst']:.1%} > {worst:.0%}")
        if s["total_median"] > total_med:
            failures.append(f"{label}: device-total median |error| {s['total_median']:.1%} > {total_med:.0%}")
    return failures


def calibrate(rows: list[Scored]) -> dict[str, float]:
    """The one runtime constant of ``memfit.estimator.events``, refitted on records that are not held out: the
    median CUDA context (device total minus reserved) for training and inference. (Reserved comes from the
    allocator replay: nothing to fit.)"""
    fit = [r for r in rows if not r.holdout and r.group == "single" and not r.concurrent]  # their device totals
    # are not theirs when another process shared the GPU
    out: dict[str, float] = {}
    for task in ("train", "infer"):
        ctx = [r.measured.device_total_bytes - r.measured.peak_reserved_bytes for r in fit if r.job.task == task]
        if ctx:
            out[f"cuda_context_mib[{task}]"] = round(statistics.median(ctx) / 2**20)
    out["runs"] = len(fit)
    return out
