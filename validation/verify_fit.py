#!/usr/bin/env python3
"""`memfit estimate --max-batch-size --verify` against the rehearsed boundaries: the estimate's answer checked by
the capped trace (memfit.tracer.verify.verified_max_batch_size) on every training pair with a measured boundary
(inference is refused by --verify). Prints, per pair, the real boundary, the estimate's answer and the verified one,
then the counts (exact / one below / further below / above) for the estimate, for the trace's own boundary searched
from the estimate (``search``: what --verify answered before the veto) and for --verify's answer, the largest batch
both engines run (``veto`` = min(estimate, search)), on all pairs, on the held-out ones and on boundaries-9 and -10
(written and measured after the veto was chosen on the 81 earlier pairs).

    PYTHONPATH=src python validation/verify_fit.py [--out validation/verify-fit.json] [--only NAME ...]

Each pair's traces are written to the output as they finish, so a rerun skips pairs already there;
``--refresh-estimates`` then brings their estimate column up to the estimator as it is, and the real boundary up to the
records and probes committed (the trace's answers stay).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "validation"))

import score_fit  # noqa: E402
from memfit.job import Job  # noqa: E402


def _kind(diff: int) -> str:
    return "exact" if diff == 0 else "one below" if diff == -1 else "further below" if diff < -1 else "above"


def summary(rows: list[dict], key: str) -> str:
    counts = {k: 0 for k in ("exact", "one below", "further below", "above")}
    for r in rows:
        counts[_kind(r[key] - r["measured"])] += 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "validation" / "verify-fit.json"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--refresh-estimates", action="store_true",
                    help="recompute the estimate's answer of the pairs kept in --out (the traces, which do not depend "
                         "on the estimator, are kept) and write them back")
    args = ap.parse_args()
    from memfit.tracer.verify import verified_max_batch_size

    paths = sorted((REPO / "validation" / "records").glob("*boundar*.json")) + \
        sorted((REPO / "validation" / "records").glob("*fit-probes*.json"))
    recs = [r for r in score_fit.load_records(paths) if r.get("job", {}).get("task", "train") == "train"]
    out_path = Path(args.out)
    done = {r["name"]: r for r in json.loads(out_path.read_text())} if out_path.exists() else {}
    rows = []
    for rec in recs:
        row = score_fit.score_pair(rec)
        if row is None or row["measured"] <= 0:
            continue
        if args.only and row["name"] not in args.only:
            continue
        if row["name"] in done:
            r = done[row["name"]]
            if args.refresh_estimates and (r["estimate"], r["measured"]) != (row["memfit"], row["measured"]):
                r["estimate"] = row["memfit"]  # score_pair's answer: memfit.max_batch_size on the record's card
                r["measured"] = row["measured"]  # a probe committed since may have moved the real boundary
                out_path.write_text(json.dumps(list(done.values()), indent=1))
            rows.append(r)
            print(f"{r['name']:44s} card {r['card_gib']:5.1f}  real {r['measured']:4d}  estimate {r['estimate']:4d}  "
                  f"verified {r['verified']:4d}  traces {len(r['trials'])}  (kept from {out_path.name})", flush=True)
            continue
        job, card = Job.from_dict(rec["job"]), int(rec["gpu_memory_bytes"])
        t0 = time.perf_counter()
        v = verified_max_batch_size(job, card)
        r = {"name": row["name"], "holdout": row["holdout"], "card_gib": card / (1 << 30), "measured": row["measured"],
             "estimate": v["estimate_max_batch_size"], "verified": v["max_batch_size"],
             "trials": v["trials"], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(r)
        done[r["name"]] = r
        out_path.write_text(json.dumps(list(done.values()), indent=1))
        print(f"{r['name']:44s} card {r['card_gib']:5.1f}  real {r['measured']:4d}  estimate {r['estimate']:4d}  "
              f"verified {r['verified']:4d}  traces {len(r['trials'])}  ({r['seconds']} s)", flush=True)
    for r in rows:
        r["veto"] = min(r["estimate"], r["verified"])
    for label, rs in (("training pairs", rows), ("held out", [r for r in rows if r["holdout"]]),
                      ("boundaries-9 and -10 (measured after the veto was chosen)",
                       [r for r in rows if r["name"].startswith(("h9-", "h10-"))]),
                      ("boundaries-11 and -12 (held out, measured in session 8)",
                       [r for r in rows if r["name"].startswith(("h11-", "h12-"))]),
                      ("boundaries-13 (held out, measured on an H100 in session 10)",
                       [r for r in rows if r["name"].startswith("h13-")]),
                      ("boundaries-14 (measured on an H100 in session 12; held out until the norm-order fix)",
                       [r for r in rows if r["name"].startswith("h14-")])):
        print(f"{label}: {len(rs)}")
        print(f"  estimate:         {summary(rs, 'estimate')}")
        print(f"  trace's search:   {summary(rs, 'verified')}")
        print(f"  --verify (veto):  {summary(rs, 'veto')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
