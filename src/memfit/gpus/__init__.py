"""The GPU catalog: memory, dense FLOP/s, memory bandwidth and links of common cards, kept as data.

``catalog.json`` beside this file holds one entry per card with its source. Memory is what the driver
reports as the card's total (``cudaMemGetInfo`` / ``torch.cuda.mem_get_info()[1]``), which is a little less
than the marketing size; the planner's step-time model reads the FLOP/s and bandwidth.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import JobError

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["GPU", "get_gpu", "all_gpus"]

_CATALOG = os.path.join(os.path.dirname(__file__), "catalog.json")  # (os.path: no pathlib at start-up)


@dataclass(frozen=True, kw_only=True)
class GPU:
    """One card. Rates are dense (no sparsity), per GPU."""

    name: str
    """Catalog key, e.g. ``h100-80gb``."""
    title: str
    """What people call it, e.g. ``NVIDIA H100 80GB HBM3 (SXM)``."""
    vendor: str
    memory_bytes: int
    """Total device memory as the driver reports it."""
    aliases: tuple[str, ...] = ()
    bf16_flops: float = 0.0
    fp16_flops: float = 0.0
    tf32_flops: float = 0.0
    fp32_flops: float = 0.0
    fp8_flops: float = 0.0
    """0 means the card has no native support for that format."""
    int8_ops: float = 0.0
    memory_bandwidth_bytes_per_s: float = 0.0
    interconnect: str = ""
    """``nvlink4``, ``pcie4``, ``infinity-fabric``..."""
    interconnect_bytes_per_s: float = 0.0
    """GPU-to-GPU bandwidth per direction inside a node."""
    pcie_bytes_per_s: float = 0.0
    """Host link bandwidth per direction (offload traffic)."""
    source: str = ""
    memory_reported: bool = True
    """False where ``memory_bytes`` is nominal (derived, not read off a driver report)."""
    memory_source: str = ""
    """Where ``memory_bytes`` comes from."""
    extras: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _load() -> dict[str, GPU]:
    with open(_CATALOG, encoding="utf-8") as f:
        data = json.load(f)
    out: dict[str, GPU] = {}
    for entry in data["gpus"]:
        gpu = GPU(**{**entry, "aliases": tuple(entry.get("aliases", ()))})
        out[gpu.name] = gpu
    return out


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def all_gpus() -> list[GPU]:
    """Every card in the catalog, in catalog order."""
    return list(_load().values())


def get_gpu(name: str) -> GPU:
    """The card called ``name`` (catalog key or alias, case and punctuation ignored)."""
    if not isinstance(name, str) or not name.strip():
        raise JobError("gpu must be a card name from `memfit gpus` (e.g. h100-80gb, rtx-4090)")
    cat = _load()
    key = _norm(name)
    for gpu in cat.values():
        if key == _norm(gpu.name) or any(key == _norm(a) for a in gpu.aliases):
            return gpu
    import difflib

    close = difflib.get_close_matches(name.lower(), list(cat), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise JobError(f"unknown GPU {name!r}{hint} (`memfit gpus` lists the catalog, or give --gpu-memory 24GiB)")
