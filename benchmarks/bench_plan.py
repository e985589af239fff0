"""Planner speed: candidate evaluations per second (a candidate = one setting of the levers at one
micro-batch, judged fits / does not fit and timed), and `memfit plan` wall time in a fresh process.
Bars (issue 11): >= 10,000 candidates/s; one card, one model <= 1 s cold.
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


def main() -> int:
    total_n, total_j, total_t = 0, 0, 0.0
    for model, gpu, gb, seq in CASES:
        spec = load_model(model)
        job = Job(model=model, batch_size=gb, seq_len=seq)
        plan(job, gpu, spec=spec, top=10)  # warm the caches of the model, not of the search
        t0 = time.perf_counter()
        res = plan(job, gpu, spec=spec, top=10)
        dt = time.perf_counter() - t0
        total_n += res.evaluated
        total_j += res.judged
        total_t += dt
        print(f"{model:14s} {gpu:10s} global batch {gb:4d}: {res.evaluated:5d} candidates in {dt * 1e3:7.1f} ms "
              f"= {res.evaluated / dt:8.0f}/s; {res.judged} judged = {res.judged / dt:8.0f}/s")
    rate = total_n / total_t
    print(f"overall {rate:.0f} timed candidates/s, {total_j / total_t:.0f} judged (setting, micro-batch) pairs/s"
          " (bar >= 10000)")
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
