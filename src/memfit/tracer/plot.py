"""Drawing a trace's timeline: a terminal chart (no dependencies) and a PNG/SVG (matplotlib).

The timeline is ``Breakdown.extras["timeline"]``: ``[event, phase, allocated_bytes]`` points of the measured
step, at most 2000, each the highest of its stretch (so the peak is in it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import MissingDependencyError

__all__ = ["ascii_timeline", "plot_timeline", "phase_spans"]

GiB = 1 << 30
_LEVELS = " ▁▂▃▄▅▆▇█"
_PHASE_COLORS = {"forward": "#4C78A8", "backward": "#F58518", "optimizer_step": "#54A24B", "prefill": "#4C78A8",
                 "decode": "#B279A2", "end": "#BAB0AC", "load": "#BAB0AC"}


def phase_spans(timeline: Sequence[Sequence[Any]]) -> list[tuple[str, int, int]]:
    """``(phase, first index, last index)`` runs of the timeline's points."""
    spans: list[tuple[str, int, int]] = []
    for i, (_, phase, _) in enumerate(timeline):
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], i)
        else:
            spans.append((phase, i, i))
    return spans


def _resample(values: Sequence[int], width: int) -> list[int]:
    """``width`` columns, each the highest value of its stretch."""
    n = len(values)
    if n <= width:
        return list(values)
    out = []
    for c in range(width):
        lo = c * n // width
        hi = max((c + 1) * n // width, lo + 1)
        out.append(max(values[lo:hi]))
    return out


def ascii_timeline(timeline: Sequence[Sequence[Any]], *, width: int = 72, height: int = 8,
                   title: str = "allocated memory through the step") -> str:
    """A block-character chart of allocated GiB over the step, phases underneath, the peak marked."""
    if not timeline:
        return ""
    values = [int(p[2]) for p in timeline]
    phases = [str(p[1]) for p in timeline]
    cols = _resample(values, width)
    n, w = len(values), len(cols)
    col_phase = []
    for c in range(w):
        lo = c * n // w if n > w else c
        hi = max((c + 1) * n // w, lo + 1) if n > w else c + 1
        col_phase.append(phases[max(range(lo, hi), key=values.__getitem__)])
    top = max(cols) or 1
    bottom = min(cols)
    unit, unit_name = (GiB, "GiB") if top >= GiB else (1 << 20, "MiB")
    # Show the top of the range in detail: weights and states sit under everything as a flat floor.
    floor = bottom * 0.9 if bottom > 0.5 * top else 0.0
    span = (top - floor) or 1
    peak_col = max(range(w), key=cols.__getitem__)
    rows = []
    for r in range(height, 0, -1):
        line = []
        for v in cols:
            level = (v - floor) / span * height - (r - 1)
            line.append(_LEVELS[max(0, min(8, int(round(level * 8))))] if level < 1 else "█")
        if r == height:
            label = f"{top / unit:7.2f} "
        elif r == 1:
            label = f"{floor / unit:7.2f} "
        elif r == (height + 1) // 2:
            label = f"{(floor + span * (r - 0.5) / height) / unit:7.2f} "
        else:
            label = " " * 8
        rows.append(label + "│" + "".join(line))
    axis = " " * 8 + "└" + "─" * w
    text = f"peak {top / unit:.2f} {unit_name} ({col_phase[peak_col]})"
    if peak_col + len(text) + 2 <= w:
        marker = " " * 9 + " " * peak_col + "▲ " + text
    else:
        marker = " " * 9 + " " * max(0, peak_col - len(text) - 1) + text + " ▲"
    legend_chars = {}
    band = []
    for ph in col_phase:
        ch = legend_chars.setdefault(ph, _phase_letter(ph, legend_chars))
        band.append(ch)
    legend = "  ".join(f"{ch}={ph}" for ph, ch in legend_chars.items())
    head = f"{title} ({unit_name}, axis from {floor / unit:.2f})" if floor else f"{title} ({unit_name})"
    return "\n".join([head, *rows, axis, " " * 9 + "".join(band), marker, " " * 9 + legend])


def _phase_letter(phase: str, taken: dict[str, str]) -> str:
    used = set(taken.values())
    for ch in (phase[:1].upper(), phase[:1].lower(), *"XYZQRSTUVW"):
        if ch and ch not in used:
            return ch
    return "?"


def plot_timeline(bd: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``bd``'s timeline to ``path`` (``.png`` or ``.svg``), phases shaded and the peak marked."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"--plot writes .png or .svg files, not {path.suffix or 'no extension'!r}")
    timeline = bd.extras.get("timeline") if hasattr(bd, "extras") else None
    if not timeline:
        raise ValueError("this Breakdown has no timeline to draw (only trace results have one)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError("matplotlib is not installed; install it with: pip install matplotlib") from exc
    xs = [p[0] for p in timeline]
    ys = [p[2] / GiB for p in timeline]
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=120)
    for phase, i0, i1 in phase_spans(timeline):
        x1 = xs[i1 + 1] if i1 + 1 < len(xs) else xs[i1]
        ax.axvspan(xs[i0], x1, color=_PHASE_COLORS.get(phase, "#DDDDDD"), alpha=0.12, lw=0)
    seen: set[str] = set()
    for phase, i0, i1 in phase_spans(timeline):
        label = phase if phase not in seen else None
        seen.add(phase)
        seg = slice(i0, min(i1 + 2, len(xs)))
        ax.plot(xs[seg], ys[seg], color=_PHASE_COLORS.get(phase, "#333333"), lw=1.4, label=label,
                drawstyle="steps-post")
    k = max(range(len(ys)), key=ys.__getitem__)
    ax.plot([xs[k]], [ys[k]], marker="v", color="#D62728", ms=8)
    ax.annotate(f"peak {ys[k]:.2f} GiB ({timeline[k][1]})", (xs[k], ys[k]), textcoords="offset points",
                xytext=(6, 8), color="#D62728", fontsize=9)
    reserved = getattr(bd, "peak_reserved_bytes", 0)
    if reserved and reserved > bd.peak_allocated_bytes:
        ax.axhline(reserved / GiB, color="#7F7F7F", ls="--", lw=1)
        ax.annotate(f"peak reserved {reserved / GiB:.2f} GiB", (xs[0], reserved / GiB), textcoords="offset points",
                    xytext=(2, 3), color="#7F7F7F", fontsize=8)
    job = getattr(bd, "job", {}) or {}
    ax.set_title(title or f"{bd.model}: {job.get('task', '')} {job.get('precision', '')} - allocated memory "
                          f"through the step ({bd.engine})", fontsize=10)
    ax.set_xlabel("allocation event")
    ax.set_ylabel("GiB allocated")
    ax.set_ylim(bottom=0, top=max(max(ys), reserved / GiB if reserved else 0) * 1.08)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
