"""The trace as the reference for configurations nobody has a GPU for: estimate vs trace, side by side.

usage: python validation/estimate_vs_trace.py [--out validation/estimate-vs-trace.json]
Prints one line per job (peak allocated by both engines, the difference, and the component that
differs most) and writes the figures to JSON. No GPU: the trace runs the real model code on fake tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit import Job  # noqa: E402
from memfit.estimator import estimate  # noqa: E402

JOBS = [
    # families the GPU records do not cover
    dict(model="opt-1.3b", precision="bf16-true", batch_size=4, seq_len=1024),
    dict(model="pythia-1b", precision="bf16-true", batch_size=4, seq_len=1024),
    dict(model="falcon-7b", method="lora", precision="bf16-true", batch_size=2, seq_len=1024),
    dict(model="bert-base-uncased", precision="bf16-mixed", batch_size=32, seq_len=512),
    dict(model="roberta-base", precision="32-true", batch_size=32, seq_len=512),
    dict(model="olmo-2-7b", method="lora", precision="bf16-true", batch_size=2, seq_len=2048),
    dict(model="deepseek-v2-lite", method="lora", lora_targets=["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
         precision="bf16-true", batch_size=1, seq_len=1024),
    dict(model="mixtral-8x7b", method="lora", lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
         precision="bf16-true", batch_size=1, seq_len=2048, gradient_checkpointing=True),
    dict(model="qwen3-30b-a3b", task="infer", precision="bf16-true", batch_size=4, prompt_len=2048, new_tokens=0),
    dict(model="gemma-2-9b", method="lora", precision="bf16-true", batch_size=2, seq_len=2048, attention="eager"),
    dict(model="gemma-3-4b", precision="bf16-true", batch_size=1, seq_len=4096, gradient_checkpointing=True),
    dict(model="phi-3-medium", method="lora", precision="bf16-true", batch_size=2, seq_len=2048,
         gradient_checkpointing=True),
    # sizes and contexts nobody here has a GPU for
    dict(model="llama-3.1-70b", method="lora", precision="bf16-true", batch_size=1, seq_len=4096,
         gradient_checkpointing=True),
    dict(model="llama-3.1-405b", task="infer", precision="bf16-true", batch_size=1, prompt_len=8192, new_tokens=0),
    dict(model="llama-3.1-8b", method="lora", precision="bf16-true", batch_size=1, seq_len=131072,
         gradient_checkpointing=True),
    dict(model="qwen2.5-72b", method="lora", precision="bf16-mixed", batch_size=1, seq_len=8192,
         gradient_checkpointing=True),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "estimate-vs-trace.json"))
    args = ap.parse_args()
    from memfit.tracer import trace

    rows = []
    for spec in JOBS:
        job = Job(**spec)
        e = estimate(job)
        t0 = time.perf_counter()
        try:
            t = trace(job, fallback=False)
        except Exception as exc:  # noqa: BLE001 - a job the trace cannot run is a row
            print(f"{job.model:18s} trace failed: {str(exc).splitlines()[0][:100]}")
            rows.append({"job": job.to_dict(), "estimate": e.to_dict(), "trace_error": str(exc)[:300]})
            continue
        secs = time.perf_counter() - t0
        err = (e.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes
        names = set(e.components) | set(t.components)
        worst = max(names, key=lambda k: abs(e.components.get(k, 0) - t.components.get(k, 0)))
        gap = (e.components.get(worst, 0) - t.components.get(worst, 0)) / 2**30
        print(f"{job.model:18s} {job.task:5s} {job.method:4s} {job.precision:10s} b{job.batch_size} "
              f"s{job.seq_len if job.task == 'train' else job.prompt_len:<6d} trace {t.peak_allocated_bytes / 2**30:8.2f} GiB "
              f"({t.peak_phase})  estimate {e.peak_allocated_bytes / 2**30:8.2f} GiB ({e.peak_phase})  "
              f"{err:+6.1%}  largest gap: {worst} {gap:+.2f} GiB  [{secs:.0f} s]", flush=True)
        t.extras.pop("timeline", None)
        rows.append({"job": job.to_dict(), "estimate": e.to_dict(), "trace": t.to_dict(), "error": err})
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    errs = sorted(abs(r["error"]) for r in rows if "error" in r)
    if errs:
        print(f"{len(errs)} jobs: median |estimate - trace| {errs[len(errs) // 2]:.1%}, worst {errs[-1]:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
