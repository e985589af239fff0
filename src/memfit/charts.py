"""The breakdown as a chart: a one-line stacked bar in the terminal (rich) and a PNG/SVG (matplotlib).

The page (``memfit web``) draws the same segments and the same green/amber/red rule in its own SVG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import JobError, MissingDependencyError

__all__ = ["bar_segments", "headroom_level", "stacked_bar", "plot_breakdown", "AMBER_FRACTION"]

GiB = 1 << 30
AMBER_FRACTION = 0.10
"""Headroom under this fraction of the card is amber (it fits, but a longer batch or a new allocator
pattern can tip it); below zero is red."""
_COLORS = ["#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5",
           "#9c6b4e", "#9498a0", "#2f4b7c", "#d45087"]
_OVERHEAD_COLORS = {"allocator reserve": "#c3c9d0", "CUDA context": "#5b6570"}


def bar_segments(bd: Any) -> list[tuple[str, int]]:
    """``(name, bytes)`` from the bottom of device memory up: the components at the peak, largest first,
    then the allocator's reserve (reserved - allocated) and the CUDA context (device total - reserved).
    They add up to ``device_total_bytes``."""
    comps = sorted(((k, int(v)) for k, v in bd.components.items() if v > 0), key=lambda kv: -kv[1])
    extra = [("allocator reserve", bd.reserve_overhead_bytes), ("CUDA context", bd.cuda_context_bytes)]
    return comps + [(k, int(v)) for k, v in extra if v > 0]


def headroom_level(bd: Any) -> str | None:
    """``green`` / ``amber`` / ``red`` for the verdict on the card (None without a card): red when it does
    not fit, amber when the headroom is under :data:`AMBER_FRACTION` of the card."""
    if bd.gpu_memory_bytes is None or bd.fits is None:
        return None
    if not bd.fits:
        return "red"
    return "green" if (bd.headroom_bytes or 0) >= AMBER_FRACTION * bd.gpu_memory_bytes else "amber"


def stacked_bar(bd: Any, width: int = 40, line: int = 80):
    """A rich ``Text``: one line of blocks, a segment per component on the scale of max(device total, card),
    the card's end marked ``|`` in the verdict's colour, then the legend's first letters are the component
    names in the same colours, wrapped at ``line`` columns."""
    from rich.text import Text

    segs = bar_segments(bd)
    card = bd.gpu_memory_bytes or 0
    scale = width / max(bd.device_total_bytes, card, 1)
    t = Text()
    drawn, acc = 0, 0
    for i, (name, n) in enumerate(segs):
        acc += n
        cells = round(acc * scale) - drawn
        color = _OVERHEAD_COLORS.get(name, _COLORS[i % len(_COLORS)])
        t.append("█" * cells, style=color)
        drawn += cells
    level = headroom_level(bd)
    if card:
        at = min(width, round(card * scale))
        t.append(" " * max(0, at - drawn))
        t.append("|", style={"green": "green", "amber": "yellow", "red": "red"}.get(level or "", "white"))
        t.append(f" card {card / GiB:.2f} GiB,")
    t.append(f" device total {bd.device_total_bytes / GiB:.2f} GiB\n")
    col = 0
    for i, (name, n) in enumerate(segs):  # wrapped here, between entries, never inside one
        entry = f"{name} {n / GiB:.2f}  "
        if col and col + 2 + len(entry) > line:
            t.append("\n")
            col = 0
        t.append("■ ", style=_OVERHEAD_COLORS.get(name, _COLORS[i % len(_COLORS)]))
        t.append(entry)
        col += 2 + len(entry)
    return t


def plot_breakdown(bd: Any, path: str | Path) -> Path:
    """Draw ``bd`` to ``path`` (``.png`` or ``.svg``): the stacked bar against the card on top, the peak
    by phase underneath (like ``memfit trace --plot`` draws a trace's timeline)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise JobError(f"--plot writes .png or .svg files, not {path.suffix or 'no extension'!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError("matplotlib is not installed; install it with: pip install matplotlib") from exc
    segs = bar_segments(bd)
    phases = list((bd.phases or {}).items())
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 2.4 + 0.35 * max(1, len(phases))), dpi=120,
                                      gridspec_kw={"height_ratios": [1.1, max(1, len(phases)) * 0.45]})
    left = 0.0
    for i, (name, n) in enumerate(segs):
        top.barh(0, n / GiB, left=left, color=_OVERHEAD_COLORS.get(name, _COLORS[i % len(_COLORS)]),
                 label=f"{name} {n / GiB:.2f}")
        left += n / GiB
    card = bd.gpu_memory_bytes
    level = headroom_level(bd)
    if card:
        c = {"green": "#11602a", "amber": "#b07800", "red": "#c01818"}.get(level or "", "#333333")
        top.axvline(card / GiB, color=c, lw=2.5)
        verdict = "fits" if bd.fits else "does not fit"
        top.annotate(f"card {card / GiB:.2f} GiB: {verdict}", (card / GiB, 0.25), xytext=(-4, 0), textcoords="offset points", color=c, fontsize=9, ha="right")
    top.set_xlim(0, max(bd.device_total_bytes, card or 0) / GiB * 1.02)
    top.set_yticks([])
    top.set_xlabel("GiB per GPU at the peak")
    top.legend(loc="upper center", bbox_to_anchor=(0.5, -0.7), ncol=4, fontsize=7, frameon=False)
    job = bd.job or {}
    top.set_title(f"{bd.model}: {job.get('task', '')} {job.get('method', '')} {job.get('precision', '')} "
                  f"batch {job.get('batch_size', '')} - device total {bd.device_total_bytes / GiB:.2f} GiB "
                  f"({bd.engine})", fontsize=10)
    if phases:
        names = [k for k, _ in phases]
        vals = [v / GiB for _, v in phases]
        bottom.barh(names, vals, color=["#ff725c" if k == bd.peak_phase else "#97bbf5" for k in names])
        for y, v in enumerate(vals):
            bottom.annotate(f"{v:.2f}", (v, y), xytext=(3, -3), textcoords="offset points", fontsize=8)
        bottom.invert_yaxis()
        bottom.set_xlabel("peak allocated GiB by phase")
    else:
        bottom.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
