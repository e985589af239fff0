#!/usr/bin/env python3
"""The batches to re-run as fresh-process first trials after a boundary search: every batch where one of
memfit's training verdicts (both address orders, the shipped rule; one order, ``TRAINING_BOTH_ORDERS`` off)
disagrees with what the search found.

    python validation/probes/disagreements.py validation/jobs/boundaries-13.yaml OUT/boundaries-boundaries-13.json

Prints ``NAME:BATCH`` words for validation/probes/first_trials.py: for an answer ``m`` above the found
boundary ``r``, ``m`` (does it really fail when it is the first trial?); below it, ``m + 1`` (does the batch
above memfit's answer really run?). Pairs the search did not finish are skipped. Imports no torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from run_boundaries import load_boundary_entries  # noqa: E402

import memfit.estimator as est  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.models import load_model  # noqa: E402


def answers(entry: dict) -> dict[str, int]:
    """memfit's largest micro-batch for the pair under each verdict rule."""
    job = Job.from_dict(entry["job"])
    spec = load_model(job.model)
    out = {}
    was = est.TRAINING_BOTH_ORDERS
    try:
        for rule, on in (("both orders", True), ("one order", False)):
            est.TRAINING_BOTH_ORDERS = on
            out[rule] = est.max_batch_size(job, entry["gpu_memory_bytes"], spec=spec)
    finally:
        est.TRAINING_BOTH_ORDERS = was
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("yaml", type=Path)
    ap.add_argument("boundaries", type=Path, help="run_boundaries.py's output JSON")
    args = ap.parse_args(argv)
    entries = {e["name"]: e for e in load_boundary_entries(args.yaml)}
    found = json.loads(args.boundaries.read_text())
    found = found["entries"] if isinstance(found, dict) else found
    words = []
    for rec in found:
        e = entries.get(rec.get("name"))
        r = rec.get("max_batch_size")
        if e is None or rec.get("status") != "ok" or not isinstance(r, int):
            continue
        got = answers(e)
        print(f"# {e['name']}: search {r}, memfit " + ", ".join(f"{k} {v}" for k, v in got.items()), file=sys.stderr)
        for m in sorted(set(got.values())):
            b = m if m > r else (m + 1 if m < r else None)
            if b is not None and b >= 1 and f"{e['name']}:{b}" not in words:
                words.append(f"{e['name']}:{b}")
    print(" ".join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
