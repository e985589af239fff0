#!/usr/bin/env python3
"""Measure every job of a YAML list, each in a fresh process, into one records file.

    python validation/run_records.py validation/jobs/FILE.yaml --out DIR [--only NAME,...] [--timeout 300]
                                     [--steps N] [--cpu]

The YAML is a list of ``{name: ..., job: {...job fields...}, steps: 3}`` (steps optional). Each job runs as
``python -m memfit.measurer.worker JOB RECORD`` in its own process - a clean CUDA context and allocator,
and an out-of-memory or a crash costs only that job - under a per-job timeout. Every record (or an error
record with the end of stderr) goes into ONE file, ``DIR/records-<yaml stem>.json``, a JSON list rewritten
after each job so that partial results survive a kill; a record whose name is already there is replaced.
``DIR/log.txt`` gets one line per job and the stderr of failures. One line per job is printed too.

Timeouts: a job with an int8/nf4/fp4 base builds its random weights on the CPU, writes them to a temporary
folder and loads them back quantized: about a minute per billion parameters on an H100 host; give such
lists a larger ``--timeout``.

It works from a plain checkout: memfit is taken from ``<repo>/src`` (put on ``sys.path`` here and on
``PYTHONPATH`` for the workers). This process imports no torch and touches no GPU, so it takes no device
memory from the runs it starts.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from launch import (GiB, Log, child_env, error_record, failure_reason, open_run, run_to_end,  # noqa: E402
                    runner_parser, tail, worker_cmd)

from memfit.measurer.record import utc_now  # noqa: E402


def run_one(entry: dict[str, Any], *, steps: int, timeout: float, cpu: bool,
            env_info: dict[str, Any]) -> dict[str, Any]:
    """Run one entry in a fresh worker process; return its record (or an error record)."""
    with tempfile.TemporaryDirectory(prefix="memfit-run-") as tmp:
        job_path = Path(tmp) / "job.json"
        rec_path = Path(tmp) / "record.json"
        job_path.write_text(json.dumps(entry["job"]))
        cmd = worker_cmd(str(job_path), str(rec_path), "--steps", str(steps)) + (["--cpu"] if cpu else [])
        t0 = time.monotonic()
        stdout, stderr, returncode, timed_out = run_to_end(cmd, env=child_env(), timeout=timeout)
        wall = time.monotonic() - t0
        record: dict[str, Any]
        if not timed_out and returncode == 0 and rec_path.is_file():
            record = json.loads(rec_path.read_text())
            fits = record.get("breakdown", {}).get("extras", {}).get("fits", True)
            status = "ok" if fits else "oom"
        else:
            status = "timeout" if timed_out else "error"
            record = error_record({"returncode": returncode, "stderr_tail": tail(stderr),
                                   "stdout_tail": tail(stdout)[-1000:]}, env_info, job=entry["job"])
        return {"name": entry["name"], "status": status, "steps": steps, "holdout": entry.get("holdout", False),
                "wall_s": round(wall, 2), **record}


def summary_line(rec: dict[str, Any]) -> str:
    name, status, wall = rec["name"], rec["status"], rec.get("wall_s", 0.0)
    bd = rec.get("breakdown")
    if not bd:
        return f"{name:<36} {status:<7} {failure_reason(rec)}  wall {wall:.0f} s"
    ex = bd.get("extras", {})
    step = ex.get("step_time_s")
    step_txt = f"{step * 1000:9.1f} ms" if step else "        - ms"
    if not ex.get("fits", True):
        return (f"{name:<36} {status:<7} does not fit (in {ex.get('oom_phase')}), peak {bd['peak_allocated_bytes'] / GiB:.2f} "
                f"GiB of {bd['device_total_bytes'] / GiB:.2f} GiB  wall {wall:.0f} s")
    return (f"{name:<36} {status:<7} alloc {bd['peak_allocated_bytes'] / GiB:8.3f} GiB  reserved "
            f"{bd['peak_reserved_bytes'] / GiB:8.3f} GiB  device {bd['device_total_bytes'] / GiB:8.3f} GiB  "
            f"step {step_txt}  wall {wall:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = runner_parser(__doc__, jobs_help="YAML list of {name, job, steps}",
                       out_help="folder for records-<stem>.json and log.txt")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per job (default 300)")
    ap.add_argument("--steps", type=int, default=3, help="steps for entries that name none (default 3)")
    ap.add_argument("--cpu", action="store_true", help="run the workers on the CPU (tiny models only)")
    args = ap.parse_args(argv)
    run = open_run(args, "run_records", f"records-{args.jobs.stem}.json")
    if run is None:
        return 2
    entries, records, env_info = run
    failures = 0
    with (args.out / "log.txt").open("a") as file:
        log = Log(file)
        log.note(f"# {utc_now()} {args.jobs} ({len(entries)} jobs, timeout {args.timeout:.0f} s"
                 f"{', cpu' if args.cpu else ''})")
        for entry in entries:
            rec = run_one(entry, steps=entry["steps"] or args.steps, timeout=args.timeout, cpu=args.cpu,
                          env_info=env_info)
            records.put(rec)
            log.say(summary_line(rec))
            if rec["status"] in ("error", "timeout"):
                failures += 1
                log.indented(rec["error"]["stderr_tail"])
    print(f"{len(entries) - failures} of {len(entries)} jobs gave a record; {records.path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
