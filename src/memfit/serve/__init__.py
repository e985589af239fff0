"""``memfit serve``: how many tokens of KV cache vLLM and SGLang will give you, and what max_model_len fits.

Serving engines do not run ``generate()``: they load the weights, profile one forward pass (vLLM) or
reserve a fixed share of the card (SGLang), and give the rest to a paged KV cache. This package follows
their source (file and version in each docstring) on a :class:`~memfit.models.ModelSpec`, without torch.

- :func:`serve` -> :class:`ServeEstimate` (``to_dict()`` for JSON);
- :func:`min_utilization`: the smallest ``gpu_memory_utilization`` / ``mem_fraction_static`` for N
  concurrent requests of L tokens;
- :func:`fewest_gpus`: the smallest tensor/pipeline-parallel layout for the same.
"""

from __future__ import annotations

import math

from ..errors import ConfigError, JobError, brief
from ..models.spec import ModelSpec
from .result import MAX_COUNT, ServeConfig, ServeEstimate, parse_version

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["serve", "ServeEstimate", "ServeConfig", "min_utilization", "fewest_gpus", "resolve_quantization",
           "SUPPORTED_VERSIONS", "claims_version"]

#: Versions whose accounting memfit follows from their source (inclusive ranges of (major, minor)). vLLM 0.19
#: is claimed: its wheel's ``gpu_worker.determine_available_memory``, ``memory_profiling``, ``request_memory``
#: (total x utilization), ``kv_cache_utils._report_kv_cache_config`` / ``get_max_concurrency_for_kv_cache_config``,
#: ``_dummy_sampler_run`` and the per-card defaults of ``EngineArgs`` are what memfit follows for 0.9-0.18, and
#: its CUDA-graph estimate is logged, not deducted. vLLM 0.20+ is accepted but not claimed: it deducts vLLM's
#: measured CUDA-graph estimate, which memfit only approximates (:func:`memfit.serve.vllm.cuda_graph_estimate`).
SUPPORTED_VERSIONS = {"vllm": ((0, 5), (0, 19)), "sglang": ((0, 3), (0, 5))}
ACCEPTED_VERSIONS = {"vllm": ((0, 5), (99, 99)), "sglang": ((0, 3), (99, 99))}


def claims_version(engine: str, version: str | None) -> bool:
    """Whether memfit claims ``engine`` at ``version`` (what the published-log score is judged on)."""
    lo, hi = SUPPORTED_VERSIONS[engine]
    v = parse_version(version, "0.11" if engine == "vllm" else "0.5")[:2]
    return lo <= v <= hi

#: memfit's quantized layouts for each serving format (:func:`memfit.estimator.quant.linear_bytes`):
#: compressed-tensors w8a8 is int8 with per-channel scales; w4a16 is packed 4-bit with group scales (AWQ's
#: layout); bitsandbytes is nf4.
_LAYOUT = {"mxfp4": "mxfp4", "fp8": "fp8", "awq": "awq", "gptq": "gptq", "bitsandbytes": "nf4", "nf4": "nf4", "w8a8": "int8",
           "int8": "int8", "w4a16": "awq", "none": "none"}


def resolve_quantization(spec: ModelSpec, flag: str | None) -> tuple[str, int, str]:
    """(memfit layout, group size, name) from ``--quantization`` or the model's ``quantization_config``
    (what vLLM and SGLang read from config.json when the flag is absent)."""
    qc = (spec.config or {}).get("quantization_config") or {}
    group = int(qc.get("group_size", 128) or 128) if isinstance(qc, dict) else 128
    name = flag
    if name is None and isinstance(qc, dict) and qc:
        method = str(qc.get("quant_method", "")).lower()
        if method in ("awq", "gptq", "fp8", "bitsandbytes", "mxfp4"):
            name = method
        elif method == "compressed-tensors":
            groups = qc.get("config_groups") or {}
            bits = 8
            symmetric = False
            for g in groups.values() if isinstance(groups, dict) else ():
                w = (g or {}).get("weights") or {}
                bits = int(w.get("num_bits", bits))
                group = int(w.get("group_size") or group)
                symmetric = bool(w.get("symmetric"))
                if w.get("type") == "float":
                    bits = -8
            name = {8: "w8a8", 4: "w4a16", -8: "fp8"}.get(bits, "w8a8")
            if name == "w4a16" and symmetric:
                # vLLM's WNA16 layers of a symmetric checkpoint hold the packed int32 values and the group
                # scales in the model dtype, no zero point (compressed_tensors_moe.py
                # CompressedTensorsWNA16MarlinMoEMethod.create_weights, v0.11.0 wheel: weight_packed,
                # weight_scale, weight_shape, and g_idx / sort_indices emptied without act order)
                return "int4-sym", group, name
        elif method in ("modelopt", "fbgemm_fp8"):
            name = "fp8"
        else:
            raise ConfigError(f"the model's quantization_config uses {method!r}, which memfit serve does not "
                              "count; pass --quantization fp8|awq|gptq|bitsandbytes|w8a8|w4a16")
        if name in ("awq", "gptq") and int(qc.get("bits", 4)) != 4:
            raise ConfigError(f"{name} with {qc.get('bits')} bits is not counted by memfit serve (4-bit only)")
    if name is None:
        # the registry's note of how a published checkpoint stores its weights (a Hub alias of a base entry)
        ckpt = str(getattr(spec, "checkpoint_quantization", "") or "").lower()
        name = {"awq": "awq", "gptq": "gptq", "gptq-int4": "gptq", "gptq-int8": "w8a8", "fp8": "fp8", "nf4": "bitsandbytes",
                "bnb-4bit": "bitsandbytes", "bitsandbytes": "bitsandbytes", "mxfp4": "mxfp4", "w8a8": "w8a8",
                "w4a16": "w4a16", "int8": "w8a8"}.get(ckpt)
        if ckpt and name is None:
            raise ConfigError(f"the checkpoint's quantization {ckpt!r} is not counted by memfit serve; pass "
                              "--quantization fp8|awq|gptq|bitsandbytes|w8a8|w4a16|mxfp4")
    name = name or "none"
    return _LAYOUT[name], group if name in ("awq", "gptq", "w4a16") else 64, name


_ATTN_ROLES = frozenset({"q", "k", "v", "qkv", "o", "q_a", "q_b", "kv_a", "kv_b"})
_MLP_ROLES = frozenset({"gate", "up", "gate_up", "down", "shared_gate", "shared_up", "shared_down"})


def skipped_roles(spec: ModelSpec) -> frozenset[str]:
    """Linear roles a quantized checkpoint keeps in 16 bits: its ``quantization_config``'s
    ``modules_to_not_convert`` / ``ignore`` patterns (``model.layers.*.self_attn``: attention projections;
    ``shared_experts``; ``mlp.(gate|up|down)_proj``: dense MLPs; ``mlp.router`` / ``mlp.gate``: routers, which
    are never quantized anyway)."""
    qc = (spec.config or {}).get("quantization_config") or {}
    if not isinstance(qc, dict):
        return frozenset()
    pats = [str(p) for p in (qc.get("modules_to_not_convert") or qc.get("ignore") or ())]
    roles: set[str] = set()
    for p in pats:
        if "self_attn" in p or "attn" in p.split(".")[-1]:
            roles |= _ATTN_ROLES
        if p.endswith("shared_expert") or "shared_experts" in p:
            roles |= {"shared_gate", "shared_up", "shared_down"}
        if "mlp" in p and "_proj" in p and "expert" not in p:
            # ``re:.*mlp\.(gate|up|gate_up|down)_proj.*`` (Kimi-K2's INT4 checkpoints): the dense MLPs
            roles |= {"gate", "up", "gate_up", "down"}
    return frozenset(roles)


def _element_bytes(spec: ModelSpec, dtype: str) -> int:
    """Model dtype bytes: ``auto`` keeps a 16-bit config dtype and turns float32 into 16 bits (vLLM's
    ``_get_and_verify_dtype``: fp32 checkpoints serve in bf16/fp16); an explicit float32 is 4."""
    return 4 if dtype == "float32" else 2


def _check_version(cfg: ServeConfig) -> None:
    lo, hi = ACCEPTED_VERSIONS[cfg.engine]
    v = parse_version(cfg.engine_version, "0.11" if cfg.engine == "vllm" else "0.5")[:2]
    if not (lo <= v <= hi):
        raise JobError(f"memfit serve follows {cfg.engine} {lo[0]}.{lo[1]} and later; engine_version "
                       f"{cfg.engine_version} is outside that")


def serve(model: str | ModelSpec, *, engine: str = "vllm", gpu: str | None = None,
          gpu_memory: int | str | None = None, **flags: Any) -> ServeEstimate:
    """What ``engine`` will do with ``model``: weights, profile peak, non-torch memory, CUDA graphs, KV cache
    bytes, blocks, tokens, concurrency at ``max_model_len`` and the largest ``max_model_len`` that fits, on the
    most constrained rank.

    ``gpu`` is a catalog name (:func:`memfit.gpus.get_gpu`); ``gpu_memory`` the total the driver reports
    (bytes or a size such as ``"79.19GiB"``). Other keywords are :class:`ServeConfig` fields (the engines'
    flag names: ``tensor_parallel``, ``gpu_memory_utilization``, ``max_model_len``, ...)."""
    from ..units import parse_bytes, parse_card_memory

    if gpu_memory is None and gpu is None:
        raise JobError("give the card: gpu='h100-80gb' (memfit gpus lists them) or gpu_memory='79.19GiB'")
    gpu_name = ""
    if gpu is not None:
        from ..gpus import get_gpu

        card = get_gpu(gpu)
        gpu_name = card.title or card.name
        total = card.memory_bytes
    if gpu_memory is not None:  # a size as a person types it needs its unit (80GiB); numbers from code are bytes
        total = parse_card_memory(gpu_memory, "gpu_memory") if isinstance(gpu_memory, str) else parse_bytes(gpu_memory)
    cfg = ServeConfig(engine=engine, gpu_memory_bytes=int(total), gpu_name=flags.pop("gpu_name", gpu_name), **flags)
    return serve_config(model, cfg)


def serve_config(model: str | ModelSpec, cfg: ServeConfig) -> ServeEstimate:
    """:func:`serve` for a ready :class:`ServeConfig`."""
    from ..models import load_model

    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if spec.head != "causal_lm":
        raise JobError(f"{spec.name} is not a causal LM; vLLM/SGLang serving of encoders has no KV cache")
    _check_version(cfg)
    if cfg.engine == "sglang" and (cfg.data_parallel > 1 or cfg.enable_lora):
        raise JobError("memfit serve models data parallelism and LoRA for vLLM only (SGLang's DP attention and "
                       "LoRA pools are not counted)")
    at = spec.blocks[0].attention
    if at.num_heads % cfg.tensor_parallel:
        raise JobError(f"{spec.name} has {at.num_heads} attention heads, not divisible by tensor_parallel "
                       f"{cfg.tensor_parallel} (vLLM and SGLang require it)")
    if cfg.pipeline_parallel > spec.num_layers:
        raise JobError(f"pipeline_parallel {cfg.pipeline_parallel} is more than the model's {spec.num_layers} layers")
    layout, group, qname = resolve_quantization(spec, cfg.quantization)
    e = _element_bytes(spec, cfg.dtype)
    notes: list[str] = []
    if qname != "none" and cfg.quantization is None:
        notes.append(f"quantization {qname} read from the model's quantization_config")
    if cfg.engine == "vllm":
        from . import vllm as engine_mod
    else:
        from . import sglang as engine_mod
    skip = skipped_roles(spec) if cfg.quantization in (None, qname) else frozenset()
    est = engine_mod.estimate(spec, cfg, quantization=layout, element_bytes=e, group_size=group, notes=notes,
                              skip_roles=skip)
    est.quantization = qname
    vision = (spec.multimodal or {}).get("vision_config")
    if isinstance(vision, dict) and not cfg.text_only:
        from ..models.vision import vision_tower

        if vision_tower(spec.multimodal, spec.hidden_size, strict=False) is None:
            est.notes.append(f"the vision tower ({vision.get('model_type', '?')}) is not counted: memfit does not "
                             "know its layout; the weights are the text model's")
    return est


def _kv_needed(est: ServeEstimate, model: ModelSpec, cfg: ServeConfig, requests: int, tokens: int) -> int:
    """KV bytes ``requests`` requests of ``tokens`` tokens need on the worst rank, in whole blocks."""
    from . import kv as K

    if cfg.engine == "sglang":
        return requests * tokens * est.kv_bytes_per_token
    if est.engine_mode == "v0":
        return requests * K.ceil_div(tokens, est.block_size) * est.kv_bytes_per_token * est.block_size
    kv_e = K.kv_element_bytes(cfg.kv_cache_dtype, _element_bytes(model, cfg.dtype))
    worst = min(est.ranks, key=lambda r: r["num_gpu_blocks"])
    layers = K.layer_kv_specs(model, tp=cfg.tensor_parallel, element_bytes=kv_e,
                              layers=K.layers_on_stage(model.num_layers, cfg.pipeline_parallel, worst["stage"]))
    hybrid = parse_version(cfg.engine_version, "0.11") >= (0, 10, 0) and not cfg.disable_hybrid_kv_cache_manager
    g = K.v1_groups(layers, est.block_size, hybrid=hybrid)
    blocks = requests * K.v1_blocks_per_request(g, tokens, est.max_num_batched_tokens)
    # the reported tokens are num_blocks // groups * block_size: ask for whole blocks of every group
    return blocks * g.page_bytes * g.group_size


def _check_load(requests: Any, tokens: Any) -> None:
    """``requests`` concurrent requests of ``tokens`` tokens: whole numbers from 1 to 2**31 - 1."""
    for name, v in (("requests", requests), ("tokens", tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise JobError(f"{name} must be a whole number >= 1; got {brief(v)}")
        if v > MAX_COUNT:
            raise JobError(f"{name} must be at most {MAX_COUNT:,}; got {brief(v)}")


def min_utilization(model: str | ModelSpec, *, requests: int, tokens: int, engine: str = "vllm",
                    gpu: str | None = None, gpu_memory: int | str | None = None, **flags: Any) -> dict[str, Any]:
    """The smallest ``gpu_memory_utilization`` (vLLM) or ``mem_fraction_static`` (SGLang), in steps of 0.001,
    whose KV cache holds ``requests`` concurrent requests of ``tokens`` tokens (``max_model_len = tokens``).
    With ``data_parallel`` N the requests are spread over the N engines (vLLM's DP load balancing), so each
    engine holds ``ceil(requests / N)``. ``utilization`` is None when even 1.0 is not enough."""
    from ..models import load_model

    _check_load(requests, tokens)
    dp = flags.get("data_parallel") or 1
    if isinstance(dp, int) and dp > 1:
        requests = math.ceil(requests / dp)
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    key = "gpu_memory_utilization" if engine == "vllm" else "mem_fraction_static"
    flags = {**flags, "max_model_len": tokens, key: 1.0}
    est = serve(spec, engine=engine, gpu=gpu, gpu_memory=gpu_memory, **flags)
    cfg = ServeConfig(engine=engine, gpu_memory_bytes=est.gpu_memory_bytes,
                      **{k: v for k, v in flags.items() if k != "gpu_name"})
    need = _kv_needed(est, spec, cfg, requests, tokens)
    if engine == "vllm":
        from .vllm import non_kv_bytes

        frac = (non_kv_bytes(est) + need) / est.gpu_memory_bytes
    else:
        from .sglang import budget, multimodal_factor

        base, non_kv = budget(est)
        factor, _ = multimodal_factor(spec, parse_version(est.engine_version, "0.5"), from_flag=True)
        frac = (non_kv + need) / base / factor  # SGLang scales the stated fraction for multimodal models
    answer = math.ceil(frac * 1000 - 1e-9) / 1000
    while answer <= 1.0:  # confirm with the engine's own rounding
        check = serve(spec, engine=engine, gpu=gpu, gpu_memory=gpu_memory, **{**flags, key: answer})
        if check.max_concurrency >= requests or check.kv_cache_tokens >= requests * tokens and engine == "sglang":
            return {"utilization": answer, "parameter": key, "estimate": check.to_dict()}
        answer = round(answer + 0.001, 3)
    return {"utilization": None, "parameter": key, "estimate": est.to_dict(),
            "reason": f"even {key}=1.0 leaves room for {est.max_concurrency:.2f} such requests"}


def fewest_gpus(model: str | ModelSpec, *, requests: int, tokens: int, engine: str = "vllm",
                gpu: str | None = None, gpu_memory: int | str | None = None, max_gpus: int = 64,
                **flags: Any) -> dict[str, Any]:
    """The fewest GPUs (tensor parallel 1, 2, 4, 8, then pipeline stages of 8) whose KV cache holds
    ``requests`` concurrent requests of ``tokens`` tokens at the given utilization."""
    from ..models import load_model

    _check_load(requests, tokens)
    if (flags.get("data_parallel") or 1) != 1:
        raise JobError("fewest_gpus searches tensor and pipeline parallel layouts of one engine; leave "
                       "data_parallel out (or ask min_utilization for a data-parallel layout)")
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    heads = spec.blocks[0].attention.num_heads
    layouts = [(t, 1) for t in (1, 2, 4, 8) if heads % t == 0]
    top = max(t for t, _ in layouts)
    layouts += [(top, p) for p in range(2, max_gpus // top + 1)]
    tried = []
    for tp, pp in layouts:
        if tp * pp > max_gpus or pp > spec.num_layers:
            continue
        est = serve(spec, engine=engine, gpu=gpu, gpu_memory=gpu_memory,
                    **{**flags, "max_model_len": tokens, "tensor_parallel": tp, "pipeline_parallel": pp})
        tried.append({"tensor_parallel": tp, "pipeline_parallel": pp, "max_concurrency": est.max_concurrency})
        if est.max_concurrency >= requests:
            return {"gpus": tp * pp, "tensor_parallel": tp, "pipeline_parallel": pp, "estimate": est.to_dict(),
                    "tried": tried}
    return {"gpus": None, "tried": tried, "reason": f"no layout up to {max_gpus} GPUs holds {requests} x {tokens} tokens"}
