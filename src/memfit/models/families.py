"""Parse a Hugging Face ``config.json`` into a :class:`ModelSpec`, family by family.

Every count here follows what ``transformers`` 5.x builds for the config (the modeling file of the
family is the source of each rule, named in each parser's docstring): the same defaults for keys a
config leaves out, the same module names, the same biases and norms, tied embeddings counted once. A
test builds every registry entry with ``transformers`` on the meta device and compares the totals, the
per-layer totals and the per-layer ``nn.Linear`` names and shapes.

No torch, no transformers: this module is plain arithmetic over a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace

from ..errors import ConfigError, brief
from .spec import MLP, Attention, Block, Linear, ModelSpec, MoE

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["spec_from_config", "SUPPORTED_MODEL_TYPES"]

# --------------------------------------------------------------------------------------------------
# Reading a config dict with the family's transformers defaults
# --------------------------------------------------------------------------------------------------

_NOT_GIVEN = object()


class _Config:
    """Typed access to a config dict, falling back to the family's ``transformers`` defaults.

    An explicit ``null`` in the config wins over the default, as it does in ``transformers``
    (``"q_lora_rank": null`` means DeepSeek-V2-Lite has no query compression).
    """

    __slots__ = ("raw", "defaults")

    def __init__(self, raw: dict[str, Any], defaults: dict[str, Any]):
        self.raw = raw
        self.defaults = defaults

    def get(self, key: str, *aliases: str, default: Any = _NOT_GIVEN) -> Any:
        for k in (key, *aliases):
            if k in self.raw:
                return self.raw[k]
        if default is not _NOT_GIVEN:
            return default
        return self.defaults.get(key)

    def int(self, key: str, *aliases: str, minimum: int = 1, default: Any = _NOT_GIVEN) -> int:
        value = self.get(key, *aliases, default=default)
        if value is None:
            names = "/".join((key, *aliases))
            raise ConfigError(f"config.json has no {names}; add it (an integer) or check the model_type")
        return _as_int(key, value, minimum)

    def opt_int(self, key: str, *aliases: str, minimum: int = 1, default: Any = _NOT_GIVEN) -> int | None:
        value = self.get(key, *aliases, default=default)
        return None if value is None else _as_int(key, value, minimum)

    def flag(self, key: str, *aliases: str, default: Any = _NOT_GIVEN) -> bool:
        return bool(self.get(key, *aliases, default=default))

    def opt_float(self, key: str) -> float | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.json: {key} must be a number, got {brief(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config.json: {key} is too large a number, got {brief(value)}") from None


#: Largest size a config field may give. transformers builds every dimension as a tensor shape; beyond
#: 2**31 - 1 no model is built (and the arithmetic here would describe nothing real).
MAX_CONFIG_SIZE = (1 << 31) - 1
#: Most layers a config may give: the deepest published decoders have a few hundred; the estimate walks the
#: layers, so an absurd count (2**31) would only exhaust memory.
MAX_LAYERS = 10_000


def _text(value: Any) -> str:
    """A config string field (an activation name) as text; a non-string value is shown briefly."""
    return value if isinstance(value, str) else brief(value)


def _as_int(key: str, value: Any, minimum: int, maximum: int = MAX_CONFIG_SIZE) -> int:
    """``value`` as a config size: an integer between ``minimum`` and ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: {key} must be an integer, got {brief(value)}")
    if value < minimum:
        raise ConfigError(f"config.json: {key} must be at least {minimum}, got {brief(value)}")
    if value > maximum:
        raise ConfigError(f"config.json: {key} must be at most {maximum:,}, got {brief(value)}")
    return value


def _as_fraction(key: str, value: Any) -> float:
    """``value`` as a fraction in (0, 1] (a config's ``rotary_pct``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"config.json: {key} must be a number in (0, 1], got {brief(value)}")
    return float(value)


def _hidden_size(c: _Config) -> int:
    if c.get("hidden_size", "n_embd", "d_model", "dim", default=None) is None:
        raise ConfigError(
            "config.json has no hidden_size (or n_embd/d_model); is this a transformers model config?"
        )
    return c.int("hidden_size", "n_embd", "d_model", "dim")


def _layers(c: _Config) -> int:
    if c.get("num_hidden_layers", "n_layer", "n_layers", "num_layers", default=None) is None:
        raise ConfigError(
            "config.json has no num_hidden_layers (or n_layer/num_layers); is this a transformers model config?"
        )
    n = c.int("num_hidden_layers", "n_layer", "n_layers", "num_layers")
    if n > MAX_LAYERS:
        raise ConfigError(f"config.json: num_hidden_layers {n:,} is more than memfit counts ({MAX_LAYERS:,})")
    return n


def _heads(c: _Config, hidden: int, *, divides: bool) -> int:
    heads = c.int("num_attention_heads", "n_head", "n_heads")
    if divides and hidden % heads:
        raise ConfigError(
            f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
            "set head_dim or fix the sizes"
        )
    return heads


def _kv_heads(c: _Config, heads: int) -> int:
    kv = c.opt_int("num_key_value_heads")
    kv = heads if kv is None else kv
    if heads % kv:
        raise ConfigError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return kv


def _head_dim(c: _Config, hidden: int, heads: int) -> int:
    """``config.head_dim`` when set (Gemma 7B: 256 with 3072 / 16 = 192), else hidden / heads."""
    head_dim = c.opt_int("head_dim")
    if head_dim is not None:
        return head_dim
    if hidden % heads:
        raise ConfigError(
            f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}; set head_dim"
        )
    return hidden // heads


def _layer_types(c: _Config, n_layers: int) -> list[str] | None:
    """The config's explicit per-layer attention kinds (``layer_types``), validated, or None."""
    types = c.raw.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != n_layers or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"config.json: layer_types must be a list of {n_layers} strings (one per layer)")
    return types


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

_NORM_WIDTH_FACTOR = {"rms": 1, "gemma_rms": 1, "layer": 2, "layer_noaffine": 0}
"""Parameters per unit of width: RMSNorm has a weight, LayerNorm a weight and a bias, OLMo's
non-parametric LayerNorm none."""


def _norm(kind: str, width: int) -> int:
    return _NORM_WIDTH_FACTOR[kind] * width


def _lin(name: str, i: int, o: int, bias: bool = False, role: str = "", **kw: Any) -> Linear:
    return Linear(name=name, in_features=i, out_features=o, bias=bias, role=role, **kw)


def _qkvo(
    hidden: int, heads: int, kv: int, head_dim: int, *, qkv_bias: bool, o_bias: bool,
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> tuple[Linear, ...]:
    """Separate q/k/v projections (GQA: k and v have ``kv`` heads) and the output projection."""
    q, k, v, o = names
    return (
        _lin(q, hidden, heads * head_dim, qkv_bias, "q"),
        _lin(k, hidden, kv * head_dim, qkv_bias, "k"),
        _lin(v, hidden, kv * head_dim, qkv_bias, "v"),
        _lin(o, heads * head_dim, hidden, o_bias, "o"),
    )


def _gated_mlp(hidden: int, inter: int, *, bias: bool = False, role_prefix: str = "") -> tuple[Linear, ...]:
    """SwiGLU / GeGLU: gate and up project to ``inter``, down projects back."""
    return (
        _lin("gate_proj", hidden, inter, bias, role_prefix + "gate"),
        _lin("up_proj", hidden, inter, bias, role_prefix + "up"),
        _lin("down_proj", inter, hidden, bias, role_prefix + "down"),
    )


def _fused_experts(hidden: int, inter: int, num_experts: int, *, bias: bool = False) -> tuple[Linear, ...]:
    """transformers 5 keeps routed experts as two 3-D ``nn.Parameter`` tensors per layer:
    ``gate_up_proj`` (E, 2 * inter, hidden) and ``down_proj`` (E, hidden, inter), each with an (E, out)
    bias where the family has one (gpt-oss)."""
    return (
        _lin("gate_up_proj", hidden, 2 * inter, bias, "expert_gate_up", count=num_experts, is_module=False),
        _lin("down_proj", inter, hidden, bias, "expert_down", count=num_experts, is_module=False),
    )


def _router(hidden: int, num_experts: int, *, fp32: bool = False) -> Linear:
    """The router is a ``...TopKRouter`` module holding a plain (E, hidden) weight, not an nn.Linear."""
    return _lin("gate", hidden, num_experts, False, "router", is_module=False, fp32=fp32)


def _assemble(
    kinds: list[Hashable], make: Callable[[Hashable, int], Block]
) -> tuple[tuple[Block, ...], tuple[int, ...]]:
    """Group identical layers: one :class:`Block` per distinct kind (in order of first appearance)."""
    order: dict[Hashable, int] = {}
    counts: dict[Hashable, int] = {}
    for kind in kinds:
        if kind not in order:
            order[kind] = len(order)
        counts[kind] = counts.get(kind, 0) + 1
    blocks = tuple(make(kind, counts[kind]) for kind in order)
    return blocks, tuple(order[kind] for kind in kinds)


def _sizes(c: _Config) -> tuple[int, int, int]:
    """Hidden size, number of layers and vocabulary size, read (and checked) in that order."""
    return _hidden_size(c), _layers(c), c.int("vocab_size")


def _mha(heads: int, hidden: int) -> Attention:
    """Multi-head attention with as many kv heads as query heads, each ``hidden / heads`` wide."""
    return Attention(num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, v_head_dim=hidden // heads)


def _plain_mlp_block(c: _Config, count: int, attention: Attention, *, hidden: int, inter: int, act_key: str,
                     linears: tuple[Linear, ...], norm: str = "layer", norms: int = 2,
                     parallel: bool = False) -> Block:
    """``count`` identical layers with an ungated MLP of width ``inter`` (activation: config key
    ``act_key``) and ``norms`` norms of kind ``norm`` over the hidden size (GPT-2, GPT-NeoX, OPT, Falcon,
    BERT, DistilBERT)."""
    return Block(
        count=count,
        attention=attention,
        mlp=MLP(intermediate_size=inter, gated=False, activation=_text(c.get(act_key))),
        norm=norm,
        norms_per_layer=norms,
        parallel=parallel,
        linears=linears,
        other_params=norms * _norm(norm, hidden),
    )


class _Parsed:
    """What a family parser found; turned into a ModelSpec by :func:`spec_from_config`."""

    __slots__ = ("hidden", "vocab", "n_layers", "blocks", "layer_blocks", "embedding", "final", "head",
                 "tie", "max_pos", "final_softcap")

    def __init__(self, *, layer_blocks: tuple[int, ...], final_softcap: float | None = None, **kw: Any):
        self.layer_blocks = layer_blocks
        self.n_layers = len(layer_blocks)
        self.final_softcap = final_softcap
        for k, v in kw.items():
            setattr(self, k, v)


def _num_labels(c: _Config) -> int:
    """``len(id2label)`` when the config has it (what transformers does), else ``num_labels``, else 2."""
    id2label = c.raw.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    value = c.raw.get("num_labels")
    return 2 if value is None else _as_int("num_labels", value, 1)


def _decoder_head(head: str, *, width: int, vocab: int, tie: bool, num_labels: int) -> int:
    """Parameters after the final norm of a decoder-only model.

    causal LM: ``lm_head`` (vocab x width, no bias), nothing when tied to the input embedding;
    sequence classification: ``score`` (width x num_labels, no bias: ``GenericForSequenceClassification``);
    base model: nothing.
    """
    if head == "causal_lm":
        return 0 if tie else vocab * width
    if head == "seq_cls":
        return width * num_labels
    return 0


def _decoder(c: _Config, head: str, num_labels: int, *, hidden: int, vocab: int, tie: bool,
             blocks: tuple[Block, ...], layer_blocks: tuple[int, ...] | None = None, embedding: int, final: int,
             width: int | None = None, max_pos: int | None = None, final_softcap: float | None = None) -> _Parsed:
    """A decoder-only model's :class:`_Parsed`. ``layer_blocks`` None: one block for every layer; the head
    is :func:`_decoder_head` over ``width`` (default: the hidden size); ``max_pos`` None: the config's
    ``max_position_embeddings`` (0 when it has none)."""
    return _Parsed(
        hidden=hidden, vocab=vocab, blocks=blocks,
        layer_blocks=(0,) * blocks[0].count if layer_blocks is None else layer_blocks,
        embedding=embedding, final=final,
        head=_decoder_head(head, width=hidden if width is None else width, vocab=vocab, tie=tie,
                           num_labels=num_labels),
        tie=tie, max_pos=(c.opt_int("max_position_embeddings") or 0) if max_pos is None else max_pos,
        final_softcap=final_softcap,
    )


# --------------------------------------------------------------------------------------------------
# Decoder families in the Llama mould (RMSNorm, rotary, q/k/v/o, gated MLP or MoE)
# --------------------------------------------------------------------------------------------------

_LLAMA_LIKE_DEFAULTS: dict[str, dict[str, Any]] = {
    # transformers 5.x configuration_<family>.py defaults, for the keys that change a count
    "llama": dict(vocab_size=32000, intermediate_size=11008, num_attention_heads=32, attention_bias=False,
                  mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=2048, hidden_act="silu"),
    "mistral": dict(vocab_size=32000, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    tie_word_embeddings=False, sliding_window=4096, max_position_embeddings=131072,
                    hidden_act="silu"),
    "mixtral": dict(vocab_size=32000, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    tie_word_embeddings=False, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=131072, hidden_act="silu"),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, num_attention_heads=32, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=None, max_window_layers=28,
                  max_position_embeddings=32768, hidden_act="silu"),
    "qwen3": dict(vocab_size=151936, intermediate_size=22016, num_attention_heads=32, head_dim=128,
                  attention_bias=False, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
                  max_window_layers=28, max_position_embeddings=32768, hidden_act="silu"),
    "qwen2_moe": dict(vocab_size=151936, intermediate_size=5632, num_attention_heads=16,
                      tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=28, decoder_sparse_step=1, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
                      mlp_only_layers=[], qkv_bias=True, max_position_embeddings=32768, hidden_act="silu"),
    "qwen3_moe": dict(vocab_size=151936, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                      attention_bias=False, tie_word_embeddings=False, use_sliding_window=False,
                      sliding_window=None, decoder_sparse_step=1, moe_intermediate_size=768,
                      num_experts_per_tok=8, num_experts=128, mlp_only_layers=[],
                      max_position_embeddings=32768, hidden_act="silu"),
    "gemma": dict(vocab_size=256000, intermediate_size=24576, num_attention_heads=16, head_dim=256,
                  attention_bias=False, tie_word_embeddings=True, max_position_embeddings=8192,
                  hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(vocab_size=256000, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, attention_bias=False, tie_word_embeddings=True, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=8192,
                   hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(vocab_size=262208, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, attention_bias=False, tie_word_embeddings=True, sliding_window=4096,
                        sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
                        max_position_embeddings=131072, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(vocab_size=32064, intermediate_size=8192, num_attention_heads=32, tie_word_embeddings=False,
                 sliding_window=None, max_position_embeddings=4096, hidden_act="silu"),
    "olmo": dict(vocab_size=50304, intermediate_size=11008, num_attention_heads=32, attention_bias=False,
                 tie_word_embeddings=False, max_position_embeddings=2048, hidden_act="silu"),
    "olmo2": dict(vocab_size=50304, intermediate_size=11008, num_attention_heads=32, attention_bias=False,
                  tie_word_embeddings=False, max_position_embeddings=2048, hidden_act="silu"),
    "olmoe": dict(vocab_size=50304, intermediate_size=2048, num_attention_heads=16, attention_bias=False,
                  tie_word_embeddings=False, num_experts_per_tok=8, num_experts=64,
                  max_position_embeddings=4096, hidden_act="silu"),
    "deepseek_v2": dict(vocab_size=102400, intermediate_size=11008, num_attention_heads=32,
                        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, first_k_dense_replace=0,
                        kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=64, n_shared_experts=2,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts_per_tok=None,
                        moe_intermediate_size=1407, max_position_embeddings=2048, hidden_act="silu"),
    "deepseek_v3": dict(vocab_size=129280, intermediate_size=18432, num_attention_heads=128,
                        attention_bias=False, tie_word_embeddings=False, first_k_dense_replace=3,
                        kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts_per_tok=8,
                        moe_intermediate_size=2048, max_position_embeddings=4096, hidden_act="silu"),
}


def _sliding_kinds(c: _Config, family: str, n_layers: int) -> list[bool]:
    """Which layers use sliding-window attention, as each family's config ``__post_init__`` decides.

    - Mistral, Mixtral, Phi-3, Qwen3-MoE: every layer when ``sliding_window`` is set;
    - Qwen2 / Qwen3: with ``use_sliding_window``, layers ``i >= max_window_layers``;
    - Qwen2-MoE: with ``use_sliding_window``, even-indexed layers below ``max_window_layers``;
    - Gemma 2, gpt-oss: even-indexed layers (0, 2, ...); Gemma 3: all but every ``sliding_window_pattern``-th;
    - an explicit ``layer_types`` list wins where the family reads it.
    """
    window = c.get("sliding_window")
    if family in ("mistral", "mixtral", "phi3"):
        return [window is not None] * n_layers
    if family == "qwen3_moe":
        return [bool(c.get("use_sliding_window")) and window is not None] * n_layers
    if family in ("qwen2", "qwen3", "qwen2_moe", "gemma2", "gemma3_text", "gpt_oss"):
        types = _layer_types(c, n_layers)
        if types is not None:
            return [t == "sliding_attention" for t in types]
        if family in ("qwen2", "qwen3"):
            on = bool(c.get("use_sliding_window")) and window is not None
            max_window = c.int("max_window_layers", minimum=0)
            return [on and i >= max_window for i in range(n_layers)]
        if family == "qwen2_moe":
            on = bool(c.get("use_sliding_window"))
            max_window = c.int("max_window_layers", minimum=0)
            return [on and (i + 1) % 2 == 1 and i < max_window for i in range(n_layers)]
        if family in ("gemma2", "gpt_oss"):
            return [(i + 1) % 2 == 1 for i in range(n_layers)]
        pattern = c.int("sliding_window_pattern", "_sliding_window_pattern")
        return [(i + 1) % pattern != 0 for i in range(n_layers)]
    return [False] * n_layers


def _parse_llama_like(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """Llama, Mistral, Mixtral, Qwen2/3 (+MoE), Gemma 1/2/3, Phi-3, OLMo 1/2, OLMoE, DeepSeek V2/V3.

    Source: ``transformers/models/<family>/modeling_<family>.py`` (5.x): ``<Family>Attention``,
    ``<Family>MLP`` / ``...SparseMoeBlock`` / ``...Experts`` / ``...TopKRouter``, ``<Family>DecoderLayer``.
    """
    hidden, n_layers, vocab = _sizes(c)
    inter = c.int("intermediate_size")
    act = _text(c.get("hidden_activation", "hidden_act", default=None) or c.defaults.get("hidden_activation")
              or c.defaults.get("hidden_act") or "silu")
    tie = c.flag("tie_word_embeddings")
    mla = family in ("deepseek_v2", "deepseek_v3")
    heads = _heads(c, hidden, divides=False)

    # ---- norms: kind, count per layer, width
    norm = {"gemma": "gemma_rms", "gemma2": "gemma_rms", "gemma3_text": "gemma_rms",
            "olmo": "layer_noaffine"}.get(family, "rms")
    norms_per_layer = 4 if family in ("gemma2", "gemma3_text") else 2  # Gemma 2/3 add pre/post-FFN norms
    layer_norm_params = norms_per_layer * _norm(norm, hidden)

    # ---- attention
    attn_other = 0
    if mla:
        q_lora = c.opt_int("q_lora_rank")
        kv_lora = c.int("kv_lora_rank")
        nope = c.int("qk_nope_head_dim", minimum=0)
        rope = c.int("qk_rope_head_dim", minimum=0)
        v_dim = c.int("v_head_dim")
        qk_dim = nope + rope
        bias = c.flag("attention_bias")
        if q_lora is None:
            q_lins: tuple[Linear, ...] = (_lin("q_proj", hidden, heads * qk_dim, False, "q"),)
        else:
            q_lins = (_lin("q_a_proj", hidden, q_lora, bias, "q_a"),
                      _lin("q_b_proj", q_lora, heads * qk_dim, False, "q_b"))
            attn_other += _norm("rms", q_lora)  # q_a_layernorm
        attn_lins = q_lins + (
            # the compressed kv latent plus one shared rotary key head ("with_mqa")
            _lin("kv_a_proj_with_mqa", hidden, kv_lora + rope, bias, "kv_a"),
            _lin("kv_b_proj", kv_lora, heads * (nope + v_dim), False, "kv_b"),
            _lin("o_proj", heads * v_dim, hidden, bias, "o"),
        )
        attn_other += _norm("rms", kv_lora)  # kv_a_layernorm

        def attention(sliding: bool) -> Attention:
            return Attention(num_heads=heads, num_kv_heads=heads, head_dim=qk_dim, v_head_dim=v_dim, kind="mla",
                             kv_lora_rank=kv_lora, q_lora_rank=q_lora or 0, qk_rope_head_dim=rope)
    else:
        kv = _kv_heads(c, heads)
        head_dim = _head_dim(c, hidden, heads)
        if family == "qwen2":  # q/k/v always biased, o never (Qwen2Attention)
            qkv_bias, o_bias = True, False
        elif family == "qwen2_moe":
            qkv_bias, o_bias = c.flag("qkv_bias"), False
        elif family in ("mistral", "mixtral", "phi3"):
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = c.flag("attention_bias")
        if family == "phi3":  # one fused projection for q, k and v
            attn_lins = (_lin("qkv_proj", hidden, (heads + 2 * kv) * head_dim, False, "qkv"),
                         _lin("o_proj", heads * head_dim, hidden, False, "o"))
        else:
            attn_lins = _qkvo(hidden, heads, kv, head_dim, qkv_bias=qkv_bias, o_bias=o_bias)
        qk_norm = family in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2", "olmoe")
        if family in ("qwen3", "qwen3_moe", "gemma3_text"):
            attn_other += 2 * _norm(norm, head_dim)  # q_norm, k_norm over one head (shared by all heads)
        elif family == "olmo2":
            attn_other += _norm("rms", heads * head_dim) + _norm("rms", kv * head_dim)  # over all heads
        elif family == "olmoe":
            attn_other += _norm("rms", hidden) + _norm("rms", (hidden // heads) * kv)
        window = c.opt_int("sliding_window", minimum=0) or None  # transformers writes 0 when it is off
        softcap = c.opt_float("attn_logit_softcapping") if family == "gemma2" else None

        def attention(sliding: bool) -> Attention:
            return Attention(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, v_head_dim=head_dim,
                             sliding_window=window if sliding else None, qk_norm=qk_norm, softcap=softcap)

    # ---- feed-forward: which layers are MoE, and what each kind holds
    moe_layers = [False] * n_layers
    moe: MoE | None = None
    moe_lins: tuple[Linear, ...] = ()
    dense_inter = inter
    dense_bias = c.flag("mlp_bias") if family in ("llama", "deepseek_v2") else False
    if family in ("mixtral", "olmoe"):  # the same MoE in every layer; each names the expert count its own way
        keys = ("num_local_experts", "num_experts")  # Mixtral's key first; OLMoE's is the other
        experts = c.int(*(keys if family == "mixtral" else keys[::-1]))
        top_k = c.int("num_experts_per_tok")
        moe = MoE(num_experts=experts, top_k=top_k, expert_intermediate_size=inter)
        moe_lins = (_router(hidden, experts),) + _fused_experts(hidden, inter, experts)
        moe_layers = [True] * n_layers
    elif family in ("qwen2_moe", "qwen3_moe"):
        experts = c.int("num_experts", "num_local_experts", minimum=0)
        top_k = c.int("num_experts_per_tok")
        expert_inter = c.int("moe_intermediate_size")
        step = c.int("decoder_sparse_step")
        mlp_only = c.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
            raise ConfigError("config.json: mlp_only_layers must be a list of layer indices")
        moe_layers = [i not in mlp_only and experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]
        moe_lins = (_router(hidden, experts),) + _fused_experts(hidden, expert_inter, experts)
        if family == "qwen2_moe":
            shared = c.int("shared_expert_intermediate_size")
            moe = MoE(num_experts=experts, top_k=top_k, expert_intermediate_size=expert_inter, num_shared_experts=1,
                      shared_intermediate_size=shared, shared_expert_gate=True)
            moe_lins += _gated_mlp(hidden, shared, role_prefix="shared_") + (
                _lin("shared_expert_gate", hidden, 1, False, "shared_router"),)  # sigmoid gate, nn.Linear
        else:
            moe = MoE(num_experts=experts, top_k=top_k, expert_intermediate_size=expert_inter)
    elif mla:
        experts = c.int("n_routed_experts", "num_local_experts", "num_experts")
        top_k = c.opt_int("num_experts_per_tok") or 0
        expert_inter = c.int("moe_intermediate_size")
        n_shared = c.int("n_shared_experts", minimum=0)
        first_dense = c.int("first_k_dense_replace", minimum=0)
        moe_layers = [i >= first_dense for i in range(n_layers)]
        shared = expert_inter * n_shared  # the shared experts are one MLP of n_shared times the width
        moe = MoE(num_experts=experts, top_k=top_k, expert_intermediate_size=expert_inter,
                  num_shared_experts=n_shared, shared_intermediate_size=shared)
        # DeepSeek routers stay float32 (_keep_in_fp32_modules_strict = ["gate.weight"])
        moe_lins = (_router(hidden, experts, fp32=True),) + _fused_experts(hidden, expert_inter, experts) + (
            _gated_mlp(hidden, shared, bias=dense_bias, role_prefix="shared_"))

    if family == "phi3":  # gate and up fused in one projection
        dense_lins: tuple[Linear, ...] = (_lin("gate_up_proj", hidden, 2 * dense_inter, False, "gate_up"),
                                          _lin("down_proj", dense_inter, hidden, False, "down"))
    else:
        dense_lins = _gated_mlp(hidden, dense_inter, bias=dense_bias)

    sliding = _sliding_kinds(c, family, n_layers) if not mla else [False] * n_layers
    kinds = list(zip(moe_layers, sliding, strict=True))

    def make(kind: Hashable, count: int) -> Block:
        is_moe, is_sliding = kind  # type: ignore[misc]
        return Block(
            count=count,
            attention=attention(is_sliding),
            mlp=None if is_moe else MLP(intermediate_size=dense_inter, gated=True, activation=act),
            moe=moe if is_moe else None,
            norm=norm,
            norms_per_layer=norms_per_layer,
            linears=attn_lins + (moe_lins if is_moe else dense_lins),
            other_params=layer_norm_params + attn_other,
        )

    blocks, layer_blocks = _assemble(kinds, make)  # type: ignore[arg-type]
    return _decoder(
        c, head, num_labels, hidden=hidden, vocab=vocab, tie=tie, blocks=blocks, layer_blocks=layer_blocks,
        embedding=vocab * hidden, final=_norm(norm, hidden), max_pos=c.opt_int("max_position_embeddings") or 0,
        final_softcap=c.opt_float("final_logit_softcapping") if family.startswith("gemma") else None,
    )


# --------------------------------------------------------------------------------------------------
# GPT-2, GPT-NeoX (Pythia), OPT, Falcon
# --------------------------------------------------------------------------------------------------

_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_head=12, n_inner=None, tie_word_embeddings=True,
                      activation_function="gelu_new")


def _parse_gpt2(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """GPT-2 (``modeling_gpt2.py``): ``Conv1D`` layers (weight stored in x out), all biased; learned
    position embeddings ``wpe`` (n_positions x n_embd); LayerNorms ``ln_1``, ``ln_2``, ``ln_f``."""
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=True)
    inner = c.opt_int("n_inner") or 4 * hidden
    n_pos = c.int("n_positions", "max_position_embeddings")
    tie = c.flag("tie_word_embeddings")
    block = _plain_mlp_block(c, n_layers, _mha(heads, hidden), hidden=hidden, inter=inner,
                             act_key="activation_function", linears=(
                                 _lin("c_attn", hidden, 3 * hidden, True, "qkv"),
                                 _lin("c_proj", hidden, hidden, True, "o"),
                                 _lin("c_fc", hidden, inner, True, "up"),
                                 _lin("c_proj", inner, hidden, True, "down"),
                             ))
    return _decoder(c, head, num_labels, hidden=hidden, vocab=vocab, tie=tie, blocks=(block,),
                    embedding=vocab * hidden + n_pos * hidden, final=_norm("layer", hidden), max_pos=n_pos)


_GPT_NEOX_DEFAULTS = dict(vocab_size=50432, intermediate_size=24576, num_attention_heads=64,
                          tie_word_embeddings=False, use_parallel_residual=True, attention_bias=True,
                          max_position_embeddings=2048, hidden_act="gelu")


def _parse_gpt_neox(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """GPT-NeoX / Pythia (``modeling_gpt_neox.py``): fused ``query_key_value`` and ``dense`` (biased when
    ``attention_bias``), ``dense_h_to_4h`` / ``dense_4h_to_h`` (always biased), two LayerNorms, parallel
    residual when ``use_parallel_residual``; untied ``embed_in`` / ``lm_head`` by default."""
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=True)
    inter = c.int("intermediate_size")
    bias = c.flag("attention_bias")
    tie = c.flag("tie_word_embeddings")
    att = _mha(heads, hidden)
    rope_params = c.get("rope_parameters", default=None)
    frac = c.get("partial_rotary_factor", "rotary_pct", default=None)
    if frac is None and isinstance(rope_params, dict):
        frac = rope_params.get("partial_rotary_factor")
    frac = _as_fraction("rotary_pct", 1.0 if frac is None else frac)
    rot = int(att.head_dim * frac)  # GPTNeoXRotaryEmbedding: dim = int(head_dim * partial_rotary_factor)
    if 0 < rot < att.head_dim:
        att = replace(att, rotary_dim=rot)
    block = _plain_mlp_block(c, n_layers, att, hidden=hidden, inter=inter, act_key="hidden_act",
                             parallel=c.flag("use_parallel_residual"), linears=(
                                 _lin("query_key_value", hidden, 3 * hidden, bias, "qkv"),
                                 _lin("dense", hidden, hidden, bias, "o"),
                                 _lin("dense_h_to_4h", hidden, inter, True, "up"),
                                 _lin("dense_4h_to_h", inter, hidden, True, "down"),
                             ))
    return _decoder(c, head, num_labels, hidden=hidden, vocab=vocab, tie=tie, blocks=(block,),
                    embedding=vocab * hidden, final=_norm("layer", hidden))


_OPT_DEFAULTS = dict(vocab_size=50272, ffn_dim=3072, num_attention_heads=12, max_position_embeddings=2048,
                     do_layer_norm_before=True, _remove_final_layer_norm=False, word_embed_proj_dim=None,
                     enable_bias=True, layer_norm_elementwise_affine=True, tie_word_embeddings=True,
                     activation_function="relu")

_OPT_POSITION_OFFSET = 2
"""``OPTLearnedPositionalEmbedding`` holds ``max_position_embeddings + 2`` rows (fairseq's padding offset)."""


def _parse_opt(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """OPT (``modeling_opt.py``): q/k/v/out_proj and fc1/fc2 biased when ``enable_bias``; learned positions
    with an offset of 2; ``project_in`` / ``project_out`` when ``word_embed_proj_dim`` differs from the
    hidden size (OPT-350m); final LayerNorm only with ``do_layer_norm_before``."""
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=True)
    ffn = c.int("ffn_dim")
    n_pos = c.int("max_position_embeddings")
    proj = c.opt_int("word_embed_proj_dim") or hidden
    bias = c.flag("enable_bias")
    norm = "layer" if c.flag("layer_norm_elementwise_affine") else "layer_noaffine"
    tie = c.flag("tie_word_embeddings")
    block = _plain_mlp_block(c, n_layers, _mha(heads, hidden), hidden=hidden, inter=ffn,
                             act_key="activation_function", norm=norm,
                             linears=_qkvo(hidden, heads, heads, hidden // heads, qkv_bias=bias, o_bias=bias,
                                           names=("q_proj", "k_proj", "v_proj", "out_proj"))
                             + (_lin("fc1", hidden, ffn, bias, "up"), _lin("fc2", ffn, hidden, bias, "down")))
    projections = proj * hidden if proj != hidden else 0
    final_norm = _norm(norm, hidden) if c.flag("do_layer_norm_before") and not c.flag("_remove_final_layer_norm") else 0
    return _decoder(c, head, num_labels, hidden=hidden, vocab=vocab, tie=tie, blocks=(block,),
                    embedding=vocab * proj + (n_pos + _OPT_POSITION_OFFSET) * hidden + projections,
                    final=final_norm + projections, width=proj, max_pos=n_pos)


_FALCON_DEFAULTS = dict(vocab_size=65024, num_attention_heads=71, num_kv_heads=None, alibi=False,
                        new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
                        ffn_hidden_size=None, num_ln_in_parallel_attn=None, tie_word_embeddings=True,
                        max_position_embeddings=2048, activation="gelu")


def _parse_falcon(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """Falcon (``modeling_falcon.py``): one ``query_key_value`` projection whose width depends on the
    attention layout (new decoder architecture: grouped kv heads; multi-query: one kv head; else full
    MHA), ``dense``, ``dense_h_to_4h`` / ``dense_4h_to_h``, all biased only when ``bias``; one LayerNorm
    before the parallel attention+MLP, two (``ln_attn``, ``ln_mlp``) in the new architecture, two in the
    sequential layout. Alibi only changes the position scheme, never a parameter."""
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=True)
    head_dim = hidden // heads
    kv_cfg = c.opt_int("num_kv_heads") or heads
    new_arch = c.flag("new_decoder_architecture")
    multi_query = c.flag("multi_query")
    parallel = c.flag("parallel_attn")
    bias = c.flag("bias")
    ffn = c.opt_int("ffn_hidden_size") or 4 * hidden
    if new_arch:
        qkv_out, kv = (2 * kv_cfg + heads) * head_dim, kv_cfg
    elif multi_query:
        qkv_out, kv = hidden + 2 * head_dim, 1
    else:
        qkv_out, kv = 3 * hidden, heads
    n_ln = c.opt_int("num_ln_in_parallel_attn")
    if n_ln is None and new_arch:
        n_ln = 2
    norms = 2 if not parallel or n_ln == 2 else 1
    tie = c.flag("tie_word_embeddings")
    attention = Attention(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, v_head_dim=head_dim)
    block = _plain_mlp_block(c, n_layers, attention, hidden=hidden, inter=ffn, act_key="activation", norms=norms,
                             parallel=parallel or new_arch, linears=(
                                 _lin("query_key_value", hidden, qkv_out, bias, "qkv"),
                                 _lin("dense", hidden, hidden, bias, "o"),
                                 _lin("dense_h_to_4h", hidden, ffn, bias, "up"),
                                 _lin("dense_4h_to_h", ffn, hidden, bias, "down"),
                             ))
    return _decoder(c, head, num_labels, hidden=hidden, vocab=vocab, tie=tie, blocks=(block,),
                    embedding=vocab * hidden, final=_norm("layer", hidden))


# --------------------------------------------------------------------------------------------------
# Encoders: BERT, RoBERTa, DistilBERT
# --------------------------------------------------------------------------------------------------

_BERT_DEFAULTS = dict(vocab_size=30522, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=512, type_vocab_size=2, tie_word_embeddings=True, hidden_act="gelu")
_ROBERTA_DEFAULTS = dict(_BERT_DEFAULTS, vocab_size=50265)
_DISTILBERT_DEFAULTS = dict(vocab_size=30522, max_position_embeddings=512, n_heads=12, hidden_dim=3072,
                            tie_word_embeddings=True, activation="gelu")


def _encoder_head(family: str, head: str, *, hidden: int, vocab: int, tie: bool, num_labels: int) -> int:
    """Heads of the encoder families.

    masked LM: a transform (dense hidden x hidden + bias, LayerNorm), the vocab decoder (tied to the
    word embeddings unless ``tie_word_embeddings`` is false) and its vocab-sized bias. BERT and RoBERTa
    tie ``decoder.bias`` to the head's own ``bias`` only together with the weights (transformers 5
    ``_tied_weights_keys``): untied, both biases exist;
    sequence classification: BERT a pooler (dense + tanh) and ``classifier``; RoBERTa a ``classifier``
    with ``dense`` and ``out_proj``; DistilBERT ``pre_classifier`` and ``classifier``. All biased.
    base model: BERT and RoBERTa build a pooler by default, DistilBERT has none.
    """
    dense = hidden * hidden + hidden
    if head == "masked_lm":
        untied = 0 if tie else vocab * hidden + (vocab if family in ("bert", "roberta") else 0)
        return dense + _norm("layer", hidden) + vocab + untied
    if head == "seq_cls":
        return dense + hidden * num_labels + num_labels
    return dense if family in ("bert", "roberta") else 0


def _encoder(c: _Config, family: str, head: str, num_labels: int, *, hidden: int, n_layers: int, vocab: int,
             heads: int, inter: int, act_key: str, names: tuple[str, str, str, str, str, str],
             n_pos: int, n_types: int = 0) -> _Parsed:
    """A BERT-shaped encoder: ``n_layers`` post-norm layers of biased q/k/v/o and up/down projections
    (``names``, in that order), an ungated MLP (activation: config key ``act_key``) and two LayerNorms;
    word, ``n_pos`` position and ``n_types`` token-type embedding rows plus an embedding LayerNorm; no
    final norm; the head of :func:`_encoder_head`."""
    q, k, v, o, up, down = names
    tie = c.flag("tie_word_embeddings")
    block = _plain_mlp_block(c, n_layers, _mha(heads, hidden), hidden=hidden, inter=inter, act_key=act_key,
                             linears=_qkvo(hidden, heads, heads, hidden // heads, qkv_bias=True, o_bias=True,
                                           names=(q, k, v, o))
                             + (_lin(up, hidden, inter, True, "up"), _lin(down, inter, hidden, True, "down")))
    return _Parsed(hidden=hidden, vocab=vocab, blocks=(block,), layer_blocks=(0,) * n_layers,
                   embedding=(vocab + n_pos + n_types) * hidden + _norm("layer", hidden), final=0,
                   head=_encoder_head(family, head, hidden=hidden, vocab=vocab, tie=tie, num_labels=num_labels),
                   tie=tie, max_pos=n_pos)


def _parse_bert(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """BERT and RoBERTa (``modeling_bert.py``, ``modeling_roberta.py``): post-norm encoder layers with
    ``query``/``key``/``value``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense`` (all
    biased) and two LayerNorms; word, position and token-type embeddings plus an embedding LayerNorm."""
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=True)
    inter = c.int("intermediate_size")
    n_pos = c.int("max_position_embeddings")
    n_types = c.int("type_vocab_size", minimum=0)
    return _encoder(c, family, head, num_labels, hidden=hidden, n_layers=n_layers, vocab=vocab, heads=heads,
                    inter=inter, act_key="hidden_act", names=("query", "key", "value", "dense", "dense", "dense"),
                    n_pos=n_pos, n_types=n_types)


def _parse_distilbert(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """DistilBERT (``modeling_distilbert.py``): ``q_lin``/``k_lin``/``v_lin``/``out_lin``, ``ffn.lin1``/``lin2``,
    ``sa_layer_norm`` and ``output_layer_norm``; word and position embeddings (an ``nn.Embedding`` even with
    ``sinusoidal_pos_embds``) plus a LayerNorm; no token types."""
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=True)
    inter = c.int("hidden_dim")
    n_pos = c.int("max_position_embeddings")
    return _encoder(c, family, head, num_labels, hidden=hidden, n_layers=n_layers, vocab=vocab, heads=heads,
                    inter=inter, act_key="activation", names=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
                    n_pos=n_pos)


# --------------------------------------------------------------------------------------------------
# Granite 3.x (dense and MoE), gpt-oss, Llama 4 (text)
# --------------------------------------------------------------------------------------------------

_GRANITE_DEFAULTS = dict(_LLAMA_LIKE_DEFAULTS["llama"])
"""transformers 5.17 ``configuration_granite.py`` defaults for the keys that change a count: Llama's, all of them."""

_GRANITEMOE_DEFAULTS = {**{k: v for k, v in _GRANITE_DEFAULTS.items() if k != "mlp_bias"},
                        "num_local_experts": 8, "num_experts_per_tok": 2}
"""transformers 5.17 ``configuration_granitemoe.py`` defaults for the keys that change a count: Granite's
(no ``mlp_bias``: every layer is MoE) and the experts'."""


def _parse_granite(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """Granite 3.x dense (``modeling_granite.py``, 5.17): the Llama layer exactly (``q/k/v/o_proj`` biased
    with ``attention_bias``, ``gate/up/down_proj`` with ``mlp_bias``, two RMSNorms); its embedding, residual,
    attention and logit multipliers are scalars, not parameters."""
    return _parse_llama_like(c, "llama", head, num_labels)


def _parse_granitemoe(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """Granite 3.x MoE (``modeling_granitemoe.py``, 5.17): Llama attention (``attention_bias``) and, in
    every layer, ``block_sparse_moe`` with a ``router`` (plain (E, hidden) weight) and fused experts
    ``gate_up_proj`` (E, 2 * inter, hidden) / ``down_proj`` (E, hidden, inter): Mixtral's shapes with the
    router named ``router``. No sliding window."""
    parsed = _parse_llama_like(_Config(dict(c.raw, sliding_window=None), c.defaults), "mixtral", head, num_labels)
    bias = c.flag("attention_bias")

    def fix(lin: Linear) -> Linear:
        if lin.role == "router":
            return replace(lin, name="router")
        if lin.role in ("q", "k", "v", "o"):
            return replace(lin, bias=bias)
        return lin

    parsed.blocks = tuple(replace(b, linears=tuple(fix(lin) for lin in b.linears)) for b in parsed.blocks)
    return parsed


_GPT_OSS_DEFAULTS = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                         num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
                         num_experts_per_tok=4, sliding_window=128, attention_bias=True,
                         tie_word_embeddings=False, max_position_embeddings=131072, hidden_act="silu")
"""transformers 5.17 ``configuration_gpt_oss.py`` defaults for the keys that change a count."""


def _parse_gpt_oss(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """gpt-oss (``modeling_gpt_oss.py``, 5.17).

    Attention: ``q/k/v/o_proj`` biased with ``attention_bias`` (default true) and one learned sink logit
    per head (``sinks``, ``num_attention_heads`` values); sliding-window layers (window
    ``sliding_window``) alternate with global ones. MoE in every layer: ``mlp.router`` holds a plain
    (E, hidden) weight and an (E,) bias; ``mlp.experts`` holds ``gate_up_proj`` (E, hidden, 2 * inter)
    with ``gate_up_proj_bias`` (E, 2 * inter) and ``down_proj`` (E, inter, hidden) with ``down_proj_bias``
    (E, hidden); no shared expert. Two RMSNorms per layer, untied LM head by default. The published
    checkpoints store the expert weights in MXFP4; that is the checkpoint's format, not a parameter count.
    """
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=False)
    kv = _kv_heads(c, heads)
    head_dim = _head_dim(c, hidden, heads)
    inter = c.int("intermediate_size")
    experts = c.int("num_local_experts", "num_experts")
    top_k = c.int("num_experts_per_tok", "experts_per_token")
    bias = c.flag("attention_bias")
    window = c.opt_int("sliding_window")
    tie = c.flag("tie_word_embeddings")
    lins = _qkvo(hidden, heads, kv, head_dim, qkv_bias=bias, o_bias=bias) + (
        _lin("router", hidden, experts, True, "router", is_module=False),
    ) + _fused_experts(hidden, inter, experts, bias=True)
    moe = MoE(num_experts=experts, top_k=top_k, expert_intermediate_size=inter)

    def make(sliding: Hashable, count: int) -> Block:
        return Block(
            count=count,
            attention=Attention(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, v_head_dim=head_dim,
                                sliding_window=window if sliding else None, sinks=True),
            mlp=None, moe=moe, norm="rms", linears=lins,
            other_params=2 * _norm("rms", hidden) + heads,  # two RMSNorms, the sinks
        )

    blocks, layer_blocks = _assemble(list(_sliding_kinds(c, family, n_layers)), make)
    return _decoder(c, head, num_labels, hidden=hidden, vocab=vocab, tie=tie, blocks=blocks, layer_blocks=layer_blocks,
                    embedding=vocab * hidden, final=_norm("rms", hidden))


_LLAMA4_TEXT_DEFAULTS = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                             intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
                             num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
                             interleave_moe_layer_step=1, no_rope_layer_interval=4, attention_chunk_size=8192,
                             attention_bias=False, tie_word_embeddings=False, max_position_embeddings=131072,
                             hidden_act="silu")
"""transformers 5.17 ``Llama4TextConfig`` defaults for the keys that change a count or the cache."""


def _llama4_layers(c: _Config, n_layers: int) -> tuple[list[bool], list[bool], list[bool]]:
    """Per layer: MoE?, RoPE?, chunked attention? (``Llama4TextConfig.__post_init__``, 5.17).

    ``moe_layers`` defaults to every ``interleave_moe_layer_step``-th layer (step 1: all); ``no_rope_layers``
    (1 = the layer uses RoPE) defaults to all but every ``no_rope_layer_interval``-th; ``layer_types``
    defaults to chunked attention on RoPE layers and global attention on NoPE layers."""
    moe_layers = c.raw.get("moe_layers")
    if moe_layers is None:
        step = c.int("interleave_moe_layer_step")
        moe_layers = list(range(step - 1, n_layers, step))
    if not isinstance(moe_layers, list) or not all(isinstance(i, int) for i in moe_layers):
        raise ConfigError("config.json: moe_layers must be a list of layer indices")
    no_rope = c.raw.get("no_rope_layers")
    if not no_rope:
        interval = c.int("no_rope_layer_interval")
        no_rope = [int((i + 1) % interval != 0) for i in range(n_layers)]
    if not isinstance(no_rope, list) or len(no_rope) != n_layers:
        raise ConfigError(f"config.json: no_rope_layers must be a list of {n_layers} 0/1 flags (one per layer)")
    types = _layer_types(c, n_layers)
    if types is None:
        types = ["chunked_attention" if r else "full_attention" for r in no_rope]
    chunk = c.opt_int("attention_chunk_size")
    return ([i in moe_layers for i in range(n_layers)], [bool(r) for r in no_rope],
            [t == "chunked_attention" and chunk is not None for t in types])


def _parse_llama4_text(c: _Config, family: str, head: str, num_labels: int) -> _Parsed:
    """Llama 4 text model (``modeling_llama4.py``, 5.17): ``Llama4ForCausalLM`` over ``text_config``.

    Attention: ``q/k/v/o_proj`` (biased with ``attention_bias``); the qk L2 norm has no weight; NoPE layers
    (every ``no_rope_layer_interval``-th) attend globally, the others in chunks of ``attention_chunk_size``.
    MoE layers (``moe_layers``): ``feed_forward.router`` (an ``nn.Linear`` hidden -> E, no bias),
    ``experts.gate_up_proj`` (E, hidden, 2 * inter) and ``experts.down_proj`` (E, inter, hidden) as
    plain parameters, and a ``shared_expert`` MLP of ``intermediate_size``; dense layers: an MLP of
    ``intermediate_size_mlp``. Two RMSNorms per layer; untied LM head by default.
    """
    hidden, n_layers, vocab = _sizes(c)
    heads = _heads(c, hidden, divides=False)
    kv = _kv_heads(c, heads)
    head_dim = _head_dim(c, hidden, heads)
    inter = c.int("intermediate_size")
    inter_mlp = c.int("intermediate_size_mlp")
    experts = c.int("num_local_experts", "num_experts")
    top_k = c.int("num_experts_per_tok")
    bias = c.flag("attention_bias")
    chunk = c.opt_int("attention_chunk_size")
    tie = c.flag("tie_word_embeddings")
    qk_norm = c.flag("use_qk_norm", default=True)
    act = str(c.get("hidden_act"))
    attn_lins = _qkvo(hidden, heads, kv, head_dim, qkv_bias=bias, o_bias=bias)
    moe = MoE(num_experts=experts, top_k=top_k, expert_intermediate_size=inter, num_shared_experts=1,
              shared_intermediate_size=inter, all_experts=True)
    moe_lins = ((_lin("router", hidden, experts, False, "router"),) + _fused_experts(hidden, inter, experts)
                + _gated_mlp(hidden, inter, role_prefix="shared_"))
    is_moe, rope, chunked = _llama4_layers(c, n_layers)

    def make(kind: Hashable, count: int) -> Block:
        layer_moe, layer_rope, layer_chunked = kind  # type: ignore[misc]
        return Block(
            count=count,
            attention=Attention(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, v_head_dim=head_dim,
                                sliding_window=chunk if layer_chunked else None, chunked=layer_chunked,
                                rope=layer_rope, qk_norm=qk_norm and layer_rope),
            mlp=None if layer_moe else MLP(intermediate_size=inter_mlp, gated=True, activation=act),
            moe=moe if layer_moe else None, norm="rms",
            linears=attn_lins + (moe_lins if layer_moe else _gated_mlp(hidden, inter_mlp)),
            other_params=2 * _norm("rms", hidden),  # the L2 qk norm has no weight
        )

    blocks, layer_blocks = _assemble(list(zip(is_moe, rope, chunked, strict=True)), make)
    return _decoder(c, head, num_labels, hidden=hidden, vocab=vocab, tie=tie, blocks=blocks, layer_blocks=layer_blocks,
                    embedding=vocab * hidden, final=_norm("rms", hidden))


def _checkpoint_quantization(config: dict[str, Any]) -> str:
    """``quantization_config.quant_method`` of a quantized checkpoint's config (``mxfp4`` for gpt-oss,
    ``awq``, ``gptq``, ``fp8``, ``compressed-tensors`` ...), with ``-int8`` for 8-bit GPTQ; empty when none."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or not isinstance(q.get("quant_method"), str):
        return ""
    method = q["quant_method"].lower()
    if method == "gptq" and q.get("bits") == 8:
        return "gptq-int8"
    return method


# --------------------------------------------------------------------------------------------------
# The family table and the entry point
# --------------------------------------------------------------------------------------------------

_DECODER_HEADS = ("causal_lm", "seq_cls", "base")
_ENCODER_HEADS = ("masked_lm", "seq_cls", "base")


class _Family:
    __slots__ = ("parse", "defaults", "prefix", "heads", "classes")

    def __init__(self, parse, defaults, prefix, heads=_DECODER_HEADS, classes=None):
        self.parse = parse
        self.defaults = defaults
        self.prefix = prefix
        """transformers class-name prefix (``Llama`` -> ``LlamaForCausalLM``)."""
        self.heads = heads
        self.classes = classes or {}
        """Class names that do not follow ``<prefix><suffix>``."""


_LLAMA_LIKE_PREFIXES = dict(
    llama="Llama", mistral="Mistral", mixtral="Mixtral", qwen2="Qwen2", qwen3="Qwen3", qwen2_moe="Qwen2Moe",
    qwen3_moe="Qwen3Moe", gemma="Gemma", gemma2="Gemma2", gemma3_text="Gemma3", phi3="Phi3", olmo="Olmo",
    olmo2="Olmo2", olmoe="Olmoe", deepseek_v2="DeepseekV2", deepseek_v3="DeepseekV3",
)
"""transformers class-name prefix of each family :func:`_parse_llama_like` reads."""
_LLAMA_LIKE_CLASSES = {"gemma3_text": {"base": "Gemma3TextModel", "seq_cls": "Gemma3TextForSequenceClassification"}}
"""Class names of those families that do not follow ``<prefix><suffix>``."""

_FAMILIES: dict[str, _Family] = {
    **{family: _Family(_parse_llama_like, _LLAMA_LIKE_DEFAULTS[family], prefix, classes=_LLAMA_LIKE_CLASSES.get(family))
       for family, prefix in _LLAMA_LIKE_PREFIXES.items()},
    "gpt2": _Family(_parse_gpt2, _GPT2_DEFAULTS, "GPT2", classes={"causal_lm": "GPT2LMHeadModel"}),
    "gpt_neox": _Family(_parse_gpt_neox, _GPT_NEOX_DEFAULTS, "GPTNeoX"),
    "opt": _Family(_parse_opt, _OPT_DEFAULTS, "OPT"),
    "falcon": _Family(_parse_falcon, _FALCON_DEFAULTS, "Falcon"),
    "bert": _Family(_parse_bert, _BERT_DEFAULTS, "Bert", heads=_ENCODER_HEADS),
    "roberta": _Family(_parse_bert, _ROBERTA_DEFAULTS, "Roberta", heads=_ENCODER_HEADS),
    "distilbert": _Family(_parse_distilbert, _DISTILBERT_DEFAULTS, "DistilBert", heads=_ENCODER_HEADS),
    "granite": _Family(_parse_granite, _GRANITE_DEFAULTS, "Granite"),
    "granitemoe": _Family(_parse_granitemoe, _GRANITEMOE_DEFAULTS, "GraniteMoe"),
    "gpt_oss": _Family(_parse_gpt_oss, _GPT_OSS_DEFAULTS, "GptOss"),
    "llama4_text": _Family(_parse_llama4_text, _LLAMA4_TEXT_DEFAULTS, "Llama4",
                           classes={"base": "Llama4TextModel"}, heads=("causal_lm", "base")),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted({*_FAMILIES, "gemma3", "llama4"}))
"""``model_type`` values :func:`spec_from_config` understands (``gemma3``, ``llama4``: the text part of the
multimodal config)."""

_HEAD_SUFFIXES = (
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForConditionalGeneration", "causal_lm"),  # multimodal: memfit counts the text model
    ("ForSequenceClassification", "seq_cls"),
    ("ForMaskedLM", "masked_lm"),
    ("Model", "base"),
)
_HEAD_SUFFIX_OF = {"causal_lm": "ForCausalLM", "seq_cls": "ForSequenceClassification",
                   "masked_lm": "ForMaskedLM", "base": "Model"}


def _head_of(config: dict[str, Any], family: _Family) -> str:
    archs = config.get("architectures")
    if not archs:
        return family.heads[0]
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ConfigError("config.json: architectures must be a list of class names, e.g. [\"LlamaForCausalLM\"]")
    arch = archs[0]
    for suffix, head in _HEAD_SUFFIXES:
        if arch.endswith(suffix):
            if head not in family.heads:
                break
            return head
    supported = ", ".join(family.prefix + _HEAD_SUFFIX_OF[h] for h in family.heads)
    raise ConfigError(f"architecture {arch!r} is not supported; memfit counts {supported}")


def _text_part(config: dict[str, Any]) -> dict[str, Any]:
    """The config to count: the config itself, or the ``text_config`` of a multimodal one (Gemma 3)."""
    model_type = config.get("model_type")
    text = config.get("text_config")
    if model_type in _FAMILIES or not isinstance(text, dict):
        return config
    text = dict(text)
    if model_type == "gemma3":
        text.setdefault("model_type", "gemma3_text")
    if model_type == "llama4":
        text.setdefault("model_type", "llama4_text")
    if not isinstance(text.get("model_type"), str) or text["model_type"] not in _FAMILIES:
        return config
    for key in ("torch_dtype", "dtype"):
        if key in config and key not in text:
            text[key] = config[key]
    return text


def spec_from_config(config: dict[str, Any], *, name: str, source: str = "") -> ModelSpec:
    """Build the :class:`ModelSpec` of a Hugging Face ``config.json`` (already parsed into a dict).

    Raises :class:`~memfit.errors.ConfigError` with a one-line reason when the config is malformed
    or its ``model_type`` is not one memfit counts.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"config.json must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError("config.json has no model_type; is this a transformers model config?")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type {brief(model_type)} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    is_multimodal = model_type not in _FAMILIES
    text = _text_part(config)
    if text is config and is_multimodal:
        raise ConfigError(f"config.json: model_type {model_type!r} needs a text_config with the text model's sizes")
    family_type = text["model_type"]
    family = _FAMILIES[family_type]
    head = "causal_lm" if is_multimodal else _head_of(text, family)
    c = _Config(text, family.defaults)
    num_labels = _num_labels(c)
    parsed: _Parsed = family.parse(c, family_type, head, num_labels)

    dtype = text.get("torch_dtype") or text.get("dtype") or "float32"
    if not isinstance(dtype, str):
        raise ConfigError(f"config.json: torch_dtype must be a string like \"bfloat16\", got {brief(dtype)}")
    return ModelSpec(
        name=name,
        model_type=family_type,
        architecture=family.classes.get(head, family.prefix + _HEAD_SUFFIX_OF[head]),
        head=head,
        hidden_size=parsed.hidden,
        vocab_size=parsed.vocab,
        num_layers=parsed.n_layers,
        blocks=parsed.blocks,
        embedding_params=parsed.embedding,
        final_params=parsed.final,
        head_params=parsed.head,
        tie_word_embeddings=parsed.tie,
        num_labels=num_labels,
        max_position_embeddings=parsed.max_pos,
        final_logit_softcapping=parsed.final_softcap,
        torch_dtype=dtype,
        source=source,
        layer_blocks=parsed.layer_blocks,
        checkpoint_quantization=_checkpoint_quantization(config),
        config=text,
        multimodal={k: v for k, v in config.items() if k != "text_config"} if is_multimodal else {},
    )
