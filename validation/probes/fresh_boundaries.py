#!/usr/bin/env python3
"""Check in fresh processes every measured boundary that only an earlier failure's process reached.

    python validation/probes/fresh_boundaries.py RECORDS... --out DIR [--parallel-gib 74] [--parallel 3]
        [--timeout 150] [--budget 480] [--max-runs 3] [--only NAME,...] [--dry-run]
        [--measured "GPU, driver, torch, transformers"]

A boundary search runs its trials one after another in one process. A trial that follows an out-of-memory
failure in that process runs on the address space the failure left (the segments it freed, where equal-sized
free blocks lie), and boundaries-14's OLMoE pair showed how far that can carry: its search ran 17 after 18
failed, while fresh processes fail 18, 17 and 16 and run 15. So a trial counts as *clean* here when no failed
trial came before it in its process (a probe, the first and only trial of a fresh process, always is).

The rule, the same for every pair whatever memfit answers: take the real boundary B as validation/score_fit.py
takes it (probes decide their batch; else the search's trial). Where B's run is not clean, run B as a fresh
process's first and only trial; if it runs, go up (B + 1, ...) while the verdict there is not clean; if it fails,
go down (B - 1, ...) until a batch runs or the verdict there is a clean run. Where B's run is clean but the
failure at B + 1 is not, start at B + 1 and go up while it runs. Each fresh run has as many steps as the search's
trials had (2 to train, 1 for inference: a second inference step runs on the first one's leftovers, another job).
The rule is :mod:`memfit.measurer.fresh`'s (``first_fresh`` / ``next_fresh``), which ``memfit measure
--find-max-batch`` applies to its own search. Session 13's first call ran its inference probes with two steps
(before the script took the search's steps); validation/score_fit.py reads those as far as the search's one step
reaches. At most ``--max-runs`` fresh runs a pair. Pairs whose card is larger than ``--parallel-gib`` (an 80 GiB
card on an 80 GB GPU) are listed, not run.

Chains run side by side while the sum of their cards stays within ``--parallel-gib`` (each worker caps its own
allocator at its card less its CUDA context; the cap is per process). Output: ``DIR/fresh-probes.json``, a list
of ``kind: "probe"`` entries in validation/probes/first_trials.py's form (score_fit.py reads them beside the
records), rewritten after every run; ``DIR/fresh-log.txt``. ``--dry-run`` prints the plan and runs nothing
(no GPU needed). This process imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from first_trials import probe_entry, verdict_word  # noqa: E402
from launch import GiB  # noqa: E402
from run_boundaries import probe_context  # noqa: E402
from score_fit import load_records, probe_verdict  # noqa: E402

from memfit.measurer.card import CONTEXT_ENV  # noqa: E402
from memfit.measurer.fresh import clean_verdicts, first_fresh, next_fresh  # noqa: E402


def verdicts(rec: dict[str, Any]) -> dict[int, tuple[bool, bool]]:
    """``{batch: (ran, clean)}`` for one boundary record: the search's trials, then its probes over them."""
    search = list((rec.get("find_max_batch") or {}).get("trials") or [])
    probes = rec.get("probes", ())
    if any(pr.get("supersedes_search") for pr in probes):
        search = []
    out = clean_verdicts((t["batch_size"], t["ok"]) for t in search)
    steps = (rec.get("find_max_batch") or {}).get("steps")
    for pr in probes:  # read as the scorer reads them: a probe of more steps only as far as the search's
        ran, _ = probe_verdict(pr, steps)
        if ran is not None:
            out[int(pr["batch_size"])] = (ran, True)
    return out


def plan(recs: list[dict[str, Any]], parallel_bytes: int, only: set[str] | None) -> tuple[list, list]:
    """(chains to run, pairs left out with why): a chain is ``(rec, first batch, direction)``
    (:func:`memfit.measurer.fresh.first_fresh`)."""
    chains, left = [], []
    for rec in recs:
        if rec.get("status", "ok") != "ok" or rec.get("max_batch_size") is None:
            continue
        if only and rec["name"] not in only:
            continue
        start = first_fresh(verdicts(rec))
        if start is None:
            continue
        if int(rec["gpu_memory_bytes"]) > parallel_bytes:
            left.append((rec["name"], start[0], f"card {rec['gpu_memory_bytes'] / GiB:g} GiB > --parallel-gib"))
            continue
        chains.append((rec, *start))
    return chains, left


def steps_for(rec: dict[str, Any]) -> int:
    """The search's steps per trial (2 to train, 1 for inference), which a fresh run repeats."""
    fm = rec.get("find_max_batch") or {}
    return int(fm.get("steps") or (2 if rec["job"].get("task") == "train" else 1))


class Budget:
    """Card bytes and run slots shared by the chains' threads."""

    def __init__(self, parallel_bytes: int, parallel: int, deadline: float) -> None:
        self.free, self.slots, self.deadline = parallel_bytes, parallel, deadline
        self.cv = threading.Condition()

    def take(self, n: int) -> bool:
        with self.cv:
            while self.free < n or self.slots == 0:
                if time.monotonic() > self.deadline:
                    return False
                self.cv.wait(1.0)
            if time.monotonic() > self.deadline:
                return False
            self.free -= n
            self.slots -= 1
            return True

    def give(self, n: int) -> None:
        with self.cv:
            self.free += n
            self.slots += 1
            self.cv.notify_all()


def fresh_run(rec: dict[str, Any], b: int, args: argparse.Namespace) -> dict[str, Any]:
    """One worker at batch ``b`` on the pair's card, the first and only trial of its process, as many steps as
    the search's trials ran (validation/probes/first_trials.py's entry)."""
    steps = steps_for(rec)
    how = (f"validation/probes/fresh_boundaries.py: the worker at batch {b} in a fresh process, {steps} step(s) as "
           "the search's trials, the batch is the process's first and only trial (the search's boundary had run only "
           "after a failure in its process); other pairs' workers shared the GPU, each capped at its card")
    return probe_entry(rec["name"], rec["job"], rec["gpu_memory_bytes"], b, steps=steps, timeout=args.timeout,
                       how=how, measured=args.measured)


def chain(rec: dict[str, Any], b0: int, direction: int, args, budget: Budget, sink) -> None:
    """Fresh runs from ``b0`` in ``direction`` (:func:`memfit.measurer.fresh.next_fresh` says where next)."""
    v = verdicts(rec)
    at, n = (b0, direction), 0
    while at is not None and n < args.max_runs:
        b, step = at
        if not budget.take(int(rec["gpu_memory_bytes"])):
            sink(None, f"{rec['name']:<44} batch {b:>4}: not run, the budget was spent")
            return
        try:
            entry = fresh_run(rec, b, args)
        finally:
            budget.give(int(rec["gpu_memory_bytes"]))
        n += 1
        sink(entry, f"{rec['name']:<44} batch {b:>4}: {verdict_word(entry)}  ({entry['wall_s']:.0f} s)")
        if entry["record"] is None:
            return  # an error is no verdict: stop this pair
        v[b] = (entry["ok"], True)
        at = next_fresh(v, b, step, entry["ok"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--parallel-gib", type=float, default=74.0)
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=150.0)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds after which no new run starts")
    ap.add_argument("--max-runs", type=int, default=3)
    ap.add_argument("--only", default=None)
    ap.add_argument("--measured", default="")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    try:
        recs = load_records(args.records)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read the records: {exc}", file=sys.stderr)
        return 2
    parallel_bytes = int(args.parallel_gib * GiB)
    chains, left = plan(recs, parallel_bytes, set(args.only.split(",")) if args.only else None)
    for name, b, why in left:
        print(f"{name:<44} boundary {b:>4}: not run ({why})")
    for rec, b, up in chains:
        print(f"{rec['name']:<44} batch {b:>4}{' (up)' if up > 0 else ' (down)' if up < 0 else '     '}: fresh run planned "
              f"(card {rec['gpu_memory_bytes'] / GiB:g} GiB, {steps_for(rec)} step(s))")
    if args.dry_run or not chains:
        return 0
    if args.out is None:
        print("error: --out DIR is needed unless --dry-run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = probe_context()
    if ctx is not None:
        os.environ[CONTEXT_ENV] = str(ctx["cuda_context_bytes"])
    dest, log = args.out / "fresh-probes.json", (args.out / "fresh-log.txt").open("a")
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(entry, line):
        with lock:
            if entry is not None:
                results.append(entry)
                dest.write_text(json.dumps(results, indent=1))
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

    budget = Budget(parallel_bytes, args.parallel, time.monotonic() + args.budget)
    # the largest cards first, so that the small ones fill the gaps beside them
    threads = [threading.Thread(target=chain, args=(rec, b, up, args, budget, sink))
               for rec, b, up in sorted(chains, key=lambda c: -c[0]["gpu_memory_bytes"])]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
