"""Planner speed, and `memfit plan` wall time in a fresh process. Bars (issue 11): >= 10,000 candidate
evaluations per second; one card, one model <= 1 s cold.

A candidate is one setting of the levers at one micro-batch (its accumulation follows from the global batch).
What is counted, per plan() call (fields of PlanResult):

- ``evaluated``: candidates with a step time and an exact fit verdict: their own estimate (capped allocator
  replay, :func:`memfit.plan.fits` or :func:`memfit.estimator.fits_on`), or the states floor (weights,
  gradients and optimizer states plus the CUDA context above the card: no micro-batch of that setting can
  run). This is the "candidate evaluation" of the bar.
- ``judged``: those plus the candidates taken not to fit because a smaller micro-batch of their setting does
  not (memory does not fall as the micro-batch grows; never used to recommend one).
- ``timed``: every candidate the search considered; all get a step time (arithmetic). Those not judged are
  slower than every candidate returned, so no verdict is needed for them.
- ``estimator_calls``: estimates (each one or two allocator replays) the search ran.

Each case is planned once untimed (to load the model and warm the estimator's per-model caches; the planner
keeps nothing between calls), then timed over ``REPEAT`` calls (the best is kept: the machine is shared).
Usage: PYTHONPATH=src python benchmarks/bench_plan.py"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memfit.job import Job  # noqa: E402
from memfit.models import load_model  # noqa: E402
from memfit.plan import plan  # noqa: E402

CASES = [("llama-3.2-1b", "rtx-4090", 64, 2048), ("qwen2.5-1.5b", "a100-80gb", 256, 1024),
         ("llama-3.1-8b", "h100-80gb", 128, 2048), ("qwen3-4b", "l40s", 64, 1024)]
REPEAT = 3


def main() -> int:
    tot = {"evaluated": 0, "judged": 0, "timed": 0, "estimator_calls": 0}
    total_t = 0.0
    for model, gpu, gb, seq in CASES:
        spec = load_model(model)
        job = Job(model=model, batch_size=gb, seq_len=seq)
        plan(job, gpu, spec=spec, top=10)
        dt = float("inf")
        for _ in range(REPEAT):
            t0 = time.perf_counter()
            res = plan(job, gpu, spec=spec, top=10)
            dt = min(dt, time.perf_counter() - t0)
        total_t += dt
        for k in tot:
            tot[k] += getattr(res, k, 0)
        print(f"{model:14s} {gpu:10s} global batch {gb:4d}: {dt * 1e3:7.1f} ms; {res.evaluated:4d} evaluated "
              f"= {res.evaluated / dt:6.0f}/s, {res.judged:4d} judged = {res.judged / dt:6.0f}/s, {res.timed:4d} timed "
              f"= {res.timed / dt:6.0f}/s; {res.estimator_calls} estimator calls")
    print(f"overall {tot['evaluated'] / total_t:.0f} candidate evaluations/s (bar >= 10000); "
          f"{tot['judged'] / total_t:.0f} judged/s, {tot['timed'] / total_t:.0f} timed/s, "
          f"{tot['estimator_calls']} estimator calls in {total_t * 1e3:.0f} ms")
    cmd = [sys.executable, "-c", "import sys; from memfit.cli import main; sys.exit(main())", "plan", "llama-3.2-1b",
           "--batch-size", "8", "--seq-len", "2048", "--gpu", "rtx-4090"]
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=False)
        walls.append(time.perf_counter() - t0)
    print(f"`memfit plan` cold wall: best {min(walls):.2f} s of {len(walls)} (bar <= 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
