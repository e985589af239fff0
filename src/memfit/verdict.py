"""Does a job fit a card? The one place the command line (and its JSON) reads the answer from.

:func:`verdict` reads ``Breakdown.fits`` / ``headroom_bytes`` when the engine filled them (the estimator's
allocator replay does, when given the card); otherwise it judges provisionally by the device total
(``device_total_bytes <= gpu_memory_bytes``). The deciding component is the largest one at the peak.
"""

from __future__ import annotations


from .breakdown import Breakdown

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["verdict", "lora_ckpt_note"]


def verdict(b: Breakdown, gpu_memory_bytes: int) -> dict[str, Any]:
    """``{"fits", "gpu_memory_bytes", "headroom_bytes", "deciding_component", "deciding_bytes", "basis"}``
    for ``b`` on a card of ``gpu_memory_bytes`` (its driver-reported total). ``headroom_bytes`` is the
    card less the device total at the peak (negative: that much too big); ``basis`` says which rule
    answered: ``engine`` (the Breakdown's own fits) or ``device_total`` (the provisional rule)."""
    same_card = b.gpu_memory_bytes in (None, gpu_memory_bytes)
    if b.fits is not None and same_card:
        fits, basis = bool(b.fits), "engine"
        headroom = b.headroom_bytes if b.headroom_bytes is not None else gpu_memory_bytes - b.device_total_bytes
    else:
        headroom = gpu_memory_bytes - b.device_total_bytes
        fits, basis = headroom >= 0, "device_total"
    named = {k: v for k, v in b.components.items() if v}
    top = max(named, key=lambda k: named[k]) if named else None
    return {"fits": fits, "gpu_memory_bytes": int(gpu_memory_bytes), "headroom_bytes": int(headroom),
            "deciding_component": top, "deciding_bytes": int(named[top]) if top else 0, "basis": basis}


def lora_ckpt_note(job: Any, answer: str = "memfit's fit answer") -> str | None:
    """What the rehearsed boundaries say of a fit answer for ``job`` when it is single-GPU LoRA / QLoRA training
    with gradient checkpointing (None otherwise), MoE models and dense ones apart (validation/verify-fit.json:
    the estimate's MoE block is not the real code's order of tensors, and every OLMoE pair answered above).
    ``memfit estimate --max-batch-size`` and ``memfit plan`` print it; ``answer`` names what the figures are of."""
    if not (job.task == "train" and job.is_lora and job.gradient_checkpointing and job.gpus == 1
            and job.strategy == "single"):
        return None
    from .models import load_model

    try:
        moe = any(b.moe for b in load_model(job.model).blocks)
    except Exception:  # noqa: BLE001 - a note only: the answer has been given
        moe = False
    if moe:
        return ("note: MoE LoRA with checkpointing: on 6 of 9 rehearsed pairs of this kind (every OLMoE one; none "
                f"of Qwen1.5-MoE's) {answer} was above the real boundary, by 2 to 8 batches; "
                "`memfit estimate --max-batch-size --verify` (or `memfit plan --verify`) checks it with the capped "
                "trace, which answered 5 of those 6 exactly and one a batch below (none above)")
    return (f"note: LoRA with checkpointing: on 1 of 79 rehearsed dense pairs of this kind {answer} was "
            "above the real boundary (by one batch); `memfit estimate --max-batch-size --verify` checks it with the "
            "trace (none above)")
