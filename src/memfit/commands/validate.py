"""`memfit validate`: score the estimate (or trace) against the measured records."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="score an engine against measured records (validation/records)")
    p.add_argument("records", nargs="?", default="validation/records", help="folder of record files")
    p.add_argument("--engine", choices=("estimate", "trace"), default="estimate")
    p.add_argument("--check", action="store_true", help="exit 1 when an accuracy bar is missed")
    p.add_argument("--calibrate", action="store_true", help="print fitted runtime constants (not held-out runs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import MemfitError
    from ..validate import calibrate, check_bars, load_records, score, summarize

    if not Path(args.records).exists():
        raise MemfitError(f"no records at {args.records!r}; pass the folder that holds the measured JSON records")
    rows = score(load_records(args.records), args.engine)
    if not rows:
        raise MemfitError(f"no measured records under {args.records!r}")
    summary = summarize(rows)
    failures = check_bars(summary, args.engine)
    if args.json:
        print(json.dumps({"rows": [{"name": r.name, "group": r.group, "holdout": r.holdout,
                                    "measured": r.measured.peak_allocated_bytes,
                                    "predicted": r.predicted.peak_allocated_bytes if r.predicted else None,
                                    "error": r.err_alloc if r.predicted else None} for r in rows],
                          "summary": summary, "failures": failures}, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{args.engine} vs measured ({len(rows)} runs)", title_justify="left")
        for col in ("run", "group", "measured GiB", f"{args.engine} GiB", "error", "phase m/e",
                    "total m GiB", "total e GiB", "error"):
            t.add_column(col, justify="left" if col in ("run", "group", "phase m/e") else "right")
        for r in sorted(rows, key=lambda r: (r.group, r.name)):
            m = r.measured
            if not r.predicted:
                t.add_row(r.name, r.group, f"{m.peak_allocated_bytes / 2**30:.2f}", "-", r.error[:40], "", "", "", "")
                continue
            p = r.predicted
            t.add_row(r.name + (" *" if r.holdout else ""), r.group, f"{m.peak_allocated_bytes / 2**30:.2f}",
                      f"{p.peak_allocated_bytes / 2**30:.2f}", f"{r.err_alloc:+.1%}",
                      f"{m.peak_phase}/{p.peak_phase}", f"{m.device_total_bytes / 2**30:.2f}",
                      f"{p.device_total_bytes / 2**30:.2f}", f"{r.err_total:+.1%}")
        c = Console(width=160)
        c.print(t)
        c.print("* held out: never used to calibrate a constant")
        for label, s in summary.items():
            c.print(f"{label:22s} runs {s['runs']:3d}  peak allocated |error|: median {s['median']:.1%}  "
                    f"p90 {s['p90']:.1%}  worst {s['worst']:.1%}   reserved: median {s['reserved_median']:.1%}  "
                    f"worst {s['reserved_worst']:.1%}   device total: median {s['total_median']:.1%}  "
                    f"worst {s['total_worst']:.1%}")
        if args.calibrate:
            c.print("calibration (not held out):", calibrate(rows))
        for f in failures:
            c.print(f"[red]bar missed[/red]: {f}")
        if not failures:
            c.print("all accuracy bars met")
    return 1 if (failures and args.check) else 0
