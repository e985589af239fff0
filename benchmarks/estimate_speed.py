"""Speed of the analytical estimate: one call in-process (target <= 200 us) and `memfit estimate`
from a cold shell (target <= 0.3 s). Prints the figures; run: python benchmarks/estimate_speed.py"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit import Job  # noqa: E402
from memfit.estimator import estimate  # noqa: E402
from memfit.models import load_model  # noqa: E402


def in_process(model: str, n: int = 2000, **job) -> float:
    spec = load_model(model)
    jobs = [Job(model=model, batch_size=1 + i % 16, **job) for i in range(n)]  # varied batch: a planner's sweep
    estimate(jobs[0], spec)
    t = time.perf_counter()
    for j in jobs:
        estimate(j, spec)
    return (time.perf_counter() - t) / n * 1e6


def cold_shell(runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "memfit.cli", "estimate", "llama-3.1-8b", "--json"], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


if __name__ == "__main__":
    for model, kw in (("llama-3.1-8b", {}), ("qwen3-30b-a3b", {"method": "lora"}), ("deepseek-v3", {}),
                      ("gemma-3-1b", {"task": "infer", "new_tokens": 256})):
        us = in_process(model, **kw)
        print(f"estimate in-process  {model:16s} {us:8.1f} us/call   (target <= 200 us)")
    print(f"memfit estimate, cold shell       {cold_shell():8.3f} s        (target <= 0.3 s)")
