"""Confirm a searched boundary in fresh processes: the batch a user's own run of the job would find.

:func:`memfit.measurer.find_max_batch` runs its trials one after another in one process. A trial that follows an
out-of-memory failure there runs on the address space the failure left (the segments freed by the retry, where
equal-sized free blocks now lie), and on the rehearsed boundaries that is not what a fresh process sees: OLMoE
LoRA on a 48 GiB card ran 46 in its search after 47 had failed, while fresh processes fail 46 down to 41 and run
40 (validation/records/h100-fit-probes-15*.json, 88 fresh runs: 9 of the 73 at batches a search had tried went the
other way, all of them trials that came after a failure).

So a trial counts as *clean* when no failed trial came before it in its process; a fresh process's first and only
trial always is. :func:`confirm_boundary` takes a search's trials in the order they ran and a way to run one batch
fresh, and checks, with as few fresh runs as it can:

- the boundary B (the largest batch that ran) where its run was not clean: B fresh; if it runs, up while the batch
  above has no clean verdict; if it fails, down until a batch runs or has a clean run;
- else the failure at B + 1 where it was not clean: B + 1 fresh, and up while it runs.

The same rule picks validation/probes/fresh_boundaries.py's runs over the committed records. ``memfit measure
--find-max-batch`` runs the search itself in a worker process (``python -m memfit.measurer.worker
--find-max-batch``) and then the fresh runs (:func:`confirmed_max_batch`), so the process that asks touches no GPU
memory and each trial process has the GPU to itself as a user's job would. This module imports no torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import MemfitError

__all__ = ["clean_verdicts", "first_fresh", "next_fresh", "confirm_boundary", "worker_trial", "search_in_worker",
           "confirmed_max_batch"]

Verdicts = dict  # {batch: (ran, clean)}


def clean_verdicts(trials: Iterable[tuple[int, bool]]) -> Verdicts:
    """``{batch: (ran, clean)}`` of one process's trials in the order they ran (a batch tried twice: its last)."""
    out: Verdicts = {}
    failed = False
    for b, ok in trials:
        out[int(b)] = (bool(ok), not failed)
        failed = failed or not ok
    return out


def first_fresh(v: Verdicts) -> tuple[int, int] | None:
    """Where fresh runs start, and which way they go (0: up if it runs, down if it fails; 1: up while it runs;
    -1: down until it runs), or None when the boundary's verdicts are clean already."""
    ran = [b for b, (ok, _) in v.items() if ok]
    if not ran:
        low = min(v) if v else 1
        return (low - 1, -1) if low > 1 else None  # fresh runs failed where the search ran: on down
    b = max(ran)
    if not v[b][1]:
        return b, 0
    if b + 1 in v and not v[b + 1][1]:
        return b + 1, 1
    return None


def next_fresh(v: Verdicts, b: int, step: int, ran: bool) -> tuple[int, int] | None:
    """After a fresh run at ``b`` going ``step`` that ``ran``: the next batch and direction, or None (settled)."""
    step = step or (1 if ran else -1)
    if (step > 0) != ran:
        return None  # went up and failed, or went down and ran
    nb = b + step
    if nb < 1:
        return None
    known = v.get(nb)
    if known and known[1] and known[0] == (step < 0):
        return None  # a clean failure above, or a clean run below, is there already
    return nb, step


def confirm_boundary(trials: Iterable[tuple[int, bool]], fresh: Callable[[int], bool | None], *,
                     max_runs: int = 6) -> dict[str, Any]:
    """Check the boundary of ``trials`` (``(batch, ran)`` in the order one process ran them) with ``fresh(b)``, a
    run of batch ``b`` as a fresh process's first and only trial (None: no verdict, and no more runs). Returns
    ``max_batch_size`` (the largest batch that ran, a fresh verdict deciding its batch), ``fresh_trials``
    (``(batch, ran)`` in order) and ``settled`` (False when the runs stopped before a batch with a clean verdict
    was reached on either side)."""
    v = clean_verdicts(trials)
    done: list[tuple[int, bool]] = []
    at = first_fresh(v)
    while at is not None and len(done) < max_runs:
        b, step = at
        ok = fresh(b)
        if ok is None:  # the run gave no verdict (it crashed or timed out): stop here, unsettled
            break
        ok = bool(ok)
        done.append((b, ok))
        v[b] = (ok, True)
        at = next_fresh(v, b, step, ok)
        if at is None:
            at = first_fresh(v)  # settled this way; the other side may still need a look (a run above B)
    ran = [b for b, (ok, _) in v.items() if ok]
    return {"max_batch_size": max(ran) if ran else 0, "fresh_trials": done, "settled": first_fresh(v) is None}


# ------------------------------------------------------------------------------------------- processes
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the directory holding the memfit package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_worker(args: list[str], timeout: float, on_line: Callable[[str], None] | None = None):
    """``python -m memfit.measurer.worker`` with ``args``; returns (exit status or None on timeout, stderr tail)."""
    cmd = [sys.executable, "-m", "memfit.measurer.worker", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_child_env(), start_new_session=True)
    tail: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            tail.append(line)
            del tail[:-40]
            if on_line is not None:
                on_line(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=timeout)
        t.join(5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return None, "".join(tail)
    return rc, "".join(tail)


def worker_trial(job: Any, gpu_memory_bytes: int, batch: int, *, steps: int, timeout: float = 900.0) -> dict[str, Any]:
    """Batch ``batch`` of ``job`` on the card as the first and only trial of a fresh worker process:
    ``{"batch_size", "ok", "peak_reserved_bytes", "device_total_bytes", "record"}``."""
    with tempfile.TemporaryDirectory(prefix="memfit-fresh-") as tmp:
        jp, rp = Path(tmp) / "job.json", Path(tmp) / "record.json"
        jp.write_text(json.dumps({"job": job.replace(batch_size=batch).to_dict(),
                                  "gpu_memory_bytes": int(gpu_memory_bytes)}))
        rc, err = _run_worker([str(jp), str(rp), "--steps", str(steps)], timeout)
        rec = json.loads(rp.read_text()) if rc == 0 and rp.exists() else None
    if rec is None:
        why = "timed out" if rc is None else f"exit status {rc}"
        last = err.strip().splitlines()[-1] if err.strip() else ""
        raise MemfitError(f"the fresh run of batch {batch} failed ({why}): {last[:300]}")
    bd = rec.get("breakdown") or {}
    return {"batch_size": batch, "ok": bool(bd.get("fits")), "peak_reserved_bytes": bd.get("peak_reserved_bytes"),
            "device_total_bytes": bd.get("device_total_bytes"), "record": rec}


def search_in_worker(job: Any, gpu_memory_bytes: int, *, start: int | None = None, steps: int | None = None,
                     limit: int = 4096, on_trial: Callable[[dict], None] | None = None,
                     timeout: float = 3600.0) -> dict[str, Any]:
    """:func:`memfit.measurer.find_max_batch` in a worker process; its boundary record (``kind: "boundary"``)."""
    def line(s: str) -> None:
        if on_trial is not None and s.startswith('{"trial"'):
            try:
                t = json.loads(s)
            except ValueError:
                return
            on_trial({"batch_size": t["trial"], "ok": t["ok"], "seconds": t.get("seconds", 0.0),
                      "peak_reserved_bytes": t.get("peak_reserved_bytes")})

    with tempfile.TemporaryDirectory(prefix="memfit-search-") as tmp:
        jp, rp = Path(tmp) / "job.json", Path(tmp) / "record.json"
        jp.write_text(json.dumps({"job": job.to_dict(), "gpu_memory_bytes": int(gpu_memory_bytes)}))
        args = [str(jp), str(rp), "--find-max-batch", "--limit", str(limit)]
        if start is not None:
            args += ["--start", str(start)]
        if steps is not None:
            args += ["--steps", str(steps)]
        rc, err = _run_worker(args, timeout, line)
        if rc == 2:
            last = err.strip().splitlines()[-1] if err.strip() else "the job was rejected"
            raise MemfitError(last.removeprefix("memfit: error: "))
        if rc != 0 or not rp.exists():
            why = "timed out" if rc is None else f"exit status {rc}"
            last = err.strip().splitlines()[-1] if err.strip() else ""
            raise MemfitError(f"the search's worker process failed ({why}): {last[:300]}")
        return json.loads(rp.read_text())


def confirmed_max_batch(job: Any, gpu_memory_bytes: int, *, start: int | None = None, steps: int | None = None,
                        limit: int = 4096, max_runs: int = 6, on_trial: Callable[[dict], None] | None = None,
                        on_fresh: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """The search in a worker process, then its boundary checked by fresh runs (:func:`confirm_boundary`): the
    search's boundary record with ``max_batch_size`` the confirmed answer, ``search_max_batch_size`` the
    search's, ``fresh_trials`` (each fresh run: batch, ran, peak reserved, device total) and
    ``fresh_settled``; ``breakdown`` is the run at the answer (a fresh one where a fresh run decided it)."""
    rec = search_in_worker(job, gpu_memory_bytes, start=start, steps=steps, limit=limit, on_trial=on_trial)
    fm = rec.get("find_max_batch") or {}
    trials = [(t["batch_size"], t["ok"]) for t in fm.get("trials", [])]
    if not fm.get("model_fits", True) or not trials:
        rec.update(search_max_batch_size=rec.get("max_batch_size"), fresh_trials=[], fresh_settled=True)
        return rec
    n_steps = int(fm.get("steps") or (2 if job.task == "train" else 1))
    runs: dict[int, dict[str, Any]] = {}
    errors: list[str] = []

    def fresh(b: int) -> bool | None:
        try:
            r = worker_trial(job, gpu_memory_bytes, b, steps=n_steps)
        except MemfitError as exc:  # the search's answer stands, unsettled, with why
            errors.append(str(exc))
            return None
        runs[b] = r
        if on_fresh is not None:
            on_fresh(r)
        return r["ok"]

    out = confirm_boundary(trials, fresh, max_runs=max_runs)
    best = out["max_batch_size"]
    rec["search_max_batch_size"] = rec.get("max_batch_size")
    rec["max_batch_size"] = best
    rec["fresh_trials"] = [{k: v for k, v in runs[b].items() if k != "record"} for b, _ in out["fresh_trials"]]
    rec["fresh_settled"] = out["settled"] and not errors
    if errors:
        rec["fresh_error"] = errors[0]
    if best in runs and runs[best]["ok"]:
        rec["breakdown"] = runs[best]["record"].get("breakdown")
    elif best != rec["search_max_batch_size"]:
        rec.pop("breakdown", None)  # the search's run at its own answer is no run at this one
    return rec
