"""vLLM's start-up memory accounting: how much of the card goes to the KV cache, and how it is paged.

Sources (github.com/vllm-project/vllm, by tag):

- v0.5.0-v0.6.2 ``vllm/worker/worker.py::determine_num_available_blocks``: after the profile run,
  ``peak = init_free - free`` (everything this process added: weights, the allocator's reserve of the
  profile peak, NCCL), ``num_gpu_blocks = (total x gpu_memory_utilization - peak) // cache_block_size``;
- v0.6.3-v0.6.4 (same function, PR #9352): ``peak = torch allocated peak + (total used - torch allocated)``,
  so the CUDA context (and any other process on the card) is charged too;
- V1 v0.7-v0.8.5 (``v1/worker/gpu_worker.py::determine_available_memory`` before PR #17122): like
  v0.6.3, the torch peak plus all non-torch memory in use, the CUDA context included;
- v0.6.5+ V0 (PR #10511, ``vllm/utils.py::memory_profiling`` / ``MemorySnapshot``) and V1
  (``v1/worker/gpu_worker.py::determine_available_memory``, v0.9-v0.11): ``available = total x util -
  (weights + torch peak increase of the profile run + non-torch increase since the worker started)``;
  the CUDA context made before the first snapshot is not charged;
- MXFP4 MoE weights on Hopper (v0.10.1+): padded, swizzled, with the checkpoint's scales kept
  (:func:`memfit.serve.memory.mxfp4_moe_extra_bytes`); other cards' MXFP4 backends (Marlin on Ampere,
  FlashInfer on Blackwell) lay the experts out differently and are counted as the checkpoint;
- v0.20+ V1: the CUDA-graph memory estimate (``GPUModelRunner.profile_cudagraph_memory``) is deducted as
  well: ``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS`` defaults to "1" in ``vllm/envs.py`` of the v0.20.0,
  v0.21.0 and v0.26.0 wheels and to "0" in v0.19.0, whose ``v1/worker/gpu_worker.py::determine_available_memory``
  measures the estimate but only logs it ("This will become the default in v0.19", a hint that shipped one
  release early). vLLM's estimate is a measurement (two graphs of each capture mode captured into a scratch
  pool, ``mem_get_info`` before and after); memfit's :func:`cuda_graph_estimate` is a rough model of it,
  which is why v0.20+ is accepted but not claimed (:data:`memfit.serve.SUPPORTED_VERSIONS`).

``gpu_memory_utilization`` is a fraction of the card's *total* memory in every version.
"""

from __future__ import annotations

from ..models.spec import ModelSpec
from ..units import GiB, MiB
from . import kv as K
from .memory import (fused_moe_chunk_tokens, layer_peak_per_token, lora_bytes_on_rank, mxfp4_moe_extra_bytes,
                     profile_peak, weights_on_rank)
from .result import ServeConfig, ServeEstimate, parse_version

DEFAULT_VERSION = "0.11"

#: Non-torch memory a worker adds after its first snapshot with TP = 1 (cuBLAS/cuDNN handles, attention
#: backends' and samplers' buffers outside PyTorch's allocator). Data-centre cards (>= 40 GiB): 0.13 GiB from
#: vllm-llmd-llama31-8b-h100 and vllm-llmd-qwen3-0.6b-h100 (H100, V1); consumer cards: 0.06 GiB from
#: vllm-rldecision-qwen25-05b-bnb-3090 (RTX 3090, v0.10). "Used for fitting".
NON_TORCH_TP1_BYTES = int(0.13 * GiB)
NON_TORCH_TP1_CONSUMER_BYTES = int(0.06 * GiB)
#: ... with TP > 1: NCCL communicators and the all-reduce buffers. Hopper boards (H100/H200/H20, :func:`nvswitch_board`):
#: 0.55 GiB per rank from vllm-llmd-qwen3-32b-2xh100-tp2 (H100, TP 2, v0.11; "used for fitting"; the
#: llm-d table prints 0.54-0.55 for both of its TP 2 runs). Other cards: 0.20 GiB from the log of PR #14447
#: (RTX 3090s, v0.8; "used for fitting"). The A100 logs of dennislee22/vLLM-benchmarking (v0.10.1.1, TP 2,
#: custom all-reduce disabled there: "your platform lacks GPU P2P capability" on one node, "spans across
#: nodes" on two) leave 0.15 and 0.19 GiB per rank besides their profile peak, the consumer figure, not
#: Hopper's: what the extra ~0.35 GiB on Hopper is (NCCL's NVLink-SHARP buffers on NVSwitch systems, vLLM
#: 0.11's symmetric-memory all-reduce, ``all_reduce_utils.py``'s 64 MiB for SM 9.0) is not established.
NON_TORCH_TP_BYTES = int(0.55 * GiB)
NON_TORCH_TP_CONSUMER_BYTES = int(0.20 * GiB)
#: vLLM v0.6.3-v0.6.4 charge everything not allocated by torch, the CUDA context included: 0.35 GiB in the
#: log of issue #10517 (RTX 3090, TP 1): "used for fitting" (vllm-gh10517-a/b). V1 before v0.9 charges the
#: same (``rule_of``); the constant is reused there, not refitted.
CUDA_CONTEXT_V063_BYTES = int(0.35 * GiB)
#: CUDA graphs: per captured batch size, the graph's own bookkeeping on top of the shared memory pool.
#: An assumption (a few MiB per graph); only deducted from the KV cache by v0.20+.
CUDA_GRAPH_PER_SIZE_BYTES = 4 * MiB


def hopper(gpu_name: str) -> bool:
    """Whether the card is a Hopper (SM 9.0: H100, H200, H800, H20, GH200), from its name."""
    import re

    return bool(re.search(r"\b(g?h(100|200|800|20))\b", gpu_name.lower().replace("-", " ")))


def nvswitch_board(gpu_name: str) -> bool:
    """Hopper or Blackwell data-centre cards (H100/H200/H800/H20, B100/B200/B300, GB200/GB300), the boards
    whose TP ranks memfit charges :data:`NON_TORCH_TP_BYTES` (fitted on H100s; Blackwell is assumed alike,
    no log checks it)."""
    import re

    return hopper(gpu_name) or bool(re.search(r"\b(g?b(100|200|300))\b", gpu_name.lower().replace("-", " ")))


def unified_memory(gpu_name: str) -> bool:
    """Whether the card shares its memory with the CPU (GB10 / DGX Spark), where NVML reports no device memory:
    vLLM's per-card defaults then see 0 bytes (``engine/arg_utils.py`` v0.19.0: ``device_memory = 0`` when
    ``get_device_total_memory`` raises). Seen in vllm-guardkit-qwen3-30b-a3b-fp8-gb10 (tuning): its
    ``max_num_batched_tokens=2048`` is the small-card default."""
    low = gpu_name.lower()
    return "gb10" in low or "dgx spark" in low


def mode_of(cfg: ServeConfig, version: tuple[int, int, int]) -> str:
    """V1 is the default engine from v0.8 (``VLLM_USE_V1=1``) and the only one from v0.11."""
    if cfg.engine_mode:
        return cfg.engine_mode
    return "v1" if version >= (0, 8, 0) else "v0"


def rule_of(version: tuple[int, int, int], mode: str) -> str:
    """Which accounting the worker applies (module docstring). V1 before v0.9
    (``v1/worker/gpu_worker.py::determine_available_memory``, v0.7-v0.8.5) adds to the torch peak
    everything in use on the device that torch has not allocated (``mem_get_info`` used minus
    ``allocated_bytes.all.current``), the CUDA context included, as V0 v0.6.3-v0.6.4 did; its switch to
    ``memory_profiling`` came with the "Available KV cache memory" log line (PR #17122)."""
    if mode == "v0" and version < (0, 6, 3):
        return "v0-free-delta"
    if mode == "v0" and version < (0, 6, 5):
        return "v0-torch-peak"
    if mode == "v1" and version < (0, 9, 0):
        return "v1-torch-peak"
    return "memory-profiling"


def default_limits(cfg: ServeConfig, spec: ModelSpec, version, mode: str, max_model_len: int) -> tuple[int, int, str]:
    """(max_num_seqs, max_num_batched_tokens, why) when not given, for ``vllm serve``.

    - V0 (``vllm/engine/arg_utils.py`` / ``config.py::SchedulerConfig``, v0.5-v0.6): 256 sequences;
      chunked prefill is on by default when ``max_model_len > 32768`` with 512 tokens per step, else a step
      takes ``max(max_model_len, 2048)`` tokens; v0.7 turns chunked prefill off for MLA models, and v0.8-v0.10
      (``_set_default_args_v0``) leave it off for MLA, multimodal and sliding-window models;
    - V1 (``EngineArgs._set_default_args_v1``), for the API server, read from the published wheels:
      v0.8.0: 8192 tokens when the device name contains "h100" or "h200", else 2048, and always 1024
      sequences; v0.8.4: the same name test for both, 8192 tokens / 1024 sequences, else 2048 / 256; v0.8.5:
      ``device_memory >= 70 GiB`` instead of the name; v0.9.0, v0.9.2, v0.10.1.1, v0.11.0: ``>= 70 GiB and
      "a100" not in device_name`` (PR #17885). v0.8.1-v0.8.3 were not read; memfit keeps v0.8.0's rule for them.
      (memfit had applied 1024 sequences to the smaller cards before v0.10, from a fit to the L40S log of PR
      #17122, vllm-pr17122; the source gives that v0.8.4+ PR branch 256.) The card's memory is NVML's
      (``CudaPlatform.get_device_total_memory``: ``nvmlDeviceGetMemoryInfo``, v0.19.0 ``platforms/cuda.py``), and
      ``_set_default_args`` takes 0 when that raises, as it does on the unified memory of a GB10 (DGX Spark):
      the small-card defaults apply there whatever the 119 GiB torch reports (:func:`unified_memory`).
    """
    if mode == "v0":
        seqs = cfg.max_num_seqs or 256
        if cfg.max_num_batched_tokens:
            return seqs, cfg.max_num_batched_tokens, "flag"
        mla = any(b.attention.kind == "mla" for b in spec.blocks)
        if mla and (0, 7, 0) <= version < (0, 8, 0):
            # config.py v0.7.x: "MLA is enabled; forcing chunked prefill and prefix caching to be disabled."
            return seqs, max(max_model_len, 2048), "V0 0.7 with MLA: chunked prefill forced off, max(max_model_len, 2048)"
        if version >= (0, 8, 0):
            # arg_utils.py v0.8-v0.10 ``_set_default_args_v0``: "Chunked prefill not supported for Multimodal or
            # MLA in V0"; the long-context default skips sliding-window models too
            multimodal = bool((spec.multimodal or {}).get("vision_config"))
            sliding = any(b.attention.sliding_window for b in spec.blocks)
            if mla or multimodal or sliding:
                why = "MLA" if mla else ("a multimodal model" if multimodal else "sliding-window attention")
                return seqs, max(max_model_len, 2048), f"V0 0.8+ with {why}: no chunked prefill, max(max_model_len, 2048)"
        if max_model_len > 32768:
            return seqs, 512, "V0 default: chunked prefill on above 32K context, 512 tokens"
        return seqs, max(max_model_len, 2048), "V0 default: max(max_model_len, 2048) without chunked prefill"
    name = cfg.gpu_name.lower()
    if version < (0, 8, 5):
        big = "h100" in name or "h200" in name
    else:
        big = cfg.gpu_memory_bytes >= 70 * GiB and not unified_memory(cfg.gpu_name)
        if version >= (0, 9, 0):
            big = big and "a100" not in name
    seqs = cfg.max_num_seqs or (1024 if big or version < (0, 8, 4) else 256)
    tokens = cfg.max_num_batched_tokens or (8192 if big else 2048)
    return seqs, tokens, "flag" if cfg.max_num_batched_tokens else "V1 default for vllm serve"


def cuda_graph_estimate(spec: ModelSpec, cfg: ServeConfig, max_num_seqs: int, e: int, mode: str) -> int:
    """CUDA-graph memory: the shared pool holds the largest captured batch's layer peak, plus a small
    per-graph cost. Capture sizes: 1, 2, 4 and multiples of 8 up to ``min(max_num_seqs, 256)`` in V0
    (``_BATCH_SIZES_TO_CAPTURE``), up to ``min(2 x max_num_seqs, 512)`` in V1
    (``CompilationConfig.init_with_cudagraph_sizes``). A rough estimate (no log checks it yet)."""
    if cfg.enforce_eager:
        return 0
    top = min(max_num_seqs, 256) if mode == "v0" else min(2 * max_num_seqs, 512)
    sizes = sum(1 for s in (1, 2, 4) if s <= top) + top // 8
    tp = cfg.tensor_parallel
    per = max(layer_peak_per_token(b, tp, e, spec.hidden_size) for b in spec.blocks)
    return int(top * per + sizes * CUDA_GRAPH_PER_SIZE_BYTES)


def estimate(spec: ModelSpec, cfg: ServeConfig, *, quantization: str, element_bytes: int, group_size: int,
             notes: list[str], skip_roles: frozenset[str] = frozenset()) -> ServeEstimate:
    """vLLM's KV cache on every rank; the result is the most constrained rank (V1 and V0 both give every
    rank the smallest rank's block count: ``get_kv_cache_configs`` / the executor's ``min`` over workers)."""
    version = parse_version(cfg.engine_version, DEFAULT_VERSION)
    mode = mode_of(cfg, version)
    rule = rule_of(version, mode)
    e = element_bytes
    util = cfg.gpu_memory_utilization if cfg.gpu_memory_utilization is not None else 0.9
    util_src = "flag" if cfg.gpu_memory_utilization is not None else "vLLM default 0.9"
    max_len = cfg.max_model_len or spec.max_position_embeddings or 2048
    if not cfg.max_model_len:
        notes.append(f"max_model_len defaults to the model's max_position_embeddings ({max_len})")
    seqs, tokens, why = default_limits(cfg, spec, version, mode, max_len)
    if why != "flag":
        notes.append(f"max_num_batched_tokens {tokens} ({why}); max_num_seqs {seqs}")
    block_size = cfg.block_size or 16
    kv_e = K.kv_element_bytes(cfg.kv_cache_dtype, e)
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    total = cfg.gpu_memory_bytes
    hybrid = mode == "v1" and version >= (0, 10, 0) and not cfg.disable_hybrid_kv_cache_manager
    cg = cuda_graph_estimate(spec, cfg, seqs, e, mode)
    cg_deducted = mode == "v1" and version >= (0, 20, 0) and cg > 0
    multi = NON_TORCH_TP_BYTES if nvswitch_board(cfg.gpu_name) else NON_TORCH_TP_CONSUMER_BYTES
    single = NON_TORCH_TP1_BYTES if total >= 40 * GiB else NON_TORCH_TP1_CONSUMER_BYTES
    dp = cfg.data_parallel
    if dp > 1 and mode == "v0":
        from ..errors import JobError

        raise JobError("data parallelism needs vLLM's V1 engine (engine_mode v1, vLLM 0.8+)")
    moe = any(b.moe is not None for b in spec.blocks)
    # DP ranks of a MoE model hold an EP/TP group's communicators (NCCL) across all dp x tp ranks
    non_torch = single if tp * pp * (dp if moe else 1) == 1 else multi
    if rule in ("v0-torch-peak", "v1-torch-peak"):
        non_torch = CUDA_CONTEXT_V063_BYTES + (0 if tp * pp == 1 else multi)
    profile_seqs = min(seqs, tokens)
    # V1's TopKTopPSampler takes FlashInfer when it is installed (v1/sample/ops/topk_topp_sampler.py,
    # v0.8-v0.11: VLLM_USE_FLASHINFER_SAMPLER None means on in V1); V0's sampler never does by default
    sampler = cfg.sampler or "native"
    if mode == "v1" and cfg.sampler:
        notes.append(f"sampler {sampler}: the profile's top-k/top-p moment uses "
                     f"{'FlashInfer (no sort)' if sampler == 'flashinfer' else 'the PyTorch sort'}")
    if dp > 1:
        notes.append(f"data_parallel {dp}: {dp} engines of {tp * pp} GPU(s) each, every one with this KV cache"
                     + (f"; MoE layers split over {dp * tp} ranks"
                        f"{' by experts' if cfg.enable_expert_parallel else ''}" if moe else ""))
    # V0 v0.6.5+ builds the slots after measuring the weights and measures the profile's peak from a snapshot
    # taken after them; before v0.6.5 the free-memory delta (v0.5-v0.6.2) and the torch allocated peak
    # (v0.6.3-v0.6.4) both include them
    lora_charged = cfg.enable_lora and (mode == "v1" or rule in ("v0-free-delta", "v0-torch-peak"))
    if cfg.enable_lora and not lora_charged:
        notes.append("LoRA: V0 builds the adapter slots after measuring the weights and resets the peak before "
                     "profiling (worker/model_runner.py::load_model, worker/worker.py), so they are not "
                     "deducted from the KV cache (they still take memory beyond gpu_memory_utilization)")

    # vLLM v0.7.1-v0.7.3 materialize MLA's absorbed W_Q_UK / W_UV_O after loading (memory.mla_absorbed_bytes);
    # PR #14770 removed them before v0.8.0. Only unquantized and FP8 MLA layers take that path.
    absorbed = (0, 7, 1) <= version < (0, 8, 0) and any(b.attention.kind == "mla" for b in spec.blocks)
    if absorbed and quantization not in ("none", "fp8"):
        notes.append(f"MLA with {quantization} weights: vLLM 0.7.x supports MLA only for unquantized and FP8 "
                     "layers (others need VLLM_MLA_DISABLE=1, a full per-head cache memfit does not model)")
        absorbed = False
    if absorbed:
        notes.append("vLLM 0.7.1-0.7.3 keep MLA's absorbed W_Q_UK / W_UV_O matrices beside the weights "
                     "(VLLM_MLA_PERFORM_MATRIX_ABSORPTION=1, removed in v0.8.0)")
    # V0's MLA backend (v0.7.1+) runs the compute-friendly prefill over the whole profile batch
    mla_prefill = None
    if mode == "v0" and version >= (0, 7, 1) and any(b.attention.kind == "mla" for b in spec.blocks):
        mla_prefill = "0.8" if version >= (0, 8, 0) else "0.7"
    ranks = []
    for stage in range(pp):
        layers = K.layer_kv_specs(spec, tp=tp, element_bytes=kv_e, layers=K.layers_on_stage(spec.num_layers, pp, stage))
        if cfg.mla_cuda_mem_align_kv_cache and mode == "v0":
            layers = K.aligned_mla(layers)
        w = weights_on_rank(spec, tp=tp, pp=pp, stage=stage, quantization=quantization, element_bytes=e,
                            group_size=group_size, skip_roles=skip_roles, vision=not cfg.text_only,
                            moe_ranks=tp * dp if dp > 1 else None, expert_parallel=cfg.enable_expert_parallel,
                            mla_absorbed=absorbed)
        if quantization == "mxfp4" and hopper(cfg.gpu_name) and version >= (0, 10, 1):
            w += mxfp4_moe_extra_bytes(spec, tp=tp, pp=pp, stage=stage)
        lora = lora_bytes_on_rank(spec, tp=tp, pp=pp, stage=stage, max_loras=cfg.max_loras,
                                  max_lora_rank=cfg.max_lora_rank, element_bytes=e) if cfg.enable_lora else 0
        if lora_charged:
            # V1 gpu_model_runner.py::load_model (v0.8-v0.11) builds the LoRA model inside the
            # DeviceMemoryProfiler of the weights: "Model loading took" includes the adapter slots
            w += lora
        act, moment = profile_peak(spec, tokens=tokens, seqs=profile_seqs, tp=tp, pp=pp, stage=stage,
                                   element_bytes=e, sampler="v0" if mode == "v0" else "v1", dp=dp,
                                   expert_parallel=cfg.enable_expert_parallel, mla_v0_prefill=mla_prefill,
                                   sampler_backend=sampler, moe_chunk=fused_moe_chunk_tokens(version))
        per_tok = sum(x.per_token_bytes for x in layers)
        available = int(total * util - w - act - non_torch - (cg if cg_deducted else 0))
        if mode == "v0":
            blk = K.v0_block_bytes(layers, block_size)
            blocks = max(0, available // blk) if blk else 0
            ranks.append({"stage": stage, "weights_bytes": w, "activation_peak_bytes": act, "kv_cache_bytes": available,
                          "num_gpu_blocks": int(blocks), "block_bytes": blk, "moment": moment,
                          "kv_bytes_per_token": per_tok, "lora_bytes": lora})
        else:
            g = K.v1_groups(layers, block_size, hybrid=hybrid)
            blocks = K.v1_num_blocks(available, g)
            ranks.append({"stage": stage, "weights_bytes": w, "activation_peak_bytes": act, "kv_cache_bytes": available,
                          "num_gpu_blocks": int(blocks), "block_bytes": g.page_bytes * g.group_size, "moment": moment,
                          "kv_bytes_per_token": per_tok, "lora_bytes": lora, "_groups": g})
    worst = min(ranks, key=lambda r: r["num_gpu_blocks"])
    per_token = worst["kv_bytes_per_token"]
    blocks = worst["num_gpu_blocks"]
    if mode == "v0":
        kv_tokens = blocks * block_size
        concurrency = kv_tokens / max_len
        fits_len = kv_tokens
    else:
        g = worst["_groups"]
        kv_tokens = K.v1_reported_tokens(blocks, g)
        concurrency = K.v1_max_concurrency(blocks, g, max_len, tokens, legacy=version < (0, 10, 0))
        fits_len = K.v1_max_model_len(blocks * g.page_bytes * g.group_size, g, tokens)
    for r in ranks:
        r.pop("_groups", None)
    if worst["kv_cache_bytes"] <= 0:
        notes.append("no memory is left for the KV cache: raise gpu_memory_utilization, add GPUs or quantize")
    if cg and not cg_deducted:
        notes.append("CUDA graphs are captured after the KV cache is allocated, outside gpu_memory_utilization")
    fits = fits_len >= max_len and blocks > 0
    if not fits and blocks > 0:
        notes.append(f"vLLM refuses to start: max_model_len {max_len} needs more KV cache than the {fits_len} "
                     "tokens that fit; lower --max-model-len or raise --gpu-memory-utilization")
    return ServeEstimate(
        engine="vllm", engine_version=".".join(map(str, version)), engine_mode=mode, model=spec.name,
        gpu_memory_bytes=total, tensor_parallel=tp, pipeline_parallel=pp, utilization=util,
        utilization_source=util_src, max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=tokens,
        kv_cache_dtype=cfg.kv_cache_dtype, quantization=quantization, weights_bytes=worst["weights_bytes"],
        activation_peak_bytes=worst["activation_peak_bytes"], activation_peak_moment=worst["moment"],
        non_torch_bytes=non_torch, cuda_graph_bytes=cg, cuda_graph_deducted=cg_deducted,
        kv_cache_bytes=max(0, worst["kv_cache_bytes"]), kv_bytes_per_token=int(per_token), block_size=block_size,
        num_gpu_blocks=blocks, kv_cache_tokens=kv_tokens, max_concurrency=round(concurrency, 4),
        max_model_len_fits=fits_len, fits=fits, rule=rule, data_parallel=dp, lora_bytes=worst["lora_bytes"],
        lora_in_weights=bool(lora_charged and worst["lora_bytes"]),
        ranks=ranks, notes=notes)


def non_kv_bytes(est: ServeEstimate) -> int:
    """What vLLM subtracts from ``total x util`` before the KV cache (the worst rank)."""
    return est.weights_bytes + est.activation_peak_bytes + est.non_torch_bytes + \
        (est.cuda_graph_bytes if est.cuda_graph_deducted else 0)
