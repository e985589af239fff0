"""Run the planning scenarios for real: for each, the planner's top five candidates on the card, each
measured once (fresh worker process, allocator capped at the card) one at a time, since timing matters.

Usage (on the GPU machine, from the repo root):
    python validation/run_plan_scenarios.py validation/jobs/plan_scenarios.yaml --out $OUT [--budget-s 450]
Runs share this process by default (``--isolate``: a fresh ``python -m memfit.measurer.worker`` per run,
~17 s of start-up each, too slow for 40 runs in 8 minutes): each run frees everything and empties the
allocator's cache before the next (as ``memfit.measurer.measure_sweep`` does); what CUDA keeps for the
process (context, cuBLAS workspaces) stays. A candidate with ``expandable_segments`` other than this
process's setting runs in a fresh worker (the allocator setting cannot change once CUDA is up).
Writes ``OUT/plan-scenarios.json`` after every run: per scenario the candidates in the planner's order with
the planner's estimate and the measured fits / OOM, tokens/s and peak. The measured step is one
micro-batch (the worker does not accumulate); tokens/s compare candidates at their own micro-batch.
A run that would start after ``--budget-s`` seconds is recorded as skipped (the whole run stays < 8 min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from launch import child_env, run_to_end, worker_cmd  # noqa: E402

from memfit.job import Job  # noqa: E402
from memfit.plan import plan  # noqa: E402
from memfit.units import parse_card_memory  # noqa: E402


def has_bitsandbytes() -> bool:
    """Whether bitsandbytes imports (in a child process: a package that is present but broken counts as absent)."""
    p = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    return p.returncode == 0


def candidates(sc: dict, bnb: bool, top: int = 5):
    job = Job.from_dict(sc["job"])
    mem = parse_card_memory(str(sc["gpu_memory"]), "gpu_memory")
    keep = list(sc.get("keep", []))
    if not bnb:  # no QLoRA, no 8-bit optimizers: keep what would need them
        keep = sorted(set(keep) | {"optimizer", "method"})
    res = plan(job, gpu_memory_bytes=mem, global_batch=sc.get("global_batch"), keep=keep or None,
               vary=sc.get("vary"), top=top, timing_gpu="h200")
    return job, mem, res


def measure(job_dict: dict, mem: int, steps: int, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        jp, rp = Path(d, "job.json"), Path(d, "rec.json")
        jp.write_text(json.dumps({"job": job_dict, "gpu_memory_bytes": mem}))
        t0 = time.time()
        _, stderr, returncode, timed_out = run_to_end(worker_cmd(str(jp), str(rp), "--steps", str(steps)),
                                                      env=child_env(), timeout=timeout)
        wall = round(time.time() - t0, 1)
        if timed_out:
            return {"status": "timeout", "wall_s": wall}
        if not rp.exists():
            return {"status": "error", "rc": returncode, "stderr": stderr[-1500:], "wall_s": wall}
        rec = json.loads(rp.read_text())
    b = rec.get("breakdown") or {}
    ex = b.get("extras") or {}
    fitsv = b.get("fits", ex.get("fits"))
    return {"status": rec.get("status", "ok"), "fits": fitsv, "oom": fitsv is False,
            "tokens_per_s": ex.get("tokens_per_s"), "step_time_s": ex.get("step_time_s"),
            "peak_allocated_bytes": b.get("peak_allocated_bytes"), "peak_reserved_bytes": b.get("peak_reserved_bytes"),
            "device_total_bytes": b.get("device_total_bytes"), "gpu_name": ex.get("gpu_name"),
            "num_alloc_retries": (ex.get("allocator") or {}).get("num_alloc_retries"), "wall_s": wall}


def measure_here(job_dict: dict, mem: int, steps: int) -> dict:
    """One run in this process (see the module note), the same fields as :func:`measure`."""
    import gc

    import torch

    from memfit.measurer import measure as run

    t0 = time.time()
    try:
        b = run(job_dict, steps=steps, progress=False, gpu_memory_bytes=mem)
    except Exception as exc:  # a run that breaks is a result too; the next run starts clean
        out = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:1500], "wall_s": round(time.time() - t0, 1)}
    else:
        ex = b.extras or {}
        fitsv = b.fits if b.fits is not None else ex.get("fits")
        out = {"status": "ok", "fits": fitsv, "oom": fitsv is False, "tokens_per_s": ex.get("tokens_per_s"),
               "step_time_s": ex.get("step_time_s"), "peak_allocated_bytes": b.peak_allocated_bytes,
               "peak_reserved_bytes": b.peak_reserved_bytes, "device_total_bytes": b.device_total_bytes,
               "gpu_name": ex.get("gpu_name"), "num_alloc_retries": (ex.get("allocator") or {}).get("num_alloc_retries"),
               "wall_s": round(time.time() - t0, 1), "in_process": True}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=450)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--only", default=None)
    ap.add_argument("--dry-run", action="store_true", help="plan only: list the candidates, measure nothing")
    ap.add_argument("--isolate", action="store_true", help="a fresh worker process per run (slow start-up)")
    ap.add_argument("--assume-bitsandbytes", action="store_true", help="plan as if bitsandbytes imports (dry runs)")
    args = ap.parse_args(argv)
    scenarios = yaml.safe_load(Path(args.scenarios).read_text())
    if args.only:
        scenarios = [s for s in scenarios if s["name"] in args.only.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bnb = args.assume_bitsandbytes or has_bitsandbytes()
    here_expandable = "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
    t_start = time.time()
    results = []
    for sc in scenarios:
        if not bnb and (sc["job"].get("method") == "qlora" or sc["job"].get("quantization", "none") != "none"):
            results.append({"name": sc["name"], "skipped": "needs bitsandbytes (not importable here)",
                            "candidates": []})
            print(f"{sc['name']:32s} skipped: needs bitsandbytes", flush=True)
            continue
        job, mem, res = candidates(sc, bnb)
        entry = {"name": sc["name"], "gpu_memory_bytes": mem, "global_batch": res.global_batch,
                 "bitsandbytes": bnb, "start_job": job.to_dict(), "planner_fits": res.any_fits, "candidates": []}
        results.append(entry)
        for rank, c in enumerate(res.candidates, 1):
            row = {"rank": rank, **c.to_dict()}
            if not c.fits:
                row["measured"] = {"status": "not-run (planner: does not fit)"}
            elif args.dry_run:
                row["measured"] = {"status": "dry-run"}
            elif time.time() - t_start > args.budget_s:
                row["measured"] = {"status": "skipped (time budget)"}
            elif args.isolate or c.job.expandable_segments != here_expandable:
                row["measured"] = measure(c.job.to_dict(), mem, args.steps, args.timeout)
            else:
                row["measured"] = measure_here(c.job.to_dict(), mem, args.steps)
            entry["candidates"].append(row)
            m = row["measured"]
            print(f"{sc['name']:32s} #{rank} b={c.job.batch_size} acc={c.accumulation} est {c.tokens_per_second:8.0f} tok/s"
                  f" | {m.get('status')} fits={m.get('fits')} {m.get('tokens_per_s') or 0:8.0f} tok/s {m.get('wall_s', '')}s",
                  flush=True)
            (out / "plan-scenarios.json").write_text(json.dumps({"elapsed_s": round(time.time() - t_start, 1),
                                                                 "scenarios": results}, indent=1))
    print(f"done in {time.time() - t_start:.0f}s -> {out / 'plan-scenarios.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
