"""What a serving engine holds on one rank besides the KV cache: weights and the profile run's peak.

Weights follow the engines' sharded layers (vLLM ``model_executor/layers/linear.py`` and
``vocab_parallel_embedding.py``, v0.5-v0.11; SGLang reuses the same layer classes): column-parallel
q/k/v/gate/up and row-parallel o/down split over TP, KV heads replicated when fewer than the ranks,
routers and MLA's ``q_a``/``kv_a`` projections replicated, the vocabulary padded to a multiple of 64 and
split, norms replicated. Quantized weights use memfit's layouts (:func:`memfit.estimator.quant.linear_bytes`).

The activation peak models the engine's profile run: one forward over ``max_num_batched_tokens`` dummy
tokens, then the sampler over one logit row per dummy sequence (vLLM ``worker/model_runner.py::profile_run``
v0.5-v0.6, ``v1/worker/gpu_model_runner.py::profile_run`` + ``_dummy_sampler_run`` v0.8-v0.11).
"""

from __future__ import annotations

import math

from ..estimator import quant
from ..models.spec import Block, ModelSpec
from .kv import block_order, layers_on_stage, sum_over_stage

#: vLLM's ``DEFAULT_VOCAB_PADDING_SIZE`` (``vocab_parallel_embedding.py``): the vocabulary is padded to a
#: multiple of 64 before it is split over the TP ranks.
VOCAB_PADDING = 64

#: vLLM's ``VLLM_FUSED_MOE_CHUNK_SIZE`` default (``envs.py``, v0.6-v0.11): the fused MoE kernel works on at
#: most this many tokens at a time, so its intermediate caches stop growing there.
FUSED_MOE_CHUNK_TOKENS = 32768
#: ... halved to ``16 * 1024`` from v0.12 (``envs.py`` of the v0.12.0 and v0.13.0 wheels; v0.11.0 has 32768).
FUSED_MOE_CHUNK_TOKENS_V012 = 16384


def fused_moe_chunk_tokens(version: tuple[int, int, int]) -> int:
    """The fused MoE chunk of a vLLM version (:data:`FUSED_MOE_CHUNK_TOKENS`)."""
    return FUSED_MOE_CHUNK_TOKENS_V012 if version >= (0, 12, 0) else FUSED_MOE_CHUNK_TOKENS

_REPLICATED = ("router", "shared_router", "q_a", "kv_a")
_NOT_QUANTIZED = ("router", "shared_router")


def padded_vocab(vocab: int, tp: int) -> int:
    """Vocabulary rows one rank holds: padded to a multiple of 64, then split (``pad_vocab_size``)."""
    padded = math.ceil(vocab / VOCAB_PADDING) * VOCAB_PADDING
    return math.ceil(padded / tp)


def _out_on_rank(lin, block: Block, tp: int) -> int:
    """Output rows of a linear on one rank. K/V projections hold ``max(1, kv_heads // tp)`` heads (vLLM's
    ``QKVParallelLinear`` replicates KV heads when there are fewer than ranks); a fused qkv splits its q
    part and keeps the per-rank KV heads; replicated layers keep everything."""
    at = block.attention
    if lin.role in _REPLICATED:
        return lin.out_features
    if lin.role in ("k", "v") and at.kind != "mla":
        return max(1, at.num_kv_heads // tp) * at.head_dim
    if lin.role == "qkv" and at.kind != "mla":
        return (at.num_heads // tp + 2 * max(1, at.num_kv_heads // tp)) * at.head_dim
    if lin.role in ("o", "down", "expert_down", "shared_down"):
        return lin.out_features
    return math.ceil(lin.out_features / tp)


def _in_on_rank(lin, tp: int) -> int:
    if lin.role in ("o", "down", "expert_down", "shared_down"):
        return math.ceil(lin.in_features / tp)  # row-parallel: the input dimension is split
    return lin.in_features


def mxfp4_bytes(in_features: int, out_features: int) -> int:
    """OCP MX FP4 (gpt-oss checkpoints, vLLM ``quantization/mxfp4.py``): 4-bit E2M1 values two to a byte and
    one E8M0 (one-byte) scale per 32 values along the input."""
    return math.ceil(in_features * out_features / 2) + out_features * math.ceil(in_features / 32)


def linear_bytes_on_rank(lin, block: Block, tp: int, quantization: str, e: int, group_size: int,
                         skip_roles: frozenset[str] = frozenset(), *, moe_ranks: int | None = None,
                         expert_parallel: bool = False) -> int:
    """One linear's bytes on one rank (all ``lin.count`` instances: the routed experts), weight and bias.
    Experts split their intermediate size over the MoE ranks (vLLM ``FusedMoE``: ``moe_ranks`` =
    data_parallel x tensor_parallel, ``tp`` by default); with ``expert_parallel`` each rank holds
    ``ceil(count / moe_ranks)`` whole experts instead (``FusedMoEParallelConfig``, v0.9+). ``skip_roles``
    stay unquantized (the checkpoint's ``modules_to_not_convert``)."""
    q = "none" if lin.role in _NOT_QUANTIZED or lin.role in skip_roles else quantization
    count = lin.count
    if lin.role.startswith("expert") and (moe_ranks or expert_parallel):
        ranks = moe_ranks or tp
        if expert_parallel:
            count, tp = math.ceil(lin.count / ranks), 1
        else:
            tp = ranks
    i, o = _in_on_rank(lin, tp), _out_on_rank(lin, block, tp)
    if q == "mxfp4":
        w = mxfp4_bytes(i, o) if lin.role.startswith("expert") else i * o * e
    else:
        w = quant.linear_bytes(i, o, q, group_size=group_size, element_bytes=e)
    bias = o * e if lin.bias and lin.role not in ("o", "down") else (lin.out_features * e if lin.bias else 0)
    return (w + bias) * count


def rope_cache_bytes(spec: ModelSpec, e: int) -> int:
    """vLLM's rotary ``cos_sin_cache`` buffer (``rotary_embedding.py``): ``max_position x rotary_dim``
    values in the model dtype, one per distinct rope setting (instances are cached by ``get_rope``);
    YaRN-style scaling multiplies the positions by its factor. Gemma 3 has a local and a global rope."""
    cfg = spec.config or {}
    at = spec.blocks[0].attention
    rot = at.qk_rope_head_dim if at.kind == "mla" else int(at.head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
    pos = spec.max_position_embeddings or int(cfg.get("max_position_embeddings", 0) or 0)
    scaling = cfg.get("rope_scaling") or {}
    if isinstance(scaling, dict) and str(scaling.get("rope_type", scaling.get("type", ""))).endswith("yarn"):
        pos = int(pos * float(scaling.get("factor", 1.0))) if at.kind == "mla" else pos
    copies = 2 if spec.model_type in ("gemma3", "gemma3_text") else 1
    if spec.model_type in ("gpt2", "opt", "bert", "roberta", "distilbert") or spec.architecture.startswith("GPT2"):
        return 0  # learned positions, no rope
    return pos * rot * e * copies


def vision_bytes_on_rank(spec: ModelSpec, *, tp: int = 1, element_bytes: int = 2) -> int:
    """The vision tower's and projector's bytes on one rank of the first pipeline stage (where vLLM and
    SGLang build them: ``*ForConditionalGeneration`` holds the tower next to the text model's first layers):
    16-bit whatever the text model's quantization, linears split over TP (:mod:`memfit.models.vision`).
    0 for a text-only model, and for a vision model memfit does not count (the estimate notes it)."""
    if not (spec.multimodal or {}).get("vision_config"):
        return 0  # no tower (vision_tower's own first answer, without importing its tables)
    from ..models.vision import vision_tower

    tower = vision_tower(spec.multimodal, spec.hidden_size, strict=False)
    return tower.params_on_rank(tp) * element_bytes if tower is not None else 0


def mla_absorbed_bytes(block: Block, tp: int, quantization: str, e: int, hidden: int) -> int:
    """What one MLA layer of vLLM v0.7.1-v0.7.3 keeps on a rank after loading, instead of v0.8's bf16
    ``W_UK_T`` / ``W_UV`` copies of ``kv_b_proj`` (``attention/backends/mla/utils.py``,
    ``MLACommonImpl.process_weights_after_loading``, read from the v0.7.1 and v0.7.3 wheels; removed by PR
    #14770 before v0.8.0, whose ``mla/common.py`` keeps the two bf16 copies instead). With
    ``VLLM_MLA_PERFORM_MATRIX_ABSORPTION`` on (its default "1" in ``envs.py``):

    - ``self.W_UK, self.W_UV`` are views of the dequantized ``kv_b_proj`` weight: a float32 copy for FP8
      checkpoints (``scaled_dequantize``'s default ``out_dtype``), none for 16-bit ones (a view of the
      parameter);
    - ``W_QR``, the rope columns of ``q_b_proj`` (``q_proj`` without query compression), ``(Lq, N/tp x R)``
      in the model dtype;
    - ``W_Q_UK = einsum(W_Q, W_UK)``, ``(Lq, N/tp x Lkv)``, and ``W_UV_O = einsum(W_UV, W_O)``,
      ``(N/tp x Lkv, hidden)``: re-quantized to FP8 with the checkpoint's 128 x 128 block scales (float32)
      for FP8 weights (``VLLM_MLA_DISABLE_REQUANTIZATION`` off by default), else in the model dtype.

    ``Lq`` is ``q_lora_rank``, or ``hidden`` for models without query compression (DeepSeek-V2-Lite)."""
    at = block.attention
    n = at.num_heads // tp
    lq = at.q_lora_rank or hidden
    lkv, rope = at.kv_lora_rank, at.qk_rope_head_dim
    kv_b = lkv * n * ((at.head_dim - rope) + at.v_head_dim)
    fp8 = quantization == "fp8"
    total = (kv_b * 4 if fp8 else 0) + lq * n * rope * e
    for rows, cols in ((lq, n * lkv), (n * lkv, hidden)):
        if fp8:
            total += rows * cols + math.ceil(rows / 128) * math.ceil(cols / 128) * 4
        else:
            total += rows * cols * e
    return total


def weights_on_rank(spec: ModelSpec, *, tp: int = 1, pp: int = 1, stage: int = 0, quantization: str = "none",
                    element_bytes: int = 2, group_size: int = 128, skip_roles: frozenset[str] = frozenset(),
                    vision: bool = True, moe_ranks: int | None = None, expert_parallel: bool = False,
                    mla_absorbed: bool = False) -> int:
    """Weight bytes one rank loads (what vLLM prints as "Model loading took X GiB", SGLang as "Load weight
    end ... mem usage"): its layers' linears (sharded, quantized), norms and other small parameters, the
    vocab-parallel embedding on the first stage, the head and final norm on the last stage (a tied head on
    a later stage is a second copy), the rope cache, and on the first stage a multimodal checkpoint's
    vision tower and projector unless ``vision`` is False (:func:`vision_bytes_on_rank`). MLA layers also keep the absorbed ``W_UK``/``W_UV``
    copies of ``kv_b_proj`` that vLLM builds after loading (``MLACommonImpl.process_weights_after_loading``),
    or with ``mla_absorbed`` (vLLM v0.7.1-v0.7.3) the materialized matrices of :func:`mla_absorbed_bytes`."""
    e = element_bytes
    order = block_order(spec)
    mine = layers_on_stage(len(order), pp, stage)
    per_block: dict[int, int] = {}
    total = 0
    for li in mine:
        bi = order[li]
        if bi not in per_block:
            b = spec.blocks[bi]
            n = b.other_params * e
            for lin in b.linears:
                n += linear_bytes_on_rank(lin, b, tp, quantization, e, group_size, skip_roles,
                                          moe_ranks=moe_ranks, expert_parallel=expert_parallel)
                if lin.role == "kv_b" and b.attention.kind == "mla":
                    if mla_absorbed:
                        n += mla_absorbed_bytes(b, tp, quantization, e, spec.hidden_size)
                    else:
                        n += math.ceil(lin.in_features * lin.out_features / tp) * e
            per_block[bi] = n
        total += per_block[bi]
    table = padded_vocab(spec.vocab_size, tp) * spec.hidden_size * e
    first, last = stage == 0, stage == pp - 1
    if first:
        total += table + max(0, spec.embedding_params - spec.vocab_size * spec.hidden_size) * e
        if vision:
            total += vision_bytes_on_rank(spec, tp=tp, element_bytes=e)
    if last:
        total += spec.final_params * e
        if spec.head == "causal_lm" and (not spec.tie_word_embeddings or not first):
            total += table
    return total + rope_cache_bytes(spec, e)


# ------------------------------------------------------------------------------------------------- LoRA
#: Roles vLLM wraps with a LoRA layer (``supported_lora_modules`` / ``packed_modules_mapping`` of the
#: decoder models: qkv_proj, o_proj, gate_up_proj, down_proj), and how many slices each fused one stacks.
_LORA_SLICES = {"q": 1, "k": 1, "v": 1, "qkv": 3, "o": 1, "gate": 1, "up": 1, "gate_up": 2, "down": 1}
#: Families whose vLLM model class also lists ``embed_tokens`` and ``lm_head`` in its LoRA modules
#: (``LlamaForCausalLM.embedding_modules``, inherited by Mistral and Phi-3/4), v0.5-v0.10.
_LORA_EMBEDDING_FAMILIES = ("llama", "mistral", "phi3")
#: ``LoRAConfig.lora_extra_vocab_size`` (default 256) and the logits padding (``lora_vocab_padding_size``).
LORA_EXTRA_VOCAB = 256


def lora_bytes_on_rank(spec: ModelSpec, *, tp: int = 1, pp: int = 1, stage: int = 0, max_loras: int = 1,
                       max_lora_rank: int = 16, element_bytes: int = 2) -> int:
    """The stacked adapter buffers vLLM allocates when LoRA is enabled, on one rank (``vllm/lora/layers.py``,
    v0.6-v0.8, ``create_lora_weights``; ``LoRAModelManager._create_lora_modules`` wraps every supported
    module of the model once, whatever adapters are later loaded):

    - each linear of attention and the dense MLP, per slice of a fused one (qkv 3, gate_up 2):
      ``lora_a_stacked`` ``(max_loras, 1, max_lora_rank, input_size)`` and ``lora_b_stacked``
      ``(max_loras, 1, output_size, max_lora_rank)``, input split for row-parallel layers and output for
      column-parallel ones, in the model dtype (``lora_dtype`` auto);
    - Llama-family models also wrap the embedding (``embeddings_tensors`` ``(max_loras, 256, hidden)``,
      ``lora_a`` ``(max_loras, vocab + 256, rank)``, ``lora_b`` ``(max_loras, 1, hidden, rank)``) and the
      logits processor (``lora_a`` ``(max_loras, 1, rank, hidden)``, ``lora_b`` over the vocabulary padded
      to 256 and split over TP, ``embeddings_tensors`` ``(max_loras, 256, hidden)``).

    Routed experts are not LoRA layers in these versions. Where vLLM charges these bytes depends on the
    engine (:func:`memfit.serve.vllm.estimate`)."""
    e, r, n = element_bytes, max_lora_rank, max_loras

    def block_bytes(b: Block) -> int:
        elems = 0
        for lin in b.linears:
            slices = _LORA_SLICES.get(lin.role)
            if slices is None or lin.count != 1:
                continue
            elems += slices * r * _in_on_rank(lin, tp) + _out_on_rank(lin, b, tp) * r
        return elems * n * e

    total = sum_over_stage(spec, pp, stage, block_bytes)
    if spec.model_type in _LORA_EMBEDDING_FAMILIES:
        H, V = spec.hidden_size, spec.vocab_size
        if stage == 0:
            total += n * (LORA_EXTRA_VOCAB * H + (V + LORA_EXTRA_VOCAB) * r + H * r) * e
        if stage == pp - 1:
            padded = math.ceil(V / LORA_EXTRA_VOCAB) * LORA_EXTRA_VOCAB
            total += n * (r * H + math.ceil(padded / tp) * r + LORA_EXTRA_VOCAB * H) * e
    return total


# ------------------------------------------------------------------------------------------ profile run
def mla_v0_prefill_elements(b: Block, tp: int, H: int, output_buffer: bool) -> int:
    """Elements per token alive when an MLA layer of vLLM's V0 engine runs ``o_proj`` in its compute-friendly
    prefill (no chunked prefill; ``attention/backends/mla/utils.py::_forward_prefill_flash`` v0.7.1-v0.7.3,
    ``mla/common.py::_forward_prefill`` v0.8.0; ``DeepseekV2MLAAttention.forward``): the residual and the
    normed input (2 x hidden); ``q_a_proj``'s output and its norm (2 x q_lora_rank, with query
    compression); ``kv_a_proj``'s output (Lkv + R), the contiguous latent and its norm (2 x Lkv); the query
    (N x qk_head); ``kv_b_proj``'s output (N x (P + V)); ``k = cat(k_nope, k_pe)`` and ``v`` padded to the
    query width (2 x N x qk_head); the attention output cut to N x V; ``o_proj``'s output (hidden); and from
    v0.8.0 the output buffer ``MLACommonImpl.forward`` allocates first (hidden). N = heads per rank."""
    at = b.attention
    n = at.num_heads // tp
    lkv, rope = at.kv_lora_rank, at.qk_rope_head_dim
    nope = at.head_dim - rope
    q_lora = 2 * at.q_lora_rank if at.q_lora_rank else 0
    return ((4 if output_buffer else 3) * H + q_lora + (lkv + rope) + 2 * lkv + n * at.head_dim
            + n * (nope + at.v_head_dim) + 2 * n * at.head_dim + n * at.v_head_dim)


#: Hidden-wide tensors an all-reduce adds while it runs: vLLM's tensor-parallel all-reduce is out of place in
#: the versions read (``distributed/parallel_state.py::GroupCoordinator.all_reduce``, v0.8.0-v0.13.0, assumed earlier:
#: "we always make the all-reduce operation out-of-place"; ``device_communicators/pynccl.py::all_reduce``
#: returns ``torch.empty_like(in_tensor)`` filled by NCCL, and the custom all-reduce returns a new tensor too,
#: read in the v0.8.0, v0.9.2 and v0.13.0 wheels): the row-parallel layer's partial output and the reduced
#: copy are alive together.
ALL_REDUCE_COPIES = 1


def moe_combine_per_token(b: Block, tp: int, e: int, H: int) -> float:
    """Bytes per token alive when a MoE block's output is all-reduced over ``tp`` > 1 ranks (the fused
    kernel's chunk caches are freed by then; ``models/deepseek_v2.py::DeepseekV2MoE.forward`` v0.8.0,
    ``qwen3_moe.py`` alike): the residual, the normed input, the experts' output and its reduced copy
    (4 x hidden), and with shared experts their output (one hidden more: the scaled routed output is
    dropped when the sum replaces it). 0 at TP 1."""
    if b.moe is None or tp <= 1:
        return 0.0
    return ((3 + ALL_REDUCE_COPIES) * H + (H if b.moe.shared_intermediate_size else 0)) * e


def layer_peak_per_token(b: Block, tp: int, e: int, H: int, mla_v0_prefill: str | None = None) -> float:
    """Bytes per token alive at a decoder layer's peak in the engine's forward (vLLM model code, e.g.
    ``models/llama.py`` v0.6): the residual, the normed input and the output (3 x hidden), plus

    - dense MLP: ``gate_up`` output (2 x I/tp) and the activation output (I/tp), both alive while
      ``down_proj`` runs (``LlamaMLP.forward`` keeps ``gate_up`` until it returns); 2 x I/tp ungated;
    - attention: the qkv output and the attention output;
    - MoE (the fused kernel, per chunk): per routed copy of the token, ``intermediate_cache1`` (2 x I_e/tp),
      ``cache2`` (I_e/tp) and ``cache3`` (hidden), plus the shared experts' MLP and output.

    With ``tp`` > 1 the row-parallel ``o_proj`` and ``down_proj`` end in an all-reduce that returns a new
    tensor (:data:`ALL_REDUCE_COPIES`), so their moments hold one more hidden-wide row per token.

    Checked against two V0 logs (vllm-gh10517-a/b: 20000 and 29000 profiled tokens of Llama-3.1-8B, within
    0.5%). ``mla_v0_prefill`` ("0.7" or "0.8"): the MLA layers' moment is V0's prefill path
    (:func:`mla_v0_prefill_elements`) where it is larger."""
    at = b.attention
    reduced = ALL_REDUCE_COPIES * H if tp > 1 else 0
    q = at.num_heads // tp * at.head_dim
    kv = max(1, at.num_kv_heads // tp) * at.head_dim if at.kind != "mla" else at.kv_lora_rank + at.qk_rope_head_dim
    attn = 3 * H + q + 2 * kv + at.num_heads // tp * at.v_head_dim + reduced
    if at.kind == "mla" and mla_v0_prefill:
        attn = max(attn, mla_v0_prefill_elements(b, tp, H, output_buffer=mla_v0_prefill == "0.8") + reduced)
    if b.moe is not None:
        m = b.moe
        routed = m.top_k * (3 * math.ceil(m.expert_intermediate_size / tp) + H)
        shared = 3 * math.ceil(m.shared_intermediate_size / tp) + H if m.shared_intermediate_size else 0
        mlp = 3 * H + routed + shared
    elif b.mlp is not None:
        width = math.ceil(b.mlp.intermediate_size / tp)
        mlp = 3 * H + (3 if b.mlp.gated else 2) * width + reduced
    else:
        mlp = 0
    return max(attn, mlp) * e


#: V1's sampler peak per (sequence, vocab) element of the profile run, fitted on two logs of the llm-d
#: benchmarks (vllm-llmd-llama31-8b-h100: 4.76 GiB for 1024 x 128256 logits; vllm-llmd-qwen3-0.6b-h100:
#: 5.56 GiB for 1024 x 151936): 38.4 bytes each, "used for fitting". Held out: Qwen3-32B at TP 1 and 2
#: (5.64 GiB printed, 5.64 modelled) and Llama-3.3-70B FP8 at TP 2 (4.84 printed, 4.83 modelled).
SAMPLER_V1_BYTES_PER_LOGIT = 38.4


def sampler_bytes_per_logit(version: str, e: int, backend: str = "native") -> float:
    """Bytes per (sequence, vocab) element at the sampler's peak in the profile run.

    - ``v0`` (vLLM v0.5-v0.6 ``layers/sampler.py``; the profile run samples with ``top_p=0.99,
      top_k=vocab-1``): the model-dtype logits, their fp32 copy, ``_apply_top_k_top_p``'s sort (fp32 values,
      int64 indices), softmax and cumsum (fp32), two bool masks, the int64 inverse index and the gathered
      fp32 logits: e + 4 + 12 + 8 + 2 + 8 + 4 (checked: 1.26 GiB printed in PR #10511 for 256 x 128256 logits,
      1.28 modelled);
    - ``v1`` with the PyTorch-native top-k/top-p (``v1/sample/ops/topk_topp_sampler.py::apply_top_k_top_p``,
      v0.9-v0.11: a full ``sort`` of the fp32 logits, values and int64 indices, then ``scatter`` back): the
      fitted :data:`SAMPLER_V1_BYTES_PER_LOGIT`;
    - ``v1`` with ``backend="flashinfer"`` (``TopKTopPSampler.forward_cuda`` -> ``flashinfer_sample`` ->
      ``flashinfer.sampling.top_k_top_p_sampling_from_logits``, read in the v0.10.1.1 and v0.11.0 wheels;
      ``_dummy_sampler_run`` passes both ``top_k = vocab - 1`` and ``top_p = 0.9``): no sort. Alive at once:
      the model-dtype logits ``_dummy_sampler_run`` holds (e), ``Sampler.forward``'s fp32 copy (4),
      FlashInfer's ``top_k_mask_logits`` output (4) and its ``softmax`` (4): e + 12. Checked on the
      vllm-dennislee-qwen2-7b A100 logs (v0.10.1.1, "Using FlashInfer for top-p & top-k sampling."): 256 x
      152064 logits, 0.55 GiB of profile peak and non-torch memory printed in all, 0.52 GiB modelled for the
      sampler moment alone; the same setup without FlashInfer (the two-node TP 2 log, "FlashInfer is not
      available") deducts 1.60 GiB, what the native figure gives.
    """
    if version == "v0":
        return e + 38
    return e + 12 if backend == "flashinfer" else SAMPLER_V1_BYTES_PER_LOGIT


def profile_peak(spec: ModelSpec, *, tokens: int, seqs: int, tp: int, pp: int = 1, stage: int = 0,
                 element_bytes: int = 2, sampler: str = "v1", dp: int = 1,
                 expert_parallel: bool = False, mla_v0_prefill: str | None = None,
                 sampler_backend: str = "native", moe_chunk: int = FUSED_MOE_CHUNK_TOKENS) -> tuple[int, str]:
    """The torch peak of the profile run on one rank over the weights: the larger of the widest layer's
    moment (``tokens`` at once; the fused MoE caches capped at ``moe_chunk`` tokens, the engine's
    ``VLLM_FUSED_MOE_CHUNK_SIZE``, :func:`fused_moe_chunk_tokens`) and, on the last
    stage, the sampler's moment (``seqs`` logit rows over the padded vocabulary, with the hidden states of
    all tokens still alive). Returns (bytes, which moment).

    With data parallelism (``dp`` > 1) every rank's MoE layers see the tokens of all ``dp`` ranks (vLLM's
    default ``naive`` all-to-all gathers the DP group's hidden states before the experts, v0.9-v0.11), each
    expert split over ``dp x tp`` ranks, or whole with ``expert_parallel``. ``sampler_backend``: vLLM V1's
    top-k/top-p implementation (``native`` or ``flashinfer``, :func:`sampler_bytes_per_logit`)."""
    e, H = element_bytes, spec.hidden_size
    order = block_order(spec)
    mine = {order[i] for i in layers_on_stage(len(order), pp, stage)}
    layer = 0.0
    for bi in mine:
        b = spec.blocks[bi]
        per = layer_peak_per_token(b, tp, e, H, mla_v0_prefill)
        if b.moe is not None and dp > 1:
            m = b.moe
            width = m.expert_intermediate_size // tp if expert_parallel else math.ceil(m.expert_intermediate_size / (tp * dp))
            routed_now = m.top_k * (3 * math.ceil(m.expert_intermediate_size / tp) + H) * e
            routed = m.top_k * (3 * width + H) * e
            val = (per - routed_now) * tokens + routed * min(tokens * dp, moe_chunk)
        elif b.moe is not None and tokens > moe_chunk:
            m = b.moe
            routed = m.top_k * (3 * math.ceil(m.expert_intermediate_size / tp) + H) * e
            val = (per - routed) * tokens + routed * moe_chunk
        else:
            val = per * tokens
        val = max(val, moe_combine_per_token(b, tp, e, H) * tokens)
        layer = max(layer, val)
    samp = 0.0
    if stage == pp - 1 and spec.head == "causal_lm":
        V = padded_vocab(spec.vocab_size, 1)
        samp = tokens * H * e + seqs * V * sampler_bytes_per_logit(sampler, e, sampler_backend)
    return (int(layer), "layer") if layer >= samp else (int(samp), "sampler")


# ------------------------------------------------------------------------------- reserved by the loaded weights
#: Linear roles the engines load into one fused parameter (vLLM / SGLang ``QKVParallelLinear``,
#: ``MergedColumnParallelLinear``, ``FusedMoE.w13_weight``): one allocation per group and layer.
_FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "gate": "gate_up", "up": "gate_up", "gate_up": "gate_up",
          "expert_gate": "w13", "expert_up": "w13", "expert_gate_up": "w13",
          "shared_gate": "shared_gate_up", "shared_up": "shared_gate_up"}


def weight_tensors_on_rank(spec: ModelSpec, *, tp: int = 1, pp: int = 1, stage: int = 0, quantization: str = "none",
                           element_bytes: int = 2, group_size: int = 128, skip_roles: frozenset[str] = frozenset(),
                           vision: bool = True, rope_element_bytes: int | None = None) -> list[int]:
    """The byte sizes of the tensors one rank allocates for its weights, in the order the model builds
    them: per layer the norms, the fused qkv / gate_up / w13 weights and their biases, the other linears,
    MLA's absorbed ``kv_b`` copies; the embedding and vision tower on the first stage, the final norm and
    head on the last, and the rope cache (``rope_element_bytes`` per value, the model dtype by default).
    Quantized weights count as one tensor with their scales (a simplification: a few extra allocations of
    scales are not modelled). The sizes add up to :func:`weights_on_rank` (with the same rope dtype)."""
    e = element_bytes
    order = block_order(spec)
    per_block: dict[int, list[int]] = {}
    sizes: list[int] = []
    first, last = stage == 0, stage == pp - 1
    H = spec.hidden_size
    if first:
        sizes.append(padded_vocab(spec.vocab_size, tp) * H * e)
        extra = max(0, spec.embedding_params - spec.vocab_size * H) * e
        if extra:
            sizes.append(extra)
    for li in layers_on_stage(len(order), pp, stage):
        bi = order[li]
        if bi not in per_block:
            b = spec.blocks[bi]
            out: list[int] = []
            other = b.other_params * e
            while other > 0:  # norms: hidden-wide vectors
                out.append(min(other, H * e))
                other -= H * e
            fused: dict[str, int] = {}
            for lin in b.linears:
                n = linear_bytes_on_rank(lin, b, tp, quantization, e, group_size, skip_roles)
                key = _FUSED.get(lin.role)
                if key is None:
                    out.append(n)
                else:
                    fused[key] = fused.get(key, 0) + n
                if lin.role == "kv_b" and b.attention.kind == "mla":
                    half = math.ceil(lin.in_features * lin.out_features / tp) * e // 2
                    out += [half, math.ceil(lin.in_features * lin.out_features / tp) * e - half]
            out += list(fused.values())
            per_block[bi] = out
        sizes += per_block[bi]
    if first and vision:
        v = vision_bytes_on_rank(spec, tp=tp, element_bytes=e)
        if v:
            sizes.append(v)
    if last:
        if spec.final_params:
            sizes.append(spec.final_params * e)
        if spec.head == "causal_lm" and (not spec.tie_word_embeddings or not first):
            sizes.append(padded_vocab(spec.vocab_size, tp) * H * e)
    rope = rope_cache_bytes(spec, e)
    if rope:
        sizes.append(rope if rope_element_bytes is None else rope // e * rope_element_bytes)
    return sizes


def reserved_bytes(sizes: list[int]) -> int:
    """What PyTorch's caching allocator reserves for tensors of these sizes allocated in this order and
    kept (``memory_reserved`` after ``empty_cache``): each large request rounded up to a 2 MiB segment,
    1-10 MiB requests sharing 20 MiB segments, small ones 2 MiB ones (:mod:`memfit.allocator`). This,
    not the sum of the sizes, is the drop in free memory an engine sees while its weights load."""
    from ..allocator.model import CachingAllocatorModel

    alloc = CachingAllocatorModel()
    for n in sizes:
        if n > 0:
            alloc.malloc(int(n))
    return int(alloc.reserved)


def mxfp4_moe_extra_bytes(spec: ModelSpec, *, tp: int = 1, pp: int = 1, stage: int = 0) -> int:
    """What vLLM's MXFP4 MoE (gpt-oss) holds on a Hopper rank beyond the checkpoint's packed experts
    (:func:`mxfp4_bytes`), from ``model_executor/layers/quantization/mxfp4.py`` (v0.10.1+,
    ``Mxfp4MoEMethod``, the triton-kernels path that Hopper takes by default):

    - ``create_weights`` pads the per-rank expert width to a multiple of 64 (``round_up(I / tp, 64)``:
      2880 / 4 = 720 -> 768), for w13 (2 x width rows) and w2 (width columns) with their scales;
    - ``process_weights_after_loading`` swizzles the weights and their scales for ``matmul_ogs``
      (``_swizzle_mxfp4``); the unswizzled weights are deleted, but the checkpoint's scale parameters stay
      registered, so every scale byte is held twice (the swizzled copy is taken as the same size);
    - the bf16 expert biases become float32 (two more bytes each).
    """

    def block_bytes(b: Block) -> int:
        if b.moe is None:
            return 0
        extra = 0
        width = math.ceil(b.moe.expert_intermediate_size / tp)
        padded = math.ceil(width / 64) * 64
        for lin in b.linears:
            if not lin.role.startswith("expert"):
                continue
            if lin.role == "expert_down":  # row-parallel: the width is the input
                i_now, o_now, i_pad, o_pad = width, lin.out_features, padded, lin.out_features
            else:  # gate_up (2 x width rows), or a separate gate / up
                mult = 2 if lin.role == "expert_gate_up" else 1
                i_now, o_now, i_pad, o_pad = lin.in_features, mult * width, lin.in_features, mult * padded
            pad = mxfp4_bytes(i_pad, o_pad) - mxfp4_bytes(i_now, o_now)
            scales = o_pad * math.ceil(i_pad / 32)
            bias = 2 * o_pad if lin.bias else 0
            extra += (pad + scales + bias) * lin.count
        return extra

    return sum_over_stage(spec, pp, stage, block_bytes)
