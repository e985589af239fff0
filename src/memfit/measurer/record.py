"""Measurement records: one JSON object per run, with the job, the Breakdown and where it ran.

Keys: ``job`` (:meth:`Job.to_dict`), ``breakdown`` (:meth:`Breakdown.to_dict`), ``env`` (GPU, driver,
CUDA and library versions; no hostname), ``created`` (UTC, ISO 8601), ``memfit_version``. Batch scripts may
add ``name``, ``status`` and ``wall_s``; an error record has ``error`` instead of ``breakdown``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..breakdown import Breakdown
from ..job import Job

__all__ = ["make_record", "make_boundary_record", "write_json", "write_record", "read_record", "read_job_argument",
           "utc_now"]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(job: Job, breakdown: Breakdown, env: dict[str, Any]) -> dict[str, Any]:
    from .. import __version__

    return {"job": job.to_dict(), "breakdown": breakdown.to_dict(), "env": env, "created": utc_now(),
            "memfit_version": __version__}


def make_boundary_record(job: Job, gpu_memory_bytes: int, result: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The record of a :func:`memfit.measurer.find_max_batch` search: ``kind: "boundary"``, the job, the card,
    ``max_batch_size``, ``find_max_batch`` (the search: trials, card facts, allocator setting) and
    ``breakdown`` (the measured run at the answer; absent when nothing fits)."""
    from .. import __version__

    result = dict(result)
    boundary = result.pop("boundary", None)
    record: dict[str, Any] = {"kind": "boundary", "job": job.to_dict(), "gpu_memory_bytes": int(gpu_memory_bytes),
                              "max_batch_size": result.get("max_batch_size"), "find_max_batch": result}
    if boundary:
        record["breakdown"] = boundary
    record.update({"env": env, "created": utc_now(), "memfit_version": __version__})
    return record


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically (a half-written file never replaces a good one)."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, p)
    return p


def write_record(path: str | Path, job: Job, breakdown: Breakdown, env: dict[str, Any]) -> dict[str, Any]:
    record = make_record(job, breakdown, env)
    write_json(path, record)
    return record


def read_job_argument(arg: str) -> tuple[Any, dict[str, Any]]:
    """The JOB argument of the measuring processes (``python -m memfit.measurer.worker`` and
    ``...distributed``): inline JSON text when it starts with ``{``, else a JSON file. Returns the job (the
    ``job`` mapping inside a record or ``{"job": ..., "gpu_memory_bytes": ...}``, else the whole value) and
    the outer mapping (empty when the JSON is not one). Raises ``OSError`` / ``ValueError`` as it reads."""
    data = json.loads(arg if arg.lstrip().startswith("{") else Path(arg).read_text())
    outer = data if isinstance(data, dict) else {}
    if isinstance(data, dict) and isinstance(data.get("job"), dict):
        data = data["job"]
    return data, outer


def read_record(path: str | Path) -> tuple[Job, Breakdown, dict[str, Any]]:
    """(job, breakdown, the whole record) from a record file written by :func:`write_record`."""
    data = json.loads(Path(path).read_text())
    return Job.from_dict(data["job"]), Breakdown.from_dict(data["breakdown"]), data
