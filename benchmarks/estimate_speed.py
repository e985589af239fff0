"""Speed of the analytical estimate with its allocator replay: one call in-process (target <= 2 ms),
``max_batch_size`` on a card (target <= 50 ms) and `memfit estimate` from a cold shell (target <= 0.1 s).
Prints the figures and the event count of each stream; run: python benchmarks/estimate_speed.py"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit import Job  # noqa: E402
from memfit.estimator import estimate, max_batch_size  # noqa: E402
from memfit.models import load_model  # noqa: E402


def in_process(model: str, n: int = 40, **job) -> float:
    spec = load_model(model)
    jobs = [Job(model=model, batch_size=1 + i % 16, **job) for i in range(n)]  # varied batch: a planner's sweep
    estimate(jobs[0], spec)
    t = time.perf_counter()
    for j in jobs:
        estimate(j, spec)
    return (time.perf_counter() - t) / n * 1e6


def batch_search(model: str, gpu_gib: int, **job) -> tuple[float, int]:
    spec = load_model(model)
    j = Job(model=model, **job)
    t = time.perf_counter()
    b = max_batch_size(j, gpu_gib << 30, spec=spec)
    return (time.perf_counter() - t) * 1e3, b


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
        events = estimate(Job(model=model, **kw)).extras.get("events", 0)
        print(f"estimate in-process  {model:16s} {us / 1e3:8.2f} ms/call  {events:7d} events  (target <= 2 ms)")
    for model, gib, kw in (("llama-3.1-8b", 80, {"precision": "bf16-true", "gradient_checkpointing": True}),
                           ("gemma-3-1b", 16, {"task": "infer", "precision": "bf16-true", "prompt_len": 2048,
                                               "new_tokens": 128})):
        ms, b = batch_search(model, gib, **kw)
        print(f"max_batch_size       {model:16s} {ms:8.1f} ms  -> {b}  on {gib} GiB   (target <= 50 ms)")
    print(f"memfit estimate, cold shell       {cold_shell():8.3f} s        (target <= 0.1 s)")
