"""Byte units. memfit computes in bytes; GiB (2**30) and GB (10**9) appear only at the edges."""

from __future__ import annotations

import re

from .errors import JobError, brief

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
    value = float(m.group(1)) * _UNITS[unit]
    if value == float("inf"):  # hundreds of digits: float() says inf, int() would raise OverflowError
        raise JobError(f"the size {brief(text, 40)} is too large to be a size in bytes")
    return int(value)


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


def fmt_gib(n_bytes: float, digits: int = 2) -> str:
    return f"{n_bytes / GiB:.{digits}f} GiB"


_BARE = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*$")


#: A card's memory as a user types it must lie between these: below 1 MiB the size is bytes meant as GiB
#: (``--gpu-memory 80B``), above 1 PiB a typo; no GPU is either.
CARD_MIN = MiB
CARD_MAX = 1 << 50


def parse_card_memory(text: str | int, flag: str = "--gpu-memory") -> int:
    """A card's memory as a user types it: the unit is required (``24GiB`` or ``24GB``), because a bare
    ``24`` could mean GiB, GB or bytes, and a typed size must be a GPU's (1 MiB to 1 PiB). Ints from code
    are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        typed = str(text).strip()
        if _BARE.match(typed):
            raise JobError(f"{flag} {typed} has no unit; write {typed}GiB (2**30 bytes) or "
                           f"{typed}GB (10**9 bytes)")
        if not _SIZE.match(typed):
            raise JobError(f"cannot read the size {text!r} for {flag}; write it with its unit, like 80GiB or 24GB")
        n = parse_bytes(typed)
        if 0 < n < CARD_MIN:
            raise JobError(f"{flag} {typed} is {n:,} bytes, smaller than any GPU; write the size in GiB or GB, "
                           f"like 80GiB or 24GB")
        if n > CARD_MAX:
            raise JobError(f"{flag} {brief(typed, 40)} is more than any GPU holds (over 1 PiB); write the card's "
                           f"memory, like 80GiB or 24GB")
    if n <= 0:
        raise JobError(f"{flag} must be more than 0 bytes; got {text!r}")
    return n
