#!/usr/bin/env python3
"""The trace's verdict on a card against the rehearsed boundaries: does the traced step, its allocations
replayed through the allocator model capped at the card (``trace(job, gpu_memory_bytes=card)``), run at the
real boundary B and fail at B + 1, where the estimate's event stream answers wrongly?

The pairs are chosen by rule before any trace verdict is seen: every training or prefill pair (decode traces
of hundreds of tokens are left out for time) whose estimate answer differs from the measured boundary, and a
control of 8 pairs the estimate answers exactly (a seeded draw among the training and prefill pairs), to see
that the trace is not wrong where the estimate is right. Both batches are traced in one process each.

    PYTHONPATH=src python validation/trace_verdicts.py [--out validation/trace-verdicts.json] [--only NAME ...]

Prints one line per pair: the real boundary, the estimate's answer, and the trace's verdicts at B and B + 1.
It calls the engine's own card verdict; validation/trace_fit.py is the older tool that rebuilds one record's traced
stream and replays it under the record's cap.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "validation"))

import score_fit  # noqa: E402
from memfit.job import Job  # noqa: E402

GiB = 1 << 30
CONTROL = 8
SEED = 9


def _traceable(job: Job) -> bool:
    return job.task == "train" or job.new_tokens == 0


def select(rows: list[dict], records: dict[str, dict]) -> list[dict]:
    eligible = [r for r in rows if r["measured"] > 0 and _traceable(Job.from_dict(records[r["name"]]["job"]))]
    misses = [r for r in eligible if r["diff"] != 0]
    exact = sorted((r for r in eligible if r["diff"] == 0), key=lambda r: r["name"])
    control = random.Random(SEED).sample(exact, min(CONTROL, len(exact)))
    return [dict(r, group="miss") for r in misses] + [dict(r, group="control") for r in control]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "validation" / "trace-verdicts.json"))
    ap.add_argument("--only", nargs="*", default=None, help="pair names to trace (default: the rule's selection)")
    args = ap.parse_args()
    from memfit.tracer import trace

    paths = sorted((REPO / "validation" / "records").glob("*boundar*.json")) + \
        sorted((REPO / "validation" / "records").glob("*fit-probes*.json"))
    recs = score_fit.load_records(paths)
    by_name = {r.get("name"): r for r in recs}
    rows = [x for x in (score_fit.score_pair(r) for r in recs) if x is not None]
    chosen = select(rows, by_name)
    if args.only:
        chosen = [r for r in chosen if r["name"] in set(args.only)]
    out = []
    for r in chosen:
        rec = by_name[r["name"]]
        job, card, b = Job.from_dict(rec["job"]), int(rec["gpu_memory_bytes"]), r["measured"]
        verdicts = {}
        t0 = time.perf_counter()
        for batch in (b, b + 1):
            bd = trace(job.replace(batch_size=batch), fallback=False, gpu_memory_bytes=card)
            verdicts[batch] = {"fits": bool(bd.fits), "peak_reserved_bytes": bd.peak_reserved_bytes,
                               "first_oom": bd.extras.get("first_oom")}
        right = verdicts[b]["fits"] and not verdicts[b + 1]["fits"]
        row = {"name": r["name"], "group": r["group"], "card_gib": card / GiB, "measured": b,
               "estimate": r["memfit"], "trace_fits_at_B": verdicts[b]["fits"],
               "trace_fits_at_B_plus_1": verdicts[b + 1]["fits"], "trace_right": right,
               "trace_reserved_at_B": verdicts[b]["peak_reserved_bytes"],
               "measured_reserved_at_B": r.get("reserved_measured"), "seconds": round(time.perf_counter() - t0, 1),
               "first_oom_at_B_plus_1": verdicts[b + 1]["first_oom"]}
        out.append(row)
        print(f"{r['name']:44s} {r['group']:7s} card {card / GiB:5.1f}  real {b:4d}  estimate {r['memfit']:4d}  "
              f"trace: B {'fits' if row['trace_fits_at_B'] else 'OOM '}  B+1 "
              f"{'fits' if row['trace_fits_at_B_plus_1'] else 'OOM '}  {'right' if right else 'WRONG'}  "
              f"({row['seconds']} s)", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    for g in ("miss", "control"):
        rs = [x for x in out if x["group"] == g]
        est_right = sum(x["estimate"] == x["measured"] for x in rs)
        print(f"{g}: {len(rs)} pairs; trace right at both batches on {sum(x['trace_right'] for x in rs)}, "
              f"the estimate's answer right on {est_right}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
