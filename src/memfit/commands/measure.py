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
from ..cli import add_card_arguments, add_job_command, card_from_args, job_from_args, whole
from ..units import GiB

__all__ = ["add_parser", "run", "render", "render_sweep"]

#: Most steps one measurement runs: the steady state shows after the warm-up; beyond this a typo (10**20)
#: would run until interrupted.
MAX_STEPS = 10_000


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_job_command(
        subparsers, "measure", run,
        help="run the job for real on the GPU (or a tiny one on the CPU) and show its memory",
        description="Build the model with random weights, run the reference training step (or inference) "
                    "and report what PyTorch's allocator saw, by component and phase. Steps after the "
                    "first are the steady state. A job that runs out of memory prints 'does not fit' and "
                    "exits 1.")
    p.add_argument("--steps", type=whole(1, MAX_STEPS), default=3,
                   help="steps to run, the first a warm-up (default 3)")
    p.add_argument("--out", metavar="FILE", help="write the record JSON (job, breakdown, env) to FILE")
    p.add_argument("--json", action="store_true", help="print the Breakdown as JSON")
    p.add_argument("--sweep", choices=("precision",),
                   help="measure once per precision: 32-true, tf32, 16-mixed, bf16-mixed, bf16-true")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU (tiny models only; counts live tensors, no allocator or CUDA context)")
    add_card_arguments(p, "rehearse a card of this size on this GPU (24GiB or 24GB): the allocator is capped at "
                          "the card less this process's CUDA context")
    p.add_argument("--find-max-batch", action="store_true", dest="find_max_batch",
                   help="with --gpu/--gpu-memory: find the largest micro-batch that really runs (double, then bisect)")
    p.add_argument("--start", type=whole(1), default=None,
                   help="--find-max-batch: batch size to begin the search at (a hint; the answer is still proven)")
    p.add_argument("--limit", type=whole(1), default=4096, help="--find-max-batch: largest batch to try (default 4096)")
    p.add_argument("--no-fresh-check", action="store_false", dest="fresh_check",
                   help="--find-max-batch: keep the search's answer; by default the search runs in a worker process "
                        "and its boundary is then checked by fresh processes, one batch each (a trial after an "
                        "out-of-memory failure in the search's process can run where a fresh run of the job fails)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..measurer import measure, measure_sweep

    job = job_from_args(args)
    card = check_card_arguments(args)
    device = "cpu" if args.cpu else None
    progress = not args.json
    if args.find_max_batch:
        return run_find(job, card, args)
    if args.sweep:
        results = measure_sweep(job, steps=args.steps, out=args.out, device=device, progress=progress)
        if args.json:
            print(json.dumps([{"label": label, "breakdown": bd.to_dict()} for label, bd in results], indent=1))
        else:
            render_sweep(results)
        return 1 if any(not bd.extras.get("fits", True) for _, bd in results) else 0
    bd = measure(job, steps=args.steps, out=args.out, device=device, progress=progress, gpu_memory_bytes=card)
    if args.json:
        print(bd.to_json(indent=1))
    else:
        render(bd)
    if not bd.extras.get("fits", True):
        print(bd.notes[0] if bd.notes else "does not fit", file=sys.stderr if args.json else sys.stdout)
        return 1
    return 0


def check_card_arguments(args: argparse.Namespace) -> int | None:
    """The card's bytes, after checking the flags that go with it (no torch, no GPU needed)."""
    from ..errors import MemfitError

    card = card_from_args(args)
    if card is not None and args.cpu:
        raise MemfitError("--gpu/--gpu-memory rehearse a card on a CUDA GPU; drop --cpu (or drop the card)")
    if card is not None and args.sweep:
        raise MemfitError("--sweep does not rehearse a card; drop --gpu/--gpu-memory or --sweep")
    if args.find_max_batch and card is None:
        raise MemfitError("--find-max-batch needs a card: add --gpu NAME or --gpu-memory 24GiB")
    if args.start is not None and not args.find_max_batch:
        raise MemfitError("--start is the batch size --find-max-batch begins at; add --find-max-batch")
    if not getattr(args, "fresh_check", True) and not args.find_max_batch:
        raise MemfitError("--no-fresh-check is an option of --find-max-batch; add --find-max-batch")
    if args.start is not None and args.start < 1:
        raise MemfitError(f"--start must be a batch size >= 1; got {args.start}")
    if args.limit < 1:
        raise MemfitError(f"--limit must be a batch size >= 1; got {args.limit}")
    return card


def run_find(job: Any, card: int, args: argparse.Namespace) -> int:
    """``--find-max-batch``: search, then print the trials and the answer (or the JSON result)."""
    from ..measurer import find_max_batch

    def progress(t: dict[str, Any]) -> None:
        if not args.json:
            print(f"  batch {t['batch_size']:>5}: {'runs' if t['ok'] else 'out of memory'} "
                  f"(peak reserved {t['peak_reserved_bytes'] / GiB:.2f} GiB, {t['seconds']:.1f} s)", flush=True)

    steps = args.steps if args.steps != 3 else None  # 3 is measure's default; the search's own is 2 / 1
    if getattr(args, "fresh_check", True):
        return _run_find_fresh(job, card, args, steps)
    res = find_max_batch(job, card, start=args.start, steps=steps, limit=args.limit, on_trial=progress)
    if args.out:
        from ..measurer.env import environment
        from ..measurer.record import make_boundary_record, write_json

        write_json(args.out, make_boundary_record(job, card, res, environment("cuda")))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _print_card(card, res)
        print(res.get("note", ""))
    return 0 if res.get("max_batch_size") else 1


def _print_card(card: int, res: dict[str, Any]) -> None:
    ctx = res["card"]
    print(f"card {card / GiB:.2f} GiB: CUDA context {ctx['cuda_context_bytes'] / GiB:.2f} GiB, allocator capped "
          f"at {ctx['allocator_limit_bytes'] / GiB:.2f} GiB (expandable_segments "
          f"{res['allocator_setting']['expandable_segments']})")


def _run_find_fresh(job: Any, card: int, args: argparse.Namespace, steps: int | None) -> int:
    """``--find-max-batch`` with the fresh check (:func:`memfit.measurer.fresh.confirmed_max_batch`)."""
    from ..measurer.fresh import confirmed_max_batch
    from ..measurer.record import write_json

    def progress(t: dict[str, Any]) -> None:
        if not args.json:
            extra = (f"peak reserved {t['peak_reserved_bytes'] / GiB:.2f} GiB, "
                     if t.get("peak_reserved_bytes") is not None else "")
            print(f"  batch {t['batch_size']:>5}: {'runs' if t['ok'] else 'out of memory'} ({extra}"
                  f"{t['seconds']:.1f} s)", flush=True)

    def fresh(t: dict[str, Any]) -> None:
        if not args.json:
            print(f"  batch {t['batch_size']:>5}: {'runs' if t['ok'] else 'out of memory'} in a fresh process",
                  flush=True)

    if not args.json:
        print("searching in a worker process, then checking the boundary in fresh ones (--no-fresh-check skips it)")
    rec = confirmed_max_batch(job, card, start=args.start, steps=steps, limit=args.limit, on_trial=progress,
                              on_fresh=fresh)
    if args.out:
        write_json(args.out, rec)
    fm = rec.get("find_max_batch") or {}
    best, searched = rec.get("max_batch_size"), rec.get("search_max_batch_size")
    if best == searched:
        runs = len(rec.get("fresh_trials", ()))
        how = (f" (confirmed by {runs} fresh run{'s' * (runs != 1)})" if runs and not rec.get("fresh_error")
               else "" if rec.get("fresh_error") else " (every trial's verdict is a clean one)")
        line = f"largest micro-batch that runs: {best}{how}"
    else:
        line = (f"largest micro-batch that runs: {best} (the search's process ran {searched}, after an out-of-memory "
                "failure there; fresh processes decide)")
    if args.json:  # the in-process search's result (find_max_batch's keys), with the fresh check's
        out = dict(fm, max_batch_size=best, boundary=rec.get("breakdown"))
        if fm.get("model_fits", True) and best:
            out["note"] = line  # the search's own note names its answer, which the fresh runs may have moved
        for k in ("search_max_batch_size", "fresh_trials", "fresh_settled", "fresh_error"):
            out[k] = rec.get(k)
        print(json.dumps(out, indent=1))
        return 0 if best else 1
    if fm.get("card"):
        _print_card(card, fm)
    if not fm.get("model_fits", True):
        print(fm.get("note", "the model itself does not fit on this card"))
    else:
        print(line)
    if rec.get("fresh_error"):
        print(f"note: a fresh run gave no verdict ({rec['fresh_error']}); the answer is the largest batch seen to run")
    elif not rec.get("fresh_settled", True):
        print("note: the fresh runs stopped before both sides of the boundary were checked; the answer is the "
              "largest batch seen to run")
    return 0 if best else 1


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
    card = ex.get("card")
    if card and bd.gpu_memory_bytes:
        verdict = "FITS" if fits else "DOES NOT FIT"
        room = f", headroom {bd.headroom_bytes / GiB:.2f} GiB" if bd.headroom_bytes is not None else ""
        console.print(f"rehearsed card {bd.gpu_memory_bytes / GiB:.2f} GiB: {verdict}{room} (CUDA context "
                      f"{card['cuda_context_bytes'] / GiB:.2f} GiB, allocator capped at "
                      f"{card['allocator_limit_bytes'] / GiB:.2f} GiB)")
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
