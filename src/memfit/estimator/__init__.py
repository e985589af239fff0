"""The analytical estimator: closed-form accounting of one job's GPU memory, no torch.

:func:`estimate` returns a :class:`~memfit.breakdown.Breakdown` for the reference run of DESIGN.md.
The peak is the largest of a few candidate moments (the loss at the end of forward, the start of
backward, each layer's backward, the optimizer step; prefill and decode for inference), each the
sum of what is alive then; the breakdown reports the winning moment, component by component.
"""

from __future__ import annotations

from functools import lru_cache

from ..breakdown import Breakdown
from ..job import Job
from ..models.spec import ModelSpec
from . import quant
from . import states as st
from .layers import Mode, saved_bytes_per_token
from .runtime import allocator_reserve_bytes, cuda_context_bytes

__all__ = ["estimate", "max_batch_size", "model_states"]

_MIXED = {"16-mixed": "mixed", "bf16-mixed": "mixed", "32-true": "32", "bf16-true": "true", "16-true": "true"}


def _spec(job: Job, spec: ModelSpec | None) -> ModelSpec:
    if spec is not None:
        return spec
    from ..models import load_model

    return load_model(job.model)


def _dropout(spec: ModelSpec) -> float:
    cfg = spec.config
    for key in ("resid_pdrop", "hidden_dropout_prob", "hidden_dropout", "dropout"):
        v = cfg.get(key)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return 0.0


def _act_mode(job: Job) -> str:
    """How activations are typed: a quantized base trained with the QLoRA recipe runs its residual stream
    in fp32 (``prepare_model_for_kbit_training`` upcast the embeddings and norms; bitsandbytes layers cast
    their output back to the input dtype), so it behaves like ``32-true`` around frozen linears."""
    mode = _MIXED[job.precision]
    if job.quantization != "none" and job.task == "train" and mode != "mixed":
        return "32"
    return mode


@lru_cache(maxsize=8192)
def _layer_saved(spec: ModelSpec, job_key: tuple) -> tuple[float, ...]:
    precision, is_lora, targets, rank, attention, seq = job_key
    mode = Mode(precision=precision, trainable_base=not is_lora, lora_targets=targets, lora_rank=rank,
                attention=attention, seq_len=seq, dropout=_dropout(spec))
    return tuple(saved_bytes_per_token(spec, i, mode) for i in range(len(spec.blocks)))


def mlp_width(spec: ModelSpec) -> int:
    """Widest per-token MLP hidden size of any layer (routed experts count top_k times, or num_experts times
    with ``all_experts``, plus shared experts):
    what sizes a layer's backward scratch."""
    width = 0
    for b in spec.blocks:
        if b.moe is not None:
            width = max(width, b.moe.routed_copies * b.moe.expert_intermediate_size + b.moe.shared_intermediate_size)
        elif b.mlp is not None:
            width = max(width, b.mlp.intermediate_size)
    return width


def _logit_bytes(spec: ModelSpec, job: Job) -> int:
    return st.compute_bytes(job.precision)


def _train(spec: ModelSpec, job: Job) -> tuple[dict[str, int], str, dict[str, int], list[str]]:
    T = job.batch_size * job.seq_len
    V, H = spec.vocab_size, spec.hidden_size
    amode = _act_mode(job)
    e = 4 if amode == "32" else 2
    pb = st.param_bytes(job.precision)
    res = 4 if amode in ("32", "mixed") else 2
    notes: list[str] = []

    weights = st.weight_bytes(spec, job)
    qstate = quant.quant_state_bytes(spec, job) if job.quantization != "none" else 0
    qtemp = quant.dequant_temp_bytes(spec, job, T) if job.quantization != "none" else 0
    if job.quantization != "none" and amode == "32" and job.precision != "32-true":
        notes.append("the QLoRA recipe (prepare_model_for_kbit_training) upcasts embeddings, norms and the "
                     f"LM head to fp32: {(spec.parameters - quant.quantized_weight_params(spec)) * 2 / 2**30:.2f} GiB "
                     "more weights than 16-bit, and fp32 activations and logits")
    grads_total = st.gradient_bytes(spec, job)
    opt_states = st.optimizer_state_bytes(spec, job)
    cache = st.autocast_cache_bytes(spec, job)
    ckpt_frozen_casts = 0
    if cache and job.is_lora and job.gradient_checkpointing:
        # autocast caches casts of leaves that require grad only: a frozen base's 16-bit copies are made per
        # use, and under checkpointing nothing keeps them, so one layer's copies exist at a time
        ckpt_frozen_casts = max(2 * sum(lin.in_features * lin.out_features * lin.count for lin in b.linears)
                                for b in spec.blocks)
        cache = 2 * spec.lm_head_params if spec.head in ("causal_lm", "masked_lm") else 0
    ws = st.CUBLAS_WORKSPACE_BYTES
    inputs = T * 8 * 3  # input_ids, the padded labels and the shifted labels (int64)
    base = weights + qstate + opt_states + ws + inputs

    key = (amode, job.is_lora, st.lora_targets(spec, job), job.lora_rank, job.attention, job.seq_len)
    per_block = _layer_saved(spec, key)
    layer_full = [per_block[i] * T + st.fused_lora_merged_bytes(spec, job, b)
                  for i, b in enumerate(spec.blocks) for _ in range(b.count)]
    layer_input = T * H * res
    ckpt = job.gradient_checkpointing
    layer_kept = [layer_input] * len(layer_full) if ckpt else layer_full
    if ckpt and job.quantization == "int8":
        # bitsandbytes' MatMul8bitLt stashes its input on ctx (not save_for_backward), outside the saved-tensor
        # hooks that non-reentrant checkpointing uses to drop activations: the distinct inputs of each layer's
        # int8 linears (attention input, attention output, MLP input, MLP hidden) stay alive through backward.
        stash = []
        for b in spec.blocks:
            at = b.attention
            width = (b.moe.routed_copies * b.moe.expert_intermediate_size if b.moe is not None
                     else (b.mlp.intermediate_size if b.mlp is not None else 0))
            stash += [T * res * (2 * H + at.num_heads * at.v_head_dim + width)] * b.count
        layer_kept = [k + x for k, x in zip(layer_kept, stash)]
    acts = sum(layer_kept)
    # final norm output kept for the head, and its fp32 input
    final_saved = T * H * (4 + res + (2 if amode == "mixed" else 0))

    # logits: the head's output, ForCausalLMLoss's .float() copy, log_softmax's saved output
    if spec.head in ("causal_lm", "masked_lm"):  # ForMaskedLMLoss upcasts and cross-entropies the same way
        TV = T * V
        logit_fwd_peak = TV * e + (TV * 4 if e != 4 else 0) + TV * 4
        logit_saved = TV * 4
        if spec.final_logit_softcapping:
            logit_fwd_peak += TV * e
            logit_saved += TV * e
            notes.append("final logit soft-capping keeps one more vocab-sized tensor (tanh output)")
        logit_bwd_extra = 2 * TV * 4  # grad of log_softmax's output and its input, both fp32
    else:
        logit_fwd_peak = logit_saved = logit_bwd_extra = T * spec.num_labels * 4

    # gradients of the layers, and what is allocated first in backward
    layer_params = [b.layer_params for b in spec.blocks for _ in range(b.count)]
    if job.is_lora:
        per_layer_grad = [st.trainable_bytes(spec, job) / max(1, len(layer_params))] * len(layer_params)
        head_grad = 0
        embed_grad_late = 0
    else:
        per_layer_grad = [p * pb for p in layer_params]
        head_grad = (spec.head_params + spec.final_params) * pb
        if spec.tie_word_embeddings and spec.head in ("causal_lm", "masked_lm"):
            head_grad += spec.vocab_size * spec.hidden_size * pb
        embed_grad_late = grads_total - head_grad - sum(per_layer_grad)
    cache_layers = [2 * sum(lin.in_features * lin.out_features * lin.count for lin in b.linears)
                    for b in spec.blocks for _ in range(b.count)] if cache and not ckpt_frozen_casts \
        else [0] * len(layer_full)
    cache_head = cache - sum(cache_layers)

    moments: dict[str, dict[str, float]] = {}
    # 1. the loss, at the end of forward
    moments["forward"] = {"weights": weights, "optimizer_states": opt_states, "autocast_cache": cache,
                          "activations": acts + final_saved, "logits_and_loss": logit_fwd_peak,
                          "temporaries": ws + inputs}
    # 2. the loss's backward (log_softmax backward)
    cache_bwd = cache if not ckpt else 0
    moments["backward"] = {"weights": weights, "optimizer_states": opt_states, "autocast_cache": cache_bwd,
                           "activations": acts + final_saved, "logits_and_loss": logit_saved + logit_bwd_extra,
                           "temporaries": ws + inputs}
    # 3. each layer's backward, last to first
    transient = T * e * (2 * mlp_width(spec) + 2 * H) + ckpt_frozen_casts
    grads_so_far = head_grad
    kept_below = acts
    cache_below = sum(cache_layers) if not ckpt else 0
    best_layer = None
    for i in range(len(layer_full) - 1, -1, -1):
        live_acts = kept_below - layer_kept[i] + layer_full[i]
        total = (base + cache_below + live_acts + grads_so_far + per_layer_grad[i] + transient)
        if best_layer is None or total > best_layer[0]:
            best_layer = (total, {"weights": weights, "optimizer_states": opt_states, "autocast_cache": cache_below,
                                  "activations": live_acts, "gradients": grads_so_far + per_layer_grad[i],
                                  "temporaries": transient + ws + inputs})
        grads_so_far += per_layer_grad[i]
        kept_below -= layer_kept[i]
        cache_below -= cache_layers[i] if not ckpt else 0
    if best_layer and sum(best_layer[1].values()) > sum(moments["backward"].values()):
        moments["backward"] = best_layer[1]
    # end of backward: the embedding gradient arrives last
    end_bwd = {"weights": weights, "optimizer_states": opt_states, "gradients": grads_total,
               "temporaries": ws + inputs + T * H * e}
    if sum(end_bwd.values()) > sum(moments["backward"].values()):
        moments["backward"] = end_bwd
    # 4. optimizer step
    moments["optimizer_step"] = {"weights": weights, "optimizer_states": opt_states, "gradients": grads_total,
                                 "temporaries": ws + st.optimizer_step_temp_bytes(spec, job)}
    del cache_head, embed_grad_late
    if qstate:
        for name, m in moments.items():
            m["quantization_state"] = qstate
            if name in ("forward", "backward"):
                m["temporaries"] = m.get("temporaries", 0) + qtemp
    if job.is_lora:
        for m in moments.values():
            m["lora_adapters"] = st.lora_adapter_params(spec, job) * 4
            m["weights"] -= m["lora_adapters"]
    if job.optimizer in ("paged-adamw-8bit", "paged-adamw"):
        notes.append("paged optimizer states live in CUDA unified memory: not in PyTorch's allocator, "
                     "resident on the GPU while it has room, paged to the host under pressure")
    phases = {k: int(sum(v.values())) for k, v in moments.items()}
    peak_phase = max(phases, key=phases.get)
    comps = {k: int(v) for k, v in moments[peak_phase].items() if v}
    return comps, peak_phase, phases, notes


def _kv_bytes_per_token(spec: ModelSpec, job: Job, total_len: int) -> float:
    """Keys and values kept by ``DynamicCache`` for one sequence of ``total_len`` tokens: per layer
    2 x kv_heads x head_dim (values: v_head_dim) elements per token; sliding-window layers keep at most
    the window; MLA layers in ``transformers`` cache the decompressed per-head keys and values."""
    e = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}.get(job.kv_cache_dtype, st.compute_bytes(job.precision))
    total = 0.0
    for b in spec.blocks:
        at = b.attention
        kvh = at.num_heads if at.kind == "mla" else at.num_kv_heads
        per_tok = kvh * (at.head_dim + at.v_head_dim) * e
        length = min(total_len, at.sliding_window) if at.sliding_window else total_len
        total += per_tok * length * b.count
    return total


def _infer(spec: ModelSpec, job: Job) -> tuple[dict[str, int], str, dict[str, int], list[str]]:
    B, P, N = job.batch_size, job.prompt_len, job.new_tokens
    V, H = spec.vocab_size, spec.hidden_size
    e = st.compute_bytes(job.precision)
    res = 4 if job.precision in ("32-true", "16-mixed", "bf16-mixed") else 2
    weights = st.weight_bytes(spec, job)
    if job.quantization != "none":
        weights += quant.quant_state_bytes(spec, job)
    # Under inference_mode autocast does not keep its cast cache (measured: llama-3.2-1b bf16-mixed prefill
    # holds no 16-bit weight copies); one linear's 16-bit copy exists at a time.
    cache = 2 * max([lin.in_features * lin.out_features for b in spec.blocks for lin in b.linears]
                    + [spec.lm_head_params]) if st.autocast_cache_bytes(spec, job) else 0
    ws = st.CUBLAS_WORKSPACE_BYTES
    notes: list[str] = []
    I_eff = 0
    qkv = 0
    for b in spec.blocks:
        at = b.attention
        qkv = max(qkv, at.num_heads * (at.head_dim + at.v_head_dim) + 2 * at.num_kv_heads * at.head_dim)
        if b.moe is not None:
            # experts run one at a time, except where every token goes through all of them at once (Llama 4)
            I_eff = max(I_eff, b.moe.expert_intermediate_size * 3 * (b.moe.num_experts if b.moe.all_experts else 1),
                        b.moe.shared_intermediate_size * 3)
        elif b.mlp is not None:
            I_eff = max(I_eff, b.mlp.intermediate_size * (3 if b.mlp.gated else 2))

    def layer_transient(tokens: int) -> float:
        t = tokens * (2 * H * res + max(I_eff, qkv) * e)
        if job.attention == "eager":
            nh = max(b.attention.num_heads for b in spec.blocks)
            t = max(t, tokens * (2 * H * res + qkv * e) + B * nh * (tokens // B) * (4 + e) * (tokens // B) / max(1, tokens // B))
        return t

    moments: dict[str, dict[str, float]] = {}
    if N == 0:
        T = B * P
        logits = T * V * e if spec.head in ("causal_lm", "masked_lm") else B * spec.num_labels * 4
        in_layer = layer_transient(T) + (quant.dequant_temp_bytes(spec, job, T) if job.quantization != "none" else 0)
        if job.attention == "eager":
            nh = max(b.attention.num_heads for b in spec.blocks)
            in_layer += B * nh * P * P * (4 + e)
        # the layers' transients are gone when the head runs: the peak is the larger of the two moments
        moments["prefill"] = {"weights": weights, "autocast_cache": cache, "activations": in_layer,
                              "temporaries": ws + T * 8}
        moments["head"] = {"weights": weights, "autocast_cache": cache, "activations": T * H * e,
                           "logits_and_loss": logits, "temporaries": ws + T * 8}
    else:
        kv_prompt = _kv_bytes_per_token(spec, job, P) * B
        kv_full = _kv_bytes_per_token(spec, job, P + N - 1) * B
        one_layer = kv_full / max(1, spec.num_layers)
        step_logits = B * V * (e + 4)  # last position's logits and generate()'s fp32 copy
        qtemp = quant.dequant_temp_bytes(spec, job, B * P) if job.quantization != "none" else 0
        pre = {"weights": weights, "autocast_cache": cache, "kv_cache": kv_prompt,
               "activations": layer_transient(B * P), "logits_and_loss": step_logits, "temporaries": ws + qtemp}
        if job.attention == "eager":
            nh = max(b.attention.num_heads for b in spec.blocks)
            pre["activations"] += B * nh * P * P * (4 + e)
        moments["prefill"] = pre
        moments["decode"] = {"weights": weights, "autocast_cache": cache, "kv_cache": kv_full + one_layer,
                             "activations": layer_transient(B), "logits_and_loss": step_logits,
                             "temporaries": ws}
    phases = {k: int(sum(v.values())) for k, v in moments.items()}
    peak_phase = max(phases, key=phases.get)
    comps = {k: int(v) for k, v in moments[peak_phase].items() if v}
    return comps, peak_phase, phases, notes


def estimate(job: Job, spec: ModelSpec | None = None) -> Breakdown:
    """Estimate the per-GPU memory of ``job`` (single GPU) without torch.

    ``spec`` skips the model lookup (the planner passes it when it sweeps batch sizes).
    """
    spec = _spec(job, spec)
    if job.strategy != "single" or job.gpus > 1:
        from .parallel import estimate_parallel  # DDP, FSDP, ZeRO, offload, TP/PP/SP/EP: per rank

        return estimate_parallel(job, spec)
    if spec.model_type == "gemma2" and job.attention == "sdpa":
        job = job.replace(attention="eager")  # transformers has no sdpa path for Gemma 2 (soft-capping)
    if spec.model_type == "gpt_oss" and job.attention == "sdpa":
        job = job.replace(attention="eager")  # GptOssPreTrainedModel._supports_sdpa = False (attention sinks)
    if job.task == "train":
        comps, phase, phases, notes = _train(spec, job)
    else:
        comps, phase, phases, notes = _infer(spec, job)
    peak = sum(comps.values())
    reserved = peak + allocator_reserve_bytes(peak, job)
    # paged optimizer state is CUDA unified memory: resident on the GPU while there is room, so nvidia-smi
    # counts it even though PyTorch's allocator does not
    total = reserved + cuda_context_bytes(job) + st.paged_optimizer_host_bytes(spec, job)
    return Breakdown(
        engine="estimate", model=spec.name, job=job.to_dict(), parameters=spec.parameters,
        trainable_parameters=st.trainable_params(spec, job), components=comps, peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved, device_total_bytes=total, peak_phase=phase, phases=phases,
        host_bytes=st.paged_optimizer_host_bytes(spec, job), notes=notes)


def max_batch_size(job: Job, gpu_memory_bytes: int, *, limit: int = 1 << 16, spec: ModelSpec | None = None) -> int:
    """Largest micro-batch whose estimated device total fits in ``gpu_memory_bytes`` (0 if none does)."""
    spec = _spec(job, spec)

    def fits(b: int) -> bool:
        return estimate(job.replace(batch_size=b), spec).device_total_bytes <= gpu_memory_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def model_states(parameters: int, *, precision: str = "32-true", optimizer: str = "adamw",
                 trainable: int | None = None) -> dict[str, int]:
    """Weights, gradients and optimizer states of any model from its parameter count (bytes).

    For a plain ``nn.Module`` (no ModelSpec): ``trainable`` defaults to all parameters. Factored
    optimizers (adafactor) need matrix shapes and are not supported here."""
    from ..errors import JobError as _JobError

    if optimizer == "adafactor":
        raise _JobError("adafactor's state depends on matrix shapes; estimate a ModelSpec instead")
    trainable = parameters if trainable is None else trainable
    pb = st.param_bytes(precision)
    per_param_state = {"adamw": 2 * pb, "adam": 2 * pb, "sgd": 0, "sgd-momentum": pb, "lion": pb,
                       "adamw-8bit": 2, "paged-adamw-8bit": 0, "paged-adamw": 0}
    if optimizer not in per_param_state:
        raise _JobError(f"unknown optimizer {optimizer!r}; one of {', '.join(per_param_state)} or adafactor")
    return {"weights": parameters * pb, "gradients": trainable * pb,
            "optimizer_states": trainable * per_param_state[optimizer],
            "autocast_cache": 0}
