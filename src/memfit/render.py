"""Terminal rendering of a Breakdown (rich), kept apart from the numbers."""

from __future__ import annotations

from .breakdown import COMPONENT_NOTES, Breakdown

GiB = 1 << 30


def _g(n: float) -> str:
    return f"{n / GiB:,.2f}"


def breakdown_table(bd: Breakdown):
    from rich.table import Table

    j = bd.job
    what = (f"{j['task']} · {j['method']} · {j['precision']}"
            + (f" · {j['optimizer']}" if j["task"] == "train" else "")
            + (f" · batch {j['batch_size']} × {j['seq_len']}" if j["task"] == "train"
               else f" · batch {j['batch_size']} × prompt {j['prompt_len']} + {j['new_tokens']} new")
            + (" · checkpointing" if j.get("gradient_checkpointing") and j["task"] == "train" else "")
            + f" · {j['attention']}")
    t = Table(title=f"{bd.engine}: {bd.model} ({bd.parameters / 1e9:.2f} B params)\n{what}", title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    t.add_column("what it is", style="dim")
    peak = bd.peak_allocated_bytes or 1
    for name, n in sorted(bd.components.items(), key=lambda kv: -kv[1]):
        t.add_row(name, _g(n), f"{100 * n / peak:.1f}%", COMPONENT_NOTES.get(name, ""))
    t.add_section()
    t.add_row("peak allocated", _g(bd.peak_allocated_bytes), "100.0%", f"at {bd.peak_phase} (torch.cuda.max_memory_allocated)")
    t.add_row("+ allocator reserve", _g(bd.reserve_overhead_bytes), "", "cached, fragmented blocks")
    t.add_row("peak reserved", _g(bd.peak_reserved_bytes), "", "torch.cuda.max_memory_reserved")
    t.add_row("+ CUDA context", _g(bd.cuda_context_bytes), "", "context and kernels, outside the allocator")
    t.add_row("device total", _g(bd.device_total_bytes), "", "what nvidia-smi shows")
    return t


def print_breakdown(bd: Breakdown, console=None) -> None:
    from rich.console import Console

    c = console or Console()
    c.print(breakdown_table(bd))
    if bd.phases:
        c.print("peak by phase: " + ", ".join(f"{k} {_g(v)} GiB" for k, v in bd.phases.items()))
    if bd.host_bytes:
        c.print(f"host memory: {_g(bd.host_bytes)} GiB")
    if getattr(bd, "nvme_bytes", 0):
        c.print(f"NVMe swap: {_g(bd.nvme_bytes)} GiB per node")
    for note in bd.notes:
        c.print(f"note: {note}")
