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

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
for path in (SRC, REPO / "validation"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from memfit import __version__  # noqa: E402
from memfit.measurer.record import utc_now, write_json  # noqa: E402
from run_records import _tail, parent_env, select_entries, summary_line  # noqa: E402


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
        env = dict(os.environ)
        env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        env.setdefault("OMP_NUM_THREADS", "8")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.monotonic()
        status = "ok"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(REPO), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own process group, started above
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
        wall = time.monotonic() - t0
        rec_path = Path(tmp) / "record.json"
        if rec_path.is_file():
            record = json.loads(rec_path.read_text())
            if record.get("error"):
                status = record.get("status") or "error"
                record["error"]["log_tail"] = _tail(out)
        else:
            if status == "ok":
                status = "error"
            record = {"job": job, "error": {"returncode": proc.returncode, "log_tail": _tail(out)},
                      "env": env_info, "created": utc_now(), "memfit_version": __version__}
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
    tail = (err.get("log_tail") or "").strip().splitlines()
    why = ranks[0] if ranks else next((t for t in reversed(tail) if re.search(r"\w+(Error|Exception): ", t)),
                                      tail[-1] if tail else "")
    return f"{rec['name']:<36} {rec['status']:<7} {why[:160]}  wall {rec.get('wall_s', 0):.0f} s"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", help="comma-separated names to run (default: all)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per job (default 180)")
    ap.add_argument("--steps", type=int, default=4, help="steps per job (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured first steps (default 2)")
    ap.add_argument("--budget", type=float, default=0.0, help="start no job after this many seconds (0: no limit)")
    args = ap.parse_args(argv)
    entries = select_entries(args.jobs, args.only, "run_multi")
    if entries is None:
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / f"records-{args.jobs.stem}.json"
    records: list[dict[str, Any]] = []
    if records_path.is_file():
        try:
            records = json.loads(records_path.read_text())
        except ValueError:
            records = []
    env_info = parent_env()
    start = time.monotonic()
    failures = 0
    with (args.out / "log.txt").open("a") as log:
        log.write(f"# {utc_now()} {args.jobs} ({len(entries)} jobs)\n")
        for entry in entries:
            if args.budget and time.monotonic() - start > args.budget:
                line = f"{entry['name']:<36} skipped (budget of {args.budget:.0f} s spent)"
                print(line, flush=True)
                log.write(line + "\n")
                continue
            rec = run_one(entry, steps=entry["steps"] or args.steps, warmup=args.warmup, timeout=args.timeout,
                          env_info=env_info)
            names = [r.get("name") for r in records]
            if rec["name"] in names:
                records[names.index(rec["name"])] = rec
            else:
                records.append(rec)
            write_json(records_path, records)
            line = _line(rec)
            print(line, flush=True)
            log.write(line + "\n")
            if rec["status"] != "ok":
                failures += 1
                log.write("    " + (rec.get("error", {}).get("log_tail") or "").replace("\n", "\n    ").rstrip() + "\n")
            log.flush()
    print(f"{len(entries) - failures} of {len(entries)} jobs gave a record; {records_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
