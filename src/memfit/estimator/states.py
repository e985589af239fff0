"""Model states: weights, gradients, optimizer states, autocast copies and optimizer-step scratch.

Each function counts one thing for the reference run of DESIGN.md (a ``transformers`` model in a
plain PyTorch loop) and says where its rule comes from.
"""

from __future__ import annotations

import math

from ..models.spec import ModelSpec

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from ..job import Job

#: bytes per element of each storage dtype
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}

#: cuBLAS + cuBLASLt workspaces handed out by PyTorch's caching allocator at the first matmul and kept
#: for the process (PyTorch sizes each from CUBLAS_WORKSPACE_CONFIG; 2 x 32 MiB on Hopper). Measured:
#: 64.0 MiB of ``memory_allocated`` appear after the first matmul on an H100 with torch 2.11
#: (validation/probes/layer_probe.json, every run after the first).
CUBLAS_HANDLE_WORKSPACE_BYTES = 32 << 20
CUBLAS_WORKSPACE_BYTES = 2 * CUBLAS_HANDLE_WORKSPACE_BYTES


def param_bytes(precision: str) -> int:
    """Bytes per parameter as stored: Lightning's ``*-true`` casts the model (2 bytes for bf16/fp16);
    ``32-true`` and the ``*-mixed`` precisions keep fp32 parameters and cast inside autocast."""
    return 2 if precision in ("bf16-true", "16-true") else 4


def compute_bytes(precision: str) -> int:
    """Bytes per element of matmul outputs: 4 for 32-true, 2 for every 16-bit or mixed precision."""
    return 4 if precision == "32-true" else 2


def lora_targets(spec: ModelSpec, job: Job) -> frozenset[str]:
    """Leaf names of the linears PEFT wraps. ``all-linear`` is PEFT's shorthand: every ``nn.Linear``
    except the output layer (fused MoE expert tensors are parameters, not modules, so they are skipped)."""
    if not job.is_lora:
        return frozenset()
    names = {lin.name for b in spec.blocks for lin in b.linears if lin.is_module}
    if job.lora_targets == "all-linear":
        return frozenset(names)
    return frozenset(t for t in job.lora_targets if t in names)


_PEFT_KEEPS_FUSED_EXPERTS = frozenset({"gpt_oss", "llama4_text", "granitemoe"})
"""MoE families whose fused expert tensors PEFT 0.21 leaves unwrapped: it converts ``all-linear`` to expert
parameters only for the model types transformers 5.17 maps to a v4 -> v5 conversion pattern
(``conversion_mapping._MODEL_TO_CONVERSION_PATTERN`` -> ``mixtral`` / ``qwen2_moe``, then
``peft/utils/transformers_weight_conversion._MOE_TARGET_MODULE_MAPPING``); these three are not mapped
(checked on tiny configs: only their nn.Linear modules get adapters)."""


def lora_wraps_fused(job: Job, spec: ModelSpec | None = None) -> bool:
    """PEFT's ``all-linear`` also wraps fused MoE expert and router parameters (``ParamWrapper``, PEFT >= 0.18)
    of the families transformers converted from v4 (not :data:`_PEFT_KEEPS_FUSED_EXPERTS`); explicit
    ``target_modules`` lists match modules only."""
    if spec is not None and spec.model_type in _PEFT_KEEPS_FUSED_EXPERTS:
        return False
    return job.is_lora and job.lora_targets == "all-linear"


def fused_lora_params(lin, r: int) -> int:
    """Adapter size of a ``ParamWrapper`` around a fused (experts, out, in) tensor: A is (r*E, in) and B is
    (out, r*E); PEFT gives the fused gate+up tensor twice the rank (A (2rE, in), B (out, 2rE)), as counted on
    PEFT 0.21 (tests/test_estimate.py checks it against PEFT on a tiny Mixtral and OLMoE)."""
    mult = 2 if lin.role == "expert_gate_up" else 1
    return mult * r * lin.count * (lin.in_features + lin.out_features)


def lora_adapter_params(spec: ModelSpec, job: Job) -> int:
    """Parameters of the LoRA adapters: A (r x in) and B (out x r) for each wrapped linear, in every
    layer (Hu et al. 2021; PEFT ``LoraLayer.update_layer``)."""
    targets = lora_targets(spec, job)
    if not targets:
        return 0
    r = job.lora_rank
    fused = lora_wraps_fused(job, spec)
    total = 0
    for b in spec.blocks:
        for lin in b.linears:
            if lin.is_module and lin.name in targets:
                total += r * (lin.in_features + lin.out_features) * lin.count * b.count
            elif not lin.is_module and fused:
                total += fused_lora_params(lin, r) * b.count
    return total


def fused_lora_merged_bytes(spec: ModelSpec, job: Job, block) -> int:
    """Per layer: the merged weight (base + B @ A) that PEFT's ``ParamWrapper`` parametrization builds for each
    wrapped fused expert tensor in forward, in the base dtype, kept by the expert matmuls for backward."""
    if not lora_wraps_fused(job, spec):
        return 0
    return sum(lin.in_features * lin.out_features * lin.count for lin in block.linears
               if not lin.is_module and lin.role.startswith("expert")) * param_bytes(job.precision)


def trainable_params(spec: ModelSpec, job: Job) -> int:
    """Parameters that get gradients: all for full fine-tuning; the adapters (plus PEFT's
    ``modules_to_save`` classifier copy for sequence classification) for LoRA; none for inference."""
    if job.task != "train":
        return 0
    if not job.is_lora:
        return spec.parameters
    extra = spec.head_params if spec.head == "seq_cls" else 0
    return lora_adapter_params(spec, job) + extra


def unquantized_param_bytes(job: Job) -> int:
    """Bytes per parameter of what bitsandbytes leaves unquantized (embeddings, norms, LM head): the
    precision's storage dtype, except that the QLoRA recipe's ``peft.prepare_model_for_kbit_training``
    upcasts every 16-bit parameter of the base to fp32 before training."""
    if job.task == "train":
        return 4
    return param_bytes(job.precision)


def weight_bytes(spec: ModelSpec, job: Job) -> int:
    """Weights in their storage dtype (packed, for a quantized base; its scales are
    :func:`memfit.estimator.quant.quant_state_bytes`). LoRA adapters are fp32 whatever the base dtype:
    PEFT's ``get_peft_model(autocast_adapter_dtype=True)`` upcasts 16-bit adapter weights."""
    if job.quantization != "none":
        from . import quant

        base = quant.packed_weight_bytes(spec, job)
        base += (spec.parameters - quant.quantized_weight_params(spec)) * unquantized_param_bytes(job)
    else:
        base = spec.parameters * param_bytes(job.precision)
    if job.is_lora and job.task == "train":
        base += lora_adapter_params(spec, job) * 4
        if spec.head == "seq_cls":
            base += spec.head_params * param_bytes(job.precision)  # modules_to_save copy
    return base


def trainable_bytes(spec: ModelSpec, job: Job) -> int:
    """Bytes of the trainable parameters (and so of their gradients: ``.grad`` has the param dtype)."""
    if job.task != "train":
        return 0
    if job.is_lora:
        extra = spec.head_params * param_bytes(job.precision) if spec.head == "seq_cls" else 0
        return lora_adapter_params(spec, job) * 4 + extra
    return spec.parameters * param_bytes(job.precision)


def master_weight_bytes(spec: ModelSpec, job: Job) -> int:
    """fp32 master weights. None in the reference run: with ``*-mixed`` the fp32 parameters *are* the
    master copy (autocast makes 16-bit copies on the fly); with ``*-true`` PyTorch updates the 16-bit
    weights in place. (DeepSpeed's bf16/fp16 engines do keep an fp32 master partition: issue 4.)"""
    return 0


def gradient_bytes(spec: ModelSpec, job: Job) -> int:
    """Gradients: one per trainable parameter, in the parameter's dtype (fp32 under ``*-mixed``)."""
    return trainable_bytes(spec, job)


def _largest_trainable_numel(spec: ModelSpec, job: Job) -> int:
    if job.is_lora:
        return max((lin.out_features * job.lora_rank for b in spec.blocks for lin in b.linears), default=0)
    biggest = spec.vocab_size * spec.hidden_size
    for b in spec.blocks:
        for lin in b.linears:
            biggest = max(biggest, lin.in_features * lin.out_features * (lin.count if not lin.is_module else 1))
    return biggest


def _matrix_shapes(spec: ModelSpec, job: Job):
    """(rows, cols, how many) of the trainable 2-D weights, for factored optimizer states."""
    if job.is_lora:
        for b in spec.blocks:
            for lin in b.linears:
                if lin.is_module and lin.name in lora_targets(spec, job):
                    yield job.lora_rank, lin.in_features, lin.count * b.count
                    yield lin.out_features, job.lora_rank, lin.count * b.count
        return
    yield spec.vocab_size, spec.hidden_size, 1 if spec.tie_word_embeddings or spec.head != "causal_lm" else 2
    for b in spec.blocks:
        for lin in b.linears:
            yield lin.out_features, lin.in_features, lin.count * b.count


def optimizer_state_bytes(spec: ModelSpec, job: Job) -> int:
    """Optimizer state tensors, in the dtype of the parameters they track (``torch.optim`` allocates
    them with ``torch.zeros_like(p)``):

    - adamw / adam: exp_avg and exp_avg_sq, 2 per parameter (Loshchilov & Hutter; ``torch.optim.AdamW``);
    - sgd: none; sgd-momentum: one momentum buffer;
    - lion: one exp_avg (Chen et al. 2023);
    - adafactor: factored second moment, rows + cols per matrix, full for vectors, no first moment
      (Shazeer & Stern 2018; ``torch.optim.Adafactor`` with beta1 None);
    - adamw-8bit / paged-adamw-8bit: 2 bytes per parameter plus an fp32 absmax per 256-value block
      (Dettmers et al. 2022, bitsandbytes blockwise quantization); tensors under 4096 elements keep
      32-bit states (bitsandbytes ``min_8bit_size``). A paged optimizer's states of tensors of at least 1e5
      elements live in CUDA unified memory that PyTorch's allocator does not see
      (:func:`paged_optimizer_host_bytes`); this counts the rest, the absmax and the small tensors' states.
    """
    n = trainable_params(spec, job)
    if n == 0:
        return 0
    pb = 4 if job.is_lora else param_bytes(job.precision)
    opt = job.optimizer
    if opt in ("adamw", "adam"):
        return 2 * n * pb
    if opt == "sgd":
        return 0
    if opt in ("sgd-momentum", "lion"):
        return n * pb
    if opt == "adafactor":
        matrix_params = 0
        factored = 0
        for rows, cols, k in _matrix_shapes(spec, job):
            matrix_params += rows * cols * k
            factored += (rows + cols) * k
        vectors = max(0, n - matrix_params)
        return (factored + vectors) * pb
    if opt in ("adamw-8bit", "paged-adamw-8bit", "paged-adamw"):
        return _bnb_state_bytes(spec, job)[0]
    raise AssertionError(opt)


#: bitsandbytes ``Optimizer8bit.get_state_buffer`` (0.50, ``optim/optimizer.py``): a paged optimizer takes its state
#: buffers from ``F.get_paged`` (``cudaMallocManaged``) only for parameters of at least 1e5 elements; smaller ones
#: get ``torch.zeros_like`` on the device, in PyTorch's allocator.
PAGED_MIN_NUMEL = 100_000


def _bnb_state_bytes(spec: ModelSpec, job: Job) -> tuple[int, int]:
    """(bytes in PyTorch's allocator, bytes in CUDA unified memory) of a bitsandbytes Adam's state.

    ``Optimizer2State.init_state`` (bitsandbytes 0.50): 8-bit (``adamw-8bit``, ``paged-adamw-8bit``), two uint8
    states per tensor of at least 4096 elements (``min_8bit_size``) with one fp32 ``absmax`` per 256-value block
    each (``torch.zeros`` on the device, never paged), two fp32 states for smaller tensors (norms, biases);
    32-bit (``paged-adamw``), two fp32 states per tensor. The states come from ``get_state_buffer``: paged for
    tensors of at least :data:`PAGED_MIN_NUMEL` elements under a paged optimizer, else on the device.
    Measured (full-paged8bit-qwen2.5-0.5b, h100-quant.json): 0.92 GiB paged, 15.27 MiB on the device."""
    n = trainable_params(spec, job)
    paged_opt = job.optimizer.startswith("paged")
    eight_bit = job.optimizer.endswith("8bit")
    big = pageable = 0
    for rows, cols, k in _matrix_shapes(spec, job):
        numel = rows * cols
        if numel >= 4096:
            big += numel * k
        if numel >= PAGED_MIN_NUMEL:
            pageable += numel * k
    big = min(big, n)
    pageable = min(pageable, big)
    if spec.hidden_size >= 4096 and not job.is_lora:
        big = n  # norm vectors are large enough for 8-bit state too (not for paging)
    small = n - big
    per_big = 2 if eight_bit else 8
    absmax = 2 * math.ceil(big / 256) * 4 if eight_bit else 0
    paged = per_big * pageable if paged_opt else 0
    device = per_big * big - paged + absmax + small * 8
    return device, paged


def paged_optimizer_host_bytes(spec: ModelSpec, job: Job) -> int:
    """State of bitsandbytes paged optimizers in CUDA unified memory (``F.get_paged``: ``cudaMallocManaged``):
    resident on the GPU while there is room and paged to the host under pressure, so ``nvidia-smi`` counts it
    and ``torch.cuda.memory_allocated`` / ``memory_reserved`` never do. See :func:`_bnb_state_bytes`."""
    if job.optimizer not in ("paged-adamw-8bit", "paged-adamw") or trainable_params(spec, job) == 0:
        return 0
    return _bnb_state_bytes(spec, job)[1]


def optimizer_step_temp_bytes(spec: ModelSpec, job: Job) -> int:
    """Scratch alive during ``optimizer.step()`` on CUDA.

    ``torch.optim.Adam(W)`` defaults to the foreach implementation on CUDA, whose
    ``torch._foreach_sqrt(exp_avg_sqs)`` materializes a denominator for every parameter at once: one more
    copy of the trainable parameters in the state dtype (``torch/optim/adamw.py``, ``_multi_tensor_adam``).
    SGD's foreach update is in place. Adafactor's single-tensor loop builds the row x column variance
    estimate of one matrix at a time in fp32: the largest trainable matrix. memfit's Lion updates one
    parameter at a time (two temporaries of the largest parameter). bitsandbytes' 8-bit optimizers update
    in fused kernels, blockwise, without parameter-sized scratch."""
    n = trainable_params(spec, job)
    if n == 0:
        return 0
    pb = 4 if job.is_lora else param_bytes(job.precision)
    opt = job.optimizer
    if opt in ("adamw", "adam"):
        return n * pb
    if opt == "adafactor":
        return _largest_trainable_numel(spec, job) * 4
    if opt == "lion":
        return 2 * _largest_trainable_numel(spec, job) * pb
    return 0


def linear_weight_params(spec: ModelSpec) -> int:
    """Parameters that pass through ``F.linear`` / matmul (all block linears and the LM head)."""
    total = sum(lin.in_features * lin.out_features * lin.count * b.count for b in spec.blocks for lin in b.linears)
    return total + spec.lm_head_params


def autocast_cache_bytes(spec: ModelSpec, job: Job) -> int:
    """16-bit copies of fp32 weights made by autocast (``*-mixed`` only).

    Autocast casts each weight once per forward and caches the copy while the autocast region lasts
    (``at::autocast::cached_cast`` caches leaf tensors that require grad); the linear layers also save
    the copy for backward, so every linear weight (and the LM head) exists twice, fp32 and 16-bit,
    from its use in forward until its layer's backward. Frozen LoRA bases are not cached but the saved
    copies are the same size. Embedding lookups are not autocast (no copy)."""
    if job.precision not in ("16-mixed", "bf16-mixed"):
        return 0
    if job.quantization != "none":  # bitsandbytes layers are not autocast: only the LM head is cast
        return 2 * spec.lm_head_params
    return 2 * (linear_weight_params(spec) - _uncached_expert_params(spec))


_EXPERTS_NOT_CAST_CACHED = frozenset({"gpt_oss"})
"""Families whose expert tensors keep no 16-bit autocast copy: ``GptOssExperts`` multiplies by
``self.gate_up_proj[expert_idx]``, a non-leaf view, which ``cached_cast`` does not cache (transformers 5.17;
the trace of a 2-layer gpt-oss-20b LoRA step holds only the LM head's and attention's copies)."""


def _uncached_expert_params(spec: ModelSpec) -> int:
    if spec.model_type not in _EXPERTS_NOT_CAST_CACHED:
        return 0
    return sum(lin.in_features * lin.out_features * lin.count * b.count for b in spec.blocks for lin in b.linears
               if lin.role.startswith("expert"))
