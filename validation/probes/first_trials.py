#!/usr/bin/env python3
"""Run single batches of boundary pairs as the first and only trial of a fresh process, as a user runs a job.

    python validation/probes/first_trials.py validation/jobs/boundaries-13.yaml NAME:BATCH [...] --out DIR
        [--steps 2] [--timeout 240] [--measured "GPU, driver, torch, transformers"]

Each NAME:BATCH runs ``python -m memfit.measurer.worker`` on the pair's job at that micro-batch with the
allocator capped at the pair's card (the worker sets the pair's allocator setting before CUDA starts), one at
a time; the YAML is read and checked as validation/run_boundaries.py reads it. Output:
``DIR/probes-<yaml stem>.json``, a list of ``kind: "probe"`` entries (the form validation/score_fit.py reads:
``pair``, ``batch_size``, ``ok``, ``first_trial``, ``job``, ``gpu_memory_bytes``, ``record``), rewritten after
each run. This process imports no torch."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import child_env, run_to_end, tail, worker_cmd  # noqa: E402
from run_boundaries import load_boundary_entries  # noqa: E402

from memfit.errors import JobError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("yaml", type=Path)
    ap.add_argument("runs", nargs="+", metavar="NAME:BATCH")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--measured", default="")
    args = ap.parse_args(argv)
    try:
        entries = {e["name"]: e for e in load_boundary_entries(args.yaml)}
    except (OSError, JobError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = []
    for run in args.runs:
        name, _, b = run.rpartition(":")
        if name not in entries or not b.isdigit() or int(b) < 1:
            print(f"error: {run!r} is not NAME:BATCH of a pair in {args.yaml} (a batch >= 1)", file=sys.stderr)
            return 2
        runs.append((entries[name], int(b)))
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"probes-{args.yaml.stem}.json"
    results = []
    for e, b in runs:
        how = (f"validation/probes/first_trials.py: the worker at batch {b} in a fresh process, {args.steps} steps, "
               "the batch is the process's first and only trial")
        entry = probe_entry(e["name"], e["job"], e["gpu_memory_bytes"], b, steps=args.steps, timeout=args.timeout,
                            how=how, measured=args.measured)
        results.append(entry)
        dest.write_text(json.dumps(results, indent=1))
        print(f"{e['name']} batch {b}: {verdict_word(entry)}  ({entry['wall_s']:.0f} s)", flush=True)
    return 0


def probe_entry(pair: str, job: dict, gpu_memory_bytes: int, batch: int, *, steps: int, timeout: float, how: str,
                measured: str) -> dict:
    """Batch ``batch`` of ``job`` on the card as a fresh worker's first and only trial: the ``kind: "probe"``
    entry validation/score_fit.py reads (``ok`` is the worker's verdict; ``record`` None when it gave none)."""
    job = dict(job, batch_size=batch)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        jp, rp = Path(tmp) / "job.json", Path(tmp) / "rec.json"
        jp.write_text(json.dumps({"job": job, "gpu_memory_bytes": gpu_memory_bytes}))
        _, err, rc, timed_out = run_to_end(worker_cmd(str(jp), str(rp), "--steps", str(steps)),
                                           env=child_env(), timeout=timeout)
        rec = json.loads(rp.read_text()) if rp.exists() else None
    ok = bool(rec is not None and rc == 0 and rec.get("breakdown", {}).get("fits"))
    return {"kind": "probe", "pair": pair, "batch_size": batch, "ok": ok, "first_trial": True,
            "job": job, "gpu_memory_bytes": gpu_memory_bytes, "how": how, "measured": measured,
            "wall_s": round(time.time() - t0, 1), "returncode": None if timed_out else rc, "record": rec,
            **({"stderr": "timeout" if timed_out else tail(err)} if rc != 0 or timed_out else {})}


def verdict_word(entry: dict) -> str:
    return "runs" if entry["ok"] else "out of memory" if entry["record"] else "error"


if __name__ == "__main__":
    raise SystemExit(main())
