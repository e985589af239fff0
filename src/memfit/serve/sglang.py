"""SGLang's start-up memory accounting (github.com/sgl-project/sglang, ``python/sglang/srt``).

- ``model_executor/model_runner.py::profile_max_num_token`` (v0.3-v0.5): ``rest = free_after_load -
  free_before_load x (1 - mem_fraction_static)``, ``max_total_num_tokens = rest // cell_size``, where
  ``free_before_load`` is the free memory after the CUDA context and the distributed init (the smallest over
  TP ranks). So the KV cache is ``free_before_load x mem_fraction_static - weights``: the activations, the
  CUDA graphs and everything else live in the ``1 - mem_fraction_static`` share; SGLang does not profile
  a forward pass.
- ``server_args.py``: ``mem_fraction_static`` by TP size before v0.5 (0.88 at TP 1, 0.87 at 2, 0.85 at 4,
  0.81 at 8, 0.79 at 16); from v0.5 (``_handle_gpu_memory_settings``) ``(gpu_mem - reserved) / gpu_mem`` with
  ``reserved`` (MB) = 512 + 1.5 x max(chunked_prefill_size, 2048) + 2 x cuda_graph_max_bs + 1024 x tp x pp / 8;
  ``chunked_prefill_size`` and ``cuda_graph_max_bs`` default by the card's memory;
- multimodal checkpoints: before v0.4.9 ``ModelRunner.model_specific_adjustment`` multiplies
  ``mem_fraction_static`` by 0.95 ("Automatically reduce --mem-fraction-static ... because this is a
  multimodal model"), whatever set it; from v0.4.9 (PR #6881, 2025-06-29) ``ServerArgs.adjust_mem_fraction_for_vlm``
  scales the *default* by ``0.95 x clamp(1 - 0.1 x (L x H**2 / (24 x 1024**2) - 1), 0.8, 1.05)`` of the
  vision tower's layers L and width H;
- the weights' share is what the load takes from the free memory (``Load weight end ... mem usage``): the
  allocator's segments holding every weight tensor (:func:`memfit.serve.memory.reserved_bytes`: a 24.5 MiB
  tensor takes a 26 MiB segment) and the rotary ``cos_sin_cache``, kept in float32 on CUDA from v0.4.2
  (``layers/rotary_embedding.py``, "cache needs to be in FP32 for numerical stability", PR #3169 with the
  sgl-kernel rope, 2025-01-27).
"""

from __future__ import annotations

from ..models.spec import ModelSpec
from ..units import GiB, MiB
from . import kv as K
from .memory import profile_peak, reserved_bytes, weight_tensors_on_rank
from .result import ServeConfig, ServeEstimate, parse_version

DEFAULT_VERSION = "0.5"

#: Memory taken before the weights load with TP = 1: the CUDA context (SGLang allocates nothing of its own
#: before ``min_per_gpu_memory`` is read in ``init_torch_distributed``, and with one rank there are no NCCL or
#: custom all-reduce buffers). 0.38 GiB from sglang-docs-llama31-8b-send-request ("Load weight begin. avail
#: mem=78.81 GB" of an 80 GB card taken as an H100's 79.19 GiB): "used for fitting"; vLLM's log of the same
#: quantity on an RTX 3090 (CUDA_CONTEXT_V063_BYTES, 0.35 GiB) agrees. The other fitting log,
#: sglang-myr1-r1-distill-qwen7b-3090, shows 0.94 GiB (22.76 of 23.70): it ran under WSL2 on a Windows desktop,
#: whose own use of the card memfit cannot know, so it no longer sets the constant (it did, averaged to 0.60).
PRELOAD_TP1_BYTES = int(0.38 * GiB)
#: ... with TP > 1 (NCCL, custom all-reduce): 0.40 GiB from sglang-llmsinclouds-qwq32b-l4 (the L4's 22.03 GiB
#: total, as the GPU catalog has it, less the printed 21.63 GiB free before load, TP 4): "used for fitting".
PRELOAD_TP_BYTES = int(0.40 * GiB)


def gpu_defaults(gpu_mem_mib: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) by the card's memory (``ServerArgs``, v0.4.x-v0.5):
    < 20 GB: 2048, 8; < 35 GB: 2048, 24 (80 at TP >= 4); < 60 GB: 4096, 32 (160); < 90 GB: 8192, 256 (512);
    < 160 GB: 8192, 256 (512); larger: 16384, 512."""
    big_tp = tp >= 4
    if gpu_mem_mib < 20 * 1024:
        return 2048, 8
    if gpu_mem_mib < 35 * 1024:
        return 2048, 80 if big_tp else 24
    if gpu_mem_mib < 60 * 1024:
        return 4096, 160 if big_tp else 32
    if gpu_mem_mib < 160 * 1024:
        return 8192, 512 if big_tp else 256
    return 16384, 512


def default_mem_fraction(version, gpu_mem_mib: float, tp: int, pp: int, chunked: int, graph_bs: int) -> tuple[float, str]:
    if version < (0, 5, 0):
        for limit, frac in ((16, 0.79), (8, 0.81), (4, 0.85), (2, 0.87)):
            if tp >= limit:
                return frac, f"SGLang <0.5 default for TP {tp}"
        return 0.88, "SGLang <0.5 default for TP 1"
    reserved = 512 + 1.5 * max(chunked, 2048) + 2 * graph_bs + tp * pp / 8 * 1024
    return round((gpu_mem_mib - reserved) / gpu_mem_mib, 3), f"SGLang >=0.5 default: {reserved:.0f} MB reserved"


def multimodal_factor(spec: ModelSpec, version, from_flag: bool) -> tuple[float, str]:
    """The factor SGLang applies to ``mem_fraction_static`` for a multimodal checkpoint (see the module
    docstring), and why; (1.0, "") for a text model or where the version leaves it alone."""
    vision = (spec.multimodal or {}).get("vision_config")
    if not isinstance(vision, dict):
        return 1.0, ""
    if version < (0, 4, 9):
        return 0.95, "x 0.95 for a multimodal model (ModelRunner.model_specific_adjustment, < 0.4.9)"
    if from_flag:
        return 1.0, ""
    layers = int(vision.get("num_hidden_layers", 24) or 24)
    width = int(vision.get("hidden_size", 1024) or 1024)
    ratio = layers * width ** 2 / (24 * 1024 ** 2)
    dyn = max(0.8, min(1.05, 1.0 - 0.1 * (ratio - 1.0)))
    return 0.95 * dyn, f"x {0.95 * dyn:.4f} for the vision tower (ServerArgs.adjust_mem_fraction_for_vlm, >= 0.4.9)"


def estimate(spec: ModelSpec, cfg: ServeConfig, *, quantization: str, element_bytes: int, group_size: int,
             notes: list[str], skip_roles: frozenset[str] = frozenset()) -> ServeEstimate:
    version = parse_version(cfg.engine_version, DEFAULT_VERSION)
    e = element_bytes
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    total = cfg.gpu_memory_bytes
    mib = total / MiB
    chunked_default, graph_default = gpu_defaults(mib, tp)
    chunked = cfg.max_num_batched_tokens or chunked_default
    graph_bs = cfg.cuda_graph_max_bs or graph_default
    if cfg.mem_fraction_static is not None:
        frac, src = cfg.mem_fraction_static, "flag"
    else:
        frac, src = default_mem_fraction(version, mib, tp, pp, chunked, graph_bs)
        notes.append(f"mem_fraction_static {frac} ({src})")
    factor, why = multimodal_factor(spec, version, from_flag=cfg.mem_fraction_static is not None)
    if factor != 1.0:
        frac = frac * factor
        src = f"{src}, {why}"
        notes.append(f"mem_fraction_static {frac:.4f} ({why})")
    max_len = cfg.max_model_len or spec.max_position_embeddings or 2048
    seqs = cfg.max_num_seqs or 0
    kv_e = K.kv_element_bytes(cfg.kv_cache_dtype, e)
    page = cfg.block_size or 1
    preload = PRELOAD_TP1_BYTES if tp * pp == 1 else PRELOAD_TP_BYTES
    free_before = total - preload
    ranks = []
    for stage in range(pp):
        layers = K.layer_kv_specs(spec, tp=tp, element_bytes=kv_e, layers=K.layers_on_stage(spec.num_layers, pp, stage))
        w = reserved_bytes(weight_tensors_on_rank(
            spec, tp=tp, pp=pp, stage=stage, quantization=quantization, element_bytes=e, group_size=group_size,
            skip_roles=skip_roles, vision=not cfg.text_only, rope_element_bytes=4 if version >= (0, 4, 2) else None))
        kv_bytes = int(free_before * frac - w)
        cell = K.sglang_cell_bytes(layers)
        tokens = max(0, kv_bytes) // cell if cell else 0
        tokens = K.floor_to(int(tokens), page)
        act, moment = profile_peak(spec, tokens=chunked, seqs=min(chunked, graph_bs), tp=tp, pp=pp, stage=stage,
                                   element_bytes=e, sampler="v1")
        ranks.append({"stage": stage, "weights_bytes": w, "kv_cache_bytes": kv_bytes, "kv_cache_tokens": tokens,
                      "kv_bytes_per_token": cell, "activation_peak_bytes": act, "moment": moment})
    worst = min(ranks, key=lambda r: r["kv_cache_tokens"])
    tokens = worst["kv_cache_tokens"]
    if any(b.attention.sliding_window for b in spec.blocks):
        notes.append("sliding-window layers get full KV cells (SGLang's hybrid SWA pool is not modelled)")
    notes.append(f"the prefill chunk ({chunked} tokens) and CUDA graphs (batch <= {graph_bs}) run in the "
                 f"{1 - frac:.2f} share SGLang leaves outside mem_fraction_static; their sizes are shown, not deducted")
    cg = 0 if cfg.enforce_eager else int(graph_bs * max(
        (worst["activation_peak_bytes"] / max(1, chunked)), 0))
    fits = tokens >= max_len
    return ServeEstimate(
        engine="sglang", engine_version=".".join(map(str, version)), engine_mode=None, model=spec.name,
        gpu_memory_bytes=total, tensor_parallel=tp, pipeline_parallel=pp, utilization=frac, utilization_source=src,
        max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=chunked, kv_cache_dtype=cfg.kv_cache_dtype,
        quantization=quantization, weights_bytes=worst["weights_bytes"],
        activation_peak_bytes=worst["activation_peak_bytes"], activation_peak_moment=worst["moment"],
        non_torch_bytes=preload, cuda_graph_bytes=cg, cuda_graph_deducted=False,
        kv_cache_bytes=max(0, worst["kv_cache_bytes"]), kv_bytes_per_token=worst["kv_bytes_per_token"],
        block_size=page, num_gpu_blocks=tokens // page, kv_cache_tokens=tokens,
        max_concurrency=round(tokens / max_len, 4) if max_len else 0.0, max_model_len_fits=tokens, fits=fits,
        rule="sglang-mem-fraction", ranks=ranks, notes=notes)


def budget(est: ServeEstimate) -> tuple[int, int]:
    """(base, non-KV) with ``kv = base x mem_fraction_static - non_kv`` on the worst rank."""
    return est.gpu_memory_bytes - est.non_torch_bytes, est.weights_bytes
