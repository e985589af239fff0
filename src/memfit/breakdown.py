"""The Breakdown: the one result type that estimate, trace and measure all return.

``components`` are the bytes alive at the moment of the peak, by what they are; they add up to
``peak_allocated_bytes`` (what ``torch.cuda.max_memory_allocated`` reports). On top of that the caching
allocator keeps a reserve (``peak_reserved_bytes``, fragmentation included), and the device shows the
reserve plus the CUDA context (``device_total_bytes``, what ``nvidia-smi`` shows for the process).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Breakdown", "COMPONENT_NOTES", "INFERENCE_NOTES"]

#: What each component name means (shown in the table).
COMPONENT_NOTES: dict[str, str] = {
    "weights": "model parameters in their storage dtype",
    "master_weights": "fp32 copy of 16-bit weights kept for the update",
    "autocast_cache": "16-bit copies of fp32 weights made by autocast, held until backward",
    "gradients": "parameter gradients (dtype of the parameters)",
    "optimizer_states": "optimizer state tensors (moments, momentum, factored variances)",
    "activations": "tensors saved in forward for backward (or, for inference, live forward temporaries)",
    "logits_and_loss": "vocab-sized logits, their fp32 upcast and the loss's log-softmax",
    "kv_cache": "keys and values kept for decoding",
    "temporaries": "short-lived buffers at the peak (backward intermediates, optimizer-step scratch)",
    "lora_adapters": "LoRA A/B matrices (trainable)",
    "quantization_state": "scales, absmax and statistics of quantized weights",
    "inputs": "token ids, labels, masks, position ids",
    "gathered_weights": "unsharded 16-bit parameters gathered by FSDP / ZeRO-3 (layers in flight, root, prefetch)",
    "communication_buffers": "gradient buckets and reduce-scatter buffers of DDP / FSDP / DeepSpeed",
    "other": "everything else allocated at the peak",
}

#: The same components described for inference (no backward, no optimizer), where they differ.
INFERENCE_NOTES: dict[str, str] = {
    "autocast_cache": "16-bit copy autocast makes of the fp32 weight in use (one linear at a time)",
    "activations": "live forward temporaries of the layer running (nothing is kept for a backward)",
    "logits_and_loss": "vocab-sized logits: every prompt position (prefill) or the last one and its fp32 copy (generate)",
    "temporaries": "cuBLAS workspace, token ids and masks, short-lived buffers",
}


@dataclass(kw_only=True)
class Breakdown:
    """Per-GPU memory of one job, by component and phase."""

    engine: str
    """``estimate``, ``trace`` or ``measure``."""
    model: str
    job: dict[str, Any]
    parameters: int
    trainable_parameters: int
    components: dict[str, int]
    """Bytes alive at the peak, by component; they add up to ``peak_allocated_bytes``."""
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    peak_phase: str
    """Where the peak falls: forward, loss, backward, optimizer_step, prefill, decode, load."""
    phases: dict[str, int] = field(default_factory=dict)
    """Peak allocated bytes within each phase."""
    host_bytes: int = 0
    """Host (CPU) memory the job pins or offloads to, per node."""
    nvme_bytes: int = 0
    """NVMe space of ZeRO-Infinity's swap files (``offload_device nvme``), per node."""
    measurement: str = ""
    """For measure: ``cuda-allocator`` or ``cpu-tensors``; for trace: ``fake-tensors``."""
    notes: list[str] = field(default_factory=list)
    """Remarks a user should read (e.g. 'the fp32 loss upcast is the peak')."""
    gpu_memory_bytes: int | None = None
    """The card the job was judged against (what the driver reports as its total), or None."""
    fits: bool | None = None
    """Whether the reference run completes on that card (the allocator limited to the card less the CUDA
    context); None when no card was given."""
    headroom_bytes: int | None = None
    """Card memory left at the peak (``gpu_memory_bytes - device_total_bytes``); negative when it does not fit."""
    step_time_seconds: float | None = None
    """Estimated (or measured) time of one optimizer step, when a card is known."""
    tokens_per_second: float | None = None
    """Tokens processed per second per GPU at that step time."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Engine-specific facts: step time, tokens/s, device name, versions, timeline."""

    @property
    def reserve_overhead_bytes(self) -> int:
        return max(0, self.peak_reserved_bytes - self.peak_allocated_bytes)

    @property
    def cuda_context_bytes(self) -> int:
        return max(0, self.device_total_bytes - self.peak_reserved_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Breakdown":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
