"""Byte units. memfit computes in bytes; GiB (2**30) and GB (10**9) appear only at the edges."""

from __future__ import annotations

import re

from .errors import JobError

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
GB = 10**9

_UNITS = {
    "b": 1, "": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse ``"80GiB"``, ``"80 GB"``, ``"24g"`` (GiB) or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise JobError(f"cannot read the size {text!r}; write it like 80GiB, 24GB or 1000000 (bytes)")
    unit = m.group(2).lower()
    if unit in ("g", "m", "k", "t"):  # bare letters are binary, as nvidia-smi and most users mean
        unit += "ib"
    if unit not in _UNITS:
        raise JobError(f"unknown size unit {m.group(2)!r} in {text!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")
    return int(float(m.group(1)) * _UNITS[unit])


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


def fmt_gib(n_bytes: float, digits: int = 2) -> str:
    return f"{n_bytes / GiB:.{digits}f} GiB"


_BARE = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*$")


def parse_card_memory(text: str | int, flag: str = "--gpu-memory") -> int:
    """A card's memory as a user types it: the unit is required (``24GiB`` or ``24GB``), because a bare
    ``24`` could mean GiB, GB or bytes. Ints from code are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        if _BARE.match(str(text)):
            raise JobError(f"{flag} {str(text).strip()} has no unit; write {str(text).strip()}GiB (2**30 bytes) or "
                           f"{str(text).strip()}GB (10**9 bytes)")
        n = parse_bytes(text)
    if n <= 0:
        raise JobError(f"{flag} must be more than 0 bytes; got {text!r}")
    return n
