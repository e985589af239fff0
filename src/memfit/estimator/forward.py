"""The inference forward over the prompt, op by op, as allocations and frees of the estimate's event stream.

The closed-form peak of a prefill is "weights + KV cache + the widest layer's transients"; under a card's
limit what decides whether the run completes is also *where* those transients land in the caching
allocator's segments, so this module emits the forward's tensors in the order and with the lifetimes the
``transformers`` 5.17 decoder code gives them (checked against the trace engine's op-level stream of
Llama, Qwen2, Mistral and Gemma 2/3 prefills, ``memfit trace`` on fake tensors):

- ``Model.forward``: the embedding output stays alive until the forward returns (``inputs_embeds``; Gemma
  scales it by ``sqrt(hidden)``, a second tensor), and so do the rotary ``cos``/``sin`` (``[B, T, head_dim]``
  each in generate(), ``[1, T, head_dim]`` in a plain forward; one pair per rope type: Gemma 3 computes a
  global and a local pair), built through fp32 scratch
  (``inv_freq @ position_ids``, ``cat``, ``cos() * scaling``) and cast to the compute dtype.
- Each decoder layer's input is held by the caller's loop variable until the layer returns its output, so
  inside a layer two residual-stream tensors (input, post-attention residual) and the normed copy coexist
  with the embedding output.
- ``RMSNorm``: ``x.to(fp32)``, ``pow(2).mean``, ``x * rsqrt``, ``.to(dtype)``, ``weight *`` (Gemma: ``x.float()``,
  ``* (1 + w)``, ``type_as``).
- Attention: q, k, v projections; per-head q/k norms (Qwen3, Gemma 3); rotary ``x * cos + rotate_half(x) *
  sin`` (``neg`` of a half, ``cat``, two ``mul``, ``add``); the dynamic cache's ``torch.cat`` onto an empty
  layer copies k and v into new tensors; SDPA's output; ``o_proj``. Eager attention materializes the
  scores (``matmul``, ``* scaling``, soft-capping, ``+ mask``, fp32 ``softmax``, ``.to(dtype)``).
- MLP: ``down(act(gate(x)) * up(x))`` (the gate's output is freed once the activation exists), a fused
  ``gate_up`` (Phi-3), or ``fc2(act(fc1(x)))``.

Pure Python, no torch. Only the allocations matter here: every tensor is ``Stream.alloc`` and ``Stream.free``;
tensors under a few kilobytes per sequence (position ids, ``rsqrt`` of a norm) are left out.
"""

from __future__ import annotations

from ..models.spec import Block, ModelSpec

__all__ = ["PrefillShape", "rope_sets", "embed", "rope_tables", "norm", "decoder_layer", "logits_head", "math_sdpa",
           "fused_experts", "experts_gated"]

#: model types whose rotary embedding is computed once per layer type (global and sliding: two cos/sin pairs;
#: transformers 5.17 ``Gemma3TextModel.forward``: ``position_embeddings[layer_type] = self.rotary_emb(...)``).
_ROPE_PER_LAYER_TYPE = ("gemma3", "gemma3_text", "olmo3")
#: model types without rotary embeddings (learned or no positions).
_NO_ROPE = ("gpt2", "opt", "bert", "roberta", "distilbert", "bloom", "mpt")
#: model types whose ``apply_rotary_pos_emb`` rotates ``q[..., :rotary_dim]`` and ``torch.cat``s the rest back
#: (transformers 5.17 ``modeling_phi3.py``: ``q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin),
#: q_pass], dim=-1)``), a copy even where ``q_pass`` is empty. Phi-3's rotary dimension is the head's in every
#: registry entry (no ``partial_rotary_factor``). GPT-NeoX (:data:`_ROPE_NEOX`) orders its ops differently.
_ROPE_CAT_PASS = ("phi3",)
#: transformers 5.17 ``modeling_gpt_neox.py`` ``apply_rotary_pos_emb``: ``q_embed`` and ``k_embed`` rotate
#: ``x[..., :rotary_dim]`` (Pythia: a quarter of the head; the cos/sin are that wide), then both are
#: ``torch.cat``-ed with their pass-through parts; the concatenated q is a contiguous (B, H, S, D) tensor, so
#: the fused attention kernel's output (q's layout) is copied by ``transpose(1, 2).contiguous()``
#: (``integrations/sdpa_attention.py``); the layer's parallel residual norms the stream twice, the second norm
#: after the attention returned (``GPTNeoXLayer.forward``). Measured: the allocator history of Pythia-1B
#: ``generate()`` at batch 67 on a capped H200 (``validation/probes/histories-7/``).
_ROPE_NEOX = ("gpt_neox",)
#: model types whose embedding output is multiplied by ``sqrt(hidden_size)`` (a second tensor).
_SCALED_EMBEDDING = ("gemma", "gemma2", "gemma3", "gemma3_text")
#: Granite divides the head's output by ``config.logits_scaling`` whatever its value (transformers 5.17
#: modeling_granite.py ``GraniteForCausalLM.forward``, modeling_granitemoe*.py): a second vocab-sized tensor,
#: alive with the first while the division runs.
LOGITS_SCALED = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")


class PrefillShape:
    """Sizes of one forward over ``tokens`` tokens: ``e`` the compute dtype's bytes (linear outputs),
    ``r`` the residual stream's (fp32 under autocast and in ``32-true``), ``mixed`` whether autocast casts
    every linear's input to 16 bits."""

    __slots__ = ("tokens", "batch", "prompt", "e", "r", "mixed", "attention", "use_cache", "quantization")

    def __init__(self, *, tokens: int, batch: int, prompt: int, e: int, r: int, mixed: bool, attention: str,
                 use_cache: bool, quantization: str = "none") -> None:
        self.tokens, self.batch, self.prompt = tokens, batch, prompt
        self.e, self.r, self.mixed = e, r, mixed
        self.attention, self.use_cache = attention, use_cache
        self.quantization = quantization


def rope_sets(spec: ModelSpec) -> int:
    """How many cos/sin pairs the model's forward keeps alive (0 without rotary embeddings)."""
    if spec.model_type in _NO_ROPE or not any(b.attention.rope for b in spec.blocks):
        return 0
    if spec.model_type in _ROPE_PER_LAYER_TYPE:
        kinds = {b.attention.sliding_window is not None for b in spec.blocks}
        return len(kinds)
    return 1


def embed(s, spec: ModelSpec, sh: PrefillShape) -> int:
    """The embedding lookup (and Gemma's scaling): the handle of the tensor the layers start from."""
    n = sh.tokens * spec.hidden_size * sh.r
    h = s.alloc(n, "activations")
    if spec.model_type in _SCALED_EMBEDDING:
        scaled = s.alloc(n, "activations")
        s.free(h)
        h = scaled
    return h


def rope_tables(s, spec: ModelSpec, sh: PrefillShape) -> list[int]:
    """The rotary cos/sin of every rope type (live until the forward returns), built through fp32 scratch."""
    out: list[int] = []
    hd = max((b.attention.qk_rope_head_dim or b.attention.rotary_dim or b.attention.head_dim) for b in spec.blocks)
    # generate() passes position_ids built from its attention mask ([B, P]); a plain forward builds them from
    # cache_position ([1, P]), so there the tables are one sequence's
    tokens = sh.tokens if sh.use_cache else sh.prompt
    n32 = tokens * hd * 4
    for _ in range(rope_sets(spec)):
        emb = s.alloc(n32, "activations")  # cat(freqs, freqs)
        c32 = s.alloc(n32, "activations")  # emb.cos() * attention_scaling
        s32 = s.alloc(n32, "activations")
        if sh.e == 4:
            s.free(emb)
            out += [c32, s32]
            continue
        out += [s.alloc(tokens * hd * sh.e, "activations"), s.alloc(tokens * hd * sh.e, "activations")]
        s.free_all((emb, c32, s32))
    return out


def norm(s, n_elems: float, sh: PrefillShape, kind: str, out_bytes: int | None = None) -> int:
    """One norm over ``n_elems`` elements; returns its output's handle (the input is not freed)."""
    r = sh.r if out_bytes is None else out_bytes
    if kind in ("layer", "layer_noaffine"):
        return s.alloc(n_elems * (4 if sh.mixed else r), "activations")  # one fused kernel
    x32 = s.alloc(n_elems * 4, "activations") if r != 4 or kind == "gemma_rms" else -1
    sq = s.alloc(n_elems * 4, "activations")  # pow(2), reduced by mean
    s.free(sq)
    y32 = s.alloc(n_elems * 4, "activations")  # x * rsqrt(var + eps)
    s.free(x32)
    if kind == "gemma_rms":
        w = s.alloc(n_elems * 4, "activations")  # * (1 + weight), fp32
        s.free(y32)
        if r == 4:
            return w
        out = s.alloc(n_elems * r, "activations")  # type_as(x)
        s.free(w)
        return out
    if r == 4:
        out = s.alloc(n_elems * 4, "activations")  # weight * x
        s.free(y32)
        return out
    c = s.alloc(n_elems * r, "activations")  # .to(input_dtype)
    out = s.alloc(n_elems * r, "activations")  # weight * x (the fp32 tensor is freed when the norm returns)
    s.free(c)
    s.free(y32)
    return out


def _linear(s, sh: PrefillShape, x_elems: float, out_elems: float) -> int:
    """A linear's output; under autocast its input is cast to 16 bits first (not cached for activations).

    A quantized layer's scratch lives for its call only (see :func:`memfit.estimator.quant.dequant_temp_bytes`
    for the kernels): 4-bit and the other weight-only formats dequantize the whole weight to 16 bits first;
    LLM.int8 quantizes the input row-wise (one byte a value plus a row scale) and multiplies into int32."""
    cast = s.alloc(x_elems * 2, "activations") if sh.mixed else -1
    scratch: tuple[int, ...] = ()
    if sh.quantization == "int8":
        scratch = (s.alloc(x_elems + sh.tokens * 4, "temporaries"), s.alloc(out_elems * 4, "temporaries"))
    elif sh.quantization != "none":
        scratch = (s.alloc(2 * (x_elems / sh.tokens) * (out_elems / sh.tokens), "temporaries"),)
    y = s.alloc(out_elems * sh.e, "activations")
    s.free_all(scratch)
    s.free(cast)
    return y


def _rope(s, n: float, e: int, cat_pass: bool = False) -> int:
    """``x * cos + rotate_half(x) * sin`` over ``n`` elements: returns the rotated tensor. ``cat_pass``: the
    partial-rotary form (:data:`_ROPE_CAT_PASS`), whose result is ``torch.cat``-ed with the part left unrotated
    (none where the rotary dimension is the head's): one more copy, the sum freed."""
    m1 = s.alloc(n * e, "activations")
    half = s.alloc(n * e / 2, "activations")  # -x2
    cat = s.alloc(n * e, "activations")
    s.free(half)
    m2 = s.alloc(n * e, "activations")
    s.free(cat)
    out = s.alloc(n * e, "activations")
    s.free(m1)
    s.free(m2)
    if cat_pass:
        whole = s.alloc(n * e, "activations")  # cat([rotated, x_pass], dim=-1)
        s.free(out)
        out = whole
    return out


def _attention(s, spec: ModelSpec, b: Block, sh: PrefillShape, x: int, kv_bytes: tuple[int, int],
               masks: float) -> tuple[int, list[int]]:
    """Self-attention over the normed input (handle ``x``, not freed): returns (``o_proj`` output, the
    layer's cached key and value tensors)."""
    at = b.attention
    T, H, e = sh.tokens, spec.hidden_size, sh.e
    nh = at.num_heads
    kvh = at.num_heads if at.kind == "mla" else at.num_kv_heads
    nq, nk, nv = T * nh * at.head_dim, T * kvh * at.head_dim, T * kvh * at.v_head_dim
    qkv = -1
    if fused_qkv(b):
        # one projection for q, k and v (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``): q, k
        # and v are slices of its output, which they keep alive until the attention returns
        qkv = _linear(s, sh, T * H, nq + nk + nv)
        q = k = v = -1
    else:
        q = _linear(s, sh, T * H, nq)
        if at.qk_norm:  # q_norm(q_proj(x)), k_norm(k_proj(x)): each projection freed once normed
            qn = norm(s, nq, sh, b.norm, out_bytes=e)
            s.free(q)
            q = qn
        k = _linear(s, sh, T * H, nk)
        if at.qk_norm:
            kn = norm(s, nk, sh, b.norm, out_bytes=e)
            s.free(k)
            k = kn
        v = _linear(s, sh, T * H, nv)
    if at.rope and rope_sets(spec):
        # cos/sin carry the compute dtype except under autocast, where they stay fp32 (the product promotes)
        re = 4 if sh.mixed else e
        if spec.model_type in _ROPE_NEOX:
            f = (at.rotary_dim or at.head_dim) / at.head_dim
            qe, ke = _rope(s, nq * f, re), _rope(s, nk * f, re)
            qr = s.alloc(nq * re, "activations")  # cat([q_embed, q_pass], dim=-1)
            s.free(qe)
            kr = s.alloc(nk * re, "activations")
            s.free(ke)
        else:
            cat_pass = spec.model_type in _ROPE_CAT_PASS
            qr = _rope(s, nq, re, cat_pass)
            kr = _rope(s, nk, re, cat_pass)
        s.free(q)
        s.free(k)
        q, k = qr, kr
    cached: list[int] = []
    if sh.use_cache:
        cached = [s.alloc(kv_bytes[0], "kv_cache"), s.alloc(kv_bytes[1], "kv_cache")]  # cat onto an empty layer
        s.free(k)
        s.free(v)
        k = v = -1
    if sh.attention == "eager":
        out = _eager_scores(s, spec, b, sh, masks)
    elif math_sdpa(sh, at) and not masks:
        out = _math_sdpa(s, b, sh)
    else:
        out = s.alloc(T * nh * at.v_head_dim * (2 if sh.mixed else e), "activations")  # sdpa's output
        if spec.model_type in _ROPE_NEOX and at.rope and rope_sets(spec):
            copy = s.alloc(T * nh * at.v_head_dim * (2 if sh.mixed else e), "activations")  # .contiguous()
            s.free(out)
            out = copy
    o = _linear(s, sh, T * nh * at.v_head_dim, T * H)
    s.free(out)
    # GPT-NeoX's forward drops the fused projection (kept by the value view) before the concatenated q
    s.free_all((qkv, q, k, v) if spec.model_type in _ROPE_NEOX else (q, k, v, qkv))
    return o, cached


def math_sdpa(sh: PrefillShape, at) -> bool:
    """Whether ``scaled_dot_product_attention`` falls to its math kernel: fp32 grouped-query attention (the
    fused kernels take 16-bit inputs only, and torch 2.11's memory-efficient one does not take ``enable_gqa``;
    :data:`memfit.tracer.cuda_emulation.EFFICIENT_SDPA_SUPPORTS_GQA`, measured on the reference H100)."""
    kvh = at.num_heads if at.kind == "mla" else at.num_kv_heads
    return sh.attention == "sdpa" and sh.e == 4 and not sh.mixed and kvh < at.num_heads


def _math_sdpa(s, b: Block, sh: PrefillShape) -> int:
    """``_scaled_dot_product_attention_math`` with ``enable_gqa`` over the prompt (causal): q scaled, the causal
    mask as a float [P, P], k and v repeated to every query head, k^T scaled, the scores, + mask, softmax, the
    product with v; the output made contiguous in (B, T, heads, dim) order. Returns that output's handle."""
    at = b.attention
    B, P, T, e = sh.batch, sh.prompt, sh.tokens, sh.e
    nh = at.num_heads
    nq, nv = T * nh * at.head_dim * e, T * nh * at.v_head_dim * e
    qs = s.alloc(nq, "activations")
    mask = s.alloc(P * P * e, "activations")
    rep = (s.alloc(nq, "activations"), s.alloc(nv, "activations"))
    kts = s.alloc(nq, "activations")
    S = B * nh * P * P * e
    w = s.alloc(S, "activations")
    s.free(kts)
    masked = s.alloc(S, "activations")
    s.free(w)
    p = s.alloc(S, "activations")
    s.free(masked)
    out = s.alloc(nv, "activations")
    s.free_all((*rep, qs, mask, p))
    outc = s.alloc(nv, "activations")
    s.free(out)
    return outc


def _eager_scores(s, spec: ModelSpec, b: Block, sh: PrefillShape, masks: float) -> int:
    """Eager attention (``eager_attention_forward``): ``repeat_kv`` of k and v, ``matmul * scaling``,
    soft-capping (Gemma 2), ``+ mask``, ``softmax(dtype=fp32).to(dtype)``, ``matmul`` with v, ``transpose``
    made contiguous. Returns the attention output's handle."""
    at = b.attention
    e = 2 if sh.mixed else sh.e
    B, P, T = sh.batch, sh.prompt, sh.tokens
    nh = at.num_heads
    kvh = at.num_heads if at.kind == "mla" else at.num_kv_heads
    rep = [s.alloc(T * nh * at.head_dim * e, "activations"), s.alloc(T * nh * at.v_head_dim * e, "activations")] \
        if kvh < nh else []
    S = B * nh * P * P
    w = s.alloc(S * e, "activations")  # q @ k^T
    scaled = s.alloc(S * e, "activations")  # * scaling
    s.free(w)
    w = scaled
    if at.softcap:
        for _ in range(3):  # / cap, tanh, * cap
            nxt = s.alloc(S * e, "activations")
            s.free(w)
            w = nxt
    masked = s.alloc(S * e, "activations")  # + causal mask
    s.free(w)
    p32 = s.alloc(S * 4, "activations")
    p = s.alloc(S * e, "activations")
    s.free(p32)
    s.free(masked)
    out = s.alloc(T * nh * at.v_head_dim * e, "activations")
    s.free(p)
    s.free_all(rep)
    outc = s.alloc(T * nh * at.v_head_dim * e, "activations")  # transpose(1, 2).contiguous()
    s.free(out)
    return outc


def _post_norm(s, x: int, n_elems: float, sh: PrefillShape, kind: str) -> int:
    """A sandwich norm after a sub-block (Gemma 2/3's post-attention and post-feed-forward norms): the normed
    copy is made, then the sub-block's output it read is freed; the copy's handle."""
    y = norm(s, n_elems, sh, kind)
    s.free(x)
    return y


def _mlp(s, spec: ModelSpec, b: Block, sh: PrefillShape, x: int, moe_width: float) -> int:
    """The MLP over the normed input (not freed): returns the down projection's output."""
    T, H, e = sh.tokens, spec.hidden_size, sh.e
    if fused_experts(b):
        return _grouped_experts(s, spec, b, sh, x)
    if b.moe is not None or b.mlp is None:
        # experts: their widest moment as one tensor (the closed form's rule), then the combined output
        router = s.alloc(T * (b.moe.num_experts if b.moe else 0) * e, "activations")
        wide = s.alloc(T * moe_width * e, "activations")
        out = s.alloc(T * H * e, "activations")
        s.free(wide)
        s.free(router)
        return out
    inter = b.mlp.intermediate_size
    n = T * inter
    if b.mlp.gated and any(lin.role == "gate_up" for lin in b.linears):
        gu = _linear(s, sh, T * H, 2 * n)
        a = s.alloc(n * e, "activations")  # act(gate)
        m = s.alloc(n * e, "activations")  # up * act(gate)
        s.free(a)
        s.free(gu)
    elif b.mlp.gated:
        g = _linear(s, sh, T * H, n)
        a = s.alloc(n * e, "activations")
        s.free(g)
        u = _linear(s, sh, T * H, n)
        m = s.alloc(n * e, "activations")
        s.free(a)
        s.free(u)
    else:
        u = _linear(s, sh, T * H, n)
        m = s.alloc(n * e, "activations")
        s.free(u)
    d = _linear(s, sh, n, T * H)
    s.free(m)
    return d


def fused_qkv(b: Block) -> bool:
    """Whether the block projects q, k and v with one linear (role ``qkv``): its output is one tensor and q, k
    and v are views of it (transformers 5.17 ``Phi3Attention.forward``: ``qkv[..., :query_pos]``; GPT-2
    ``c_attn(...).split``; GPT-NeoX ``.chunk(3)``), as :mod:`memfit.estimator.layers` counts it for training."""
    return b.attention.kind != "mla" and any(lin.role == "qkv" for lin in b.linears)


def fused_experts(b: Block) -> bool:
    """Whether an MoE block's routed experts are fused parameters (one tensor per projection over all experts),
    which ``transformers`` 5.17 runs through its experts interface (``grouped_mm`` by default; ``batched_mm`` in
    ``generate()``'s decode on a GPU), rather than one module per expert or every expert at once (Llama 4)."""
    return b.moe is not None and not b.moe.all_experts and any(
        lin.role.startswith("expert_") and not lin.is_module for lin in b.linears)


def experts_gated(b: Block) -> bool:
    """Whether the routed experts have a gate (a fused gate/up projection or a separate gate)."""
    return any(lin.role in ("expert_gate_up", "expert_gate") for lin in b.linears)


def _grouped_experts(s, spec: ModelSpec, b: Block, sh: PrefillShape, x: int) -> int:
    """An MoE block whose experts are fused parameters, run by ``transformers`` 5.17's default ``grouped_mm``
    experts (``integrations/moe.py`` ``grouped_mm_experts_forward``): the router and its fp32 softmax/top-k;
    the shared expert first where there is one (Qwen2-MoE computes it before routing); then the S = tokens x
    top_k routed rows: sorted by expert, gathered (``hidden[perm // k]``), the grouped gate/up projection and
    its sentinel ``masked_fill``, the gated activation, the grouped down projection and its ``masked_fill``,
    the routing weights' product, the un-permuting gather, and the sum over k. Returns the block's output."""
    m = b.moe
    T, H, e = sh.tokens, spec.hidden_size, sh.e
    S = T * m.top_k
    inter = m.expert_intermediate_size
    gated = experts_gated(b)
    shared = -1
    if m.shared_intermediate_size:
        n = T * m.shared_intermediate_size
        g = _linear(s, sh, T * H, n)
        a = s.alloc(n * e, "activations")
        s.free(g)
        u = _linear(s, sh, T * H, n)
        h = s.alloc(n * e, "activations")
        s.free_all((a, u))
        shared = _linear(s, sh, n, T * H)
        s.free(h)
    logits = _linear(s, sh, T * H, T * m.num_experts)
    l32 = s.alloc(T * m.num_experts * 4, "activations")  # softmax(..., dtype=float)
    probs = s.alloc(T * m.num_experts * 4, "activations")
    s.free(l32)
    top_v = s.alloc(T * m.top_k * 4, "activations")
    top_i = s.alloc(T * m.top_k * 8, "activations")
    weights = s.alloc(T * m.top_k * e, "activations")  # .to(hidden dtype)
    s.free_all((top_v, probs))
    order = (s.alloc(S * 8, "activations"), s.alloc(S * 8, "activations"))  # sort: values, permutation
    rows = s.alloc(S * H * e, "activations")  # hidden_states[perm // top_k]
    side = s.alloc(S * (e + 4 + 1), "activations")  # sorted weights, their fp32 histc input, sentinel mask
    width = 2 * inter if gated else inter
    up = s.alloc(S * width * e, "activations")
    up_m = s.alloc(S * width * e, "activations")  # masked_fill
    s.free(up)
    if gated:
        a = s.alloc(S * inter * e, "activations")  # act(gate)
        h = s.alloc(S * inter * e, "activations")  # * up
        s.free(a)
    else:
        h = s.alloc(S * inter * e, "activations")
    s.free(up_m)
    down = s.alloc(S * H * e, "activations")
    s.free(h)
    down_m = s.alloc(S * H * e, "activations")
    s.free(down)
    weighted = s.alloc(S * H * e, "activations")
    inv = s.alloc(S * 8, "activations")
    back = s.alloc(S * H * e, "activations")  # weighted[inv_perm]
    s.free(weighted)
    out = s.alloc(T * H * e, "activations")  # view(T, k, H).sum(1)
    s.free_all((*order, rows, side, down_m, back, inv, logits, weights, top_i))
    if shared >= 0:
        gate = _linear(s, sh, T * H, T)
        sg = s.alloc(T * H * e, "activations")  # sigmoid(gate) * shared
        s.free_all((gate, shared))
        total = s.alloc(T * H * e, "activations")  # routed + shared
        s.free_all((sg, out))
        out = total
    return out


def decoder_layer(s, spec: ModelSpec, b: Block, sh: PrefillShape, x: int, kv_bytes: tuple[int, int], *,
                  free_input: bool, masks: float = 0, moe_width: float = 0) -> tuple[int, list[int]]:
    """One decoder layer over the residual stream ``x``: returns (its output, the cached k and v). The input
    is freed once the output exists unless it is the embedding output (``free_input`` False)."""
    T, H = sh.tokens, spec.hidden_size
    sandwich = b.norms_per_layer >= 4  # Gemma 2/3: post-attention and pre/post-feed-forward norms
    n1 = norm(s, T * H, sh, b.norm)
    o, cached = _attention(s, spec, b, sh, n1, kv_bytes, masks)
    if b.parallel and spec.model_type in _ROPE_NEOX:
        # mlp(post_attention_layernorm(x)) once the attention returned; mlp + attn + x, one sum at a time
        s.free(n1)
        n2 = norm(s, T * H, sh, b.norm)
        d = _mlp(s, spec, b, sh, n2, moe_width)
        s.free(n2)
        t = s.alloc(T * H * sh.r, "activations")
        out = s.alloc(T * H * sh.r, "activations")
        s.free(t)
        s.free_all((d, o))
    elif b.parallel:
        d = _mlp(s, spec, b, sh, n1, moe_width)
        t = s.alloc(T * H * sh.r, "activations")  # attn + mlp
        s.free_all((o, d))
        out = s.alloc(T * H * sh.r, "activations")  # + residual
        s.free_all((t, n1))
    else:
        s.free(n1)
        if sandwich:
            o = _post_norm(s, o, T * H, sh, b.norm)
        h1 = s.alloc(T * H * sh.r, "activations")  # residual + attention
        s.free(o)
        n2 = norm(s, T * H, sh, b.norm)
        d = _mlp(s, spec, b, sh, n2, moe_width)
        s.free(n2)
        if sandwich:
            d = _post_norm(s, d, T * H, sh, b.norm)
        out = s.alloc(T * H * sh.r, "activations")  # residual + mlp
        s.free(d)
        s.free(h1)
    if free_input:
        s.free(x)
    return out, cached


def logits_head(s, spec: ModelSpec, sh: PrefillShape, rows: int, vocab_out: int) -> int:
    """The head over ``rows`` positions (all of them for a plain forward, the last one per sequence in
    ``generate()``): ``lm_head``, Granite's ``/ logits_scaling`` (:data:`LOGITS_SCALED`) and Gemma's final soft-capping (``/ cap``, ``tanh``, ``* cap``: each a new
    tensor, the previous freed, so two are alive at once). Returns the logits' handle."""
    n = rows * vocab_out * sh.e
    logits = s.alloc(n, "logits_and_loss")
    if spec.model_type in LOGITS_SCALED and spec.head == "causal_lm":
        nxt = s.alloc(n, "logits_and_loss")
        s.free(logits)
        logits = nxt
    if spec.final_logit_softcapping and spec.head == "causal_lm":
        for _ in range(3):
            nxt = s.alloc(n, "logits_and_loss")
            s.free(logits)
            logits = nxt
    return logits
