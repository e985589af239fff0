"""Quantized weights: the real layouts of bitsandbytes int8 / 4-bit, fp8 and GPTQ/AWQ packed weights.

Which layers are quantized follows ``transformers``' ``replace_with_bnb_linear``: every ``nn.Linear`` in
the blocks, not the LM head (``modules_to_not_convert``); fused MoE expert tensors are parameters, not
``nn.Linear`` modules, so they stay in 16 bits. Embeddings, norms and biases stay unquantized.
"""

from __future__ import annotations

import math

from ..models.spec import ModelSpec

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from ..job import Job


def quantized_linears(spec: ModelSpec):
    """(in_features, out_features, instances in the model) of every linear bitsandbytes replaces."""
    for b in spec.blocks:
        for lin in b.linears:
            if lin.is_module:
                yield lin.in_features, lin.out_features, lin.count * b.count


def quantized_weight_params(spec: ModelSpec) -> int:
    return sum(i * o * n for i, o, n in quantized_linears(spec))


def packed_weight_bytes(spec: ModelSpec, job: Job) -> int:
    """The quantized weights themselves.

    - nf4 / fp4 (bitsandbytes ``Params4bit``): two 4-bit values per byte (``quantize_4bit`` packs a
      uint8 tensor of numel/2), Dettmers et al. 2023 (QLoRA);
    - int8 (``Int8Params``, LLM.int8): one byte per weight, Dettmers et al. 2022;
    - fp8 (e4m3): one byte per weight;
    - gptq / awq: 4-bit values packed eight to an int32 (``qweight``), Frantar et al. 2022, Lin et al. 2023.
    """
    n = quantized_weight_params(spec)
    if job.quantization in ("nf4", "fp4", "gptq", "awq"):
        return math.ceil(n / 2)
    return n  # int8, fp8


def quant_state_bytes(spec: ModelSpec, job: Job) -> int:
    """Scales and statistics that come with the packed weights.

    - 4-bit: one absmax per block of ``quant_group_size`` (64) weights, fp32; with double quantization
      the absmax are themselves 8-bit with one fp32 constant per 256 of them (QLoRA, section 3);
    - int8: one fp32 row scale (``SCB``) per output row;
    - fp8: one fp32 scale per output row;
    - gptq / awq: per group of ``quant_group_size`` (128 usual) input rows, fp16 scales and 4-bit
      zero points packed in int32 for every output column; GPTQ adds an int32 ``g_idx`` per input row.
    """
    q = job.quantization
    g = job.quant_group_size
    total = 0
    for i, o, n in quantized_linears(spec):
        numel = i * o
        if q in ("nf4", "fp4"):
            blocks = math.ceil(numel / g)
            per = blocks + math.ceil(blocks / 256) * 4 + 4 if job.double_quant else blocks * 4
        elif q in ("int8", "fp8"):
            per = o * 4
        elif q in ("gptq", "awq"):
            groups = math.ceil(i / g)
            per = groups * o * 2 + math.ceil(groups * o / 2) + (i * 4 if q == "gptq" else 0)
        else:
            per = 0
        total += per * n
    return total


def dequant_temp_bytes(spec: ModelSpec, job: Job, tokens: int) -> int:
    """Scratch of one quantized matmul, the largest: 4-bit kernels dequantize the whole weight to the
    compute dtype (``bnb.functional.dequantize_4bit``) for prefill/training shapes; LLM.int8 quantizes
    the input row-wise to int8, multiplies into an int32 result and dequantizes it to fp16
    (``int8_vectorwise_quant``, ``int8_linear_matmul``, ``int8_mm_dequant``)."""
    shapes = list(quantized_linears(spec))
    if not shapes:
        return 0
    if job.quantization == "int8":
        return max(tokens * (i + 4 + 6 * o) for i, o, _ in shapes)
    return max(2 * i * o for i, o, _ in shapes)


def bnb_dequantizes(m: int, n: int, k: int) -> bool:
    """Whether bitsandbytes 0.50's ``gemm_4bit`` on an H100/H200 (sm90, the measured cards) multiplies an (m, k)
    input by an (n, k) 4-bit weight through ``_dequant_linear_fallback`` (the whole weight dequantized to 16 bits)
    rather than its own kernel. ``backends/cuda/ops.py``: always past ``_gemm_4bit_custom_max_m`` (1536) rows,
    never at 4 rows or fewer; between, ``_gemm_4bit_use_custom_cuda``'s sm90 tiers, whose widest caps are kept
    here: small weights (n * k < 4 Mi) with a short inner dimension (2 k < n) keep the kernel to 320 rows
    (512 below one wave of blocks), everything else to 64 at most."""
    if m > 1536:
        return True
    if m <= 4:
        return False
    if n * k < 4 * 1024 * 1024 and 2 * k < n:
        return m > 320
    return m > 64


#: The row counts where :func:`bnb_dequantizes` changes its answer (any m answers as the first of these >= m).
BNB_ROW_TIERS = (4, 64, 320, 1536)


def bnb_row_tier(m: int) -> int:
    """``m`` rounded up to the tier :func:`bnb_dequantizes` answers the same for (past the last: 1537): a cache
    key that does not grow with the batch."""
    for t in BNB_ROW_TIERS:
        if m <= t:
            return t
    return BNB_ROW_TIERS[-1] + 1


def linear_bytes(in_features: int, out_features: int, quantization: str, *, group_size: int = 128,
                 double_quant: bool = False, element_bytes: int = 2) -> int:
    """Bytes of one quantized linear weight in its real layout: the packed values of
    :func:`packed_weight_bytes` plus the scales of :func:`quant_state_bytes`, for one (in, out) matrix.
    ``none`` is the unquantized weight at ``element_bytes`` per value. The serving estimate
    (:mod:`memfit.serve`) sums this per rank, so the layouts stay in one place."""
    numel = in_features * out_features
    if quantization == "none":
        return numel * element_bytes
    if quantization in ("nf4", "fp4"):
        blocks = math.ceil(numel / group_size)
        state = blocks + math.ceil(blocks / 256) * 4 + 4 if double_quant else blocks * 4
        return math.ceil(numel / 2) + state
    if quantization in ("int8", "fp8"):
        return numel + out_features * 4
    if quantization in ("gptq", "awq"):
        groups = math.ceil(in_features / group_size)
        state = groups * out_features * 2 + math.ceil(groups * out_features / 2)
        return math.ceil(numel / 2) + state + (in_features * 4 if quantization == "gptq" else 0)
    if quantization == "int4-sym":
        # symmetric 4-bit groups (compressed-tensors pack-quantized with ``symmetric: true``): packed values
        # and one 16-bit scale per group, no zero points and no act-order index
        return math.ceil(numel / 2) + math.ceil(in_features / group_size) * out_features * 2
    raise ValueError(f"unknown quantization {quantization!r}")
