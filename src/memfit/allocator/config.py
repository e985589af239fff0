"""The allocator's constants, its setting (``PYTORCH_CUDA_ALLOC_CONF``) and the size rules that depend on it.

Pure Python, no torch. Sources (PyTorch, read for facts; the code here is memfit's own):

- ``c10/cuda/CUDACachingAllocator.cpp``, the ``DeviceCachingAllocator`` class, as read from the
  pytorch/pytorch main-branch snapshot 001074d2 (2.x; the torch 2.11 release tag could not be checked out
  here: the repository snapshot is larger than the fetch limit). Functions named below: ``round_size``,
  ``roundup_power2_next_division``, ``get_allocation_size``, ``should_split``.
- ``c10/core/AllocatorConfig.{h,cpp}`` (``AcceleratorAllocatorConfig``, ``ConfigTokenizer``: torch >= 2.9
  moved the device-generic keys there from ``c10/cuda/CUDAAllocatorConfig.cpp``) and
  ``c10/cuda/CUDAAllocatorConfig.h`` (the CUDA-only keys), as shipped in the torch 2.13 headers.

Every constant below is the source's, with its C++ name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MemfitError

__all__ = [
    "AllocatorConfig", "AllocatorConfigError", "round_size", "segment_size", "format_size",
    "MIN_BLOCK_BYTES", "SMALL_REQUEST_BYTES", "SMALL_SEGMENT_BYTES", "LARGE_SEGMENT_BYTES",
    "MIN_LARGE_ALLOC_BYTES", "ROUND_LARGE_BYTES", "ROUNDUP_POWER2_INTERVALS",
]

MiB = 1 << 20

MIN_BLOCK_BYTES = 512
"""``kMinBlockSize``: every block is a multiple of 512 bytes, and at least 512."""
SMALL_REQUEST_BYTES = 1 << 20
"""``kSmallSize``: the largest request served from the small pool (1 MiB)."""
SMALL_SEGMENT_BYTES = 2 << 20
"""``kSmallBuffer``: small requests are packed into 2 MiB segments (and 2 MiB pages when expandable)."""
LARGE_SEGMENT_BYTES = 20 << 20
"""``kLargeBuffer`` / ``large_segment_size()`` default: 1-10 MiB requests share 20 MiB segments (and the
large pool's pages are 20 MiB when expandable)."""
MIN_LARGE_ALLOC_BYTES = 10 << 20
"""``kMinLargeAlloc``: from 10 MiB on, a request gets a segment of its own size."""
ROUND_LARGE_BYTES = 2 << 20
"""``kRoundLarge``: own-size segments are rounded up to 2 MiB."""
ROUNDUP_POWER2_INTERVALS = 16
"""``kRoundUpPowerOfTwoIntervals``: ``roundup_power2_divisions`` has one entry per power-of-two interval
from 1 MiB to 64 GiB (the first also covers everything below 1 MiB, the last everything above 32 GiB)."""
_UNLIMITED = (1 << 64) - 1
"""``std::numeric_limits<size_t>::max()``: max_split_size when it is not set (every block may split)."""


class AllocatorConfigError(MemfitError, ValueError):
    """A ``PYTORCH_CUDA_ALLOC_CONF`` string (or an AllocatorConfig field) PyTorch would reject."""


@dataclass(kw_only=True, slots=True, frozen=True)
class AllocatorConfig:
    """The caching allocator's setting: what ``PYTORCH_CUDA_ALLOC_CONF`` sets (defaults: no variable set)."""

    max_split_size_bytes: int | None = None
    """``max_split_size_mb`` in bytes: cached blocks this large or larger are never split, and requests
    below it never take them. None: unlimited (the default, every block may split)."""
    roundup_power2_divisions: int | tuple[int, ...] = 0
    """``roundup_power2_divisions``: one int for every size, or 16 ints (one per power-of-two interval from
    1 MiB up, see :data:`ROUNDUP_POWER2_INTERVALS`). A request is rounded up to the next 1/n step of its
    power-of-two interval; 0 or 1 disables it (plain 512-byte rounding, the default)."""
    expandable_segments: bool = False
    """``expandable_segments:True``: one virtual segment per pool that grows by mapping pages (2 MiB in the
    small pool, 20 MiB in the large pool) and unmaps fully free pages on ``empty_cache``/before an OOM."""
    garbage_collection_threshold: float = 0.0
    """``garbage_collection_threshold``: with a memory fraction set, once reserved passes this share of the
    allowed memory, unsplit cached large blocks older than average are released before a new segment is
    made (``garbage_collect_cached_blocks``). 0: off (the default)."""
    max_non_split_rounding_bytes: int = LARGE_SEGMENT_BYTES
    """``max_non_split_rounding_mb`` in bytes: a request at or above max_split_size may take an oversize
    cached block only when that block wastes less than this (default ``kLargeBuffer``, 20 MiB)."""
    large_segment_bytes: int = LARGE_SEGMENT_BYTES
    """``large_segment_size_mb`` in bytes (newer torch; 20 MiB default = ``kLargeBuffer``): the segment that
    1-10 MiB requests share, and the large pool's page size when expandable."""
    per_process_memory_fraction: float | None = None
    """``per_process_memory_fraction`` (a CUDA key of newer torch): recorded only; the model's cap is its
    ``capacity_bytes`` (the allowed bytes, ``fraction * device total``)."""
    _divisions: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_split_size_bytes is not None:
            _check_int("max_split_size_bytes", self.max_split_size_bytes)
            if self.max_split_size_bytes < self.large_segment_bytes:
                raise AllocatorConfigError(
                    f"max_split_size must be at least {self.large_segment_bytes // MiB} MiB (PyTorch rejects "
                    f"smaller), got {self.max_split_size_bytes} bytes")
        _check_int("max_non_split_rounding_bytes", self.max_non_split_rounding_bytes)
        _check_int("large_segment_bytes", self.large_segment_bytes)
        if self.large_segment_bytes <= MIN_LARGE_ALLOC_BYTES:
            raise AllocatorConfigError("large_segment_size must be more than 10 MiB (PyTorch rejects smaller)")
        if not isinstance(self.expandable_segments, bool):
            raise AllocatorConfigError("expandable_segments must be True or False")
        g = self.garbage_collection_threshold
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (g == 0 or 0 < g < 1):
            raise AllocatorConfigError(f"garbage_collection_threshold must be in (0.0, 1.0) or 0 (off), got {g!r}")
        f = self.per_process_memory_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1):
            raise AllocatorConfigError(f"per_process_memory_fraction must be in [0, 1], got {f!r}")
        d = self.roundup_power2_divisions
        if isinstance(d, int) and not isinstance(d, bool):
            divisions = (d,) * ROUNDUP_POWER2_INTERVALS
        elif isinstance(d, tuple) and len(d) == ROUNDUP_POWER2_INTERVALS:
            divisions = d
        else:
            raise AllocatorConfigError("roundup_power2_divisions must be one int or 16 ints (one per interval)")
        for v in divisions:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v & (v - 1)):
                raise AllocatorConfigError(f"roundup_power2_divisions must be powers of 2 (or 0), got {v!r}")
        object.__setattr__(self, "_divisions", divisions)

    # ------------------------------------------------------------------------------------------- derived
    @property
    def max_split_size(self) -> int:
        """``max_split_size()``: the bytes from which blocks are oversize (2**64-1 when unlimited)."""
        return _UNLIMITED if self.max_split_size_bytes is None else self.max_split_size_bytes

    def divisions_for(self, size: int) -> int:
        """``roundup_power2_divisions(size)``: the divisions of the power-of-two interval ``size`` is in."""
        index = max(0, size.bit_length() - 1 - 20)  # log2(size) - log2(1 MiB), clamped to [0, 15]
        return self._divisions[min(index, ROUNDUP_POWER2_INTERVALS - 1)]

    @property
    def rounds_power2(self) -> bool:
        """Whether any interval has ``roundup_power2_divisions`` > 1 (else round_size is plain 512 rounding)."""
        return any(v > 1 for v in self._divisions)

    # ------------------------------------------------------------------------------------------- parsing
    @classmethod
    def from_env_string(cls, text: str | None) -> AllocatorConfig:
        """Parse a ``PYTORCH_CUDA_ALLOC_CONF`` value the way torch does (``ConfigTokenizer`` then
        ``AcceleratorAllocatorConfig::parseArgs`` and ``CUDAAllocatorConfig::parseArgs``).

        ``"expandable_segments:True,max_split_size_mb:128"``; ``roundup_power2_divisions`` takes one number
        or a list ``[256:1,512:2,>:4]`` (interval starts in MiB, ``>`` for the rest). Whitespace is
        ignored; ``True``/``False`` are case-sensitive, as in torch. Keys torch accepts that do not change
        the device allocator's bytes (pinned-memory and lock options) are accepted and ignored. Numbers must
        be plain digits (torch's ``stoull`` would also read ``"128abc"`` as 128; memfit refuses it).
        Raises :class:`AllocatorConfigError` (one line) on anything else.
        """
        if text is None or not text.strip():
            return cls()
        tok = _tokenize(text)
        kw: dict = {}
        i = 0
        while i < len(tok):
            key = tok[i]
            if key in (",", ":", "[", "]"):
                raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: expected a key, got {key!r}")
            if key not in _ALL_KEYS:
                raise AllocatorConfigError(
                    f"PYTORCH_CUDA_ALLOC_CONF {text!r}: unrecognized key {key!r} (known: "
                    f"{', '.join(sorted(_MODELLED_KEYS))}, and pinned-memory options)")
            _expect(tok, i + 1, ":", text)
            i += 2
            if i >= len(tok):
                raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} has no value")
            if key == "roundup_power2_divisions":
                value, i = _parse_divisions(tok, i, text)
                kw["roundup_power2_divisions"] = value
            elif key == "max_split_size_mb":
                kw["max_split_size_bytes"] = _mb(tok[i], key, text)
            elif key == "max_non_split_rounding_mb":
                kw["max_non_split_rounding_bytes"] = _mb(tok[i], key, text)
            elif key == "large_segment_size_mb":
                kw["large_segment_bytes"] = _mb(tok[i], key, text)
            elif key == "garbage_collection_threshold":
                kw["garbage_collection_threshold"] = _float(tok[i], key, text)
            elif key == "per_process_memory_fraction":
                kw["per_process_memory_fraction"] = _float(tok[i], key, text)
            elif key == "expandable_segments":
                kw["expandable_segments"] = _bool(tok[i], key, text)
            elif key == "backend":
                if tok[i] != "native":
                    raise AllocatorConfigError(
                        f"PYTORCH_CUDA_ALLOC_CONF {text!r}: backend {tok[i]!r} is not modelled (memfit models "
                        "the native caching allocator only; cudaMallocAsync has no caching pools)")
            elif tok[i] == "[":
                i = _skip_list(tok, i, text)
            elif tok[i] in (",", ":", "]"):
                raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} has no value")
            i += 1
            if i < len(tok):
                _expect(tok, i, ",", text)
                i += 1
                if i >= len(tok):
                    raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: trailing ','")
        # torch checks max_split_size (and max_non_split_rounding) against large_segment_size as parsed so far;
        # the dataclass checks the same bound whatever the key order.
        if "max_non_split_rounding_bytes" in kw and kw["max_non_split_rounding_bytes"] < kw.get(
                "large_segment_bytes", LARGE_SEGMENT_BYTES):
            raise AllocatorConfigError(
                f"PYTORCH_CUDA_ALLOC_CONF {text!r}: max_non_split_rounding_mb must be at least "
                f"{kw.get('large_segment_bytes', LARGE_SEGMENT_BYTES) // MiB}")
        if "max_non_split_rounding_bytes" not in kw and "large_segment_bytes" in kw:
            kw["max_non_split_rounding_bytes"] = kw["large_segment_bytes"]  # its default follows the segment
        return cls(**kw)

    def to_env_string(self) -> str:
        """The ``PYTORCH_CUDA_ALLOC_CONF`` value that sets this config (empty for the defaults)."""
        parts = []
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        if self.max_split_size_bytes is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size_bytes // MiB}")
        if self.max_non_split_rounding_bytes != self.large_segment_bytes:
            parts.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding_bytes // MiB}")
        if self.large_segment_bytes != LARGE_SEGMENT_BYTES:
            parts.append(f"large_segment_size_mb:{self.large_segment_bytes // MiB}")
        if self.garbage_collection_threshold:
            parts.append(f"garbage_collection_threshold:{self.garbage_collection_threshold}")
        d = self._divisions
        if any(d):
            if len(set(d)) == 1:
                parts.append(f"roundup_power2_divisions:{d[0]}")
            else:
                items = ",".join(f"{1 << k}:{v}" for k, v in enumerate(d))
                parts.append(f"roundup_power2_divisions:[{items}]")
        return ",".join(parts)


_MODELLED_KEYS = {
    "max_split_size_mb", "max_non_split_rounding_mb", "garbage_collection_threshold", "roundup_power2_divisions",
    "expandable_segments", "large_segment_size_mb", "per_process_memory_fraction", "backend",
}
_IGNORED_KEYS = {
    # AcceleratorAllocatorConfig::getMutableKeys and CUDAAllocatorConfig::getKeys (torch 2.13 headers) that do
    # not change the device caching allocator's bytes.
    "pinned_use_background_threads", "release_lock_on_cudamalloc", "release_lock_on_hipmalloc",
    "pinned_use_cuda_host_register", "pinned_use_hip_host_register", "graph_capture_record_stream_reuse",
    "pinned_reserve_segment_size_mb", "pinned_num_register_threads", "pinned_free_catch_all",
    "throw_on_cudamalloc_oom", "pinned_max_round_threshold", "pinned_max_cached_size",
}
_ALL_KEYS = _MODELLED_KEYS | _IGNORED_KEYS


def _tokenize(text: str) -> list[str]:
    """``ConfigTokenizer``: ``, : [ ]`` are tokens of their own, whitespace is dropped, the rest are words."""
    out: list[str] = []
    buf: list[str] = []
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append("".join(buf))
                buf = []
            out.append(ch)
        elif not ch.isspace():
            buf.append(ch)
    if buf:
        out.append("".join(buf))
    return out


def _expect(tok: list[str], i: int, want: str, text: str) -> None:
    if i >= len(tok) or tok[i] != want:
        got = tok[i] if i < len(tok) else "the end"
        raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: expected {want!r}, got {got!r}")


def _uint(word: str, key: str, text: str) -> int:
    if not word.isdigit():
        raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} needs a whole number, got {word!r}")
    return int(word)


def _mb(word: str, key: str, text: str) -> int:
    return _uint(word, key, text) * MiB


def _float(word: str, key: str, text: str) -> float:
    try:
        return float(word)
    except ValueError:
        raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} needs a number, got {word!r}") from None


def _bool(word: str, key: str, text: str) -> bool:
    if word not in ("True", "False"):
        raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} must be True or False, got {word!r}")
    return word == "True"


def _skip_list(tok: list[str], i: int, text: str) -> int:
    """``ConfigTokenizer::skipKey`` for list values of ignored keys: the index of the closing ``]``."""
    while i < len(tok) and tok[i] != "]":
        i += 1
    if i >= len(tok):
        raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: '[' without ']'")
    return i


def _parse_divisions(tok: list[str], i: int, text: str) -> tuple[int | tuple[int, ...], int]:
    """``parseRoundUpPower2Divisions``: one value for all intervals, or ``[start_mb:n,...,>:n]``.

    The list form follows torch >= 2.9 exactly: the first entry also fills every interval below it, each
    entry sets the interval its start (a power of two, in MiB) falls in, ``>`` fills every interval after
    the last one set; intervals between two listed starts keep 0 (no rounding), as in torch.
    Returns (value, index of the value's last token).
    """
    key = "roundup_power2_divisions"
    if tok[i] != "[":
        v = _uint(tok[i], key, text)
        if v == 0 or v & (v - 1):
            raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} must be a power of 2, got {v}")
        return v, i
    divisions = [0] * ROUNDUP_POWER2_INTERVALS
    last = 0
    first = True
    i += 1
    while i < len(tok) and tok[i] != "]":
        start = tok[i]
        _expect(tok, i + 1, ":", text)
        if i + 2 >= len(tok):
            raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} entry {start!r} has no value")
        v = _uint(tok[i + 2], key, text)
        if v & (v - 1):
            raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} must be powers of 2 or 0, got {v}")
        if start == ">":
            for k in range(last + 1, ROUNDUP_POWER2_INTERVALS):
                divisions[k] = v
        else:
            b = _uint(start, key, text)
            if b == 0 or b & (b - 1):
                raise AllocatorConfigError(
                    f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} interval starts must be powers of 2 (MiB), got {b}")
            index = min(b.bit_length() - 1, ROUNDUP_POWER2_INTERVALS - 1)
            if first:
                for k in range(index):
                    divisions[k] = v
                first = False
            divisions[index] = v
            last = index
        i += 3
        if i < len(tok) and tok[i] == ",":
            i += 1
    if i >= len(tok):
        raise AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} list has no closing ']'")
    return tuple(divisions), i


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AllocatorConfigError(f"{name} must be a positive whole number of bytes, got {value!r}")


# ------------------------------------------------------------------------------------------------ size rules
def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: ``size`` rounded up to the next of ``divisions`` equal steps between
    the powers of two around it (1200 with 4 divisions: steps 1024, 1280, ... -> 1280); a power of two stays."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def round_size(nbytes: int, config: AllocatorConfig | None = None) -> int:
    """``round_size``: the block size a request of ``nbytes`` takes.

    A multiple of 512 (at least 512); with ``roundup_power2_divisions`` n > 1 for the request's interval,
    and the request over 512 * n bytes, rounded up to the next 1/n step of its power-of-two interval instead.
    """
    if nbytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    if config is not None:
        divisions = config.divisions_for(nbytes)
        if divisions > 1 and nbytes > MIN_BLOCK_BYTES * divisions:
            return _roundup_power2_next_division(nbytes, divisions)
    return MIN_BLOCK_BYTES * ((nbytes + MIN_BLOCK_BYTES - 1) // MIN_BLOCK_BYTES)


def segment_size(size: int, large_segment_bytes: int = LARGE_SEGMENT_BYTES) -> int:
    """``get_allocation_size``: the segment ``cudaMalloc``-ed for a rounded request no cached block fits:
    2 MiB for a small request, 20 MiB for 1-10 MiB, else the request rounded up to 2 MiB."""
    if size <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if size < MIN_LARGE_ALLOC_BYTES:
        return large_segment_bytes
    return ROUND_LARGE_BYTES * ((size + ROUND_LARGE_BYTES - 1) // ROUND_LARGE_BYTES)


def format_size(nbytes: int) -> str:
    """PyTorch's ``format_size`` (used in its OOM message): bytes, KiB, MiB or GiB with two decimals."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    if nbytes <= 1048576:
        return f"{nbytes / 1024:.2f} KiB"
    if nbytes <= 1073741824:
        return f"{nbytes / 1048576:.2f} MiB"
    return f"{nbytes / 1073741824:.2f} GiB"
