"""Planner speed, and `memfit plan` wall time in a fresh process. Bars (issue 11): >= 10,000 candidate
evaluations per second; one card, one model <= 1 s cold.

A candidate is one setting of the levers at one micro-batch (its accumulation follows from the global batch).
Every candidate gets a step time (arithmetic) and is ranked by it; what is counted, per plan() call (fields
of PlanResult, and one difference of them):

- ``evaluated``: candidates with an exact fit verdict: their own estimate (capped allocator replay,
  :func:`memfit.plan.fits` or :func:`memfit.estimator.fits_on`), or the floor
  (:func:`memfit.estimator.floor_bytes`: weights, gradients, optimizer states, the layers' kept activations and
  the loss's scores alive at one moment of the stream, plus the CUDA context above
  the card, so no replay of them can complete).
- ``decided``: those plus the candidates the ranking settles without a verdict: slower than every candidate
  returned once the list is full (no verdict of theirs can change the answer), or a slower copy of one
  returned with extra changes. ``timed`` less the inferred ones below: the headline figure, "a candidate
  counts when the planner decided it: fit or not, or ranked out".
- ``inferred`` (``judged`` - ``evaluated``): candidates taken not to fit because a smaller micro-batch of their
  setting does not. Memory not falling as the micro-batch grows is not proven for the capped replay, so these
  are not counted as decided (such a rule can only miss a candidate, never recommend one).
- ``timed``: every candidate the search considered.
- ``estimator_calls``: verdicts and estimates the search asked for (many are answered by the plan's
  :class:`memfit.estimator.Memo` without a new stream or replay).

Each case is planned once untimed (to load the model and warm the estimator's per-model caches; the planner
keeps nothing between calls: each call has its own Memo), then timed over ``REPEAT`` calls (the best is kept:
the machine is shared).

    python benchmarks/bench_plan.py [--src DIR] [--cpu-time]

``--src`` times another checkout's ``src`` (before/after under the same load); ``--cpu-time`` reports CPU time
(this process's, and the cold processes' user + system) instead of the wall clock: on a shared machine the
time spent waiting for a core is left out."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [("llama-3.2-1b", "rtx-4090", 64, 2048), ("qwen2.5-1.5b", "a100-80gb", 256, 1024),
         ("llama-3.1-8b", "h100-80gb", 128, 2048), ("qwen3-4b", "l40s", 64, 1024)]
REPEAT = 3


#: `memfit plan` from a fresh process: one card and one model each (issue 11's examples and the README's)
COLD = [["llama-3.2-1b", "--batch-size", "8", "--seq-len", "2048", "--gpu", "rtx-4090"],
        ["llama-3.1-8b", "--method", "lora", "--gpu", "rtx-4090"],
        ["qwen2.5-7b", "--gpu", "h100-80gb", "--gpus", "8"]]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description="planner candidates per second and `memfit plan` cold")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the memfit source to time (default: this one)")
    ap.add_argument("--cpu-time", action="store_true", help="CPU time instead of the wall clock")
    args = ap.parse_args()
    src = str(args.src.resolve())
    sys.path.insert(0, src)
    from memfit.job import Job
    from memfit.models import load_model
    from memfit.plan import plan

    clock = time.process_time if args.cpu_time else time.perf_counter
    what = "CPU" if args.cpu_time else "wall"
    print(f"timing {src} ({what} time)")
    tot = {"evaluated": 0, "decided": 0, "inferred": 0, "timed": 0, "estimator_calls": 0}
    total_t = 0.0
    for model, gpu, gb, seq in CASES:
        spec = load_model(model)
        job = Job(model=model, batch_size=gb, seq_len=seq)
        plan(job, gpu, spec=spec, top=10)
        dt = float("inf")
        for _ in range(REPEAT):
            t0 = clock()
            res = plan(job, gpu, spec=spec, top=10)
            dt = min(dt, clock() - t0)
        total_t += dt
        got = {"evaluated": res.evaluated, "inferred": res.judged - res.evaluated, "timed": res.timed,
               "decided": res.timed - (res.judged - res.evaluated), "estimator_calls": res.estimator_calls}
        for k in tot:
            tot[k] += got[k]
        print(f"{model:14s} {gpu:10s} global batch {gb:4d}: {dt * 1e3:7.1f} ms; {got['decided']:4d} decided "
              f"= {got['decided'] / dt:6.0f}/s ({got['evaluated']:4d} by a verdict = {got['evaluated'] / dt:6.0f}/s), "
              f"{got['inferred']:3d} inferred, {got['timed']:4d} timed; {got['estimator_calls']} estimator calls")
    print(f"overall {tot['decided'] / total_t:.0f} candidate evaluations/s (decided; bar >= 10000); "
          f"{tot['evaluated'] / total_t:.0f}/s by an exact verdict, {tot['timed'] / total_t:.0f} timed/s; "
          f"{tot['estimator_calls']} estimator calls in {total_t * 1e3:.0f} ms")
    for cli in COLD:
        cmd = [sys.executable, "-c", "import sys; from memfit.cli import main; sys.exit(main())", "plan", *cli]
        walls = []
        for _ in range(3):
            t0, c0 = time.perf_counter(), _children_cpu()
            subprocess.run(cmd, capture_output=True, env={**os.environ, "PYTHONPATH": src}, check=False)
            walls.append(_children_cpu() - c0 if args.cpu_time else time.perf_counter() - t0)
        print(f"`memfit plan {' '.join(cli)}` cold {what}: best {min(walls):.2f} s of {len(walls)} (bar <= 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
