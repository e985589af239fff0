"""`memfit gpus`: the GPU catalog (name, memory as the driver reports it, dense bf16 FLOP/s, bandwidth)."""

from __future__ import annotations

import argparse
import json
from typing import Any

GiB = 1 << 30


def add_parser(sub: Any) -> None:
    p = sub.add_parser("gpus", help="list the GPU catalog (names for --gpu)",
                       description="The cards memfit knows: use a name (or alias) with --gpu.")
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")
    p.set_defaults(func=run)


def rows() -> list[dict[str, Any]]:
    """One dict per card: name, title, aliases, memory (bytes and GiB), bf16 TFLOP/s, bandwidth TB/s."""
    from ..gpus import all_gpus

    return [{"name": g.name, "title": g.title, "aliases": list(g.aliases), "memory_bytes": g.memory_bytes,
             "memory_gib": round(g.memory_bytes / GiB, 2), "bf16_tflops": g.bf16_flops / 1e12,
             "memory_bandwidth_tb_s": g.memory_bandwidth_bytes_per_s / 1e12} for g in all_gpus()]


def run(args: argparse.Namespace) -> int:
    data = rows()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="GPU catalog (memory: the total the driver reports)", box=None)
    for col, just in (("name", "left"), ("card", "left"), ("memory GiB", "right"), ("bf16 TFLOP/s", "right"),
                      ("bandwidth TB/s", "right"), ("aliases", "left")):
        t.add_column(col, justify=just)
    for r in data:
        t.add_row(r["name"], r["title"], f"{r['memory_gib']:.2f}", f"{r['bf16_tflops']:.0f}" if r["bf16_tflops"] else "-",
                  f"{r['memory_bandwidth_tb_s']:.2f}" if r["memory_bandwidth_tb_s"] else "-", ", ".join(r["aliases"]))
    Console().print(t)
    return 0
