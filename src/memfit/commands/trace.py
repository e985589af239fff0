"""`memfit trace`: the job's real model code on fake tensors (no GPU), as a table, JSON and a chart."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_card_arguments, add_job_command, card_from_args, job_from_args


def add_parser(sub) -> None:
    p = add_job_command(
        sub, "trace", run, help="trace the job's real model code on fake tensors (no GPU, no weights)",
        description="Run the job's model code under PyTorch fake tensors on the CPU, record every allocation "
                    "and free of one steady-state step as CUDA's caching allocator would, and report the "
                    "peak by component with a timeline. Needs: pip install 'memfit[trace]'.")
    p.add_argument("--json", action="store_true", help="print the Breakdown as JSON (timeline in extras)")
    p.add_argument("--plot", metavar="FILE", help="draw the timeline to FILE (.png or .svg; needs matplotlib)")
    p.add_argument("--no-chart", action="store_true", help="leave out the terminal chart of the timeline")
    p.add_argument("--no-fallback", action="store_true",
                   help="fail instead of showing the estimate when the job cannot be traced")
    p.add_argument("--sdpa", choices=("cudnn", "flash"), default=None,
                   help="fused attention kernel torch tries first on the GPU (default cudnn, as torch >= 2.10 with "
                        "cuDNN > 9.15 on an H100)")
    add_card_arguments(p, "the card's memory, with its unit (24GiB or 24GB): run the traced step through the "
                          "caching allocator capped at that card and say whether it fits")


def run(args: argparse.Namespace) -> int:
    from ..tracer import trace

    job = job_from_args(args)
    card = card_from_args(args)
    bd = trace(job, fallback=not args.no_fallback, sdpa=args.sdpa, gpu_memory_bytes=card)
    if bd.engine != "trace":
        print(f"memfit: {bd.notes[0] if bd.notes else 'trace could not run; showing the estimate'}",
              file=sys.stderr)
    if args.plot:
        from ..tracer.plot import plot_timeline

        if bd.extras.get("timeline"):
            try:
                path = plot_timeline(bd, args.plot)
            except ValueError as exc:
                print(f"memfit: error: {exc}", file=sys.stderr)
                return 2
            print(f"timeline drawn to {path}", file=sys.stderr)
        else:
            print("memfit: no timeline to draw (the job was estimated, not traced)", file=sys.stderr)
    v = None
    if card is not None:
        from ..verdict import verdict

        v = verdict(bd, card)
    if args.json:
        print(bd.to_json(indent=1))
        return 0 if v is None or v["fits"] else 1
    from ..render import print_breakdown

    print_breakdown(bd)
    timeline = bd.extras.get("timeline")
    if timeline and not args.no_chart:
        from ..tracer.plot import ascii_timeline

        print()
        print(ascii_timeline(timeline))
    if v is not None:
        from .estimate import fit_line

        print(fit_line(v))
        return 0 if v["fits"] else 1
    return 0
