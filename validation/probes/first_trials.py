#!/usr/bin/env python3
"""Run single batches of boundary pairs as the first and only trial of a fresh process, as a user runs a job.

    python validation/probes/first_trials.py validation/jobs/boundaries-13.yaml NAME:BATCH [...] --out DIR
        [--steps 2] [--timeout 240] [--measured "GPU, driver, torch, transformers"]

Each NAME:BATCH runs ``python -m memfit.measurer.worker`` on the pair's job at that micro-batch with the
allocator capped at the pair's card (the worker sets the pair's allocator setting before CUDA starts), one at
a time. Output: ``DIR/probes-<yaml stem>.json``, a list of ``kind: "probe"`` entries (the form
validation/score_fit.py reads: ``pair``, ``batch_size``, ``ok``, ``first_trial``, ``record``), rewritten
after each run. This process imports no torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from memfit.units import parse_bytes  # noqa: E402  (torch-free)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("yaml")
    ap.add_argument("runs", nargs="+", metavar="NAME:BATCH")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--measured", default="")
    args = ap.parse_args(argv)
    entries = {e["name"]: e for e in yaml.safe_load(Path(args.yaml).read_text())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"probes-{Path(args.yaml).stem}.json"
    results = []
    for run in args.runs:
        name, _, b = run.rpartition(":")
        if name not in entries or not b.isdigit():
            print(f"error: {run!r} is not NAME:BATCH of a pair in {args.yaml}", file=sys.stderr)
            return 2
        e = entries[name]
        job = dict(e["job"], batch_size=int(b))
        with tempfile.TemporaryDirectory() as tmp:
            jp, rp = Path(tmp) / "job.json", Path(tmp) / "rec.json"
            jp.write_text(json.dumps({"job": job, "gpu_memory": e["gpu_memory"]}))
            t0 = time.time()
            try:
                p = subprocess.run([sys.executable, "-m", "memfit.measurer.worker", str(jp), str(rp),
                                    "--steps", str(args.steps)], capture_output=True, text=True,
                                   timeout=args.timeout)
                rc, err = p.returncode, p.stderr[-2000:]
            except subprocess.TimeoutExpired:
                rc, err = None, "timeout"
            rec = json.loads(rp.read_text()) if rp.exists() else None
        fits = (rec or {}).get("breakdown", rec or {}).get("fits") if rec else None
        ok = bool(rec is not None and rc == 0 and fits)
        results.append({"kind": "probe", "pair": name, "batch_size": int(b), "ok": ok, "first_trial": True,
                        "job": job, "gpu_memory_bytes": parse_bytes(e["gpu_memory"]),
                        "how": f"validation/probes/first_trials.py: the worker at batch {b} in a fresh process, "
                               f"{args.steps} steps, the batch is the process's first and only trial",
                        "measured": args.measured, "wall_s": round(time.time() - t0, 1), "returncode": rc,
                        "record": rec, **({"stderr": err} if rc != 0 else {})})
        dest.write_text(json.dumps(results, indent=1))
        print(f"{name} batch {b}: {'runs' if ok else 'out of memory' if rec else 'error'}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
