"""`memfit compare`: estimate, trace and a measurement side by side, component by component."""

from __future__ import annotations

import argparse
import json

from ..cli import add_job_command, job_from_args


def add_parser(sub) -> None:
    p = add_job_command(sub, "compare", run, help="estimate vs trace vs measured, per component",
                        description="Put the engines' Breakdowns side by side so a gap points at the term that is "
                                    "wrong.")
    p.add_argument("--measured", metavar="RECORD", help="a measurement record (memfit measure --out, or a "
                   "validation records file with --name); its job is used when no job is given")
    p.add_argument("--name", help="pick this run from a records file that holds a list")
    p.add_argument("--trace", action="store_true", help="add the trace engine (needs memfit[trace])")
    p.add_argument("--json", action="store_true")


def _load_record(path: str, name: str | None) -> dict:
    from pathlib import Path

    from ..errors import MemfitError

    p = Path(path)
    if not p.is_file():
        raise MemfitError(f"record file {path!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MemfitError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, list):
        pick = [r for r in data if isinstance(r, dict)
                and (name is None or r.get("name") == name or r.get("label") == name)]
        if len(pick) != 1 or "breakdown" not in pick[0]:
            names = ", ".join(str(r.get("name") or r.get("label")) for r in data if isinstance(r, dict))[:300]
            raise MemfitError(f"{path} holds {len(data)} records; pick one with --name (one of: {names})")
        data = pick[0]
    if not isinstance(data, dict) or "breakdown" not in data or "job" not in data:
        raise MemfitError(f"{path} is not a measurement record (no job/breakdown)")
    return data


#: Components a measurement cannot tell apart from the activations (measure names what it can count
#: exactly and calls the rest of the peak activations: the logits are in there).
_FOLDED_INTO_ACTIVATIONS = ("logits_and_loss",)


def attribute_alike(engines: dict) -> list[str]:
    """Fold components into ``activations`` in every engine where any engine lumps them there, so each row
    compares like with like (a measured run counts the logits in its activations; the estimate and the
    trace name them apart). Changes the Breakdowns in place; returns a note per folded component."""
    notes = []
    for name in _FOLDED_INTO_ACTIVATIONS:
        has = [name in bd.components for bd in engines.values()]
        if any(has) and not all(has):
            for bd in engines.values():
                if name in bd.components:
                    bd.components["activations"] = bd.components.get("activations", 0) + bd.components.pop(name)
            missing = [e for e, h in zip(engines, has) if not h]
            notes.append(f"{name} counted in activations for every engine ({', '.join(missing)} does not "
                         "separate them)")
    return notes


def compare_rows(engines: dict) -> list[tuple[str, list[int | None]]]:
    names = []
    for bd in engines.values():
        for k in bd.components:
            if k not in names:
                names.append(k)
    rows = [(k, [bd.components.get(k, 0) for bd in engines.values()]) for k in names]
    for total in ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes"):
        rows.append((total.replace("_bytes", ""), [getattr(bd, total) for bd in engines.values()]))
    return rows


def run(args: argparse.Namespace) -> int:
    from ..breakdown import Breakdown
    from ..estimator import estimate
    from ..job import Job

    record = _load_record(args.measured, args.name) if args.measured else None
    if args.model or args.job:
        job = job_from_args(args)
    elif record:
        job = Job.from_dict(record["job"])
    else:
        job = job_from_args(args)  # raises the "name a model" error
    engines = {"estimate": estimate(job)}
    if args.trace:
        from ..tracer import trace

        engines["trace"] = trace(job)
    if record:
        engines["measured"] = Breakdown.from_dict(record["breakdown"])
    folded = attribute_alike(engines)
    rows = compare_rows(engines)
    if args.json:
        print(json.dumps({"job": job.to_dict(), "engines": list(engines), "notes": folded,
                          "rows": {k: v for k, v in rows}, "peak_phase": {e: b.peak_phase for e, b in engines.items()}},
                         indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{job.model}: {', '.join(engines)}", title_justify="left")
    t.add_column("component")
    for e in engines:
        t.add_column(f"{e} GiB", justify="right")
    ref = "measured" if "measured" in engines else None
    if ref:
        for e in engines:
            if e != ref:
                t.add_column(f"{e} - measured", justify="right")
    keys = list(engines)
    for i, (name, vals) in enumerate(rows):
        if name == "peak_allocated":
            t.add_section()
        cells = [f"{v / 2**30:.2f}" for v in vals]
        if ref:
            m = vals[keys.index(ref)]
            for e, v in zip(keys, vals):
                if e != ref:
                    cells.append(f"{(v - m) / 2**30:+.2f}" + (f" ({(v - m) / m:+.1%})" if m else ""))
        t.add_row(name, *cells)
    c = Console()
    c.print(t)
    c.print("peak phase: " + ", ".join(f"{e} {b.peak_phase}" for e, b in engines.items()))
    for note in folded:
        c.print(f"note: {note}")
    return 0
