#!/usr/bin/env python3
"""A ``generate()`` stream whose decode steps past each stretch's first three are made by ``Stream.extend`` (the
estimator's ``_EXTEND_DECODE``) against the same stream built step by step: the same operations, handles and
accounting, byte for byte, for every registry model at prompt lengths on both sides of the sliding windows
(512, 1024, 4096, 8192 tokens: a window reached during the decode cuts it into two stretches), several decode
lengths, micro-batches, precisions and attention kernels, both the reference run (warm-up and measured call)
and the card verdict's single call.

    PYTHONPATH=src python validation/check_extended_decode.py [--quick]

Prints the streams compared and every one that differs (exit status 1 if any does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import memfit.estimator as estimator  # noqa: E402
from memfit.checks import check_job_for_model  # noqa: E402
from memfit.errors import MemfitError  # noqa: E402
from memfit.estimator import _stream  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.models import load_model, registry_names  # noqa: E402

PROMPTS = (1, 100, 500, 511, 512, 513, 1000, 2047, 3000, 4095, 4097, 8000)
NEW = (2, 4, 5, 64, 300, 1100)
SETTINGS = (dict(batch_size=1, precision="bf16-true"), dict(batch_size=3, precision="32-true"),
            dict(batch_size=2, precision="bf16-mixed", attention="eager"))


def built(spec, job, fit: bool, extend: bool):
    estimator._EXTEND_DECODE = extend
    stream, *rest = _stream(spec, job, fit=fit)
    return stream.ops, stream.handles, rest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every third model, fewer lengths")
    args = ap.parse_args(argv)
    names = registry_names()[::3] if args.quick else registry_names()
    prompts, new = (PROMPTS[::2], NEW[::2]) if args.quick else (PROMPTS, NEW)
    t0, n, bad = time.perf_counter(), 0, []
    for name in names:
        spec = load_model(name)
        for i, (p, k) in enumerate((p, k) for p in prompts for k in new):
            kw = SETTINGS[i % len(SETTINGS)]
            try:
                job = Job(model=name, task="infer", prompt_len=p, new_tokens=k, **kw)
                check_job_for_model(job, spec)
            except MemfitError:
                continue
            for fit in (False, True):
                n += 1
                if built(spec, job, fit, True) != built(spec, job, fit, False):
                    bad.append(f"{name} prompt {p} new {k} {kw} fit={fit}")
    estimator._EXTEND_DECODE = True
    for b in bad:
        print("DIFFERS:", b)
    print(f"{n} decode streams compared, {len(bad)} differ ({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
