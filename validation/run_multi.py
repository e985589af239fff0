#!/usr/bin/env python3
"""Measure every multi-GPU job of a YAML list, each under its own torchrun, into one records file.

    python validation/run_multi.py validation/jobs/multi.yaml --out DIR [--only NAME,...] [--timeout 180]
                                   [--steps 4] [--warmup 2] [--budget SECONDS]

The YAML is the list format of ``validation/run_records.py`` (``{name, job, steps?, holdout?}``). Each job runs as
``python -m torch.distributed.run --standalone --nproc_per_node GPUS -m memfit.measurer.distributed JOB TMPDIR``
in its own process group (a clean CUDA context, allocator and NCCL communicator per job; a crash or a hang
costs only that job), under a per-job timeout. Records (or error records with the end of the log) go into
``DIR/records-<yaml stem>.json``, rewritten after each job; ``DIR/log.txt`` gets one line per job and the log
of failures. ``--budget`` stops starting jobs once that many seconds have passed (what ran is kept).

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0) and each rank gets OMP_NUM_THREADS (default 8) so
that a host-side optimizer (ZeRO-Offload with a torch optimizer) does not run single-threaded.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from launch import Log, child_env, error_record, open_run, run_to_end, runner_parser, tail  # noqa: E402
from run_records import summary_line  # noqa: E402

from memfit.measurer.record import utc_now  # noqa: E402

_CHILD_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "8", "TOKENIZERS_PARALLELISM": "false"}


def run_one(entry: dict[str, Any], *, steps: int, warmup: int, timeout: float,
            env_info: dict[str, Any]) -> dict[str, Any]:
    name, job = entry["name"], entry["job"]
    gpus = int(job.get("gpus", 1))
    with tempfile.TemporaryDirectory(prefix="memfit-multi-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "memfit.measurer.distributed", str(job_path), tmp, "--steps", str(steps),
               "--warmup", str(warmup)]
        t0 = time.monotonic()
        out, _, returncode, timed_out = run_to_end(cmd, env=child_env(_CHILD_DEFAULTS), timeout=timeout,
                                                   merge_stderr=True)
        wall = time.monotonic() - t0
        status = "timeout" if timed_out else "ok"
        rec_path = Path(tmp) / "record.json"
        if rec_path.is_file():
            record = json.loads(rec_path.read_text())
            if record.get("error"):
                status = record.get("status") or "error"
                record["error"]["log_tail"] = tail(out)
        else:
            if status == "ok":
                status = "error"
            record = error_record({"returncode": returncode, "log_tail": tail(out)}, env_info, job=job)
        if status != "ok":
            record.pop("breakdown", None)
        return {"name": name, "status": status, "steps": steps, "holdout": entry.get("holdout", False),
                "wall_s": round(wall, 2), **record}


def _line(rec: dict[str, Any]) -> str:
    if rec.get("breakdown"):
        line = summary_line(rec)
        ranks = rec["breakdown"].get("extras", {}).get("ranks", [])
        peaks = ", ".join(f"{r['peak_allocated_bytes'] / 2**30:.2f}" for r in ranks)
        return f"{line}  ranks [{peaks}] GiB"
    err = rec.get("error", {})
    ranks = [r.get("error") for r in err.get("ranks", []) if r.get("error")]
    lines = (err.get("log_tail") or "").strip().splitlines()
    why = ranks[0] if ranks else next((t for t in reversed(lines) if re.search(r"\w+(Error|Exception): ", t)),
                                      lines[-1] if lines else "")
    return f"{rec['name']:<36} {rec['status']:<7} {why[:160]}  wall {rec.get('wall_s', 0):.0f} s"


def main(argv: Sequence[str] | None = None) -> int:
    ap = runner_parser(__doc__)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per job (default 180)")
    ap.add_argument("--steps", type=int, default=4, help="steps per job (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured first steps (default 2)")
    ap.add_argument("--budget", type=float, default=0.0, help="start no job after this many seconds (0: no limit)")
    args = ap.parse_args(argv)
    run = open_run(args, "run_multi", f"records-{args.jobs.stem}.json")
    if run is None:
        return 2
    entries, records, env_info = run
    start = time.monotonic()
    failures = 0
    with (args.out / "log.txt").open("a") as file:
        log = Log(file)
        log.note(f"# {utc_now()} {args.jobs} ({len(entries)} jobs)")
        for entry in entries:
            if args.budget and time.monotonic() - start > args.budget:
                log.say(f"{entry['name']:<36} skipped (budget of {args.budget:.0f} s spent)")
                continue
            rec = run_one(entry, steps=entry["steps"] or args.steps, warmup=args.warmup, timeout=args.timeout,
                          env_info=env_info)
            records.put(rec)
            log.say(_line(rec))
            if rec["status"] != "ok":
                failures += 1
                log.indented(rec.get("error", {}).get("log_tail") or "")
    print(f"{len(entries) - failures} of {len(entries)} jobs gave a record; {records.path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
