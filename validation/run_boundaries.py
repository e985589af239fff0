#!/usr/bin/env python3
"""Find the real largest micro-batch of each card/job pair of a YAML list, several at once on one GPU.

    python validation/run_boundaries.py validation/jobs/boundaries.yaml --out DIR [--parallel-gib 128]
        [--parallel 5] [--budget 330] [--timeout 180] [--max-wait 45] [--only NAME,...]

The YAML is a list of ``{name, job: {...}, gpu_memory: "24GiB", holdout: bool, start: N, needs: bitsandbytes,
timeout: S}`` (start, holdout, needs, timeout optional). Each entry runs as a fresh
``python -m memfit.measurer.worker JOB RECORD --find-max-batch --gpu-memory BYTES [--start N]`` process: the
allocator is capped at the card less that process's CUDA context (a per-process fraction of the GPU), with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True|False`` set in its environment as the job says. Several
run at once while the sum of their cards stays within ``--parallel-gib`` (an entry larger than that runs
alone; smaller later entries may start before a waiting big one for ``--max-wait`` seconds, then it
goes first), each under a timeout; no new entry starts after ``--budget`` seconds (those left are listed in the
log). An entry that ``needs: bitsandbytes`` is skipped when bitsandbytes is not installed.

Output: ``DIR/boundaries-<yaml stem>.json``, ONE JSON list of records (the worker's ``kind: "boundary"``
record plus ``name``, ``status``, ``holdout``, ``gpu_memory``, ``wall_s``), rewritten after each entry so
that partial results survive a kill; an error or timeout record keeps the trials the worker had reported.
``DIR/log-boundaries.txt`` gets one line per entry (answer, trial count, seconds) and failures' stderr.

This process imports no torch and touches no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from run_records import REPO, SRC, _tail, parent_env, select_entries  # noqa: E402

from memfit import __version__  # noqa: E402
from memfit.errors import JobError  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.measurer.card import CONTEXT_ENV  # noqa: E402
from memfit.measurer.record import utc_now, write_json  # noqa: E402
from memfit.units import parse_card_memory  # noqa: E402

GiB = 1 << 30
_KEYS = {"name", "job", "gpu_memory", "holdout", "start", "needs", "timeout"}
_NEEDS = ("bitsandbytes",)


def load_boundary_entries(path: Path) -> list[dict[str, Any]]:
    """The YAML's entries, each checked (unique name, valid job, a card with its unit) before anything runs."""
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a list of {{name, job, gpu_memory}} entries")
    entries, names = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item or not isinstance(item.get("job"), dict):
            raise JobError(f"{path}: entry {i + 1} needs a name and a job mapping")
        name = str(item["name"])
        if name in names:
            raise JobError(f"{path}: the name {name!r} appears twice")
        names.add(name)
        unknown = sorted(set(item) - _KEYS)
        if unknown:
            raise JobError(f"{path}: entry {name!r} has unknown key(s) {', '.join(unknown)}")
        try:
            job = Job.from_dict(item["job"])
            if "gpu_memory" not in item:
                raise JobError("needs gpu_memory (e.g. 24GiB)")
            card = parse_card_memory(str(item["gpu_memory"]), "gpu_memory")  # a YAML number is bare too
        except JobError as exc:
            raise JobError(f"{path}: entry {name!r}: {exc}") from None
        start = item.get("start")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 1):
            raise JobError(f"{path}: entry {name!r}: start must be a batch size >= 1")
        needs = item.get("needs")
        needs = [needs] if isinstance(needs, str) else list(needs or [])
        bad = sorted(set(needs) - set(_NEEDS))
        if bad:
            raise JobError(f"{path}: entry {name!r}: unknown needs {', '.join(bad)} (known: {', '.join(_NEEDS)})")
        timeout = item.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise JobError(f"{path}: entry {name!r}: timeout must be seconds > 0")
        entries.append({"name": name, "job": job.to_dict(), "gpu_memory": str(item["gpu_memory"]),
                        "gpu_memory_bytes": card, "holdout": bool(item.get("holdout")), "start": start,
                        "needs": needs, "timeout": timeout})
    return entries


def missing_needs(entry: dict[str, Any]) -> list[str]:
    """The packages an entry needs that are not installed (found without importing them)."""
    return [n for n in entry.get("needs", []) if importlib.util.find_spec(n) is None]


def launchable(pending: list[dict[str, Any]], running_bytes: int, running_count: int, *,
               parallel_bytes: int, parallel: int, head_only: bool = False) -> dict[str, Any] | None:
    """The first pending entry that can start now: fewer than ``parallel`` runs and the sum of their cards
    within ``parallel_bytes`` (an entry larger than that alone starts only on an idle GPU). ``head_only``:
    consider only the first pending entry (it has waited long enough; smaller ones must not pass it)."""
    if running_count >= parallel:
        return None
    for e in pending[:1] if head_only else pending:
        if running_bytes + e["gpu_memory_bytes"] <= parallel_bytes or running_count == 0:
            return e
    return None


class _Worker:
    """One entry's worker process, with its files in a temporary folder."""

    def __init__(self, entry: dict[str, Any], timeout: float) -> None:
        self.entry = entry
        self.timeout = entry.get("timeout") or timeout
        self.tmp = tempfile.TemporaryDirectory(prefix="memfit-boundary-")
        d = Path(self.tmp.name)
        self.job_path, self.rec_path = d / "job.json", d / "record.json"
        self.out_path, self.err_path = d / "stdout.txt", d / "stderr.txt"
        self.job_path.write_text(json.dumps({"job": entry["job"], "gpu_memory_bytes": entry["gpu_memory_bytes"]}))
        cmd = [sys.executable, "-m", "memfit.measurer.worker", str(self.job_path), str(self.rec_path),
               "--find-max-batch", "--gpu-memory", str(entry["gpu_memory_bytes"])]
        if entry.get("start"):
            cmd += ["--start", str(entry["start"])]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        expandable = bool(entry["job"].get("expandable_segments"))
        env["PYTORCH_CUDA_ALLOC_CONF"] = f"expandable_segments:{'True' if expandable else 'False'}"
        self._out, self._err = self.out_path.open("w"), self.err_path.open("w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, env=env, cwd=str(REPO),
                                     start_new_session=True)
        self.timed_out = False

    def poll(self) -> bool:
        """True once the process has ended (killed here when past its timeout)."""
        if self.proc.poll() is not None:
            return True
        if time.monotonic() - self.t0 > self.timeout:
            self.timed_out = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker's own process group, started above
            except ProcessLookupError:
                pass
            self.proc.wait()
            return True
        return False

    def record(self, env_info: dict[str, Any]) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        self._out.close()
        self._err.close()
        stderr = self.err_path.read_text(errors="replace")
        stdout = self.out_path.read_text(errors="replace")
        entry = self.entry
        rec: dict[str, Any]
        if not self.timed_out and self.proc.returncode == 0 and self.rec_path.is_file():
            rec = json.loads(self.rec_path.read_text())
            status = "ok" if rec.get("max_batch_size") else "none-fits"
        else:
            status = "timeout" if self.timed_out else "error"
            rec = {"kind": "boundary", "job": entry["job"], "gpu_memory_bytes": entry["gpu_memory_bytes"],
                   "trials_reported": _trials_from(stderr),
                   "error": {"returncode": self.proc.returncode, "stderr_tail": _tail(stderr),
                             "stdout_tail": _tail(stdout)[-1000:]},
                   "env": env_info, "created": utc_now(), "memfit_version": __version__}
        self.tmp.cleanup()
        return {"name": entry["name"], "status": status, "holdout": entry["holdout"], "gpu_memory": entry["gpu_memory"],
                "start": entry.get("start"), "wall_s": round(wall, 2), **rec}


def _trials_from(stderr: str) -> list[dict[str, Any]]:
    """The ``{"trial": b, "ok": ..., "seconds": ...}`` lines the worker printed before it died."""
    out = []
    for line in stderr.splitlines():
        if line.startswith('{"trial"'):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def probe_context(timeout: float = 120.0) -> dict[str, Any] | None:
    """This machine's CUDA context, measured by one worker alone on the (still idle) GPU; None if it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        res = subprocess.run([sys.executable, "-m", "memfit.measurer.worker", "--probe-context"], capture_output=True,
                             text=True, timeout=timeout, env=env, cwd=str(REPO))
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def summary_line(rec: dict[str, Any]) -> str:
    name, status, wall = rec["name"], rec["status"], rec.get("wall_s", 0.0)
    fm = rec.get("find_max_batch")
    if fm is None:
        err = rec.get("error", {})
        last = (err.get("stderr_tail") or "").strip().splitlines()
        why = last[-1][:120] if last else f"exit {err.get('returncode')}"
        return (f"{name:<44} {status:<9} {rec.get('gpu_memory', ''):>7}  trials {len(rec.get('trials_reported', []))}"
                f"  {why}  wall {wall:.0f} s")
    trials = fm.get("trials", [])
    trial_s = sum(t.get("seconds", 0) for t in trials)
    card = fm.get("card", {})
    return (f"{name:<44} {status:<9} {rec.get('gpu_memory', ''):>7}  max batch {rec.get('max_batch_size'):>5}"
            f"  (start {rec.get('start') or '-'})  trials {len(trials):>2} in {trial_s:6.1f} s  build "
            f"{fm.get('build_seconds', 0):5.1f} s  context {card.get('cuda_context_bytes', 0) / GiB:.2f} GiB"
            f"  wall {wall:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", type=Path, help="YAML list of {name, job, gpu_memory, holdout, start}")
    ap.add_argument("--out", type=Path, required=True, help="folder for boundaries-<stem>.json and the log")
    ap.add_argument("--only", help="comma-separated names to run (default: all)")
    ap.add_argument("--parallel-gib", type=float, default=128.0,
                    help="the sum of the running entries' cards stays within this many GiB (default 128)")
    ap.add_argument("--parallel", type=int, default=5, help="at most this many entries at once (default 5)")
    ap.add_argument("--budget", type=float, default=330.0,
                    help="seconds after which no new entry starts (default 330)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per entry (default 180)")
    ap.add_argument("--no-probe", action="store_true",
                    help="do not probe the CUDA context alone before the runs start")
    ap.add_argument("--max-wait", type=float, default=45.0,
                    help="seconds the first waiting entry lets smaller later ones pass it (default 45)")
    args = ap.parse_args(argv)

    entries = select_entries(args.jobs, args.only, "run_boundaries", loader=load_boundary_entries)
    if entries is None:
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / f"boundaries-{args.jobs.stem}.json"
    log_path = args.out / "log-boundaries.txt"
    records: list[dict[str, Any]] = []
    if records_path.is_file():
        try:
            records = json.loads(records_path.read_text())
        except ValueError:
            records = []
        if not isinstance(records, list):
            records = []
    env_info = parent_env()
    parallel_bytes = int(args.parallel_gib * GiB)
    t_start = time.monotonic()
    failures = 0
    with log_path.open("a") as log:
        def say(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        say(f"# {utc_now()} {args.jobs} ({len(entries)} entries, parallel {args.parallel} within "
            f"{args.parallel_gib:g} GiB, budget {args.budget:.0f} s, timeout {args.timeout:.0f} s)")
        pending = []
        for e in entries:
            miss = missing_needs(e)
            if miss:
                say(f"{e['name']:<44} skipped   needs {', '.join(miss)} (not installed)")
            else:
                pending.append(e)
        if pending and not args.no_probe:
            ctx = probe_context()
            if ctx is not None:
                os.environ[CONTEXT_ENV] = str(ctx["cuda_context_bytes"])  # the workers inherit it
                say(f"# CUDA context probed alone on the idle GPU: {ctx['cuda_context_bytes'] / GiB:.3f} GiB "
                    f"({ctx['context_method']}); workers use it where NVML cannot see their process")
            else:
                say("# context probe failed (no GPU?); workers measure their own context")
        running: list[_Worker] = []
        head, head_since = None, 0.0  # the first pending entry and since when smaller ones pass it
        while pending or running:
            now = time.monotonic()
            if now - t_start < args.budget:
                while True:
                    if pending and pending[0] is not head:
                        head, head_since = pending[0], now
                    e = launchable(pending, sum(w.entry["gpu_memory_bytes"] for w in running), len(running),
                                   parallel_bytes=parallel_bytes, parallel=args.parallel,
                                   head_only=now - head_since > args.max_wait)
                    if e is None:
                        break
                    pending.remove(e)
                    running.append(_Worker(e, args.timeout))
            elif pending:
                for e in pending:
                    say(f"{e['name']:<44} not run   the budget of {args.budget:.0f} s was spent")
                pending = []
            for w in [w for w in running if w.poll()]:
                running.remove(w)
                rec = w.record(env_info)
                names = [r.get("name") for r in records]
                if rec["name"] in names:
                    records[names.index(rec["name"])] = rec
                else:
                    records.append(rec)
                write_json(records_path, records)
                say(summary_line(rec))
                if rec["status"] in ("error", "timeout"):
                    failures += 1
                    log.write("    " + rec["error"]["stderr_tail"][-2000:].replace("\n", "\n    ").rstrip() + "\n")
                    log.flush()
            time.sleep(0.25)
        say(f"# done in {time.monotonic() - t_start:.0f} s; {failures} failed; {records_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
