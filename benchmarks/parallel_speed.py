"""Speed of the multi-GPU estimate (one event stream per pipeline stage's rank, accounted and replayed through
the allocator model) and of ``max_batch_size`` on an 80 GiB card (every stage's capped replay per trial).
Prints one line per layout; run: python benchmarks/parallel_speed.py"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit import Job  # noqa: E402
from memfit.estimator import estimate, max_batch_size  # noqa: E402
from memfit.models import load_model  # noqa: E402

CASES = [
    ("llama-3.1-8b", dict(strategy="ddp", gpus=8)),
    ("llama-3.1-8b", dict(strategy="fsdp2", gpus=8)),
    ("llama-3.1-8b", dict(strategy="zero3", gpus=8, gradient_checkpointing=True)),
    ("llama-3.1-70b", dict(strategy="zero1", gpus=64, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=8,
                           sequence_parallel=True, gradient_checkpointing=True)),
    ("deepseek-v3", dict(strategy="zero3", gpus=64, gpus_per_node=8, expert_parallel=8)),
]

if __name__ == "__main__":
    for model, kw in CASES:
        spec = load_model(model)
        jobs = [Job(model=model, batch_size=1 + i % 8, seq_len=2048, precision="bf16-mixed", **kw) for i in range(16)]
        estimate(jobs[0], spec)
        times = []
        for j in jobs:
            t = time.perf_counter()
            bd = estimate(j, spec)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = max_batch_size(jobs[0], 80 << 30, spec=spec, limit=512)
        ms = (time.perf_counter() - t) * 1e3
        layout = kw["strategy"]
        if "pipeline_parallel" in kw:
            layout += f" tp{kw['tensor_parallel']} pp{kw['pipeline_parallel']}"
        print(f"{model:14s} {layout:16s} estimate {statistics.median(times) * 1e3:7.2f} ms/call "
              f"({bd.extras['events']:6d} events)   max_batch_size(80 GiB) {ms:7.1f} ms -> {n}")
