#!/usr/bin/env python3
"""Score memfit's fit answers against rehearsed boundaries (records of validation/run_boundaries.py).

    python validation/score_fit.py validation/records/h200-boundaries.json [...] [--json] [--holdout-only]

For every record with a measured boundary B (the largest micro-batch that ran on the card, B + 1 did not):

- fit answer: ``memfit.max_batch_size(job, card)`` with the record's card and allocator setting
  (``job.expandable_segments``). Bars: never above B; equal to B on >= 85 % of the pairs; the rest B - 1.
- reserved: the estimate's peak reserved at batch B against the measured peak reserved at B (the run
  that defines the boundary). Bars: median |error| <= 2 %, worst <= 8 %. Where memfit's answer is below B it
  says B does not fit, and its reserve at B is the unlimited replay's (what a card without a limit would
  hold: for a decode that concatenates its cache, up to 3x what the capped run holds once it frees its cache
  under pressure), which is no figure of a capped run. Those pairs are compared at the largest measured batch
  that both memfit and the real run say runs (``compared_at``); the figures at B are kept as
  ``reserved_error_at_b`` / ``device_error_at_b`` and summarised apart (``reserved_worst_at_b``).
- device total: the estimate's device total against the measured one at the same batch (this process's CUDA
  context, measured at start, + peak reserved). Bar: median |error| <= 2.5 %.

- trial verdicts (no bar): memfit's fits / does-not-fit (``memfit.fits_on``) at every batch the record's search
  measured, against that trial's outcome. The answer compares two searches' end points, which need not be the
  same boundary where fitting is not monotone in the batch (a replay that fits at 232 between failing 230 and 233
  answers 232 from its own search, while every trial the measured search made agrees with it); the trials
  compare the verdicts themselves.

Probes (``kind: probe`` entries, e.g. validation/records/h200-fit-probes.json): a single batch of a pair's job
run on the same card as the first and only trial of a fresh process, as a user runs it. A probe of more steps
than the search's trials (a second inference step runs on the first one's leftovers) decides only as far as
its steps reach: a failure within the search's steps is a failure, a failure after them a run (see
:func:`probe_verdict`). They add to the pair's
trials and decide the verdict at their batch (the search's later trials run on an address space the earlier ones
left, which changes where equal-sized free blocks lie); the real boundary is then the largest batch measured to
run, and its run gives the reserved and device-total figures. A probe marked ``supersedes_search`` replaces the
search's trials altogether (the search ran another job: see its note). Pairs where nothing fits (B = 0) count for the fit answer only. Held-out pairs (``holdout: true``, chosen
before any result existed) are printed separately; the bars are asserted on all pairs together.
Records with an error or timeout are listed and not scored. Exit status 1 when a bar is missed.
``--one-order`` scores the training verdict without its second address order (``memfit.estimator.TRAINING_BOTH_ORDERS``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from memfit.estimator import estimate, fits_on, max_batch_size  # noqa: E402
from memfit.job import Job  # noqa: E402

GiB = 1 << 30
BARS = {"exact_share": 0.85, "reserved_median": 0.02, "reserved_worst": 0.08, "device_median": 0.025}


def _estimate(job: Job, card: int):
    if "gpu_memory_bytes" in inspect.signature(estimate).parameters:
        return estimate(job, gpu_memory_bytes=card)
    return estimate(job)


def load_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The boundary records of ``paths``, each with the probes of its pair (``rec["probes"]``) attached."""
    out: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        items = data if isinstance(data, list) else [data]
        out.extend(r for r in items if r.get("kind") == "boundary")
        probes.extend(r for r in items if r.get("kind") == "probe")
    for rec in out:
        mine = [pr for pr in probes if pr.get("pair") == rec.get("name") and _same_job(pr, rec)]
        if mine:
            rec.setdefault("probes", []).extend(mine)
    return out


def _same_job(probe: dict[str, Any], rec: dict[str, Any]) -> bool:
    """A probe counts for a pair only when it ran the pair's job (its batch apart) on the pair's card."""
    bd = (probe.get("record") or {}).get("breakdown") or {}
    if bd:
        pj = Job.from_dict(bd["job"]).to_dict()
        # a run capped from outside measure (memory_history.py's set_per_process_memory_fraction at the pair's
        # allocator limit) states no card in its breakdown: the probe's own entry says which it rehearsed
        card = bd.get("gpu_memory_bytes") or probe.get("gpu_memory_bytes")
    else:  # a probe whose record did not come back: its job and card as it states them
        pj = Job.from_dict(probe["job"]).to_dict()
        card = probe.get("gpu_memory_bytes")
    rj = Job.from_dict(rec["job"]).to_dict()
    pj.pop("batch_size", None)
    rj.pop("batch_size", None)
    return pj == rj and int(card or -1) == int(rec["gpu_memory_bytes"])


def probe_verdict(probe: dict[str, Any], steps: int | None) -> tuple[bool | None, dict[str, Any] | None]:
    """``(ran, breakdown)`` of a probe for a search of ``steps`` steps per trial. A probe of another number of
    steps ran another job (a second inference step runs on what the first left): it still says whether the
    search's steps run where it ran them all, or failed within them. Otherwise ``ran`` is None (no verdict); the
    breakdown is kept only where the probe's steps are the search's. A worker probe
    (validation/probes/first_trials.probe_entry) that left no record gave no verdict (a crash, a timeout, a card
    larger than the GPU it was to be rehearsed on), whatever its ``ok`` (false there); a hand-made probe without a
    record says what its verdict rests on (``evidence``: the command's exit status)."""
    if probe.get("record", {}) is None and not probe.get("ok") and not probe.get("evidence"):
        return None, None
    bd = (probe.get("record") or {}).get("breakdown")
    extras = (bd or {}).get("extras") or {}
    p_steps = extras.get("steps")
    if steps is None or p_steps is None or int(p_steps) == int(steps):
        return bool(probe["ok"]), bd
    if probe["ok"]:
        return (True, None) if int(p_steps) > int(steps) else (None, None)
    done = extras.get("steps_completed")
    if done is None:
        return None, None
    return int(done) >= int(steps), None


def score_pair(rec: dict[str, Any]) -> dict[str, Any] | None:
    """memfit's answers for one boundary record, or None when the record has no measured boundary."""
    if rec.get("status", "ok") not in ("ok", "none-fits") or rec.get("max_batch_size") is None:
        return None
    job = Job.from_dict(rec["job"])
    card = int(rec["gpu_memory_bytes"])
    measured = int(rec["max_batch_size"])
    bd = rec.get("breakdown")
    probes = rec.get("probes", ())
    search = list((rec.get("find_max_batch") or {}).get("trials") or [])
    if any(pr.get("supersedes_search") for pr in probes):
        search = []  # the search ran another job (see the probe's note): only the probes count
    verdict = {int(t["batch_size"]): (bool(t["ok"]), t) for t in search}
    steps = (rec.get("find_max_batch") or {}).get("steps")
    for pr in probes:  # a first trial in a fresh process is how a user runs the job: it decides its batch
        ran, rb = probe_verdict(pr, steps)
        if ran is None:
            continue
        if rb is None and int(pr["batch_size"]) in verdict and verdict[int(pr["batch_size"])][0] == ran:
            rb = verdict[int(pr["batch_size"])][1]  # same verdict as the search's trial: that run's figures
        verdict[int(pr["batch_size"])] = (ran, rb)
    trials = [{"batch_size": b, "ok": ok} for b, (ok, _) in sorted(verdict.items())]
    ran = [b for b, (ok, _) in verdict.items() if ok]
    if probes:
        measured = max(ran) if ran else 0
        src = verdict[measured][1] if ran else None
        if measured != rec["max_batch_size"] or any(int(p["batch_size"]) == measured for p in probes):
            # the run at the real boundary: a probe's breakdown, or the search's trial at that batch
            bd = src if (src is None or "peak_reserved_bytes" in src) else None
    answer = max_batch_size(job, card)
    row: dict[str, Any] = {"name": rec.get("name", job.model), "holdout": bool(rec.get("holdout")),
                           "card_gib": card / GiB, "expandable_segments": job.expandable_segments,
                           "measured": measured, "memfit": answer, "diff": answer - measured}
    row["probes"] = len(rec.get("probes", ()))
    row["trials"] = len(trials)
    row["trials_disagree"] = [t["batch_size"] for t in trials
                              if fits_on(job.replace(batch_size=t["batch_size"]), card) != bool(t["ok"])]
    if measured and bd:
        est = _estimate(job.replace(batch_size=measured), card)
        row["reserved_measured"] = bd["peak_reserved_bytes"]
        row["reserved_estimate"] = est.peak_reserved_bytes
        row["reserved_error_at_b"] = est.peak_reserved_bytes / bd["peak_reserved_bytes"] - 1
        row["device_error_at_b"] = est.device_total_bytes / bd["device_total_bytes"] - 1
        row["reserved_error"], row["device_error"] = row["reserved_error_at_b"], row["device_error_at_b"]
        row["compared_at"] = measured
        row["device_measured"] = bd["device_total_bytes"]
        row["device_estimate"] = est.device_total_bytes
        if answer < measured:
            # memfit says B does not fit: its reserve at B is then the unlimited replay's, not a capped run's.
            # The figures compare the largest measured batch that both memfit and the real run say runs.
            both = [b for b, (ok, t) in verdict.items() if ok and b <= answer and t and "peak_reserved_bytes" in t]
            if both:
                b = max(both)
                t = verdict[b][1]
                e = _estimate(job.replace(batch_size=b), card)
                row["compared_at"] = b
                row["reserved_error"] = e.peak_reserved_bytes / t["peak_reserved_bytes"] - 1
                row["device_error"] = e.device_total_bytes / t["device_total_bytes"] - 1
            else:  # nothing measured at or below memfit's answer: not compared
                del row["reserved_error"], row["device_error"]
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the bars are about, over ``rows``."""
    n = len(rows)
    res = [abs(r["reserved_error"]) for r in rows if "reserved_error" in r]
    dev = [abs(r["device_error"]) for r in rows if "device_error" in r]
    res_b = [abs(r["reserved_error_at_b"]) for r in rows if "reserved_error_at_b" in r]
    return {
        "pairs": n,
        "above": sum(r["diff"] > 0 for r in rows),
        "exact": sum(r["diff"] == 0 for r in rows),
        "one_below": sum(r["diff"] == -1 for r in rows),
        "further_below": sum(r["diff"] < -1 for r in rows),
        "exact_share": (sum(r["diff"] == 0 for r in rows) / n) if n else None,
        "reserved_median": statistics.median(res) if res else None,
        "reserved_worst": max(res) if res else None,
        "device_median": statistics.median(dev) if dev else None,
        "device_worst": max(dev) if dev else None,
        "reserved_median_at_b": statistics.median(res_b) if res_b else None,
        "reserved_worst_at_b": max(res_b) if res_b else None,
        "trials": sum(r.get("trials", 0) for r in rows),
        "trials_agree": sum(r.get("trials", 0) - len(r.get("trials_disagree", ())) for r in rows),
    }


def bars_missed(s: dict[str, Any]) -> list[str]:
    """The bars ``s`` misses (empty when all are met)."""
    missed = []
    if s["above"]:
        missed.append(f"{s['above']} answer(s) above the real boundary")
    if s["further_below"]:
        missed.append(f"{s['further_below']} answer(s) more than one below")
    if s["exact_share"] is not None and s["exact_share"] < BARS["exact_share"]:
        missed.append(f"exact on {100 * s['exact_share']:.0f}% < {100 * BARS['exact_share']:.0f}%")
    for key in ("reserved_median", "reserved_worst", "device_median"):
        if s[key] is not None and s[key] > BARS[key]:
            missed.append(f"{key} {100 * s[key]:.2f}% > {100 * BARS[key]:.1f}%")
    return missed


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}%"


def render(rows: list[dict[str, Any]], skipped: list[str]) -> str:
    lines = [f"{'pair':<44} {'card':>6} {'exp':>3} {'real':>5} {'memfit':>6} {'reserved err':>12} {'device err':>10}"
             f" {'at':>5} {'reserved err at B':>17}"]
    for r in rows:
        at = r.get("compared_at")
        lines.append(f"{r['name'] + (' (h)' if r['holdout'] else ''):<44} {r['card_gib']:6.1f} "
                     f"{'y' if r['expandable_segments'] else '-':>3} {r['measured']:>5} {r['memfit']:>6} "
                     f"{_pct(r.get('reserved_error')):>12} {_pct(r.get('device_error')):>10} "
                     f"{'' if at is None or at == r['measured'] else at:>5} "
                     f"{'' if at is None or at == r['measured'] else _pct(r.get('reserved_error_at_b')):>17}")
    for label, subset in (("all", rows), ("calibration", [r for r in rows if not r["holdout"]]),
                          ("held out", [r for r in rows if r["holdout"]])):
        s = summarize(subset)
        if not s["pairs"]:
            continue
        lines.append(f"{label}: {s['pairs']} pairs; memfit exact {s['exact']}, one below {s['one_below']}, further "
                     f"below {s['further_below']}, above {s['above']}; reserved |err| median "
                     f"{_pct(s['reserved_median'])} worst {_pct(s['reserved_worst'])}; device total |err| median "
                     f"{_pct(s['device_median'])} worst {_pct(s['device_worst'])} (reserved at B itself: median "
                     f"{_pct(s['reserved_median_at_b'])} worst {_pct(s['reserved_worst_at_b'])})")
    s = summarize(rows)
    off = [f"{r['name']} B={','.join(map(str, r['trials_disagree']))}" for r in rows if r.get("trials_disagree")]
    lines.append(f"trial verdicts: memfit agrees with {s['trials_agree']} of {s['trials']} measured trials"
                 + (f"; not with {'; '.join(off)}" if off else ""))
    if skipped:
        lines.append("not scored: " + ", ".join(skipped))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one-order", action="store_true",
                    help="score the training verdict without the replay at increasing segment addresses "
                         "(memfit.estimator.TRAINING_BOTH_ORDERS off)")
    args = ap.parse_args(argv)
    if args.one_order:
        import memfit.estimator

        memfit.estimator.TRAINING_BOTH_ORDERS = False
    rows, skipped = [], []
    for rec in load_records(args.records):
        row = score_pair(rec)
        if row is None:
            skipped.append(f"{rec.get('name')} ({rec.get('status')})")
        else:
            rows.append(row)
    s = summarize(rows)
    missed = bars_missed(s)
    if args.json:
        print(json.dumps({"rows": rows, "all": s, "held_out": summarize([r for r in rows if r["holdout"]]),
                          "missed": missed, "skipped": skipped}, indent=1))
    else:
        print(render(rows, skipped))
        print("bars: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
