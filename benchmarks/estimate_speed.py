"""Speed of the analytical estimate with its allocator replay: one call in-process (target <= 2 ms),
``max_batch_size`` on a card (target <= 50 ms) and `memfit estimate` from a cold shell (target <= 0.1 s).

Prints the figures and the event count of each stream. The machine these run on is often shared, so each
figure is the minimum over several repeats (the run least disturbed by other work), and the median is shown
next to it. The cold shell is timed twice: with Python's bytecode cache (what an installed package has: pip
byte-compiles it) and without it (``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__``: every module compiled
at each start).

    python benchmarks/estimate_speed.py [--src DIR] [--repeats N] [--cpu-time]

``--src`` times another checkout's ``src`` (to compare before/after under the same load);
``MEMFIT_FULL_REPLAY=1`` times the full event-by-event replay; ``MEMFIT_PURE_PYTHON=1`` the Python versions of the
compiled parts (the allocator replay of ``allocator/_replay.c``, the stream helpers of ``estimator/_events.c``). ``--cpu-time`` reports the CPU time of the
process (and of the cold shells, their CPU time) instead of the wall clock: on a machine shared with other
work, time spent waiting for a core is left out, so two checkouts compare more steadily.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES_IN_PROCESS = (("llama-3.1-8b", {}), ("qwen3-30b-a3b", {"method": "lora"}), ("deepseek-v3", {}),
                    ("gemma-3-1b", {"task": "infer", "new_tokens": 256}))
#: the clock of the in-process figures: wall (perf_counter) or this process's CPU time (--cpu-time)
clock = time.perf_counter

CASES_BATCH = (("llama-3.1-8b", 80, {"precision": "bf16-true", "gradient_checkpointing": True}),
               ("gemma-3-1b", 16, {"task": "infer", "precision": "bf16-true", "prompt_len": 2048,
                                   "new_tokens": 128}))


def in_process(model: str, repeats: int, n: int = 16, **job) -> tuple[float, float, int]:
    """ms per estimate() over a sweep of ``n`` distinct batch sizes (a planner's sweep): (min, median, events)."""
    from memfit import Job
    from memfit.estimator import estimate
    from memfit.models import load_model

    spec = load_model(model)
    jobs = [Job(model=model, batch_size=1 + i, **job) for i in range(n)]
    estimate(jobs[0], spec)
    runs = []
    for _ in range(repeats):
        t = clock()
        for j in jobs:
            estimate(j, spec)
        runs.append((clock() - t) / n * 1e3)
    events = estimate(Job(model=model, **job), spec).extras.get("events", 0)
    return min(runs), statistics.median(runs), events


def batch_search(model: str, gpu_gib: int, repeats: int, **job) -> tuple[float, float, int]:
    from memfit import Job
    from memfit.estimator import max_batch_size
    from memfit.models import load_model

    spec = load_model(model)
    j = Job(model=model, **job)
    runs = []
    for _ in range(repeats):
        t = clock()
        b = max_batch_size(j, gpu_gib << 30, spec=spec)
        runs.append((clock() - t) * 1e3)
    return min(runs), statistics.median(runs), b


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cold_shell(src: Path, runs: int, bytecode: bool, cpu_time: bool = False) -> tuple[float, float]:
    """Seconds for ``python -m memfit.cli estimate llama-3.1-8b --json`` in a fresh process: (min, median);
    ``cpu_time``: the CPU time of that process instead of the wall clock."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "src"
        shutil.copytree(src, tree, ignore=shutil.ignore_patterns("__pycache__"))
        env = dict(os.environ, PYTHONPATH=str(tree))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if not bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        cmd = [sys.executable, "-m", "memfit.cli", "estimate", "llama-3.1-8b", "--json"]
        subprocess.run(cmd, check=True, capture_output=True, env=env)  # writes the bytecode cache when allowed
        times = []
        for _ in range(runs):
            t, c = time.perf_counter(), _children_cpu()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            times.append(_children_cpu() - c if cpu_time else time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description="speed of estimate, max_batch_size and the cold CLI")
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                    help="the src directory to time (default: this checkout's)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of each figure (the minimum is reported)")
    ap.add_argument("--cpu-time", action="store_true", help="CPU time instead of the wall clock")
    args = ap.parse_args()
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    src = args.src.resolve()
    sys.path.insert(0, str(src))
    print(f"src: {src}" + ("  (MEMFIT_FULL_REPLAY)" if os.environ.get("MEMFIT_FULL_REPLAY") else "")
          + ("  (CPU time)" if args.cpu_time else ""))
    for model, kw in CASES_IN_PROCESS:
        lo, med, events = in_process(model, args.repeats, **kw)
        print(f"estimate in-process  {model:16s} {lo:8.2f} ms/call (median {med:7.2f})  {events:7d} events"
              "  (target <= 2 ms)")
    for model, gib, kw in CASES_BATCH:
        lo, med, b = batch_search(model, gib, args.repeats, **kw)
        print(f"max_batch_size       {model:16s} {lo:8.1f} ms (median {med:7.1f}) -> {b}  on {gib} GiB"
              "   (target <= 50 ms)")
    for bytecode in (True, False):
        lo, med = cold_shell(src, 2 * args.repeats + 1, bytecode, args.cpu_time)
        label = "with bytecode cache   " if bytecode else "without bytecode cache"
        print(f"memfit estimate, cold shell, {label} {lo:6.3f} s (median {med:6.3f})  (target <= 0.1 s)")


if __name__ == "__main__":
    main()
