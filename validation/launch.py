"""What the GPU-run scripts of ``validation/`` share: starting a measuring process, its job list, its records.

``run_records.py``, ``run_boundaries.py``, ``run_multi.py`` and ``run_plan_scenarios.py`` each start fresh
processes (``python -m memfit.measurer.worker`` or a ``torchrun`` of ``memfit.measurer.distributed``) and
collect their records. The pieces they have in common live here:

- :data:`REPO` / :data:`SRC`: the checkout; ``SRC`` is put on ``sys.path`` on import (memfit runs from a plain
  checkout) and on ``PYTHONPATH`` for the children (:func:`child_env`);
- :func:`start_child` / :func:`kill_group` / :func:`run_to_end`: a child in its own process group (so a timeout
  kills it and everything it started), cwd at the repo root;
- :func:`job_entries` / :func:`load_entries` / :func:`select_entries`: a YAML job list, checked before anything
  runs;
- :class:`RecordsFile` / :class:`Log` / :func:`error_record`: one JSON list of records rewritten after every
  run (partial results survive a kill), a log that is printed too, the record of a run that gave none.

This module imports no torch and touches no GPU: the scripts take no device memory from the runs they start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

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
"""Characters of a failed child's output kept in its error record."""


# ------------------------------------------------------------------------------------------- processes
def worker_cmd(*args: str) -> list[str]:
    """``python -m memfit.measurer.worker ARGS`` with this interpreter."""
    return [sys.executable, "-m", "memfit.measurer.worker", *args]


def child_env(defaults: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: ``SRC`` first on ``PYTHONPATH``, unbuffered output, and
    ``defaults`` for the keys the environment does not set already."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (defaults or {}).items():
        env.setdefault(key, value)
    return env


def start_child(cmd: Sequence[str], *, env: dict[str, str], stdout: Any, stderr: Any,
                text: bool = False) -> subprocess.Popen:
    """``cmd`` started at the repo root in a process group of its own (see :func:`kill_group`)."""
    return subprocess.Popen(list(cmd), stdout=stdout, stderr=stderr, text=text, env=env, cwd=str(REPO),
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group :func:`start_child` gave ``proc`` (the child and whatever it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_to_end(cmd: Sequence[str], *, env: dict[str, str], timeout: float,
               merge_stderr: bool = False) -> tuple[str, str, int | None, bool]:
    """Run ``cmd`` (:func:`start_child`) to its end or ``timeout`` seconds, whichever comes first; a child past
    its timeout is killed with its group. Returns ``(stdout, stderr, returncode, timed_out)``; with
    ``merge_stderr`` stderr goes into stdout and the second item is empty."""
    proc = start_child(cmd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        out, err = proc.communicate()
    return out or "", err or "", proc.returncode, timed_out


def tail(text: str | bytes | None) -> str:
    """The last :data:`STDERR_TAIL` characters of a child's output (bytes decoded, None empty)."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-STDERR_TAIL:]


def parent_env() -> dict[str, Any]:
    """What this process can say about the machine without torch (for error records)."""
    env = software_versions()
    env.update(nvidia_smi())
    return env


# ------------------------------------------------------------------------------------------- job lists
def whole_number(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def job_entries(path: Path, keys: set[str], shape: str) -> Iterator[tuple[str, dict[str, Any], Job]]:
    """``(name, item, job)`` for each entry of the YAML list at ``path``, checked in turn: a mapping with a
    ``name`` (unique) and a ``job`` mapping (a valid :class:`Job`), and no key outside ``keys``. ``shape``
    names the entries' keys in the error for a file that is not a list (``"name, job, steps"``)."""
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a list of {{{shape}}} entries")
    names: set[str] = set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item or not isinstance(item.get("job"), dict):
            raise JobError(f"{path}: entry {i + 1} needs a name and a job mapping")
        name = str(item["name"])
        if name in names:
            raise JobError(f"{path}: the name {name!r} appears twice")
        names.add(name)
        unknown = sorted(set(item) - keys)
        if unknown:
            raise JobError(f"{path}: entry {name!r} has unknown key(s) {', '.join(unknown)}")
        try:
            job = Job.from_dict(item["job"])
        except JobError as exc:
            raise JobError(f"{path}: entry {name!r}: {exc}") from None
        yield name, item, job


def load_entries(path: Path) -> list[dict[str, Any]]:
    """The ``{name, job, steps?, holdout?}`` entries of a job list, each checked before anything runs."""
    entries = []
    for name, item, job in job_entries(path, {"name", "job", "steps", "holdout"}, "name, job, steps"):
        steps = item.get("steps")
        if steps is not None and not whole_number(steps, 1):
            raise JobError(f"{path}: entry {name!r}: steps must be a whole number >= 1")
        entries.append({"name": name, "job": job.to_dict(), "steps": steps, "holdout": bool(item.get("holdout"))})
    return entries


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


def runner_parser(doc: str, *, jobs_help: str | None = None, out_help: str | None = None) -> argparse.ArgumentParser:
    """A runner's command line, first line of ``doc`` as its description: the job list, ``--out`` (a
    folder) and ``--only`` (comma-separated names); the runner adds its own flags."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("jobs", type=Path, help=jobs_help)
    ap.add_argument("--out", type=Path, required=True, help=out_help)
    ap.add_argument("--only", help="comma-separated names to run (default: all)")
    return ap


def open_run(args: argparse.Namespace, prog: str, records_name: str,
             loader: Any = None) -> tuple[list[dict[str, Any]], RecordsFile, dict[str, Any]] | None:
    """What a runner needs before its first run: the selected entries (:func:`select_entries`), the records
    file ``records_name`` in ``args.out`` (made if need be) and this machine's :func:`parent_env`; None
    (after a one-line error) when the job list is bad."""
    entries = select_entries(args.jobs, args.only, prog, loader=loader)
    if entries is None:
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    return entries, RecordsFile(args.out / records_name), parent_env()


# ------------------------------------------------------------------------------------------- records
class RecordsFile:
    """A JSON list of records at ``path``: what is there already (nothing when it is not a list), each new
    record replacing the one of its name, the file rewritten after every :meth:`put`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.is_file():
            try:
                records = json.loads(path.read_text())
            except ValueError:
                records = []
            self.records = records if isinstance(records, list) else []

    def put(self, rec: dict[str, Any]) -> None:
        names = [r.get("name") for r in self.records]
        if rec["name"] in names:
            self.records[names.index(rec["name"])] = rec
        else:
            self.records.append(rec)
        write_json(self.path, self.records)


class Log:
    """Lines for a log file, printed too (:meth:`say`) or not (:meth:`note`); each flushed as written."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.note(line)

    def note(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()

    def indented(self, text: str) -> None:
        """``text`` (a failure's output) indented under the line before it."""
        self.file.write("    " + text.replace("\n", "\n    ").rstrip() + "\n")
        self.file.flush()


def error_record(error: dict[str, Any], env_info: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The record of a run that wrote none: ``fields`` (the job ...), then ``error`` and where it ran."""
    return {**fields, "error": error, "env": env_info, "created": utc_now(), "memfit_version": __version__}


def failure_reason(rec: dict[str, Any]) -> str:
    """The last line of a failed run's stderr (120 characters), else its exit status."""
    err = rec.get("error", {})
    last = (err.get("stderr_tail") or "").strip().splitlines()
    return last[-1][:120] if last else f"exit {err.get('returncode')}"
