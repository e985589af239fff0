"""``memfit measure``: run the job for real and show where its memory went.

Parse (``add_parser``), compute (:func:`memfit.measurer.measure`), render (:func:`render`). torch is
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..breakdown import COMPONENT_NOTES, Breakdown
from ..cli import add_job_arguments, job_from_args
from ..units import GiB

__all__ = ["add_parser", "run", "render", "render_sweep"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "measure", help="run the job for real on the GPU (or a tiny one on the CPU) and show its memory",
        description="Build the model with random weights, run the reference training step (or inference) "
                    "and report what PyTorch's allocator saw, by component and phase. Steps after the "
                    "first are the steady state. A job that runs out of memory prints 'does not fit' and "
                    "exits 1.")
    add_job_arguments(p)
    p.add_argument("--steps", type=int, default=3, help="steps to run, the first a warm-up (default 3)")
    p.add_argument("--out", metavar="FILE", help="write the record JSON (job, breakdown, env) to FILE")
    p.add_argument("--json", action="store_true", help="print the Breakdown as JSON")
    p.add_argument("--sweep", choices=("precision",),
                   help="measure once per precision: 32-true, tf32, 16-mixed, bf16-mixed, bf16-true")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU (tiny models only; counts live tensors, no allocator or CUDA context)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..measurer import measure, measure_sweep

    job = job_from_args(args)
    device = "cpu" if args.cpu else None
    progress = not args.json
    if args.sweep:
        results = measure_sweep(job, steps=args.steps, out=args.out, device=device, progress=progress)
        if args.json:
            print(json.dumps([{"label": label, "breakdown": bd.to_dict()} for label, bd in results], indent=1))
        else:
            render_sweep(results)
        return 1 if any(not bd.extras.get("fits", True) for _, bd in results) else 0
    bd = measure(job, steps=args.steps, out=args.out, device=device, progress=progress)
    if args.json:
        print(bd.to_json(indent=1))
    else:
        render(bd)
    if not bd.extras.get("fits", True):
        print(bd.notes[0] if bd.notes else "does not fit", file=sys.stderr if args.json else sys.stdout)
        return 1
    return 0


def _gib(n: float | None, digits: int = 3) -> str:
    return "-" if n is None else f"{n / GiB:.{digits}f}"


def _console():
    from rich.console import Console

    return Console()


def render(bd: Breakdown, console: Any = None) -> None:
    """The component table, the phases and the totals of one measured Breakdown."""
    from rich.table import Table

    console = console or _console()
    ex = bd.extras
    fits = ex.get("fits", True)
    title = f"{bd.model}: measured ({bd.measurement}) on {ex.get('device', '?')}"
    if not fits:
        title += f" - does not fit (out of memory in {ex.get('oom_phase')})"
    t = Table(title=title, box=None)
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("share of peak", justify="right")
    t.add_column("what it is", style="dim")
    peak = bd.peak_allocated_bytes or 1
    d = 3 if peak >= GiB // 10 else 6  # tiny (CPU) runs need more digits to show anything

    def g(n: float | None) -> str:
        return _gib(n, d)

    for name, n in sorted(bd.components.items(), key=lambda kv: -kv[1]):
        if n == 0:
            continue
        t.add_row(name, g(n), f"{100 * n / peak:.1f}%", COMPONENT_NOTES.get(name, ""))
    t.add_row("[b]peak allocated[/b]", f"[b]{g(bd.peak_allocated_bytes)}[/b]", "100.0%",
              f"in {bd.peak_phase}")
    t.add_row("peak reserved", g(bd.peak_reserved_bytes), "",
              f"allocator reserve +{g(bd.reserve_overhead_bytes)} GiB")
    t.add_row("device total", g(bd.device_total_bytes), "",
              "device capacity (out of memory)" if not fits else
              f"what the GPU shows; CUDA context and others +{g(bd.cuda_context_bytes)} GiB")
    console.print(t)
    if bd.phases:
        ph = Table(title="peak allocated by phase", box=None)
        ph.add_column("phase")
        ph.add_column("GiB", justify="right")
        for name, n in bd.phases.items():
            mark = " <- peak" if name == bd.peak_phase else ""
            ph.add_row(name + mark, g(n))
        console.print(ph)
    facts = []
    if ex.get("step_time_s"):
        facts.append(f"step time {ex['step_time_s'] * 1000:.1f} ms (median of {ex['steps'] - ex.get('warmup_steps', 0)})")
    if ex.get("tokens_per_s"):
        facts.append(f"{ex['tokens_per_s']:,.0f} tokens/s")
    facts.append(f"parameters {bd.parameters:,} (trainable {bd.trainable_parameters:,})")
    console.print("; ".join(facts))
    for note in bd.notes:
        console.print(f"note: {note}")


def render_sweep(results: list[tuple[str, Breakdown]], console: Any = None) -> None:
    """One row per precision."""
    from rich.table import Table

    console = console or _console()
    t = Table(title="precision sweep (GiB)", box=None)
    for col in ("precision", "peak allocated", "reserved", "device total", "peak phase", "step ms", "tokens/s"):
        t.add_column(col, justify="left" if col in ("precision", "peak phase") else "right")
    for label, bd in results:
        ex = bd.extras
        if not ex.get("fits", True):
            t.add_row(label, "does not fit", "", "", ex.get("oom_phase", ""), "", "")
            continue
        step = ex.get("step_time_s")
        tps = ex.get("tokens_per_s")
        t.add_row(label, _gib(bd.peak_allocated_bytes), _gib(bd.peak_reserved_bytes), _gib(bd.device_total_bytes),
                  bd.peak_phase, f"{step * 1000:.1f}" if step else "-", f"{tps:,.0f}" if tps else "-")
    console.print(t)
    for label, bd in results:
        if not bd.extras.get("fits", True) and bd.notes:
            console.print(f"{label}: {bd.notes[0]}")
