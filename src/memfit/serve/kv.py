"""Paged KV cache accounting of the serving engines: per-layer KV specs, pages, blocks, tokens, concurrency.

Follows vLLM's ``vllm/v1/kv_cache_interface.py`` and ``vllm/v1/core/kv_cache_utils.py`` (v0.10-v0.11:
``get_kv_cache_groups``, ``_get_kv_cache_groups_uniform_page_size``, ``get_num_blocks``,
``_report_kv_cache_config``, ``get_max_concurrency_for_kv_cache_config``), vLLM's V0
``vllm/worker/cache_engine.py::get_cache_block_size`` (v0.5-v0.6), and SGLang's
``model_executor/model_runner.py::profile_max_num_token`` cell size (v0.3-v0.5). Pure functions, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.spec import Attention, ModelSpec

__all__ = ["LayerKV", "layer_kv_specs", "kv_element_bytes", "page_bytes", "KVGroups", "v1_groups",
           "v1_num_blocks", "v1_reported_tokens", "v1_max_concurrency", "v1_max_model_len",
           "v0_block_bytes", "sglang_cell_bytes", "layers_on_stage", "aligned_mla"]


@dataclass(frozen=True, slots=True)
class LayerKV:
    """One attention layer's KV cache on one rank, as vLLM's ``KVCacheSpec`` describes it."""

    kind: str
    """``full``, ``sliding`` or ``mla``."""
    num_kv_heads: int
    """KV heads this rank stores (MLA: 1, its latent is not split over TP)."""
    head_size: int
    """Elements per head per token (MLA: kv_lora_rank + qk_rope_head_dim)."""
    element_bytes: int
    sliding_window: int | None = None

    @property
    def per_token_bytes(self) -> int:
        """Bytes one token takes in this layer: K and V (2 x heads x head_size) for full and sliding
        attention (``AttentionSpec.page_size_bytes``), the single latent for MLA (``MLAAttentionSpec``)."""
        kv = 1 if self.kind == "mla" else 2
        return kv * self.num_kv_heads * self.head_size * self.element_bytes


def kv_element_bytes(kv_cache_dtype: str, model_dtype_bytes: int) -> int:
    """Bytes per KV element: ``auto`` follows the model dtype; fp8 variants (``fp8``, ``fp8_e4m3``,
    ``fp8_e5m2``) store one byte. vLLM and SGLang keep the fp8 KV scales as one float per layer
    (``Attention._k_scale`` / ``_v_scale``), not per token, so they add nothing to a page."""
    d = kv_cache_dtype.lower()
    if d == "auto":
        return model_dtype_bytes
    if d.startswith("fp8"):
        return 1
    if d in ("bf16", "bfloat16", "fp16", "float16", "half"):
        return 2
    if d in ("fp32", "float32", "float"):
        return 4
    from ..errors import JobError

    raise JobError(f"kv_cache_dtype must be auto, fp8, fp8_e4m3, fp8_e5m2, bf16, fp16 or fp32; got {kv_cache_dtype!r}")


def _layer_kv(at: Attention, tp: int, e: int, *, mla_enabled: bool = True) -> LayerKV:
    """The KV spec of a layer on one TP rank. KV heads split over TP and are replicated when there are
    fewer heads than ranks (vLLM ``ModelConfig.get_num_kv_heads``: ``max(1, total // tp)``). MLA caches
    one compressed latent per token, the same on every rank (vLLM ``MLAAttentionSpec``, SGLang's MLA
    cell size)."""
    if at.kind == "mla" and mla_enabled:
        return LayerKV("mla", 1, at.kv_lora_rank + at.qk_rope_head_dim, e)
    heads = at.num_heads if at.kind == "mla" else at.num_kv_heads
    head = max(at.head_dim, at.v_head_dim)
    kind = "sliding" if at.sliding_window else "full"
    return LayerKV(kind, max(1, heads // tp), head, e, at.sliding_window)


def block_order(spec: ModelSpec) -> list[int]:
    """The block index of each layer of ``spec``, in model order (``layer_blocks`` where the spec has them)."""
    if spec.layer_blocks and len(spec.layer_blocks) == spec.num_layers:
        return list(spec.layer_blocks)
    return [i for i, b in enumerate(spec.blocks) for _ in range(b.count)]


def sum_over_stage(spec: ModelSpec, pp: int, stage: int, per_block) -> int:
    """``per_block(block)`` summed over the layers of pipeline ``stage`` (each block's value computed once)."""
    order = block_order(spec)
    cache: dict[int, int] = {}
    total = 0
    for li in layers_on_stage(len(order), pp, stage):
        bi = order[li]
        if bi not in cache:
            cache[bi] = per_block(spec.blocks[bi])
        total += cache[bi]
    return total


def layers_on_stage(num_layers: int, pp: int, stage: int) -> range:
    """Layer indices held by pipeline stage ``stage``: ``num_layers // pp`` each, the remainder going one
    each to the stages before the last (vLLM ``vllm/distributed/utils.py::get_pp_indices``, v0.6-v0.11)."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    start = sum(parts[:stage])
    return range(start, start + parts[stage])


def layer_kv_specs(spec: ModelSpec, *, tp: int = 1, element_bytes: int = 2,
                   layers: range | None = None) -> list[LayerKV]:
    """The KV spec of every attention layer of ``spec`` on one rank, in model order."""
    order = block_order(spec)
    if layers is not None:
        order = [order[i] for i in layers]
    return [_layer_kv(spec.blocks[bi].attention, tp, element_bytes) for bi in order]


def aligned_mla(layers: list[LayerKV], alignment: int = 256) -> list[LayerKV]:
    """MLA layers with each token's entry padded to ``alignment`` bytes (vLLM V0's
    ``CacheEngine._align_cache`` / ``align_to_256bytes``, PR #12676): 576 bf16 elements -> 640."""
    out = []
    for x in layers:
        if x.kind == "mla":
            entry = -(-x.head_size * x.element_bytes // alignment) * alignment
            x = LayerKV(x.kind, x.num_kv_heads, entry // x.element_bytes, x.element_bytes, x.sliding_window)
        out.append(x)
    return out


def page_bytes(layer: LayerKV, block_size: int) -> int:
    """One block of one layer: ``block_size`` tokens (vLLM ``AttentionSpec.page_size_bytes``)."""
    return block_size * layer.per_token_bytes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------- vLLM V1
@dataclass(frozen=True, slots=True)
class KVGroups:
    """vLLM V1's KV cache groups on one rank: ``groups`` lists (layer spec, layers in the group);
    every group has ``group_size`` layers (padded), and all share one page size."""

    groups: tuple[tuple[LayerKV, int], ...]
    group_size: int
    page_bytes: int
    block_size: int


def v1_groups(layers: list[LayerKV], block_size: int, *, hybrid: bool = True) -> KVGroups:
    """Group layers as vLLM V1 does (``get_kv_cache_groups``, v0.10+): one group when every layer has the
    same spec; else layers of each spec are split into groups of ``group_size`` = the fewest layers of any
    spec (the most, if that is < 1.5x the fewest), padding the last group of a spec. With the hybrid
    manager off (``hybrid=False``: vLLM before v0.10, or ``--disable-hybrid-kv-cache-manager``) sliding
    window layers are treated as full attention (``unify_hybrid_kv_cache_specs``). Page sizes must agree
    (vLLM raises otherwise; memfit uses the largest)."""
    if not layers:
        return KVGroups((), 0, 0, block_size)
    if not hybrid:
        layers = [LayerKV("full" if x.kind == "sliding" else x.kind, x.num_kv_heads, x.head_size,
                          x.element_bytes) for x in layers]
    by_spec: dict[LayerKV, int] = {}
    for x in layers:
        by_spec[x] = by_spec.get(x, 0) + 1
    page = max(page_bytes(x, block_size) for x in by_spec)
    if len(by_spec) == 1:
        (x, n), = by_spec.items()
        return KVGroups(((x, n),), n, page, block_size)
    lo, hi = min(by_spec.values()), max(by_spec.values())
    size = hi if hi < lo * 1.5 else lo
    groups = []
    for x, n in by_spec.items():
        for _ in range(_cdiv(n, size)):
            groups.append((x, size))
    return KVGroups(tuple(groups), size, page, block_size)


def v1_num_blocks(available_bytes: int, g: KVGroups) -> int:
    """``get_num_blocks``: ``available // page_size // group_size`` (one tensor per layer slot in a group,
    each holding ``num_blocks`` pages)."""
    if not g.groups or available_bytes <= 0:
        return 0
    return int(available_bytes // g.page_bytes // g.group_size)


def v1_reported_tokens(num_blocks: int, g: KVGroups) -> int:
    """"GPU KV cache size: N tokens" (``_report_kv_cache_config``): ``num_blocks // len(groups) * block_size``."""
    if not g.groups:
        return 0
    return num_blocks // len(g.groups) * g.block_size


def _max_request_bytes(layer: LayerKV, g: KVGroups, max_model_len: int, max_num_batched_tokens: int) -> int:
    """``KVCacheSpec.max_memory_usage_bytes`` of one layer for one request of ``max_model_len`` tokens:
    full attention keeps every token's page; a sliding window keeps ``window - 1 + max_num_batched_tokens``
    tokens (capped at the request), plus one page (``SlidingWindowSpec``)."""
    if layer.kind == "sliding" and layer.sliding_window:
        tokens = min(layer.sliding_window - 1 + max_num_batched_tokens, max_model_len)
        return (_cdiv(tokens, g.block_size) + 1) * g.page_bytes
    return _cdiv(max_model_len, g.block_size) * g.page_bytes


def v1_blocks_per_request(g: KVGroups, max_model_len: int, max_num_batched_tokens: int) -> int:
    """Blocks one request of ``max_model_len`` tokens takes across groups
    (``get_max_concurrency_for_kv_cache_config``: ``cdiv(sum of max_memory_usage_bytes, page_size)``)."""
    total = sum(_max_request_bytes(x, g, max_model_len, max_num_batched_tokens) for x, _ in g.groups)
    return _cdiv(total, g.page_bytes)


def v1_max_concurrency(num_blocks: int, g: KVGroups, max_model_len: int, max_num_batched_tokens: int,
                       *, legacy: bool = False) -> float:
    """"Maximum concurrency for L tokens per request: Nx". vLLM v0.8-v0.9 printed ``tokens / L``;
    from v0.10 ``num_blocks / blocks_per_request`` (sliding windows need fewer blocks)."""
    if not g.groups or max_model_len <= 0:
        return 0.0
    if legacy:
        return v1_reported_tokens(num_blocks, g) / max_model_len
    return num_blocks / max(1, v1_blocks_per_request(g, max_model_len, max_num_batched_tokens))


def v1_max_model_len(available_bytes: int, g: KVGroups, max_num_batched_tokens: int, *,
                     upper: int = 1 << 24) -> int:
    """Largest ``max_model_len`` one request can have in ``available_bytes`` (vLLM's
    ``_estimate_max_model_len_from_groups``: binary search over ``group_size x page x blocks needed``)."""
    if not g.groups:
        return upper

    def fits(n: int) -> bool:
        return g.group_size * g.page_bytes * v1_blocks_per_request(g, n, max_num_batched_tokens) <= available_bytes

    if not fits(1):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------------------------- vLLM V0
def v0_block_bytes(layers: list[LayerKV], block_size: int) -> int:
    """``CacheEngine.get_cache_block_size`` (vLLM v0.5-v0.6): ``block_size`` tokens of K and V of every
    layer on the rank (``num_gpu_blocks = available // this``). V0 gives sliding-window layers full pages."""
    return sum(block_size * x.per_token_bytes for x in layers)


# ----------------------------------------------------------------------------------------------- SGLang
def sglang_cell_bytes(layers: list[LayerKV]) -> int:
    """SGLang's ``cell_size``: bytes of one token over all layers on the rank (``profile_max_num_token``:
    kv_heads/TP x head_dim x layers x 2 x element size; MLA: (kv_lora_rank + qk_rope_head_dim) x layers x
    element size). Sliding-window layers get full cells unless the hybrid SWA pool is used (not modelled)."""
    return sum(x.per_token_bytes for x in layers)


def ceil_div(a: int, b: int) -> int:
    return _cdiv(a, b)


def floor_to(n: int, multiple: int) -> int:
    return n // multiple * multiple if multiple > 0 else n


__all__ += ["ceil_div", "floor_to", "v1_blocks_per_request"]
