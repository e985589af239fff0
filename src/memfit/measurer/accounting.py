"""Bytes by what they are: weights, LoRA adapters, quantization state, gradients, optimizer states, inputs.

Every sum here counts a storage once (views, tied weights and shared tables share one) and only storages on
the measured device: a tensor PyTorch keeps on the host (AdamW's ``step`` counters unless ``capturable``)
is not device memory. Zero-dimensional optimizer-state tensors (the ``step`` counters) are left out of
``optimizer_states`` on every device, so a CPU run and a GPU run name the same bytes; the few bytes they
take on a CPU run fall into the remainder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["StorageSet", "ModelBytes", "model_bytes", "gradient_bytes", "optimizer_state_bytes",
           "tensor_bytes", "count_parameters"]


def _on_device(t: Any, device: Any) -> bool:
    dev = t.device
    if dev.type != device.type:
        return False
    return device.index is None or dev.index is None or dev.index == device.index


@dataclass
class StorageSet:
    """Distinct storages on one device and their bytes."""

    device: Any
    seen: set[int] = field(default_factory=set)

    def add(self, t: Any) -> int:
        """Count ``t``'s storage if it is new on the device; return the bytes added."""
        if t is None or not _on_device(t, self.device):
            return 0
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
            return 0
        n = st.nbytes()
        key = st.data_ptr()
        if n == 0 or key in self.seen:
            return 0
        self.seen.add(key)
        return n

    def add_all(self, tensors: Iterable[Any]) -> int:
        return sum(self.add(t) for t in tensors)


def tensor_bytes(tensors: Iterable[Any], device: Any, exclude: StorageSet | None = None) -> int:
    """Bytes of the distinct storages of ``tensors`` on ``device``, skipping those ``exclude`` holds."""
    s = StorageSet(device, set(exclude.seen) if exclude is not None else set())
    return s.add_all(tensors)


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _quant_state_tensors(model: Any) -> list[Any]:
    """Tensors bitsandbytes keeps beside quantized weights: 4-bit absmax/code (and the nested ones of
    double quantization), 8-bit row scales (SCB)."""
    import torch

    out: list[Any] = []

    def walk(qs: Any, depth: int = 0) -> None:
        if qs is None or depth > 3:
            return
        for attr in ("absmax", "code", "offset"):
            t = getattr(qs, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        walk(getattr(qs, "state2", None), depth + 1)

    for p in model.parameters():
        walk(getattr(p, "quant_state", None))
        for attr in ("SCB", "CB"):
            t = getattr(p, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    for m in model.modules():
        state = getattr(m, "state", None)
        if state is not None and type(state).__name__ == "MatmulLtState":
            for attr in ("SCB", "CB"):
                t = getattr(state, attr, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
    return out


@dataclass
class ModelBytes:
    weights: int
    """Parameters and buffers, LoRA adapters excluded (quantized uint8/int8 weights included)."""
    lora_adapters: int
    quantization_state: int
    storages: StorageSet
    """Every storage counted above (to keep later sums from counting them again)."""


def model_bytes(model: Any, device: Any) -> ModelBytes:
    """What the model itself holds on ``device``."""
    seen = StorageSet(device)
    lora = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if _is_lora(name):
            lora += seen.add(p)
    weights = 0
    for p in model.parameters():
        weights += seen.add(p)
    for b in model.buffers():
        weights += seen.add(b)
    quant = seen.add_all(_quant_state_tensors(model))
    return ModelBytes(weights=weights, lora_adapters=lora, quantization_state=quant, storages=seen)


def gradient_bytes(model: Any, device: Any) -> int:
    """Bytes of the ``.grad`` tensors present now."""
    return tensor_bytes((p.grad for p in model.parameters() if p.grad is not None), device)


def optimizer_state_bytes(optimizer: Any, device: Any, exclude: StorageSet | None = None) -> tuple[int, int]:
    """(device bytes, paged bytes) of the optimizer's state tensors.

    bitsandbytes' paged optimizers keep their state in CUDA unified memory (``cudaMallocManaged``), outside
    PyTorch's allocator; those tensors carry ``is_paged`` and are returned apart. Shared tensors (the 8-bit
    quantization maps) count once; 0-dim ``step`` counters are left out (see the module docstring).
    """
    import torch

    dev_set = StorageSet(device, set(exclude.seen) if exclude is not None else set())
    device_bytes = paged = 0
    paged_seen: set[int] = set()
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if getattr(v, "is_paged", False):
                key = v.data_ptr()
                if key not in paged_seen:
                    paged_seen.add(key)
                    paged += v.numel() * v.element_size()
                continue
            device_bytes += dev_set.add(v)
    return device_bytes, paged


def _logical_numel(p: Any) -> int:
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:  # a packed 4-bit weight: count the weights it stands for
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return p.numel()


def count_parameters(model: Any) -> tuple[int, int, int]:
    """(base parameters, trainable parameters, LoRA parameters).

    Base parameters are the model's own: LoRA adapters and PEFT's ``modules_to_save`` copies are left out;
    packed 4-bit weights count the weights they stand for.
    """
    base = trainable = lora = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        n = _logical_numel(p)
        if p.requires_grad:
            trainable += n
        if _is_lora(name):
            lora += n
        elif "modules_to_save." not in name:
            base += n
    return base, trainable, lora
