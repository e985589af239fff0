#!/usr/bin/env python3
"""A training stream made from two others of the same job (``Stream.interpolate``) against the stream built for
that micro-batch: the same operations, byte for byte, for every registry model under a set of training settings
and micro-batches (what the estimator's Memo relies on when it instantiates a job's stream at a new micro-batch
instead of building it: :meth:`memfit.estimator.Memo.stream`).

    PYTHONPATH=src python validation/check_interpolated_streams.py [--quick] [--random N]

Prints the pairs compared and every one that differs (exit status 1 if any does, or if a template that should
serve does not). ``--random N``: also N seeded random jobs (any registry model, method, precision, optimizer,
attention, checkpointing, int8 base, adapter targets, odd sequence lengths), each built at four random
micro-batches and the last two made from the first two.
"""

from __future__ import annotations

import argparse
import random
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
    ap.add_argument("--random", type=int, default=0, metavar="N", help="also N seeded random jobs")
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
    if args.random:
        c, d, r = random_jobs(args.random)
        compared, differ, refused = compared + c, differ + d, refused + r
    return 1 if differ or refused else 0


def random_jobs(n: int, seed: int = 17) -> tuple[int, int, int]:
    """(compared, differ, refused) over ``n`` seeded random training jobs (see the module note)."""
    rng = random.Random(seed)
    names = registry_names()
    options = dict(method=["full", "lora", "qlora"], precision=["bf16-true", "bf16-mixed", "32-true", "16-mixed"],
                   optimizer=["adamw", "sgd", "adamw-8bit", "lion", "adafactor", "paged-adamw-8bit"],
                   attention=["sdpa", "eager"], gradient_checkpointing=[True, False], quantization=["none", "int8"],
                   lora_targets=["all-linear", ["q_proj", "v_proj"]])
    compared = differ = refused = 0
    t0 = time.perf_counter()
    for _ in range(n):
        name = rng.choice(names)
        spec = load_model(name)
        kw = {k: rng.choice(v) for k, v in options.items()}
        if kw["method"] != "lora":
            kw["quantization"] = "none"
        if kw["method"] == "full":
            del kw["lora_targets"]
        seq = rng.choice([100, 333, 512, 777, 1500])
        batches = rng.sample(range(1, 40), 4)
        try:
            jobs = [Job(model=name, batch_size=b, seq_len=seq, **kw) for b in batches]
            built = [_stream(spec, j)[0] for j in jobs]
        except (MemfitError, OverflowError, ValueError):
            continue
        if not hasattr(built[0], "interpolate") or len({_template_key(j) for j in jobs}) > 1:
            continue
        for b, want in zip(batches[2:], built[2:]):
            made = built[0].interpolate(built[1], batches[0], batches[1], b)
            compared += 1
            if made is None:
                refused += 1
                print(f"refused: {name} {kw} seq {seq} batch {b} (from {batches[:2]})")
            elif list(made.ops) != list(want.ops):
                differ += 1
                print(f"DIFFERS: {name} {kw} seq {seq} batch {b} (from {batches[:2]})")
    print(f"random jobs: {compared} interpolated streams compared: {differ} differ, {refused} refused "
          f"({time.perf_counter() - t0:.0f} s)")
    return compared, differ, refused


if __name__ == "__main__":
    sys.exit(main())
