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

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from launch import (GiB, Log, child_env, error_record, failure_reason, job_entries, kill_group,  # noqa: E402
                    open_run, run_to_end, runner_parser, start_child, tail, whole_number, worker_cmd)

from memfit.errors import JobError  # noqa: E402
from memfit.measurer.card import CONTEXT_ENV  # noqa: E402
from memfit.measurer.record import utc_now  # noqa: E402
from memfit.units import parse_card_memory  # noqa: E402

_KEYS = {"name", "job", "gpu_memory", "holdout", "start", "needs", "timeout"}
_NEEDS = ("bitsandbytes",)


def load_boundary_entries(path: Path) -> list[dict[str, Any]]:
    """The YAML's entries, each checked (unique name, valid job, a card with its unit) before anything runs."""
    entries = []
    for name, item, job in job_entries(path, _KEYS, "name, job, gpu_memory"):
        try:
            if "gpu_memory" not in item:
                raise JobError("needs gpu_memory (e.g. 24GiB)")
            card = parse_card_memory(str(item["gpu_memory"]), "gpu_memory")  # a YAML number is bare too
        except JobError as exc:
            raise JobError(f"{path}: entry {name!r}: {exc}") from None
        start = item.get("start")
        if start is not None and not whole_number(start, 1):
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
        cmd = worker_cmd(str(self.job_path), str(self.rec_path), "--find-max-batch",
                         "--gpu-memory", str(entry["gpu_memory_bytes"]))
        if entry.get("start"):
            cmd += ["--start", str(entry["start"])]
        env = child_env()
        expandable = bool(entry["job"].get("expandable_segments"))
        env["PYTORCH_CUDA_ALLOC_CONF"] = f"expandable_segments:{'True' if expandable else 'False'}"
        self._out, self._err = self.out_path.open("w"), self.err_path.open("w")
        self.t0 = time.monotonic()
        self.proc = start_child(cmd, env=env, stdout=self._out, stderr=self._err)
        self.timed_out = False

    def poll(self) -> bool:
        """True once the process has ended (killed here when past its timeout)."""
        if self.proc.poll() is not None:
            return True
        if time.monotonic() - self.t0 > self.timeout:
            self.timed_out = True
            kill_group(self.proc)
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
            rec = error_record({"returncode": self.proc.returncode, "stderr_tail": tail(stderr),
                                "stdout_tail": tail(stdout)[-1000:]}, env_info,
                               kind="boundary", job=entry["job"], gpu_memory_bytes=entry["gpu_memory_bytes"],
                               trials_reported=_trials_from(stderr))
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
    try:
        stdout, _, returncode, timed_out = run_to_end(worker_cmd("--probe-context"), env=child_env(), timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if timed_out or returncode != 0:
        return None
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def summary_line(rec: dict[str, Any]) -> str:
    name, status, wall = rec["name"], rec["status"], rec.get("wall_s", 0.0)
    fm = rec.get("find_max_batch")
    if fm is None:
        return (f"{name:<44} {status:<9} {rec.get('gpu_memory', ''):>7}  trials {len(rec.get('trials_reported', []))}"
                f"  {failure_reason(rec)}  wall {wall:.0f} s")
    trials = fm.get("trials", [])
    trial_s = sum(t.get("seconds", 0) for t in trials)
    card = fm.get("card", {})
    return (f"{name:<44} {status:<9} {rec.get('gpu_memory', ''):>7}  max batch {rec.get('max_batch_size'):>5}"
            f"  (start {rec.get('start') or '-'})  trials {len(trials):>2} in {trial_s:6.1f} s  build "
            f"{fm.get('build_seconds', 0):5.1f} s  context {card.get('cuda_context_bytes', 0) / GiB:.2f} GiB"
            f"  wall {wall:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = runner_parser(__doc__, jobs_help="YAML list of {name, job, gpu_memory, holdout, start}",
                       out_help="folder for boundaries-<stem>.json and the log")
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

    run = open_run(args, "run_boundaries", f"boundaries-{args.jobs.stem}.json", loader=load_boundary_entries)
    if run is None:
        return 2
    entries, records, env_info = run
    parallel_bytes = int(args.parallel_gib * GiB)
    t_start = time.monotonic()
    failures = 0
    with (args.out / "log-boundaries.txt").open("a") as file:
        log = Log(file)
        say = log.say
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
                records.put(rec)
                say(summary_line(rec))
                if rec["status"] in ("error", "timeout"):
                    failures += 1
                    log.indented(rec["error"]["stderr_tail"][-2000:])
            time.sleep(0.25)
        say(f"# done in {time.monotonic() - t_start:.0f} s; {failures} failed; {records.path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
