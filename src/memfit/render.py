"""Terminal rendering of a Breakdown (rich), kept apart from the numbers."""

from __future__ import annotations

from .breakdown import COMPONENT_NOTES, INFERENCE_NOTES, Breakdown

GiB = 1 << 30
MiB = 1 << 20


def _g(n: float) -> str:
    return f"{n / GiB:,.2f}"


def _size(n: float, unit: str) -> str:
    """``n`` bytes in the table's unit (GiB, or MiB for a small job)."""
    return f"{n / (GiB if unit == 'GiB' else MiB):,.2f}"


def table_unit(bd: Breakdown) -> str:
    """GiB, or MiB when the peak is under 1 GiB (a tiny model's components would all read 0.00 GiB)."""
    return "GiB" if bd.peak_allocated_bytes >= GiB else "MiB"


def header_line(j: dict) -> str:
    """What the job is, in one line: task, method, precision, optimizer, batch, checkpointing, attention,
    and where they apply GPUs and strategy, parallel degrees, offload and quantization."""
    parts = [j["task"], j["method"], j["precision"]]
    if j["task"] == "train":
        parts.append(j["optimizer"])
        parts.append(f"batch {j['batch_size']} × {j['seq_len']}")
    else:
        parts.append(f"batch {j['batch_size']} × prompt {j['prompt_len']} + {j['new_tokens']} new")
    if j.get("gradient_checkpointing") and j["task"] == "train":
        parts.append("checkpointing")
    parts.append(j["attention"])
    if j.get("quantization", "none") != "none":
        parts.append(j["quantization"] + (" + double quant" if j.get("double_quant") else ""))
    gpus = j.get("gpus", 1)
    if gpus > 1 or j.get("strategy", "single") != "single":
        layout = f"{gpus} GPUs · {j['strategy']}"
        for key, tag in (("tensor_parallel", "TP"), ("pipeline_parallel", "PP"), ("expert_parallel", "EP")):
            if j.get(key, 1) > 1:
                layout += f" · {tag} {j[key]}"
        if j.get("offload", "none") != "none":
            layout += f" · offload {j['offload']} to {j.get('offload_device', 'cpu')}"
        parts.append(layout)
    else:
        parts.append("1 GPU")
    return " · ".join(parts)


def breakdown_table(bd: Breakdown):
    from rich.table import Table

    j = bd.job
    what = header_line(j)
    unit = table_unit(bd)
    t = Table(title=f"{bd.engine}: {bd.model} ({bd.parameters / 1e9:.2f} B params)\n{what}", title_justify="left")
    t.add_column("component")
    t.add_column(unit, justify="right")
    t.add_column("share", justify="right")
    t.add_column("what it is", style="dim")
    peak = bd.peak_allocated_bytes or 1
    notes = {**COMPONENT_NOTES, **(INFERENCE_NOTES if j.get("task") == "infer" else {})}
    _g = lambda n: _size(n, unit)  # noqa: E731 - the table's unit
    for name, n in sorted(bd.components.items(), key=lambda kv: -kv[1]):
        t.add_row(name, _g(n), f"{100 * n / peak:.1f}%", notes.get(name, ""))
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
