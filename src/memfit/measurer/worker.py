"""Measure one job in this (fresh) process and write its record: the unit of validation/run_records.py.

Usage: ``python -m memfit.measurer.worker JOB RECORD [--steps N] [--cpu] [--gpu-memory SIZE]
[--find-max-batch [--start N] [--limit N]]`` (or ``--probe-context`` alone: print this process's CUDA
context as JSON) where JOB is a JSON file or inline JSON text - a job, or a
mapping holding one under ``job`` (a record, or ``{"job": {...}, "gpu_memory_bytes": N}``) - and RECORD
the path of the record to write.

A card to rehearse: ``--gpu-memory 24GiB`` (bytes, or a size with its unit), or ``gpu_memory_bytes`` (an
int) / ``gpu_memory`` (a size like ``"24GiB"``) next to ``job`` in the JOB json; the flag wins. The
allocator is then capped at the card less this process's CUDA context (the record's breakdown has
``gpu_memory_bytes``, ``fits``, ``headroom_bytes`` and ``extras.card``). ``--find-max-batch`` (needs a card)
searches the largest micro-batch that runs instead, starting at ``--start`` (or ``start`` in the JOB json);
its record has ``kind: "boundary"``, ``max_batch_size``, ``find_max_batch`` (every trial) and ``breakdown``
(the run at the answer; absent when nothing fits).

The job's ``expandable_segments`` is put into ``PYTORCH_CUDA_ALLOC_CONF`` here, before torch initialises
CUDA. A fresh process per job means a clean CUDA context and allocator, and a crash takes only its own job.
Exit status: 0 with a record written (a job that does not fit is a record too, with fits false),
2 for a job memfit rejects, 1 for anything else (the traceback goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence


def _card(args: argparse.Namespace, data: dict[str, Any]) -> int | None:
    from ..errors import JobError
    from ..units import parse_bytes, parse_card_memory

    if args.gpu_memory is not None:  # the runner passes bytes here; a person may type 24GiB
        return parse_bytes(args.gpu_memory)
    if data.get("gpu_memory_bytes") is not None:
        v = data["gpu_memory_bytes"]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise JobError(f"gpu_memory_bytes must be a whole number of bytes > 0; got {v!r}")
        return v
    if data.get("gpu_memory") is not None:
        return parse_card_memory(str(data["gpu_memory"]), "gpu_memory")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfit.measurer.worker", description=__doc__.splitlines()[0])
    if argv is None:
        argv = sys.argv[1:]
    if list(argv) == ["--probe-context"]:
        return _probe()
    ap.add_argument("job", help="job JSON file, or inline JSON text")
    ap.add_argument("record", help="where to write the record JSON")
    ap.add_argument("--steps", type=int, default=None, help="steps (default 3; with --find-max-batch 2 to train, "
                    "1 for inference)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (tensor-level accounting)")
    ap.add_argument("--gpu-memory", default=None, help="rehearse a card of this size (24GiB, 16GB or bytes)")
    ap.add_argument("--find-max-batch", action="store_true", help="search the largest micro-batch that runs")
    ap.add_argument("--start", type=int, default=None, help="batch size to begin the search at (a hint)")
    ap.add_argument("--limit", type=int, default=4096, help="largest batch size the search tries (default 4096)")
    args = ap.parse_args(argv)

    from ..errors import MemfitError
    from ..job import Job

    from .record import read_job_argument

    try:
        data, outer = read_job_argument(args.job)
    except (OSError, ValueError) as exc:
        print(f"memfit: error: cannot read the job {args.job!r}: {exc}", file=sys.stderr)
        return 2
    try:
        job = Job.from_dict(data)
        card = _card(args, outer)
        # before anything imports torch: the allocator reads its setting when CUDA starts
        from .card import allocator_conf_for

        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = allocator_conf_for(
            job.expandable_segments, os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        if args.find_max_batch:
            if card is None:
                raise MemfitError("--find-max-batch needs a card: --gpu-memory 24GiB or gpu_memory_bytes in the job json")
            return _find(job, card, args, outer)
        from .engine import measure

        bd = measure(job, steps=args.steps or 3, out=args.record, progress=False,
                     device="cpu" if args.cpu else None, gpu_memory_bytes=card)
    except MemfitError as exc:
        print(f"memfit: error: {exc}", file=sys.stderr)
        return 2
    fits = bd.extras.get("fits", True)
    print(json.dumps({"fits": fits, "peak_allocated_bytes": bd.peak_allocated_bytes,
                      "peak_reserved_bytes": bd.peak_reserved_bytes, "device_total_bytes": bd.device_total_bytes,
                      "step_time_s": bd.extras.get("step_time_s")}))
    return 0


def _probe() -> int:
    """``--probe-context``: print this process's CUDA context (JSON) as :func:`memfit.measurer.card.measure_context`
    measures it, for a runner to pass to workers that share the GPU (``MEMFIT_CUDA_CONTEXT_BYTES``)."""
    from ..reference import require_torch
    from .card import measure_context

    torch = require_torch()
    if not torch.cuda.is_available():
        print("memfit: error: no CUDA device to probe", file=sys.stderr)
        return 2
    ctx = measure_context(torch, torch.device("cuda", torch.cuda.current_device()))
    print(json.dumps(ctx))
    return 0


def _find(job: Any, card: int, args: argparse.Namespace, outer: dict[str, Any]) -> int:
    from .engine import find_max_batch
    from .env import environment
    from .record import make_boundary_record, write_json

    start = args.start if args.start is not None else outer.get("start")

    def progress(t: dict[str, Any]) -> None:
        print(json.dumps({"trial": t["batch_size"], "ok": t["ok"], "seconds": t["seconds"],
                          "peak_reserved_bytes": t.get("peak_reserved_bytes")}), file=sys.stderr, flush=True)

    res = find_max_batch(job, card, start=start, steps=args.steps, limit=args.limit,
                         device="cpu" if args.cpu else None, on_trial=progress)
    write_json(args.record, make_boundary_record(job, card, res, environment("cuda")))
    print(json.dumps({"max_batch_size": res["max_batch_size"], "trials": len(res["trials"]),
                      "model_fits": res.get("model_fits")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
