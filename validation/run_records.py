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

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from memfit import __version__  # noqa: E402
from memfit.errors import JobError  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.measurer.env import nvidia_smi, software_versions  # noqa: E402
from memfit.measurer.record import utc_now, write_json  # noqa: E402

GiB = 1 << 30
STDERR_TAIL = 4000


def select_entries(jobs: Path, only: str | None, prog: str, loader: Any = None) -> list[dict[str, Any]] | None:
    """The entries of ``jobs`` (all, or those ``only`` names, comma-separated); None after printing a
    one-line error when the file is bad or a name is missing. ``loader`` reads the file (default
    :func:`load_entries`)."""
    try:
        entries = (loader or load_entries)(jobs)
    except (JobError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        missing = sorted(set(wanted) - {e["name"] for e in entries})
        if missing:
            print(f"{prog}: no entry named {', '.join(missing)} in {jobs}", file=sys.stderr)
            return None
        entries = [e for e in entries if e["name"] in wanted]
    return entries


def load_entries(path: Path) -> list[dict[str, Any]]:
    """The YAML's entries, each checked (a unique name, a valid job) before anything runs."""
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a list of {{name, job, steps}} entries")
    entries, names = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item or not isinstance(item.get("job"), dict):
            raise JobError(f"{path}: entry {i + 1} needs a name and a job mapping")
        name = str(item["name"])
        if name in names:
            raise JobError(f"{path}: the name {name!r} appears twice")
        names.add(name)
        unknown = sorted(set(item) - {"name", "job", "steps", "holdout"})
        if unknown:
            raise JobError(f"{path}: entry {name!r} has unknown key(s) {', '.join(unknown)}")
        try:
            job = Job.from_dict(item["job"])
        except JobError as exc:
            raise JobError(f"{path}: entry {name!r}: {exc}") from None
        steps = item.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise JobError(f"{path}: entry {name!r}: steps must be a whole number >= 1")
        entries.append({"name": name, "job": job.to_dict(), "steps": steps, "holdout": bool(item.get("holdout"))})
    return entries


def parent_env() -> dict[str, Any]:
    """What this process can say about the machine without torch (for error records)."""
    env = software_versions()
    env.update(nvidia_smi())
    return env


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-STDERR_TAIL:]


def run_one(entry: dict[str, Any], *, steps: int, timeout: float, cpu: bool,
            env_info: dict[str, Any]) -> dict[str, Any]:
    """Run one entry in a fresh worker process; return its record (or an error record)."""
    name = entry["name"]
    with tempfile.TemporaryDirectory(prefix="memfit-run-") as tmp:
        job_path = Path(tmp) / "job.json"
        rec_path = Path(tmp) / "record.json"
        job_path.write_text(json.dumps(entry["job"]))
        cmd = [sys.executable, "-m", "memfit.measurer.worker", str(job_path), str(rec_path), "--steps", str(steps)]
        if cpu:
            cmd.append("--cpu")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        t0 = time.monotonic()
        status, returncode = "ok", None
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=str(REPO), start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group, started above
            except ProcessLookupError:
                pass
            stdout, stderr = proc.communicate()
            returncode = proc.returncode
        wall = time.monotonic() - t0
        record: dict[str, Any]
        if status == "ok" and returncode == 0 and rec_path.is_file():
            record = json.loads(rec_path.read_text())
            fits = record.get("breakdown", {}).get("extras", {}).get("fits", True)
            status = "ok" if fits else "oom"
        else:
            if status == "ok":
                status = "error"
            record = {"job": entry["job"], "error": {"returncode": returncode, "stderr_tail": _tail(stderr),
                                                      "stdout_tail": _tail(stdout)[-1000:]},
                      "env": env_info, "created": utc_now(), "memfit_version": __version__}
        record = {"name": name, "status": status, "steps": steps, "holdout": entry.get("holdout", False),
                  "wall_s": round(wall, 2), **record}
        return record


def summary_line(rec: dict[str, Any]) -> str:
    name, status, wall = rec["name"], rec["status"], rec.get("wall_s", 0.0)
    bd = rec.get("breakdown")
    if not bd:
        err = rec.get("error", {})
        last = (err.get("stderr_tail") or "").strip().splitlines()
        why = last[-1][:120] if last else f"exit {err.get('returncode')}"
        return f"{name:<36} {status:<7} {why}  wall {wall:.0f} s"
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", type=Path, help="YAML list of {name, job, steps}")
    ap.add_argument("--out", type=Path, required=True, help="folder for records-<stem>.json and log.txt")
    ap.add_argument("--only", help="comma-separated names to run (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per job (default 300)")
    ap.add_argument("--steps", type=int, default=3, help="steps for entries that name none (default 3)")
    ap.add_argument("--cpu", action="store_true", help="run the workers on the CPU (tiny models only)")
    args = ap.parse_args(argv)

    entries = select_entries(args.jobs, args.only, "run_records")
    if entries is None:
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / f"records-{args.jobs.stem}.json"
    log_path = args.out / "log.txt"
    records: list[dict[str, Any]] = []
    if records_path.is_file():
        try:
            records = json.loads(records_path.read_text())
        except ValueError:
            records = []
        if not isinstance(records, list):
            records = []
    env_info = parent_env()
    failures = 0
    with log_path.open("a") as log:
        log.write(f"# {utc_now()} {args.jobs} ({len(entries)} jobs, timeout {args.timeout:.0f} s"
                  f"{', cpu' if args.cpu else ''})\n")
        log.flush()
        for entry in entries:
            rec = run_one(entry, steps=entry["steps"] or args.steps, timeout=args.timeout, cpu=args.cpu,
                          env_info=env_info)
            names = [r.get("name") for r in records]
            if rec["name"] in names:
                records[names.index(rec["name"])] = rec
            else:
                records.append(rec)
            write_json(records_path, records)
            line = summary_line(rec)
            print(line, flush=True)
            log.write(line + "\n")
            if rec["status"] in ("error", "timeout"):
                failures += 1
                log.write("    " + rec["error"]["stderr_tail"].replace("\n", "\n    ").rstrip() + "\n")
            log.flush()
    print(f"{len(entries) - failures} of {len(entries)} jobs gave a record; {records_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
