#!/usr/bin/env python3
"""A training stream made from two others of the same job (``Stream.interpolate``) against the stream built for
that micro-batch: the same operations, byte for byte, for every registry model under a set of training settings
and micro-batches (what the estimator's Memo relies on when it instantiates a job's stream at a new micro-batch
instead of building it: :meth:`memfit.estimator.Memo.stream`).

    PYTHONPATH=src python validation/check_interpolated_streams.py [--quick]

Prints the pairs compared and every one that differs (exit status 1 if any does, or if a template that should
serve does not).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit.errors import MemfitError  # noqa: E402
from memfit.estimator import _stream, _template_key  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.models import load_model, registry_names  # noqa: E402

SETTINGS = [
    dict(precision="bf16-true"),
    dict(precision="bf16-mixed", gradient_checkpointing=True),
    dict(precision="32-true", optimizer="sgd"),
    dict(method="lora", precision="bf16-true", gradient_checkpointing=True),
    dict(method="lora", precision="bf16-mixed", attention="eager"),
    dict(method="qlora", precision="bf16-true", gradient_checkpointing=True),
    dict(method="lora", quantization="int8", precision="bf16-true"),
    dict(precision="bf16-true", optimizer="adamw-8bit", gradient_checkpointing=True),
]
BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="every third model, fewer micro-batches")
    args = ap.parse_args()
    names = registry_names()[::3] if args.quick else registry_names()
    batches = (1, 2, 3, 5, 8, 16) if args.quick else BATCHES
    t0 = time.perf_counter()
    compared = differ = refused = 0
    for name in names:
        spec = load_model(name)
        for kw in SETTINGS:
            for seq in (256, 1024):
                templates: dict = {}
                for b in batches:
                    try:
                        job = Job(model=name, batch_size=b, seq_len=seq, **kw)
                        built = _stream(spec, job)[0]
                    except (MemfitError, OverflowError, ValueError):
                        break
                    if not hasattr(built, "interpolate"):
                        break  # the Python stream (a size of 2**62 bytes or more): never interpolated
                    key = _template_key(job)
                    got = templates.setdefault(key, [])
                    if len(got) == 2:
                        (ba, sa), (bb, sb) = got
                        made = sa.interpolate(sb, ba, bb, b)
                        compared += 1
                        if made is None:
                            refused += 1
                            print(f"refused: {name} {kw} seq {seq} batch {b} (from {ba}, {bb})")
                        elif bytes(memoryview(made)) != bytes(memoryview(built)) or list(made.ops) != list(built.ops):
                            differ += 1
                            print(f"DIFFERS: {name} {kw} seq {seq} batch {b} (from {ba}, {bb})")
                    else:
                        got.append((b, built))
    print(f"{compared} interpolated streams compared with their builds: {differ} differ, {refused} refused "
          f"({len(names)} models, {time.perf_counter() - t0:.0f} s)")
    return 1 if differ or refused else 0


if __name__ == "__main__":
    sys.exit(main())
