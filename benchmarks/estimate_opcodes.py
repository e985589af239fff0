"""Bytecodes the estimate executes (``sys.settrace`` opcode events): a deterministic stand-in for its speed where
the machine is shared and the clock moves by +-30 % between runs. Counts the benchmark's cases of
benchmarks/estimate_speed.py (one estimate at batch 3, and ``max_batch_size`` on the card), with the functions
that execute the most. C code (bisect, list and dict methods) is not counted: compare two checkouts with it, not
two designs.

    python benchmarks/estimate_opcodes.py [--src DIR] [--top N]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

CASES = (("llama-3.1-8b", None, {}), ("qwen3-30b-a3b", None, {"method": "lora"}), ("deepseek-v3", None, {}),
         ("gemma-3-1b", None, {"task": "infer", "new_tokens": 256}),
         ("llama-3.1-8b", 80, {"precision": "bf16-true", "gradient_checkpointing": True}),
         ("gemma-3-1b", 16, {"task": "infer", "precision": "bf16-true", "prompt_len": 2048, "new_tokens": 128}))


def count(fn) -> tuple[int, collections.Counter]:
    hist: collections.Counter = collections.Counter()

    def on_call(frame, event, arg):
        frame.f_trace_opcodes = True
        return on_opcode

    def on_opcode(frame, event, arg):
        if event == "opcode":
            c = frame.f_code
            hist[f"{c.co_filename.rsplit('/src/', 1)[-1]}:{c.co_name}"] += 1
        return on_opcode

    sys.settrace(on_call)
    try:
        fn()
    finally:
        sys.settrace(None)
    return sum(hist.values()), hist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    from memfit import Job
    from memfit.estimator import estimate, max_batch_size
    from memfit.models import load_model

    for model, gib, kw in CASES:
        spec = load_model(model)
        job = Job(model=model, **kw)
        if gib is None:
            estimate(job, spec)  # warm the spec-level caches, as a sweep's later calls find them
            label = "estimate"
            total, hist = count(lambda: estimate(job.replace(batch_size=3), spec))
        else:
            max_batch_size(job, gib << 30, spec=spec)
            label = f"max_batch_size {gib} GiB"
            total, hist = count(lambda: max_batch_size(job, gib << 30, spec=spec))
        top = ", ".join(f"{k} {v / total:.0%}" for k, v in hist.most_common(args.top))
        print(f"{label:20s} {model:15s} {total:10d} opcodes  ({top})")


if __name__ == "__main__":
    main()
