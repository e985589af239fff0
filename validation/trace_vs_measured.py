"""The trace (and the estimate) against measured records, one record at a time with a time limit.

usage: python validation/trace_vs_measured.py [RECORDS.json ...] [--timeout 240] [--out FILE] [--cache FILE]

`memfit validate --engine trace` traces every record in one process and has no way to skip a slow one; this
runs each record's trace in a child process under ``--timeout`` seconds (a trace that runs past it is listed as
skipped, with the time it was given), and prints peak allocated measured / trace / estimate with both errors.
Default records: validation/records/h200-worst.json. ``--out`` also writes the printed table to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

_CHILD = """
import json, sys, time
sys.path.insert(0, {src!r})
from memfit.job import Job
from memfit.tracer import trace
job = Job.from_dict(json.loads(sys.argv[1]))
t0 = time.perf_counter()
bd = trace(job, fallback=False)
print(json.dumps({{"peak": bd.peak_allocated_bytes, "phase": bd.peak_phase, "seconds": time.perf_counter() - t0}}))
"""


def _records(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for rec in data if isinstance(data, list) else [data]:
            if isinstance(rec, dict) and rec.get("breakdown") and rec.get("job") and rec.get("status", "ok") == "ok":
                out.append(rec)
    return out


def _trace(job: dict, timeout: float) -> dict:
    code = _CHILD.format(src=str(ROOT / "src"))
    t0 = time.perf_counter()
    try:
        cp = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"slower than {timeout:.0f} s"}
    if cp.returncode != 0:
        lines = [x for x in cp.stderr.strip().splitlines() if x.strip()]
        return {"failed": (lines[-1] if lines else f"exit {cp.returncode}")[:90]}
    res = json.loads(cp.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="*", default=[str(ROOT / "validation" / "records" / "h200-worst.json")])
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds a record's trace may take")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--cache", help="JSON file of trace results by job, read and updated (the trace does not depend "
                                    "on the estimate: re-scoring the estimate need not re-trace)")
    args = ap.parse_args()
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    from memfit.estimator import estimate
    from memfit.job import Job

    lines: list[str] = []

    def emit(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    emit(f"{'run':40s} {'measured':>9s} {'trace':>9s} {'error':>7s} {'estimate':>9s} {'error':>7s}  phase m/t/e"
         "   (GiB, peak allocated)")
    t_err, e_err, skipped = [], [], []
    for rec in _records(args.records):
        name = rec.get("name", "?") + (" *" if rec.get("holdout") else "")
        m = rec["breakdown"]["peak_allocated_bytes"]
        mphase = rec["breakdown"].get("peak_phase", "")
        e = estimate(Job.from_dict(rec["job"]))
        ee = e.peak_allocated_bytes / m - 1
        e_err.append(abs(ee))
        key = json.dumps(rec["job"], sort_keys=True)
        t = cache.get(key) or _trace(rec["job"], args.timeout)
        if args.cache:  # a skipped (too slow) or failed trace is remembered too
            cache[key] = t
            Path(args.cache).write_text(json.dumps(cache, indent=0) + "\n")
        if "peak" not in t:
            why = t.get("skipped") or t.get("failed")
            skipped.append(f"{name} ({why})")
            emit(f"{name:40s} {m / 2**30:9.2f} {'-':>9s} {'-':>7s} {e.peak_allocated_bytes / 2**30:9.2f} {ee:+7.1%}"
                 f"  {mphase}/-/{e.peak_phase}   trace: {why}")
            continue
        te = t["peak"] / m - 1
        t_err.append(abs(te))
        emit(f"{name:40s} {m / 2**30:9.2f} {t['peak'] / 2**30:9.2f} {te:+7.1%} {e.peak_allocated_bytes / 2**30:9.2f}"
             f" {ee:+7.1%}  {mphase}/{t['phase']}/{e.peak_phase}   [trace {t['seconds']:.0f} s]")
    emit("* held out: never used to find or shape a rule")
    if t_err:
        emit(f"trace    {len(t_err):3d} runs: median |error| {statistics.median(t_err):.1%}, worst {max(t_err):.1%}")
    if e_err:
        emit(f"estimate {len(e_err):3d} runs: median |error| {statistics.median(e_err):.1%}, worst {max(e_err):.1%}")
    if skipped:
        emit("not traced: " + "; ".join(skipped))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
