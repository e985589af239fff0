"""Measure one job in this (fresh) process and write its record: the unit of validation/run_records.py.

Usage: ``python -m memfit.measurer.worker JOB RECORD [--steps N] [--cpu]`` where JOB is a JSON file (a job,
or a record holding one under ``job``) or inline JSON text, and RECORD the path of the record to write.
A fresh process per job means a clean CUDA context and allocator, and a crash takes only its own job.
Exit status: 0 with a record written (a job that does not fit is a record too, with fits false),
2 for a job memfit rejects, 1 for anything else (the traceback goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfit.measurer.worker", description=__doc__.splitlines()[0])
    ap.add_argument("job", help="job JSON file, or inline JSON text")
    ap.add_argument("record", help="where to write the record JSON")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (tensor-level accounting)")
    args = ap.parse_args(argv)

    from ..errors import MemfitError
    from ..job import Job

    try:
        text = args.job if args.job.lstrip().startswith("{") else Path(args.job).read_text()
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        print(f"memfit: error: cannot read the job {args.job!r}: {exc}", file=sys.stderr)
        return 2
    if isinstance(data, dict) and isinstance(data.get("job"), dict):
        data = data["job"]
    try:
        job = Job.from_dict(data)
        from .engine import measure

        bd = measure(job, steps=args.steps, out=args.record, progress=False, device="cpu" if args.cpu else None)
    except MemfitError as exc:
        print(f"memfit: error: {exc}", file=sys.stderr)
        return 2
    fits = bd.extras.get("fits", True)
    print(json.dumps({"fits": fits, "peak_allocated_bytes": bd.peak_allocated_bytes,
                      "peak_reserved_bytes": bd.peak_reserved_bytes, "device_total_bytes": bd.device_total_bytes,
                      "step_time_s": bd.extras.get("step_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
